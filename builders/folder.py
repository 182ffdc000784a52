"""Creating a folder whole or not at all (`avi import-davi --out DIR`).

The folder is filled under a temporary name beside it and renamed into place in one step, so
a full disk, a read-only folder or an interrupt leaves no half of it: on failure the
temporary folder, and any parent folder this call created, are removed again. rename(2)
replaces an empty folder of the target's name, and fails on one that is not empty.

The temporary folder is flock'ed by its writer until it is renamed (as builders.files locks a
temporary file): one under avi's exact temporary name that nobody holds a lock on was left by
an import killed outright (SIGKILL, power loss), and the next import into the same parent
removes it. A live import's folder is locked and left alone; a symbolic link, a file or any
other name is never touched, and nothing is removed through a link.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable

from .checkpoint import _fsync_dir
from .files import _flock
from .faults import fault_point

TEMP_PREFIX = ".avi-new-"
TEMPORARY = re.compile(r"^\.avi-new-[0-9a-f]{12}\.tmp$")      # _new_temporary's names only
DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def create_folder(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """fill(tmp) on a new temporary folder beside `target`, then rename it to `target`.
    Any OSError (or interrupt) on the way is raised after everything this call made is gone."""
    target = Path(target)
    made = _make_parents(target.parent)
    if not made:
        remove_dead_temporaries(target.parent)
    tmp: Path | None = None
    lock: int | None = None
    try:
        tmp, lock = _new_temporary(target.parent)
        fill(tmp)
        fault_point(f"rename {tmp.name} -> {target.name}")
        os.rename(tmp, target)
        tmp = None
        _fsync_dir(target.parent)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):
            try:
                os.rmdir(folder)
            except OSError:
                pass
        raise
    finally:
        if lock is not None:
            os.close(lock)           # the lock goes with the descriptor
    return target


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first) so they can be removed."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for f in reversed(missing):
            fault_point(f"mkdir {f.name}")
            os.mkdir(f)
            made.append(f)
    except BaseException:
        for f in reversed(made):
            try:
                os.rmdir(f)
            except OSError:
                pass
        raise
    return made


def _new_temporary(parent: Path) -> tuple[Path, int]:
    """A new empty folder in `parent` with a short hidden name (the target's own name may be
    255 bytes already), and a descriptor holding its lock. os.mkdir, not mkdtemp: the folder
    gets the umask's permissions, not 0700."""
    while True:
        tmp = parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}.tmp"
        try:
            fault_point(f"mkdir {tmp.name}")
            os.mkdir(tmp)
        except FileExistsError:
            continue
        try:
            fd = os.open(tmp, DIR_FLAGS)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _flock(fd, blocking=True)
        if os.fstat(fd).st_nlink > 0:   # a cleaner took it for dead before the lock was ours: again
            return tmp, fd
        os.close(fd)


def remove_dead_temporaries(parent: Path) -> list[Path]:
    """Remove the temporary folders of imports killed in `parent` (see the module's note)."""
    try:
        names = sorted(e.name for e in os.scandir(parent) if TEMPORARY.match(e.name))
    except OSError:
        return []
    return [parent / n for n in names if _remove_if_dead(parent / n)]


def _remove_if_dead(path: Path) -> bool:
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False                        # a link or a file: not a folder avi made
        fd = os.open(path, DIR_FLAGS)           # O_NOFOLLOW: a link swapped in since is not opened
    except OSError:
        return False
    try:
        if not _flock(fd, blocking=False):
            return False                        # a live import holds it
        if os.fstat(fd).st_ino != os.lstat(path).st_ino:
            return False
        # rmtree works through descriptors and follows no links below (avoids_symlink_attacks),
        # and refuses a top that is a link. The lock is held until everything is gone.
        shutil.rmtree(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
