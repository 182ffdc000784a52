"""Writing a file so that a reader, or a run resumed after a kill, never sees half of it, and
cleaning up after the writers that were killed.

Every write goes through a temporary file .<name>.<kind>.<pid> beside its target, created
exclusively (never through a symbolic link planted under that name) and flock'ed by its writer
until it is renamed into place: a file with such a name that nobody holds a lock on belongs to
a writer that died, and the next writer of that target (or the next `avi train`, `avi eval`)
removes it. Nothing else is ever removed: a user's own `notes.tmp` is not avi's.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Callable

from .faults import fault_point

# .<target>.tmp.<pid> and .<target>.prev.tmp.<pid> (checkpoint.save_checkpoint's last.prev.pt)
TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?:prev\.)?tmp\.\d+$")
OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """The temporary file a write of ``path`` goes through: .<name>.<kind>.<pid>, hidden and
    unique per process."""
    return path.with_name(f".{path.name}.{kind}.{os.getpid()}")


def temporary_of(target: str) -> Callable[[str], bool]:
    """A test of a file name: is it a temporary of a write of ``target`` (a file name)?"""
    return lambda name: (m := TEMPORARY.match(name)) is not None and m["target"] == target


def any_temporary(suffix: str = "") -> Callable[[str], bool]:
    """A test of a file name: a temporary of avi of a target ending in ``suffix``."""
    return lambda name: (m := TEMPORARY.match(name)) is not None and m["target"].endswith(suffix)


def _flock(fd: int, blocking: bool) -> bool:
    try:
        import fcntl
    except ImportError:             # not POSIX: no locks, so nothing is known dead either
        return not blocking
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def create_temporary(path: Path, kind: str = "tmp") -> tuple[Path, int]:
    """Create ``path``'s temporary file for writing and lock it -> (its path, an open descriptor).
    A file already under that name (a dead process with this pid, or a planted link) is
    removed first, never written through."""
    tmp = temporary_name(path, kind)
    for _ in range(3):
        remove_if_dead(tmp)
        fd = os.open(tmp, OPEN_FLAGS, 0o666)
        _flock(fd, blocking=True)
        if os.fstat(fd).st_nlink > 0:      # a cleaner removed it before the lock was ours: again
            return tmp, fd
        os.close(fd)
    raise OSError(f"cannot create {tmp}: it keeps disappearing")


def remove_if_dead(path: Path) -> bool:
    """Remove a temporary file whose writer died (no lock held on it), or a link or other
    entry under a temporary name (avi writes only regular files). True if removed."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return False
        try:
            if not _flock(fd, blocking=False):
                return False                           # a live writer holds it
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except OSError:
            return False
        finally:
            os.close(fd)        # the lock goes with it; a writer that opens it now sees nlink 0
        if not same:
            return False
    elif stat.S_ISDIR(st.st_mode):
        return False
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def remove_dead_temporaries(folder: Path, match: Callable[[str], bool] = any_temporary()) -> list[Path]:
    """Remove the temporaries of killed writers in ``folder`` whose names ``match``. A folder
    that is a symbolic link is left alone: the files it points to are not the run's."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return []
    try:
        names = sorted(e.name for e in os.scandir(folder) if match(e.name))
    except OSError:
        return []
    return [folder / n for n in names if remove_if_dead(folder / n)]


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write encoded bytes to ``path`` through a temporary renamed into place, removed when the
    write fails; the temporaries of earlier writers of ``path`` that died are removed first.
    Callers encode first, so a full disk or a read-only folder is a plain OSError
    (matplotlib's PDF writer and safetensors' writer turn it into their own exceptions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path.parent, temporary_of(path.name))
    fault_point(f"write {temporary_name(path).name}")
    tmp, fd = create_temporary(path)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
        fault_point(f"rename {tmp.name} -> {path.name}")
        os.replace(tmp, path)
    finally:
        os.close(fd)
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def linked_entries(folder: Path, names) -> list[str]:
    """"NAME -> TARGET" for each of ``names`` in ``folder`` that is a symbolic link: a run
    directory's entries that avi writes into (samples/, checkpoints/, metrics.jsonl, the lock)
    must be its own, or a write would land wherever the link points."""
    found = []
    for name in names:
        p = Path(folder) / name
        if p.is_symlink():
            try:
                target = os.readlink(p)
            except OSError:
                target = "?"
            found.append(f"{name} -> {target}")
    return found


def open_for_append(path: Path):
    """A text file opened to append, never through a symbolic link (OSError ELOOP) and only a
    regular file (a FIFO would block, /dev/null would swallow the records): OSError otherwise."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
                 | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(0, "not a regular file", str(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")
