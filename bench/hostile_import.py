"""Time and memory of `avi import-davi` on hostile inputs (issue 20): a 1 MB eval_hparams list
of 80,000 pairs (37 s when parsing was quadratic), a 3 GB flag file, an .h5 declaring a 1 TiB
tensor. Each is one `python -m cli.main import-davi` process, so the figures include the
interpreter start and imports; the `their tiny run` row (a valid import) is that baseline.

    python bench/hostile_import.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "davi" / "trained_tiny_attn"


def cases(tmp: Path) -> dict[str, list[str]]:
    command = (FIX / "train.sh").read_text().strip()
    long = tmp / "long.sh"
    long.write_text(command + " --eval_hparams=" + ",".join(f"k{i}={i}" for i in range(80_000)))
    huge = tmp / "huge.sh"
    with open(huge, "wb") as f:
        f.write(command.encode())
        f.truncate(3 << 30)                                  # sparse
    import h5py
    declared = tmp / "declared.h5"
    shutil.copy(FIX / "final_model.h5", declared)
    with h5py.File(declared, "r+") as f:
        layer = f.attrs["layer_names"][0]
        g = f[layer.decode() if isinstance(layer, bytes) else layer]
        n = g.attrs["weight_names"][0]
        n = n.decode() if isinstance(n, bytes) else n
        del g[n]
        g.create_dataset(n, shape=(1 << 38,), dtype="f4")
    flags = ["--flags", str(FIX / "train.sh")]
    return {
        "their tiny run (valid, baseline)": [str(FIX), *flags],
        "80,000 eval_hparams pairs, 1 MB": [str(long), "--flags-only", "--json"],
        "3 GB flag file (sparse)": [str(huge), "--flags-only"],
        ".h5 declaring a 1 TiB tensor": [str(declared), *flags],
    }


def run(args: list[str], out: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one import process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "import-davi", *args, "--out", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"{'case':40s} {'wall s':>8s} {'peak MB':>8s} {'exit':>5s}")
        for i, (name, args) in enumerate(cases(tmp).items()):
            wall, rss, code = run(args, tmp / f"out{i}")
            print(f"{name:40s} {wall:8.2f} {rss:8.0f} {code:5d}")


if __name__ == "__main__":
    main()
