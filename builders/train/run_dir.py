"""The run directory of `avi train`: one writer at a time, clean start, plain-language OS errors.

Layout (README.md "A run directory"): spec.yaml, metrics.jsonl, samples/, checkpoints/, and
.avi-train.lock, which the training process holds (an flock, so the operating system
releases it when the process dies, even by SIGKILL) and which names that process. Temporary
files of writers that were killed are removed when the next writer takes the lock.
"""
from __future__ import annotations

import errno
import json
import math
import os
import socket
import stat
import time
from pathlib import Path

from avi_spec.yaml_io import read_text_file

from ..checkpoint import remove_stale_temporaries
from ..files import linked_entries, write_atomically
from ..faults import fault_point

LOCK_NAME = ".avi-train.lock"
# What `avi train` writes into or through: none of them may be a symbolic link
WRITTEN_ENTRIES = (LOCK_NAME, "samples", "checkpoints", "metrics.jsonl", "tb")
MAX_METRICS_BYTES = 1 << 30       # a 1,000,000-step run logged every step is about 250 MB


class TrainingError(Exception):
    """A refusal or a failed run caused by the user's input or data (exit 2 in the CLI)."""


class DivergedError(TrainingError):
    """Training stopped after train.max_skipped consecutive non-finite steps: the input was
    valid, the run failed (exit 1 in the CLI); checkpoints/last.pt keeps the last good state."""


_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file grew over the size limit (disk or ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "a name is too long (a path component over 255 bytes or a path over "
                        "PATH_MAX)",
    errno.ENOTDIR: "a component of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.ELOOP: "it is a symbolic link (avi writes only its own files inside the run directory)",
    errno.ENXIO: "it is a FIFO or device with no reader, not a regular file",
}


def os_error_text(e: OSError) -> str:
    """What an OSError means, in words ("the disk is full"), without a traceback."""
    return _REASONS.get(e.errno, e.strerror or str(e))


def write_error(e: OSError, path: Path, saved: str) -> TrainingError:
    """The error of a run that could not write ``path``: what, where, what is kept, what to do."""
    return TrainingError(f"cannot write {e.filename or path}: {os_error_text(e)}. {saved} "
                         f"Free space or fix the permissions, then continue with --resume.")


class RunLock:
    """One `avi train` per run directory. acquire() raises TrainingError naming the holder."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:                     # not POSIX: no locking available
            return self
        # O_NOFOLLOW: a lock that is a link would truncate the file it points to (or create one)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TrainingError(f"{self.path} is not a regular file (a FIFO or device); "
                                    f"remove it and train again")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except TrainingError:
            os.close(fd)
            raise
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise TrainingError(f"{self.path.parent} is being written by another `avi train` "
                                f"({holder}); wait for it to finish, stop it, or train into "
                                f"another --out") from None
        # The lock is ours; a previous holder that died left its text: replace it.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode() + b"\n", 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)                   # closing the descriptor releases the flock
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"process {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def check_out_dir(out_dir: Path) -> None:
    """Refuse an --out that cannot become a run directory, before any work is done."""
    for part in out_dir.absolute().parts:
        if len(part.encode()) > 255:
            raise TrainingError(f"--out {str(out_dir)[:80]}...: a path component is "
                                f"{len(part.encode())} bytes long (at most 255); use a shorter name")
    if len(str(out_dir.absolute()).encode()) >= 4000:
        raise TrainingError(f"--out {str(out_dir)[:80]}... is {len(str(out_dir.absolute()))} characters "
                            f"long (the system allows about 4096); use a shorter path")
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise TrainingError(f"--out {out_dir}: {folder} is a file, not a folder; give a folder "
                                f"for the run")
        if folder.exists():
            break
    links = linked_entries(out_dir, WRITTEN_ENTRIES) if out_dir.is_dir() else []
    if links:
        raise TrainingError(f"{out_dir}: {', '.join(links)} is a symbolic link; avi writes, "
                            f"truncates and cleans up only inside the run directory, so it would "
                            f"change the files it points to. Remove the link (or put a plain "
                            f"file or folder in its place) and train again")


def open_run_dir(out_dir: Path) -> RunLock:
    """Create the run directory (and samples/, checkpoints/), take its lock, and remove the
    temporary files of killed writers. Raises TrainingError."""
    check_out_dir(out_dir)
    try:
        fault_point("mkdir run directory")
        for folder in (out_dir, out_dir / "samples", out_dir / "checkpoints"):
            folder.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out_dir).acquire()
    except OSError as e:
        raise TrainingError(f"cannot create the run directory {e.filename or out_dir}: "
                            f"{os_error_text(e)}; choose another --out") from None
    for folder in (out_dir, out_dir / "samples", out_dir / "checkpoints"):
        remove_stale_temporaries(folder)
    return lock


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` is old or new, never partial (spec.yaml, metrics.jsonl when trimmed)."""
    write_atomically(path, text.encode("utf-8"))


def trim_metrics(path: Path, step: int, epoch: int | None = None) -> None:
    """Drop the records a killed run wrote after its last checkpoint: step records after
    ``step`` and epoch-end records of epochs from ``epoch`` on (the checkpoint says they are
    not finished). The resumed run writes them again, and metrics.jsonl must read as one
    uninterrupted run."""
    if not os.path.lexists(path):
        return
    try:
        text = read_text_file(path, MAX_METRICS_BYTES)
    except UnicodeDecodeError as e:
        raise TrainingError(f"{path} is not text (byte {e.start} is not UTF-8): not a metrics file "
                            f"of avi; move it aside and resume again") from None
    except ValueError as e:     # a FIFO, a device or too large
        raise TrainingError(f"{path} cannot be a metrics file of avi: {e}; move it aside and "
                            f"resume again") from None
    except OSError as e:
        why = "it is a folder" if isinstance(e, IsADirectoryError) else os_error_text(e)
        raise TrainingError(f"cannot read {path}: {why}; move it aside and resume again") from None
    kept = [line for line in text.splitlines(keepends=True)
            if line.strip() and _before(line, step, epoch)]
    if "".join(kept) != text:
        write_text_atomic(path, "".join(kept))


def _before(line: str, step: int, epoch: int | None) -> bool:
    try:
        rec = json.loads(line)
        if not line.endswith("\n") or not isinstance(rec, dict):
            return False                   # a half-written last line of a killed run
        if "test_nelbo" in rec and epoch is not None:
            return rec.get("epoch", math.inf) < epoch
        return rec.get("step", math.inf) <= step
    except (ValueError, TypeError, RecursionError):   # RecursionError: brackets nested too deep
        return False
