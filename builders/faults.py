"""Fault injection for tests: every place where a run directory is changed on disk calls
``fault_point(label)`` first.

With AVI_FAULT_LOG=<file> each label is appended to that file (to count a run's fault
points); with AVI_FAULT_KILL_AT=<n> the process SIGKILLs itself at its n-th fault point
(1-based), so tests can kill a real run at every write and rename in turn; with
AVI_FAULT_RAISE_AT=<n>:<ERRNO name> (e.g. 7:EROFS) it raises that OSError there instead (a
read-only folder, a full disk). All unset (always, outside tests): dictionary lookups per call.
"""
from __future__ import annotations

import errno
import os
import signal

_count = 0


def fault_point(label: str) -> None:
    global _count
    log, kill_at = os.environ.get("AVI_FAULT_LOG"), os.environ.get("AVI_FAULT_KILL_AT")
    raise_at = os.environ.get("AVI_FAULT_RAISE_AT")
    if log is None and kill_at is None and raise_at is None:
        return
    _count += 1
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{_count} {label}\n")
    if kill_at is not None and _count == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
    if raise_at is not None and _count == int(raise_at.split(":")[0]):
        code = getattr(errno, raise_at.split(":")[1])
        raise OSError(code, os.strerror(code), label.split()[-1])


def reset() -> None:
    """Start counting again (a test that runs several trainings in one process)."""
    global _count
    _count = 0
