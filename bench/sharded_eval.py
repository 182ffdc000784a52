"""Sharded evaluation's throughput against one process, on the same run (issue 19 item 2).

Run by hand (never as a timed test):

    python bench/sharded_eval.py RUN -k 50 --limit 64 --devices 1 2 [--device cpu]

For each N, `avi eval RUN --devices N` runs on a copy of RUN (the original's eval.json is left
alone) with OMP_NUM_THREADS = cores // N, so every N uses the same cores (--threads T: T each). Prints a table and one
JSON line (prefix "BENCH "): image-samples per second inside the estimator (images x K over the
slowest process's time), the command's wall time (start-up of the processes included), and
whether the per-image estimates equal one process's bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def evaluate(run: Path, devices: int, k: int, limit: int, device: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run / "checkpoints", copy / "checkpoints")
        shutil.copy(run / "spec.yaml", copy / "spec.yaml")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "cli.main", "eval", str(copy), "-k", str(k),
                            "--limit", str(limit), "--devices", str(devices), "--device", device,
                            "--json"], cwd=run.parent, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode:
            sys.exit(f"avi eval --devices {devices} failed:\n{r.stderr[-3000:]}")
        doc = json.loads(r.stdout)
        saved = json.loads((copy / "eval.json").read_text())["results"][-1]
        with np.load(copy / saved["per_example"]["file"]) as z:
            nll = z["nll_nats"].copy()
    return {"devices": devices, "threads_each": threads, "seconds": doc["seconds"],
            "image_samples_per_s": doc["images_per_s"] * k, "wall_s": wall, "nll_nats": doc["nll_nats"],
            "per_image": nll}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("-k", type=int, default=50)
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--threads", type=int, help="threads per process (default: cores // N)")
    a = ap.parse_args()
    rows = [evaluate(a.run.resolve(), n, a.k, a.limit, a.device, a.threads or max(1, a.cores // n))
            for n in a.devices]
    base = rows[0]
    print(f"sharded eval of {a.run}: K = {a.k}, {a.limit} images, {a.device}, {a.cores} cores")
    print(f"{'processes':>9} {'threads':>7} {'img*K/s':>9} {'speed-up':>8} {'wall s':>7}  same per-image numbers")
    reference = base["per_image"]
    for r in rows:
        r["identical"] = bool(np.array_equal(r.pop("per_image"), reference))
        print(f"{r['devices']:>9} {r['threads_each']:>7} {r['image_samples_per_s']:>9.1f} "
              f"{r['image_samples_per_s'] / base['image_samples_per_s']:>8.2f} {r['wall_s']:>7.1f}  {r['identical']}")
    print("BENCH " + json.dumps({"bench": "sharded_eval", "k": a.k, "images": a.limit, "device": a.device,
                                 "cores": a.cores, "rows": rows}))


if __name__ == "__main__":
    main()
