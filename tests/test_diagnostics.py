"""Training that explains itself (issue 22): a skipped step names the term, the layer and the
module group that went non-finite, with the remedies; after train.max_skipped in a row
`avi train` stops with exit 1, no traceback, and checkpoints/last.pt as it was."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from builders.api import load_run
from builders.checkpoint import load_checkpoint
from builders.network.model import DeepAttentiveVAE
from builders.train import diagnostics
from cli.main import app
from tiny_run import REPO, make_tiny


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("diag"))


def test_a_nan_in_layer_1_is_named_and_the_run_stops_with_last_pt_intact(spec, tmp_path, monkeypatch):
    """Layer 1's posterior log-scale turns NaN from the second training step on: steps 2 and 3
    are skipped and explained, the run stops at step 3 (max_skipped 2) with exit 1, and the
    last.pt written after step 2 holds the finite weights of step 1's update."""
    real = DeepAttentiveVAE._posterior_params
    calls = []

    def poisoned(self, l, *args):
        dmu, ds = real(self, l, *args)
        if l == 1 and torch.is_grad_enabled():
            calls.append(1)                   # one per training forward
        if l == 1 and len(calls) >= 2:
            ds = ds * float("nan")
        return dmu, ds
    monkeypatch.setattr(DeepAttentiveVAE, "_posterior_params", poisoned)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", str(spec), "--out", str(out), "--device", "cpu",
                                 "--set", "train.max_skipped=2", "--set", "train.checkpoint_every=1"])
    text = r.output
    assert r.exit_code == 1, text
    assert "Traceback" not in text and r.exception is None or isinstance(r.exception, SystemExit)
    assert "step 2: non-finite loss or gradient" in text and "KL of layer 1" in text
    assert "posterior log-scale of layer 1 is not finite" in text
    assert "non-finite term(s): KL of layer 1" in text and "non-finite gradient in" in text
    assert "layer 0" not in text.split("Last skipped step")[-1].split("Usual remedies")[0]
    for remedy in ("train.optimizer.lr", "train.grad_clip", "train.max_skipped"):
        assert remedy in text
    assert "2 consecutive non-finite steps (train.max_skipped = 2) at step 3" in text
    assert "last.pt is intact (step 2)" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    diag = [rec for rec in records if "diagnosis" in rec]
    assert [rec["step"] for rec in diag] == [2, 3]
    d = diag[0]["diagnosis"]
    assert d["non_finite_terms"] == ["KL of layer 1", "reconstruction (NLL)"]
    assert d["kl_per_layer"][0] is not None and d["kl_per_layer"][1] is None
    assert d["layers"][1]["posterior_log_scale_non_finite"] and not d["layers"][0]["posterior_log_scale_non_finite"]
    assert "layers.1" in d["non_finite_grad_groups"] and "postprocess" in d["grad_norm_per_group"]
    assert d["non_finite_weight_groups"] == [] and "largest |weight|" in text
    assert set(d["weight_max_abs_per_group"]) >= set(d["grad_norm_per_group"])
    payload = load_checkpoint(out / "checkpoints" / "last.pt")
    assert payload["state"]["step"] == 2 and payload["state"]["skipped"] == 1
    assert all(torch.isfinite(t).all() for t in payload["model"].values() if t.is_floating_point())
    monkeypatch.undo()
    assert torch.isfinite(load_run(out, device="cpu").sample(2, seed=0)).all()


def test_a_huge_learning_rate_stops_through_the_entry_point(spec, tmp_path):
    """The real `avi` process: lr 1e30 diverges, every skipped step is explained in strict
    JSON (--jsonl), and the run stops with exit 1 and a message, no traceback."""
    out = tmp_path / "huge"
    r = subprocess.run([sys.executable, "-m", "cli.main", "train", str(spec), "--out", str(out), "--jsonl",
                        "--device", "cpu", "--set", "train.optimizer.lr=1e30", "--set",
                        "train.schedule.warmup_epochs=0", "--set", "train.max_skipped=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "training diverged" in r.stderr
    assert "train.max_skipped = 2" in r.stderr and "Usual remedies" in r.stderr
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}")) for line in r.stdout.splitlines()]
    diag = [row["diagnosis"] for row in rows if "diagnosis" in row]
    assert len(diag) >= 2 and all(set(d["grad_norm_per_group"]) >= {"head", "layers.0"} for d in diag)
    # lr 1e30: the first update throws the weights far out, and every later step says so.
    assert max(diag[-1]["weight_max_abs_per_group"].values()) > 1e20 and "largest |weight|" in r.stderr


def test_group_names_and_bound_shares():
    assert diagnostics.module_group("layers.3.prior_head.1.weight_v") == "layers.3"
    assert diagnostics.module_group("encoders.0.blocks.0.conv") == "encoders.0"
    assert diagnostics.module_group("constant") == "constant"
    share, bad = diagnostics._bound_shares(torch.tensor([-5.0, 4.9999, 0.0, float("nan")]), (-5.0, 5.0))
    assert share == pytest.approx(0.5) and bad
    text = diagnostics.summary(diagnostics.diagnose(
        {"loss": math.inf, "nll": 1.0, "kl": math.inf, "grad_norm": math.nan}, [0.5, math.inf],
        {"head": 1.0, "layers.1": math.nan}, None, (-5, 5), (-5, 5)))
    assert "KL of layer 1" in text and "non-finite gradient in layers.1" in text
