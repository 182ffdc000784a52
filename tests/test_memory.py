"""`avi build SPEC --batch B [--gpu-memory SIZE]`: the peak training memory per device,
counted on the meta device, against what a CPU training step measures (bench/memory_estimate.py:
peak resident memory of two steps in a fresh process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
SMALL_CIFAR = ["hierarchy.layers=2", "cells.preprocess.filters=16", "cells.decoder.filters=16"]


@pytest.mark.parametrize("spec, overrides, batch", [
    ("specs/quickstart.yaml", [], 16),               # binary data, both depth-wise attentions
    ("specs/cifar10_l16.yaml", SMALL_CIFAR, 8),      # mixture head, non-local blocks (fused SDPA)
], ids=["quickstart", "cifar_like"])
def test_estimate_is_within_25_percent_of_a_measured_cpu_step(spec, overrides, batch):
    cmd = [sys.executable, "bench/memory_estimate.py", spec, "--batch", str(batch), "--json"]
    for o in overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["measured"] > 20 * 2 ** 20                    # a real step, not noise
    assert 0.75 <= result["ratio"] <= 1.25, result


def _build(*args):
    r = runner.invoke(app, ["build", *args])
    assert "Traceback" not in r.output
    return r


def test_build_batch_reports_the_parts_and_whether_it_fits():
    r = _build("specs/quickstart.yaml", "--batch", "8", "--gpu-memory", "1GiB", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["memory"]
    parts = ("weights", "gradients", "optimizer", "ema", "buffers", "activations", "workspace")
    assert m["batch"] == 8 and m["fits"] and m["limit"] == 2 ** 30
    assert m["gradients"] == m["weights"] and m["optimizer"] == 2 * m["weights"]   # Adamax: 2 moments
    assert m["peak"] == sum(m[k] for k in parts)
    assert m["activations"] > m["weights"] and m["activations_per_image"] > 0
    assert m["largest_batch"] > 8 and m["accumulate"] == 1
    small = _build("specs/quickstart.yaml", "--batch", "8", "--gpu-memory", "40MiB", "--json")
    s = json.loads(small.stdout)["memory"]
    assert not s["fits"] and 0 < s["largest_batch"] < 8
    k = s["accumulate"]
    assert 32 % k == 0 and 32 // k <= s["largest_batch"]          # the smallest split that fits
    assert all(32 // j > s["largest_batch"] for j in range(1, k) if 32 % j == 0)
    text = _build("specs/quickstart.yaml", "--batch", "8", "--gpu-memory", "40MiB")
    assert text.exit_code == 0 and "does not fit in" in text.stdout and f"train.accumulate: {k}" in text.stdout


def test_bad_gpu_memory_is_exit_2():
    r = _build("specs/quickstart.yaml", "--batch", "8", "--gpu-memory", "lots")
    assert r.exit_code == 2 and "--gpu-memory" in r.stderr and "80GiB" in r.stderr
