"""Active latent channels (issue 22): the KL of every channel of every layer, in
`avi eval --json` and drawn by `avi plot active`."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from builders.api import load_run
from builders.evaluation.active_units import active_units, kl_per_channel
from builders.evaluation.evaluate import batched, eval_images, kl_per_layer
from tiny_run import REPO, train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("active"), steps=6)


def _avi(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_the_channels_of_a_layer_add_up_to_its_kl(run):
    trained = load_run(run, device="cpu")
    x = eval_images(trained.spec, "test", limit=8)
    torch.manual_seed(5)
    channels = kl_per_channel(trained.model, batched(x, 4))
    torch.manual_seed(5)
    layers = kl_per_layer(trained.model, batched(x, 4))
    assert channels.shape == (2, 4) and (channels >= 0).all()
    assert np.allclose(channels.sum(1), layers, rtol=1e-5)
    summary = active_units(channels, float(np.median(channels)))
    assert summary["active"] == int((channels > np.median(channels)).sum()) and summary["channels"] == 8
    assert active_units(channels, float(channels.max()) + 1)["active"] == 0


def test_eval_json_and_plot_active_report_the_active_channels(run, tmp_path):
    r = _avi("eval", run, "-k", 2, "--limit", 8, "--device", "cpu", "--json", "--active-threshold", 0.5)
    assert r.returncode == 0, r.stderr
    au = json.loads(r.stdout)["active_units"]
    kl = np.array(au["kl_per_channel_nats"])
    assert kl.shape == (2, 4) and au["threshold_nats"] == 0.5 and au["channels"] == 8
    assert au["active"] == int((kl > 0.5).sum()) and au["active_per_layer"] == (kl > 0.5).sum(1).tolist()
    r = _avi("plot", "active", run, "--limit", 8, "--device", "cpu", "--threshold", 0.5,
             "--out", tmp_path / "active.png", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["figure"] == str(tmp_path / "active.png") and (tmp_path / "active.png").read_bytes()[:4] == b"\x89PNG"
    assert np.allclose(doc["kl_per_channel_nats"], kl)          # the same seed, the same images
