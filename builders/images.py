"""PNG output without an imaging dependency: image grids and heatmaps.

PNG is zlib-compressed scanlines plus three chunks; writing it directly keeps the install
small (no Pillow/matplotlib) and is all sample grids and attention heatmaps need.
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W] (grey) or [H, W, 3] (RGB) -> PNG bytes."""
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    if a.ndim == 2:
        colour = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        colour = 2
    else:
        raise ValueError(f"expected [H, W] or [H, W, 3] pixels, got shape {a.shape}")
    h, w = a.shape[:2]
    rows = a.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of encode_png for the files it writes (8-bit, no interlace, filter 0)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, w, h, colour = 8, b"", 0, 0, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, _, colour = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    ch = 3 if colour == 2 else 1
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * ch)
    if rows[:, 0].any():
        raise ValueError("only filter type 0 is supported")
    out = rows[:, 1:].reshape(h, w, ch)
    return out[..., 0] if ch == 1 else out


def save_png(path: str | Path, pixels: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(encode_png(pixels))
    tmp.replace(path)
    return path


def grid(images, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """[N, C, H, W] floats in [0, 1] (tensor or array) -> one uint8 image of tiles."""
    a = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    n, c, h, w = a.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 0.5, dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[y:y + h, x:x + w] = a[i].transpose(1, 2, 0)
    out = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out[..., 0] if c == 1 else out


def save_grid(path: str | Path, images, columns: int | None = None) -> Path:
    return save_png(path, grid(images, columns))


def heatmap(values: np.ndarray, cell: int = 24) -> np.ndarray:
    """A [rows, cols] matrix in [0, 1] as an RGB image (white -> dark blue), NaN as grey.
    Each entry becomes a cell x cell square so small matrices stay readable."""
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    t = np.clip(np.nan_to_num(v), 0, 1)[..., None]
    low, high = np.array([255, 255, 255]), np.array([8, 48, 107])
    rgb = (low + (high - low) * t).astype(np.uint8)
    rgb[nan] = (200, 200, 200)
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
