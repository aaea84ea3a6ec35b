"""Process-wide helpers the other packages share: ``user_warnings`` (a warning that points at the user's
line, once per cause) and ``pids`` (whether the process that named a file still runs)."""
