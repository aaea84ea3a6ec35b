"""Paging telemetry: bytes moved, time stalled and major page faults, per step and in total."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field


def major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


@dataclass
class Traffic:
    """What a paged placement moved in the current step (``moved_bytes``, ``stall_s``), rolled by ``close_step``."""

    moved_bytes: int = 0
    stall_s: float = 0.0
    last: dict[str, float] = field(default_factory=lambda: {"moved_bytes": 0, "stall_s": 0.0, "major_faults": 0})
    totals: dict[str, float] = field(default_factory=lambda: {"moved_bytes": 0, "stall_s": 0.0, "steps": 0})
    faults_before: int = field(default_factory=major_faults)

    def close_step(self) -> None:
        faults = major_faults()
        self.last = {"moved_bytes": self.moved_bytes, "stall_s": self.stall_s,
                     "major_faults": faults - self.faults_before}
        self.faults_before = faults
        self.totals["moved_bytes"] += self.moved_bytes
        self.totals["stall_s"] += self.stall_s
        self.totals["steps"] += 1
        self.moved_bytes, self.stall_s = 0, 0.0

    def report(self) -> dict[str, float]:
        """The last step's traffic and the totals (``Optimizer.paging_stats``'s keys)."""
        return {**self.last, "total_moved_bytes": self.totals["moved_bytes"],
                "total_stall_s": self.totals["stall_s"], "steps": self.totals["steps"]}
