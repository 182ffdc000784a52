"""Sharded evaluation (`avi eval --devices N`, builders.evaluation.sharded): the images split
across processes started by torchrun, every image drawing its own samples, the per-image
estimates gathered, process 0 alone writing eval.json and eval/*.npz; the same numbers as one
process, bit for bit on the CPU.

A tiny spec (2 layers, 8 filters) on a 48/64-image folder, trained one step in the test process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avi_spec import load_spec
from builders.data.datasets import load_images

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "specs" / "quickstart.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
SPEC = """extends: {base}
name: sharded
data: {{dataset: folder, root: {root}}}
hierarchy: {{layers: 2, latent: {{channels: 4, size: 8}}}}
cells:
  preprocess: {{filters: 8}}
  decoder: {{filters: 8}}
train: {{batch_size: 16, epochs: 1, log_every: 1}}
eval: {{batch_size: 10}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from builders.train.training import train
    root = tmp_path_factory.mktemp("sharded")
    for split, n in (("train", 48), ("test", 70)):
        (root / "data" / split).mkdir(parents=True)
        np.save(root / "data" / split / "images.npy", load_images("mnist5k", None, split)[:n, 0])
    spec = root / "tiny.yaml"
    spec.write_text(SPEC.format(base=QUICKSTART, root=root / "data"))
    train(load_spec(spec), root / "run", device="cpu", max_steps=1, progress_mode="quiet")
    return root / "run"


def avi(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def evaluate(run: Path, devices: int) -> tuple[dict, dict]:
    """avi eval RUN --devices N -k 20 --limit 64: the printed document and the per-image file."""
    r = avi("eval", run, "--devices", devices, "-k", 20, "--limit", 64, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    saved = json.loads((run / "eval.json").read_text())["results"]
    assert len(saved) == 1                               # the same key: replaced, not added
    with np.load(run / saved[0]["per_example"]["file"]) as z:
        arrays = {k: z[k] for k in ("index", "nll_nats", "nelbo_nats")}
    return doc, arrays


def test_two_processes_give_one_processs_numbers(run):
    """Batches of 10 over 64 images: process 0 scores images 0..29, process 1 30..63 (a
    shard that is not a whole number of batches of its own), gathered in order."""
    one_doc, one = evaluate(run, 1)
    two_doc, two = evaluate(run, 2)
    assert one_doc["processes"] == 1 and two_doc["processes"] == 2
    assert two_doc["examples"] == 64 and np.array_equal(two["index"], np.arange(64))
    for key in ("nll_nats", "nelbo_nats"):
        assert np.array_equal(one[key], two[key]), key            # bit for bit, every image
    for key in ("nll_nats", "nll_stderr_nats", "nelbo_nats", "nelbo_stderr_nats", "chunk", "data_sha256"):
        assert one_doc[key] == two_doc[key], key
    assert np.unique(one["nll_nats"]).size == 64                  # the images were all scored
    files = sorted(p.name for p in (run / "eval").iterdir())
    assert len(files) == 1 and files[0].endswith(".npz")          # no second writer, no temp files


def test_shard_bounds_cover_the_images_once():
    from builders.evaluation.sharded import shard_bounds
    for n, b, w in ((64, 10, 2), (64, 10, 3), (5, 10, 4), (100, 1, 7), (7, 3, 7)):
        bounds = [shard_bounds(n, b, r, w) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(w - 1))
        assert all(start % b == 0 for start, stop in bounds if stop > start)


def test_eval_under_srun_gives_one_processs_numbers(run):
    """`srun --ntasks 2 avi eval ...` on the local SLURM cluster: the tasks find each other from
    SLURM's environment (builders.launch) and task 0 alone prints and writes."""
    srun = shutil.which("srun")
    if srun is None:
        if os.environ.get("CI"):
            pytest.fail("srun is not installed, and CI must run this test")
        pytest.skip("srun is not installed")
    subprocess.run(["bash", str(REPO / "tools" / "slurm" / "start.sh")], capture_output=True, timeout=120)
    _, one = evaluate(run, 1)
    r = subprocess.run([srun, "--partition", "debug", "--ntasks", "2", "--cpus-per-task", "1", "--time", "5",
                        "--kill-on-bad-exit=1", sys.executable, "-m", "cli.main", "eval", str(run), "-k", "20",
                        "--limit", "64", "--device", "cpu", "--json"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)                                   # one document: task 1 printed nothing
    assert doc["processes"] == 2
    saved = json.loads((run / "eval.json").read_text())["results"]
    with np.load(run / saved[0]["per_example"]["file"]) as z:
        assert np.array_equal(z["nll_nats"], one["nll_nats"])
