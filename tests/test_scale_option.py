"""hierarchy.scale (issue 22): exp (the paper, the default) or softplus (Efficient-VDVAE's
gradient smoothing). The field leaves the hash of every existing spec as it was."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from avi_spec import load_spec
from builders.network.build import build_model
from builders.network.distributions import Gaussian, scale_of
from tiny_run import REPO, make_tiny

# The hashes these specs had before hierarchy.scale existed (commit 0c12b25): runs trained then
# must resume, and their exports load, with the same hash.
HASHES_BEFORE = {"quickstart.yaml": "b6fad137901ffb250d7936369e4909de2d93a3ca5927f74aa6e514596de905ba",
                 "mnist_l15.yaml": "ef6b59851fc5090220e0cc627288650f6968f8a0824e4b166926e95304dd77b1"}


@pytest.mark.parametrize("name", sorted(HASHES_BEFORE))
def test_the_default_keeps_the_hash_of_existing_specs(name):
    path = REPO / "specs" / name
    default = load_spec(path)
    assert default.document["hierarchy"]["scale"] == "exp" and default.hash == HASHES_BEFORE[name]
    assert load_spec(path, ["hierarchy.scale=exp"]).hash == HASHES_BEFORE[name]
    assert load_spec(path, ["hierarchy.scale=softplus"]).hash != HASHES_BEFORE[name]
    assert "scale" in default.document["hierarchy"]          # the hash leaves the document whole


def test_softplus_is_one_at_zero_and_linear_above():
    s = torch.tensor([-4.0, 0.0, 3.0, 30.0])
    soft = scale_of(s, "softplus")
    assert soft[1] == pytest.approx(1.0) and scale_of(s, "exp")[1] == 1.0
    assert soft[3] == pytest.approx(30.0) and soft[0] == pytest.approx(math.log2(1 + 2 ** -4.0))
    g = Gaussian.from_raw(torch.zeros(3), torch.tensor([-2.0, 0.0, 2.0]), scale="softplus")
    assert torch.allclose(g.sigma, scale_of(g.log_scale, "softplus") + 0.01)
    with pytest.raises(ValueError, match="exp or softplus"):
        scale_of(s, "relu")


def test_softplus_trains_and_differs_from_exp(tmp_path):
    """Same weights (the option adds none), other scales: the KL differs; and `avi train` with
    --set hierarchy.scale=softplus takes steps with finite losses."""
    spec = make_tiny(tmp_path)
    models = {}
    for kind in ("exp", "softplus"):
        torch.manual_seed(0)
        models[kind] = build_model(load_spec(spec, [f"hierarchy.scale={kind}"]).spec, "cpu").eval()
    assert all(torch.equal(a, b) for a, b in zip(models["exp"].state_dict().values(),
                                                  models["softplus"].state_dict().values()))
    x = torch.rand(4, 1, 32, 32).round() * 2 - 1
    noise = [torch.randn(4, 4, 8, 8) for _ in range(2)]
    with torch.no_grad():
        kl = {k: m(x, posterior_noise=noise).kl for k, m in models.items()}
    assert torch.isfinite(kl["softplus"]).all() and not torch.allclose(kl["exp"], kl["softplus"])
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "cli.main", "train", str(spec), "--out", str(out), "--device", "cpu",
                        "--max-steps", "3", "--quiet", "--set", "hierarchy.scale=softplus"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    losses = [rec["loss"] for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in rec]
    assert len(losses) == 3 and all(v is not None and math.isfinite(v) for v in losses)
    assert "scale: softplus" in (out / "spec.yaml").read_text()
