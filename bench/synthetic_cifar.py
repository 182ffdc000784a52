"""Write CIFAR-10-shaped random data in the real dataset's layout, for timing training where
the real files are not (the GPU machine reaches no network):

    python bench/synthetic_cifar.py /tmp/cifar --per-batch 2000 --test 1000
    avi train specs/cifar10_l16.yaml --set data.root=/tmp/cifar

Writes cifar-10-batches-py/data_batch_1..5 and test_batch as the Python pickles of the real
archive ({b"data": uint8 [N, 3072], b"labels": [N ints]}). The pixels are uniform noise:
good for throughput and memory, meaningless for likelihoods.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np


def write(root: Path, per_batch: int, test: int, seed: int = 0) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]
    for name, n in names:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--per-batch", type=int, default=2000, help="images in each of the 5 training batches")
    p.add_argument("--test", type=int, default=1000)
    args = p.parse_args()
    print(write(args.root, args.per_batch, args.test))


if __name__ == "__main__":
    main()
