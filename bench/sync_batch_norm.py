"""What train.sync_batch_norm costs and what it buys, on one spec (issue 19).

Run by hand (never as a timed test):

    python bench/sync_batch_norm.py [--spec specs/quickstart.yaml] [--steps 20] [--device cpu]

Trains the spec for --steps steps three ways from the same seed: one process, then
`--devices 2` with per-process batch norm (the default) and with train.sync_batch_norm. Prints
a table and one JSON line (prefix "BENCH "): steps per second (the mean of metrics.jsonl's
it_per_s after the first step, which holds start-up), wall time, and how far each run's
losses and final weights are from the one process's (max relative loss difference, max
absolute weight difference).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from builders.checkpoint import load_checkpoint  # noqa: E402

CASES = [("1 process", 1, "false"), ("2 processes, per-process BN", 2, "false"),
         ("2 processes, sync_batch_norm", 2, "true")]


def train(spec: Path, out: Path, devices: int, sync: str, steps: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "cli.main", "train", str(spec), "--out", str(out), "--device", device,
           "--max-steps", str(steps), "--quiet", "--set", "train.log_every=1",
           "--set", f"train.sync_batch_norm={sync}"]
    if devices > 1:
        cmd += ["--devices", str(devices)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    steps_rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rec = [s for s in steps_rec if "loss" in s]
    speeds = [s["it_per_s"] for s in steps_rec[1:]]
    return {"steps_per_s": sum(speeds) / max(len(speeds), 1), "wall_s": wall,
            "losses": [s["loss"] for s in steps_rec],
            "weights": load_checkpoint(out / "checkpoints" / "last.pt")["model"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "specs" / "quickstart.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, devices, sync in CASES:
            r = train(args.spec.resolve(), Path(tmp) / name.replace(" ", "_").replace(",", ""), devices,
                      sync, args.steps, args.device)
            one = rows[0]["run"] if rows else r
            loss_diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], one["losses"]))
            weight_diff = max((r["weights"][k].float() - t.float()).abs().max().item()
                              for k, t in one["weights"].items())
            rows.append({"case": name, "steps_per_s": r["steps_per_s"], "wall_s": r["wall_s"],
                         "max_rel_loss_diff": loss_diff, "max_abs_weight_diff": weight_diff, "run": r})
            print(f"{name:32s} {r['steps_per_s']:6.2f} steps/s  {r['wall_s']:6.1f} s wall  "
                  f"loss diff {loss_diff:.2e}  weight diff {weight_diff:.2e}", flush=True)
    for row in rows:
        del row["run"]
    print("BENCH " + json.dumps({"spec": str(args.spec), "steps": args.steps, "device": args.device,
                                 "torch": torch.__version__, "cores": os.cpu_count(), "rows": rows}))


if __name__ == "__main__":
    main()
