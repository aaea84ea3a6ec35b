"""Whether a process still runs: files named after the process that wrote them (spill files, kernel builds) are
stale once it has gone."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True while process ``pid`` exists (also when it is another user's, which ``kill`` may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
