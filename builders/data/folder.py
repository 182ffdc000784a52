"""`dataset: folder`: the user's own images, decoded once into a memory-mapped cache.

Layout of ``data.root``:

    root/train/..., root/test/...     the split the user made (each may hold class sub-folders)
    root/<class>/..., or root/*.jpg   no split: every class sub-folder (or the flat folder) gives
                                      data.folder.test_fraction of its files, drawn with
                                      data.folder.split_seed, to the test split

Files are found recursively and read in sorted path order. Image files (JPEG, PNG, WebP, BMP,
TIFF) are turned upright by their EXIF orientation, reduced to 8 bits when they hold 16
(v * 255 / 65535, rounded), converted to the spec's channels and fitted to the spec's size
(``decode``); .npy arrays are taken as they are (one image, or a whole stacked split).
A file that cannot be read is named with the reason, all of them in one DatasetError.

The decoded split is saved as ``<root>/.avi_cache/<split>-<settings>-<files>.npy`` (or under
``~/.cache/avi/folders/`` when root is read-only) and read back memory-mapped. <settings>
hashes the decoding settings (size, channels, fit, split), <files> every file's relative path,
size and modification time too, so a changed, added or removed file makes a new cache and
the stale one of the same split and settings is removed (other settings keep theirs).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import DatasetError, check_grey_levels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SUFFIXES = IMAGE_SUFFIXES + (".npy",)
CACHE_DIR = ".avi_cache"
CACHE_VERSION = 1
MAX_SHOWN = 10                      # bad files named in one message


@dataclass(frozen=True)
class Options:
    """How image files become arrays: data.image and data.folder of a spec (None: as stored)."""
    size: int | None = None
    channels: int | None = None
    fit: str = "exact"
    convert: bool = False
    test_fraction: float = 0.1
    split_seed: int = 0
    cache: bool = False

    @classmethod
    def of(cls, data) -> "Options":
        f = data.folder
        return cls(data.image.size, data.image.channels, f.fit, f.convert, f.test_fraction,
                   f.split_seed, f.cache)


# ------------------------------------------------------------------------------- files

def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                  and CACHE_DIR not in p.relative_to(folder).parts)


def split_files(root: Path, split: str, opts: Options) -> list[Path]:
    """The files of `split`: root/<split>/ when the user made the split, else a seeded draw."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise DatasetError(f"image folder {what}: {root} (data.root); it should hold the images, "
                           f"in train/ and test/ or not; set data.root (or --set data.root=DIR)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        files = _files(root / split)
        where = root / split
    else:
        files = _drawn(root, split, opts)
        where = root
    if not files:
        raise DatasetError(f"no images for the {split} split in {where}: expected image files "
                           f"({', '.join(SUFFIXES)}) in {root}/train/ and {root}/test/, or in "
                           f"{root} itself (a test split is then drawn); set data.root")
    return files


def _drawn(root: Path, split: str, opts: Options) -> list[Path]:
    """Per class sub-folder (the top-level folder of a file), a seeded share for test."""
    if not root.is_dir():
        return []
    by_class: dict[str, list[Path]] = {}
    for p in _files(root):
        parts = p.relative_to(root).parts
        by_class.setdefault(parts[0] if len(parts) > 1 else "", []).append(p)
    rng = np.random.default_rng(opts.split_seed)
    out = []
    for name in sorted(by_class):
        files = by_class[name]
        n_test = min(len(files) - 1, max(1, round(opts.test_fraction * len(files)))) if len(files) > 1 else 0
        test = set(rng.permutation(len(files))[:n_test].tolist())
        out += [f for i, f in enumerate(files) if (i in test) == (split == "test")]
    return sorted(out)


# ------------------------------------------------------------------------------ decode

_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def decode(path: Path, opts: Options) -> np.ndarray:
    """One file -> [H, W] or [H, W, C] (uint8 for image files). Raises DatasetError."""
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)   # plain arrays only: no pickled objects
        except (ValueError, OSError, EOFError) as e:
            raise DatasetError(f"{path}: not a valid .npy array file ({e})") from None
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = _eight_bit(im, path)
            im = _colour(im, path, opts)
            im = _fit(im, path, opts)
            return np.asarray(im)
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: not a readable image ({e})") from None


def _eight_bit(im, path: Path):
    """16-bit (and 32-bit integer) grey levels -> 8 bits: v * 255 / 65535, rounded."""
    from PIL import Image
    if im.mode.startswith("I"):
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DatasetError(f"{path}: integer pixels outside 0..65535 (min {a.min()}, max "
                               f"{a.max()}); avi reads 8- and 16-bit images")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    if im.mode == "F":
        raise DatasetError(f"{path}: floating-point pixels; save it as an 8- or 16-bit image "
                           f"or as a .npy of grey levels in [0, 1]")
    return im


def _colour(im, path: Path, opts: Options):
    if opts.channels is None:                   # as stored: grey stays grey, the rest is RGB
        return im.convert("L" if im.mode in ("1", "L") else "RGB")
    want = _MODES[opts.channels]
    if im.mode == want:
        return im
    if not opts.convert and _channels(im) != opts.channels:
        raise DatasetError(f"{path}: {_channels(im)} channel(s) ({im.mode}), the spec says "
                           f"data.image.channels: {opts.channels}; set data.folder.convert: true")
    return im.convert(want)


def _channels(im) -> int:
    return {"1": 1, "L": 1, "LA": 2, "P": 3, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3}.get(im.mode, 3)


def _fit(im, path: Path, opts: Options):
    from PIL import Image, ImageOps
    if opts.size is None or im.size == (opts.size, opts.size):
        return im
    if opts.fit == "exact":
        raise DatasetError(f"{path}: {im.size[0]}x{im.size[1]} pixels, the spec says data.image.size: "
                           f"{opts.size}; set data.folder.fit: center_crop to resize and crop it")
    return ImageOps.fit(im, (opts.size, opts.size), method=Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------- a split

def stack(files: list[Path], arrays: list[np.ndarray], folder: Path) -> np.ndarray:
    """The arrays of a split's files -> [N, C, H, W]; one 4-d .npy (or 3-d of N images) is a
    whole stacked split."""
    for path, a in zip(files, arrays):
        if np.issubdtype(a.dtype, np.floating):
            check_grey_levels(a, str(path))
        elif a.dtype != np.uint8:
            raise DatasetError(f"{path} holds {a.dtype} values; images must be uint8 or floats in [0, 1]")
    if len(arrays) == 1 and (arrays[0].ndim == 4 or
                             (arrays[0].ndim == 3 and arrays[0].shape[-1] not in (1, 3, 4))):
        stacked = arrays[0]
    else:
        bad = [p for p, a in zip(files, arrays) if a.ndim not in (2, 3)]
        if bad:
            raise DatasetError(f"{bad[0]}: an image must be [H, W] or [H, W, C]")
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        kinds = {}
        for p, a in zip(files, arrays):
            kinds.setdefault((a.shape, str(a.dtype)), p)
        if len(kinds) != 1:
            shown = "; ".join(f"{p.name}: {list(s)} {d}" for (s, d), p in list(kinds.items())[:4])
            raise DatasetError(f"images in {folder} differ in shape or dtype ({shown}); all must "
                               f"match (image files are fitted to data.image, .npy files are not)")
        stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    out = stacked if stacked.dtype == np.uint8 else stacked.astype(np.float32)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # NHWC -> NCHW


def decode_all(files: list[Path], opts: Options) -> list[np.ndarray]:
    """Every file decoded; the bad ones named with their reasons, all in one DatasetError."""
    arrays, bad = [], []
    for p in files:
        try:
            arrays.append(decode(p, opts))
        except DatasetError as e:
            bad.append(str(e))
    if bad:
        more = f"\n  ... and {len(bad) - MAX_SHOWN} more" if len(bad) > MAX_SHOWN else ""
        raise DatasetError(f"{len(bad)} of {len(files)} files cannot be used:\n  " +
                           "\n  ".join(bad[:MAX_SHOWN]) + more)
    return arrays


def load_folder(root: Path, split: str, opts: Options = Options(), report=None) -> np.ndarray:
    """The images of `split` as [N, C, H, W], from the cache when it is current. `report`
    (a callable taking a line) is told whether the cache was used."""
    from .folder_cache import cache_path, read_cache, write_cache
    files = split_files(root, split, opts)
    path = cache_path(root, split, files, opts) if opts.cache else None
    if path is not None:
        cached = read_cache(path)
        if cached is not None:
            if report:
                report(f"{split}: {len(cached)} images from the cache {path}")
            return cached
    images = stack(files, decode_all(files, opts), root / split)
    if path is not None:
        written = write_cache(path, images)
        if report:
            report(f"{split}: decoded {len(files)} files" + (f" into the cache {written}" if written else ""))
    return images


def settings_key(opts: Options) -> str:
    return json.dumps([CACHE_VERSION, opts.size, opts.channels, opts.fit, opts.convert,
                       opts.test_fraction, opts.split_seed])


def settings_hash(opts: Options) -> str:
    return hashlib.sha256(settings_key(opts).encode()).hexdigest()[:12]


def listing_hash(root: Path, files: list[Path], opts: Options) -> str:
    h = hashlib.sha256(settings_key(opts).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(
            "utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "avi" / "folders"
