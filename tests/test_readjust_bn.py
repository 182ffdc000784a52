"""`avi sample --readjust-bn` (issue 22): the batch-norm statistics of the sampling path are
re-estimated on prior samples, and nothing else changes."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from builders.api import load_run
from builders.checkpoint import load_checkpoint
from tiny_run import REPO, train_tiny

STATS = ("running_mean", "running_var")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("readjust"))


def test_readjust_changes_the_sampling_path_statistics_and_nothing_else(run):
    trained = load_run(run, device="cpu")
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    trained.model.prior_noise = 0.25                          # training-time noise: off while it runs
    assert trained.readjust_bn(temperature=0.5, passes=3, batch_size=8, seed=0) > 0
    after = trained.model.state_dict()
    assert after.keys() == before.keys() and not trained.model.training
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(STATS) for k in changed)
    assert any(k.startswith("layers.") for k in changed) and any(k.startswith("postprocess.") for k in changed)
    # The encoder's batch norms are not on the sampling path: untouched.
    encoder = [k for k in before if k.startswith(("encoders.", "preprocess.")) and k.endswith(STATS)]
    assert encoder and not changed & set(encoder)
    assert trained.model.prior_noise == 0.25                  # ... and put back after


def test_the_statistics_are_those_of_the_samples(run):
    """Re-estimating twice from the same seed gives the same statistics (they are an average
    over the passes, not mixed with the trained ones), and another temperature other ones."""
    a, b, c = (load_run(run, device="cpu") for _ in range(3))
    a.readjust_bn(0.5, passes=2, batch_size=4, seed=1)
    b.model.prior_noise = b.model.post_noise = 0.5           # training-time noise stays off
    b.readjust_bn(0.5, passes=2, batch_size=4, seed=1)
    c.readjust_bn(1.0, passes=2, batch_size=4, seed=1)
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    keys = [k for k in sa if k.endswith("running_var") and k.startswith("postprocess.")]
    assert keys and all(torch.equal(sa[k], sb[k]) for k in keys)
    assert any(not torch.equal(sa[k], sc[k]) for k in keys)


def _avi(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_avi_sample_readjust_bn(run, tmp_path):
    ck = run / "checkpoints" / "last.pt"
    weights = load_checkpoint(ck)["model"]
    plain, readjusted = tmp_path / "plain.png", tmp_path / "readjusted.png"
    common = ("--n", 4, "--temperature", 0.5, "--device", "cpu", "--seed", 7)
    assert _avi("sample", run, *common, "--out", plain).returncode == 0
    r = _avi("sample", run, *common, "--readjust-bn", "--readjust-passes", 3, "--out", readjusted)
    assert r.returncode == 0, r.stderr
    assert "re-estimated the statistics of" in r.stderr and r.stdout.strip() == str(readjusted)
    pixels = [np.asarray(Image.open(p)) for p in (plain, readjusted)]
    assert pixels[0].shape == pixels[1].shape and not np.array_equal(*pixels)
    again = load_checkpoint(ck)["model"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)          # the run is left as it was
