"""Process utilities for the lock-recovery tests."""

from __future__ import annotations

import multiprocessing as mp


def dead_pid() -> int:
    """A pid that certainly existed and is now gone (a finished child we reaped). Starts a process."""
    proc = mp.get_context("spawn").Process(target=int)
    proc.start()
    proc.join()
    return proc.pid
