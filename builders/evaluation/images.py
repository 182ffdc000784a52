"""Image grids of samples and reconstructions, written with Pillow (the format follows the
file's extension: .png, .jpg, .webp, ...)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from ..files import write_atomically


def grid(images, columns: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """[N, C, H, W] floats in [0, 1] (tensor or array) -> one uint8 image of tiles, every
    pixel drawn as a scale x scale block (sharp edges: slides show the model's pixels)."""
    a = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    n, c, h, w = a.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 0.5, dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[y:y + h, x:x + w] = a[i].transpose(1, 2, 0)
    out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)     # a diverged model's NaN pixels: black
    out = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out[..., 0] if c == 1 else out


def image_format(path: str | Path) -> str:
    """Pillow's format for the path's extension; ValueError when Pillow cannot write it."""
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot write images as {path.suffix or 'a file without extension'} "
                         f"({path}); use .png, .jpg or .webp")
    return fmt


def save_image(path: str | Path, pixels: np.ndarray) -> Path:
    """uint8 [H, W] (grey) or [H, W, 3] (RGB) pixels -> an image file, written atomically (a
    reader never sees half a file). Raises ValueError for an extension Pillow cannot write."""
    from PIL import Image

    path = Path(path)
    fmt = image_format(path)
    encoded = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(encoded, format=fmt)
    return write_atomically(path, encoded.getvalue())


def save_grid(path: str | Path, images, columns: int | None = None, scale: int = 1) -> Path:
    return save_image(path, grid(images, columns, scale=scale))
