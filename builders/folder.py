"""Creating a folder whole or not at all (`avi import-davi --out DIR`).

The folder is filled under a temporary name beside it and renamed into place in one step, so
a full disk, a read-only folder or an interrupt leaves no half of it: on failure the
temporary folder, and any parent folder this call created, are removed again. rename(2)
replaces an empty folder of the target's name, and fails on one that is not empty.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from .checkpoint import _fsync_dir
from .faults import fault_point

TEMP_PREFIX = ".avi-new-"


def create_folder(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """fill(tmp) on a new temporary folder beside `target`, then rename it to `target`.
    Any OSError (or interrupt) on the way is raised after everything this call made is gone."""
    target = Path(target)
    made = _make_parents(target.parent)
    tmp: Path | None = None
    try:
        tmp = _new_temporary(target.parent)
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


def _new_temporary(parent: Path) -> Path:
    """A new empty folder in `parent` with a short hidden name (the target's own name may be
    255 bytes already). os.mkdir, not mkdtemp: the folder gets the umask's permissions, not 0700."""
    while True:
        tmp = parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}.tmp"
        try:
            fault_point(f"mkdir {tmp.name}")
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue
