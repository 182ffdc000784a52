"""Fault injection for tests: every place where a run directory is changed on disk calls
``fault_point(label)`` first.

With AVI_FAULT_LOG=<file> each label is appended to that file (to count a run's fault
points); with AVI_FAULT_KILL_AT=<n> the process SIGKILLs itself at its n-th fault point
(1-based), so tests can kill a real run at every write and rename in turn. Both unset (always,
outside tests): a dictionary lookup per call.
"""
from __future__ import annotations

import os
import signal

_count = 0


def fault_point(label: str) -> None:
    global _count
    log, kill_at = os.environ.get("AVI_FAULT_LOG"), os.environ.get("AVI_FAULT_KILL_AT")
    if log is None and kill_at is None:
        return
    _count += 1
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{_count} {label}\n")
    if kill_at is not None and _count == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Start counting again (a test that runs several trainings in one process)."""
    global _count
    _count = 0
