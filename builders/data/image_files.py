"""Images a user hands to `avi encode` (or TrainedRun.encode_file): one .npy, .npz or .png
file, read as the spec's data.image says images are, then made model input as evaluation
makes the test split (builders.evaluation.evaluate.eval_images).

Layouts: .npy / .npz (the array named ``images``, or the file's only array) of [H, W]
(one image), [N, H, W] or [N, H, W, C]; a .png is one image. uint8 0..255 or floats in [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .datasets import DatasetError, check_grey_levels


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if "images" in names:
                return z["images"]
            if len(names) == 1:
                return z[names[0]]
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path} is not a valid .npz file ({e})") from None
    raise DatasetError(f"{path} holds arrays {names}; name the images 'images' (or keep one array)")


def _read_npy_or_png(path: Path) -> np.ndarray:
    """A .npy array (plain arrays only: no pickled objects) or one .png as it is stored (grey
    or RGB): the folder dataset's decoding would resize and convert, which a user's file to
    encode must not need."""
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DatasetError(f"{path} is not a valid .npy array file ({e})") from None
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L" if im.mode in ("1", "L", "I", "I;16") else "RGB"))
    except OSError as e:
        raise DatasetError(f"{path} is not a readable PNG file ({e})") from None


def read_image_file(path: str | Path, data) -> np.ndarray:
    """The images of ``path`` as [N, C, H, W] (uint8 or float32), checked against the spec's
    ``data`` (its image shape; its transpose applied, as training applied it)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".png"):
        raise DatasetError(f"{path}: images must be a .npy, .npz or .png file")
    a = _read_npz(path) if suffix == ".npz" else _read_npy_or_png(path)
    c, size = data.image.channels, data.image.size
    if a.ndim == 2 or (a.ndim == 3 and suffix == ".png"):
        a = a[None]
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[1:] != (size, size, c):
        raise DatasetError(f"{path} holds an array of shape {list(a.shape)}; this model takes "
                           f"[N, {size}, {size}{'' if c == 1 else f', {c}'}] images (data.image)")
    if np.issubdtype(a.dtype, np.floating):
        check_grey_levels(a, str(path))
        a = a.astype(np.float32)
    elif a.dtype != np.uint8:
        raise DatasetError(f"{path} holds {a.dtype} values; images must be uint8 or floats in [0, 1]")
    images = np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    return np.ascontiguousarray(images.swapaxes(-1, -2)) if data.transpose else images


def model_input(spec, images, seed: int = 0) -> torch.Tensor:
    """Raw images [N, C, H, W] as model input, as eval_images prepares the test split: binary
    data padded and binarised once with ``seed``, 8-bit data padded and mapped to [-1, 1]."""
    from .preprocess import BinarizedTestSet, data_kind, prepare_batch
    if data_kind(spec) == "binary":
        return BinarizedTestSet(images, seed, pad=spec.data.pad)[:]
    images = np.asarray(images)
    if images.dtype != np.uint8:                     # grey levels in [0, 1] -> the 8-bit values
        images = np.round(images.astype(np.float64) * 255).astype(np.uint8)
    return prepare_batch(images, "cifar", None, train=False, pad=spec.data.pad)
