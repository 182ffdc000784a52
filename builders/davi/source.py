"""Where a run of the authors' code keeps its flags and weights, and reading them."""
from __future__ import annotations

import os
import stat
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .flags import FlagError, parse_command
from .weights import ConversionError

FLAG_FILES = ("train.sh", "eval_command.sh")       # what their trainer / evaluator write
WEIGHT_SUFFIXES = (".h5", ".npz")


def _kind(path: Path) -> str:
    """'file', 'dir', 'other' (a device, FIFO, socket) or 'missing'; an error for a path that
    cannot be looked at (too long, in a folder we may not read)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as e:
        raise FlagError(f"{str(path)[:200]}: cannot be looked at ({e.strerror})") from None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def find_flags(source: Path, flags_file: Path | None) -> Path:
    """--flags FILE, else the train.sh / eval_command.sh of the run directory (or beside the
    weights file); a plain text file given as SOURCE is taken as the flags themselves."""
    if flags_file is not None:
        kind = _kind(flags_file)
        if kind != "file":
            raise FlagError(f"--flags {flags_file}: " + ("no such file" if kind == "missing" else
                            "not a regular file (a folder, device, FIFO or socket)"))
        return flags_file
    kind = _kind(source)
    if kind == "other":
        raise FlagError(f"{source}: not a regular file (a device, FIFO or socket)")
    if kind == "file" and source.suffix not in WEIGHT_SUFFIXES:
        return source
    folder = source if kind == "dir" else source.parent
    for name in FLAG_FILES:
        if _kind(folder / name) != "missing":
            return folder / name              # read_flags refuses it if it is not a regular file
    raise FlagError(f"no {' or '.join(FLAG_FILES)} in {folder}: pass the command of their run.py "
                    "with --flags FILE")


def read_flags(path: Path) -> dict[str, str]:
    """Their flags, with a relative --dataset_path made relative to the flags file's folder
    (their run.py ran there), so the spec finds the data from anywhere."""
    flags = parse_command(_flag_text(path))
    data = flags.get("dataset_path")
    # os.path's exists/realpath: False for a path too long or unreadable (pathlib raises).
    if data and not os.path.isabs(data) and os.path.exists(path.parent / data):
        flags["dataset_path"] = os.path.realpath(path.parent / data)
    return flags


# A command line longer than Linux's ARG_MAX (2 MiB by default) never ran; a flag file is a
# few KB. Larger files (a log, a 3 GB file named train.sh) are refused without being read.
MAX_FLAG_BYTES = 2 << 20


def _flag_text(path: Path) -> str:
    """The text of a flag file: a regular file of at most MAX_FLAG_BYTES of UTF-8 text."""
    from avi_spec.yaml_io import read_bytes_file
    try:
        raw = read_bytes_file(path, MAX_FLAG_BYTES)
    except ValueError as e:                       # a device, FIFO or socket, or too large
        raise FlagError(f"{path}: {e}; expected their run.py command (train.sh, eval_command.sh)") from None
    except OSError as e:
        raise FlagError(f"{path}: cannot be read ({e.strerror})") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        raise FlagError(f"{path}: binary data (a NUL byte at byte {nul}), not a command line")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise FlagError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        "expected their run.py command") from None


def find_weights(source: Path) -> Path:
    """The weights file: SOURCE itself, or the run directory's final_model.h5 (else its one
    .h5 / *_by_path.npz)."""
    kind = _kind(source)
    if kind == "other":
        raise ConversionError(f"{source}: not a regular file (a device, FIFO or socket)")
    if kind == "file":
        if source.suffix not in WEIGHT_SUFFIXES:
            raise ConversionError(f"{source}: expected their weights, a .h5 file (or a .npz keyed "
                                  "by attribute path); use --flags-only to map flags alone")
        return source
    if kind != "dir":
        raise ConversionError(f"no such run directory or weights file: {source}")
    if _kind(source / "final_model.h5") != "missing":
        return source / "final_model.h5"     # read_h5 refuses it if it is not a regular file
    found = sorted(source.glob("*.h5")) or sorted(source.glob("*_by_path.npz"))
    if len(found) != 1:
        shown = ", ".join(p.name for p in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise ConversionError(f"{source}: expected final_model.h5 (found {shown or 'no weights file'}); "
                              "name the file")
    return found[0]


def read_npz(path: Path, model) -> dict[str, np.ndarray]:
    """Their tensors from a .npz keyed by attribute path. Each member's .npy header (shape,
    dtype) is checked against `model` before its data is read: a small archive declaring a huge
    array, or one that decompresses to gigabytes, costs no more than the model's own size."""
    from .declared import check_declared, expected_shapes
    shapes = expected_shapes(model)
    try:
        with open_regular(path) as f, zipfile.ZipFile(f) as z:
            members = [(i, i.filename.removesuffix(".npy")) for i in z.infolist()]
            for info, key in members:
                with z.open(info) as fp:
                    shape, dtype = _npy_header(fp, f"{path}: {info.filename}")
                check_declared(key, shape, dtype, shapes, f"{path}: {info.filename}")
            out = {}
            for info, key in members:
                with z.open(info) as fp:
                    out[key] = np.lib.format.read_array(fp, allow_pickle=False)
            return out
    except ConversionError:
        raise
    # RuntimeError: an encrypted member; NotImplementedError: a compression zipfile lacks.
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile) as e:
        raise ConversionError(f"{path}: not a readable .npz of tensors ({str(e)[:200]})") from None


def _npy_header(fp, where: str) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ConversionError(f"{where}: a .npy format version {version} avi does not read")
    return shape, dtype


@contextmanager
def open_regular(path: Path) -> Iterator:
    """A binary file object for `path`, checked on its descriptor to be a regular file (a FIFO
    would block for ever, a device never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ConversionError(f"{path}: cannot open ({e.strerror})") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        raise ConversionError(f"{path}: not a regular file (a folder, device, FIFO or socket)")
    f = os.fdopen(fd, "rb")
    try:
        yield f
    finally:
        f.close()
