"""The decode cache of `dataset: folder`: one memory-mapped .npy per split (builders.data.folder).

Written atomically (a temporary file renamed into place), so a run killed while writing
leaves no half cache; a cache that cannot be read is decoded again. Where root is not
writable the cache goes under ~/.cache/avi/folders/<hash of root>/; where neither is, the
images are decoded and not cached.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .folder import CACHE_DIR, Options, listing_hash, settings_hash, user_cache_root


def _cache_dir(root: Path) -> Path:
    here = root / CACHE_DIR
    if os.access(root, os.W_OK) or here.is_dir():
        return here
    tag = hashlib.sha256(str(root.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return user_cache_root() / tag


def cache_path(root: Path, split: str, files: list[Path], opts: Options) -> Path:
    return _cache_dir(root) / f"{split}-{settings_hash(opts)}-{listing_hash(root, files, opts)}.npy"


def read_cache(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None                     # damaged: decode again (and overwrite it)
    return images if images.ndim == 4 else None


def write_cache(path: Path, images: np.ndarray) -> Path | None:
    """Save the split's cache and remove the stale ones of its split and settings; None when
    it cannot be written (the run goes on with the decoded images)."""
    split, settings = path.name.split("-")[:2]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{split}-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, images, allow_pickle=False)
            os.chmod(tmp, 0o644)                # mkstemp's 0600 would hide it from others
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for old in path.parent.glob(f"{split}-{settings}-*.npy"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        return None
    return path
