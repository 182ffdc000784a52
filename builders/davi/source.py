"""Where a run of the authors' code keeps its flags and weights, and reading them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .flags import FlagError, parse_command
from .weights import ConversionError

FLAG_FILES = ("train.sh", "eval_command.sh")       # what their trainer / evaluator write
WEIGHT_SUFFIXES = (".h5", ".npz")


def find_flags(source: Path, flags_file: Path | None) -> Path:
    """--flags FILE, else the train.sh / eval_command.sh of the run directory (or beside the
    weights file); a plain text file given as SOURCE is taken as the flags themselves."""
    if flags_file is not None:
        if not flags_file.is_file():
            raise FlagError(f"--flags {flags_file}: no such file")
        return flags_file
    if source.is_file() and source.suffix not in WEIGHT_SUFFIXES:
        return source
    folder = source if source.is_dir() else source.parent
    for name in FLAG_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FlagError(f"no {' or '.join(FLAG_FILES)} in {folder}: pass the command of their run.py "
                    "with --flags FILE")


def read_flags(path: Path) -> dict[str, str]:
    """Their flags, with a relative --dataset_path made relative to the flags file's folder
    (their run.py ran there), so the spec finds the data from anywhere."""
    flags = parse_command(path.read_text(errors="replace"))
    data = flags.get("dataset_path")
    if data and not Path(data).is_absolute() and (path.parent / data).exists():
        flags["dataset_path"] = str((path.parent / data).resolve())
    return flags


def find_weights(source: Path) -> Path:
    """The weights file: SOURCE itself, or the run directory's final_model.h5 (else its one
    .h5 / *_by_path.npz)."""
    if source.is_file():
        if source.suffix not in WEIGHT_SUFFIXES:
            raise ConversionError(f"{source}: expected their weights, a .h5 file (or a .npz keyed "
                                  "by attribute path); use --flags-only to map flags alone")
        return source
    if not source.is_dir():
        raise ConversionError(f"no such run directory or weights file: {source}")
    if (source / "final_model.h5").is_file():
        return source / "final_model.h5"
    found = sorted(source.glob("*.h5")) or sorted(source.glob("*_by_path.npz"))
    if len(found) != 1:
        raise ConversionError(f"{source}: expected final_model.h5 (found "
                              f"{', '.join(p.name for p in found) or 'no weights file'}); name the file")
    return found[0]


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable .npz of tensors ({e})") from None
