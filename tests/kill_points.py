"""Driver of the kill-point test (tests/test_faults.py): trains a tiny spec once to count its
fault points, then for every point n kills a run there with SIGKILL (AVI_FAULT_KILL_AT=n,
builders.faults) and continues it as a user would (`--resume`, or a fresh start when the
run directory holds no spec.yaml yet). Prints one JSON summary per run on stdout.

Runs as its own process so that it can fork: each run is a fork of this interpreter with
torch already imported (a second instead of an interpreter start), through the CLI's app;
one kill point per CPU core (up to 4) at a time.

    python tests/kill_points.py SPEC WORKDIR
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)       # before any parallel region: forks stay safe
import torch._dynamo  # noqa: E402,F401 - imported lazily by torch.optim; once here, not per fork

from builders.checkpoint import load_checkpoint  # noqa: E402
from builders.train.train_state import tensors_hash  # noqa: E402
from cli.main import app  # noqa: E402

TIMING = ("it_per_s", "epoch_seconds")
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))


def start(args: list[str], env: dict[str, str]) -> int:
    """Start `avi ARGS` in a forked child; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.update(env)
            sys.stdout = sys.stderr = open(os.devnull, "w")
            app(args, prog_name="avi")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """The child's exit code, or -signal."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def avi(args: list[str], env: dict[str, str]) -> int:
    return wait(start(args, env))


def summary(run: Path) -> dict:
    """What must match the uninterrupted run: weights of every checkpoint, the metrics
    records in order (timings left out) and the files of the run directory."""
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = {p.name: tensors_hash(load_checkpoint(p)["model"])
               for p in sorted((run / "checkpoints").glob("*.pt"))}
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    return {"records": records, "weights": weights, "files": files}


def main(spec: str, work: str) -> None:
    work_dir = Path(work)
    log = work_dir / "points.log"
    ref = work_dir / "ref"
    train = ["train", spec, "--quiet", "--out"]
    assert avi([*train, str(ref)], {"AVI_FAULT_LOG": str(log)}) == 0
    points = log.read_text().splitlines()
    print(json.dumps({"reference": summary(ref), "points": points}), flush=True)
    for first in range(1, len(points) + 1, WORKERS):     # WORKERS kill points at a time
        ns = range(first, min(first + WORKERS, len(points) + 1))
        runs = {n: work_dir / f"kill{n}" for n in ns}
        killed = {n: wait(pid) for n, pid in
                  [(n, start([*train, str(runs[n])], {"AVI_FAULT_KILL_AT": str(n)})) for n in ns]}
        again = {n: ["--resume"] if (runs[n] / "spec.yaml").exists() else [] for n in ns}
        resumed = {n: wait(pid) for n, pid in [(n, start([*train, str(runs[n]), *again[n]], {})) for n in ns]}
        for n in ns:
            print(json.dumps({"n": n, "point": points[n - 1], "killed": killed[n], "resumed": resumed[n],
                              "summary": summary(runs[n]) if resumed[n] == 0 else None}), flush=True)

if __name__ == "__main__":
    main(*sys.argv[1:])
