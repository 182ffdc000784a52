"""Evaluation: the importance-sampled log-likelihood against a model whose log p(x) is known
in closed form, the per-layer KL / attention summaries, loading trained runs, and the
`avi eval / sample / reconstruct / plot` commands end to end on a tiny trained run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from avi_spec import load_spec
from builders.evaluation.evaluate import attention_maps, auto_chunk, data_dims, importance_sampled_nll, kl_per_layer
from builders.loading import RunError, load_trained

ROOT = Path(__file__).resolve().parents[1]
LOG2PI = math.log(2 * math.pi)


# ------------------------------------------------------------------ closed-form model

class LinearGaussian(nn.Module):
    """z ~ N(0, I_d), x | z ~ N(W z + b, s^2 I_D); so x ~ N(b, W W^T + s^2 I).

    The proposal q(z|x) = N(mean_true(x) + shift, diag(sd_scale^2 * diag(Sigma_post))) is a
    diagonal, shifted, widened stand-in for the true (correlated) posterior: importance
    sampling with it must still converge to log p(x).

    It has the noise interface of the attentive VAE (noise_shapes, log_weights(x, k, noise)),
    so the estimator draws every image's samples from that image's generator: with the same
    seed chunk=K and chunk=K/4, or any batching, see identical samples.
    """

    def __init__(self, d: int = 2, D: int = 4, s: float = 0.7, shift: float = 0.15,
                 sd_scale: float = 1.3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d, self.D, self.s = d, D, s
        self.register_buffer("W", torch.randn(D, d, generator=g, dtype=torch.float64))
        self.register_buffer("b", torch.randn(D, generator=g, dtype=torch.float64))
        precision = torch.eye(d, dtype=torch.float64) + self.W.T @ self.W / s ** 2
        self.post_cov = torch.linalg.inv(precision)
        self.q_sd = sd_scale * self.post_cov.diagonal().sqrt()
        self.shift = shift

    def q_mean(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b) @ self.W @ self.post_cov.T / self.s ** 2 + self.shift

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        return z @ self.W.T + self.b + self.s * torch.randn(n, self.D, generator=generator,
                                                           dtype=torch.float64)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.s ** 2 * torch.eye(self.D, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        m, v = self.q_mean(x), self.q_sd ** 2
        e_log_pz = -0.5 * self.d * LOG2PI - 0.5 * ((m ** 2).sum(1) + v.sum())
        entropy = 0.5 * (LOG2PI + 1 + v.log()).sum()
        resid = ((x - m @ self.W.T - self.b) ** 2).sum(1) + (self.W ** 2 * v).sum()
        e_log_px = -0.5 * self.D * math.log(2 * math.pi * self.s ** 2) - resid / (2 * self.s ** 2)
        return e_log_px + e_log_pz + entropy

    def noise_shapes(self) -> list[tuple[int, ...]]:
        return [(self.d,)]

    def log_weights(self, x: torch.Tensor, k: int, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        b = x.shape[0]
        if noise is None:
            eps = torch.randn(b, k, self.d, dtype=torch.float64)
        else:
            eps = noise[0].view(b, k, self.d).double()
        z = self.q_mean(x)[:, None] + self.q_sd * eps                          # [B, k, d]
        log_q = (-0.5 * eps ** 2 - self.q_sd.log() - 0.5 * LOG2PI).sum(-1)
        log_pz = (-0.5 * z ** 2 - 0.5 * LOG2PI).sum(-1)
        mean = z @ self.W.T + self.b
        log_pxz = (-0.5 * ((x[:, None] - mean) / self.s) ** 2
                   - math.log(self.s) - 0.5 * LOG2PI).sum(-1)
        return log_pxz + log_pz - log_q


@pytest.fixture(scope="module")
def toy():
    model = LinearGaussian()
    x = model.draw(512, torch.Generator().manual_seed(1))
    return model, x


def _batches(x, size=128):
    return [x[i:i + size] for i in range(0, len(x), size)]


def test_converges_to_closed_form_log_likelihood(toy):
    model, x = toy
    true_nll = -model.log_px(x).mean().item()
    errors = {}
    for k in (1, 10, 100, 1000):
        r = importance_sampled_nll(model, _batches(x), k, seed=0)
        errors[k] = r["nll_nats"] - true_nll
        assert r["importance_samples"] == k and r["examples"] == 512
        assert r["nll_nats"] <= r["nelbo_nats"] + 1e-9       # IWAE bound is never looser
    assert abs(errors[1000]) < 0.05, errors
    assert abs(errors[1000]) < abs(errors[10]) < abs(errors[1]), errors
    assert errors[1] > 0.1                                    # q is not the posterior: a real gap


def test_k1_is_the_elbo_and_mean_weight_is_unbiased(toy):
    model = toy[0]
    x = model.draw(2000, torch.Generator().manual_seed(2))
    elbo = model.elbo(x).mean().item()
    r1 = importance_sampled_nll(model, _batches(x, 500), 1, seed=3)
    assert r1["nll_nats"] == pytest.approx(r1["nelbo_nats"], abs=1e-9)   # one sample: same number
    assert abs(-r1["nll_nats"] - elbo) < 4 * r1["nll_stderr_nats"]
    r = importance_sampled_nll(model, _batches(x, 500), 50, seed=3)
    assert abs(-r["nelbo_nats"] - elbo) < 0.02                 # mean_k w_k estimates the ELBO


def test_estimate_increases_with_k_on_average(toy):
    model = toy[0]
    x = model.draw(2048, torch.Generator().manual_seed(4))
    nll = [importance_sampled_nll(model, _batches(x, 512), k, seed=5)["nll_nats"] for k in (1, 10, 100)]
    assert nll[0] > nll[1] > nll[2]


def test_chunking_does_not_change_the_result(toy):
    model, x = toy
    full = importance_sampled_nll(model, _batches(x), 100, chunk=100, seed=7)
    split = importance_sampled_nll(model, _batches(x), 100, chunk=25, seed=7)
    uneven = importance_sampled_nll(model, _batches(x), 100, chunk=30, seed=7)   # 30+30+30+10
    for key in ("nll_nats", "nll_stderr_nats", "nelbo_nats"):
        assert split[key] == pytest.approx(full[key], abs=1e-9)
        assert uneven[key] == pytest.approx(full[key], abs=1e-9)
    other = importance_sampled_nll(model, _batches(x), 100, chunk=100, seed=8)
    assert other["nll_nats"] != full["nll_nats"]              # the seed does matter


def test_an_images_draws_depend_on_its_index_not_its_batch_or_shard(toy):
    """Per-image generators: scoring images 100..299 as a shard (their indices given) gives each
    image the numbers the full evaluation gives it, whatever the batching; the seed mixes in."""
    model, x = toy
    full = importance_sampled_nll(model, _batches(x, 128), 30, chunk=7, seed=3)["per_example"]
    shard = importance_sampled_nll(model, _batches(x[100:300], 33), 30, chunk=30, seed=3,
                                   indices=np.arange(100, 300))["per_example"]
    np.testing.assert_allclose(shard["nll_nats"], full["nll_nats"][100:300], rtol=0, atol=1e-12)
    np.testing.assert_allclose(shard["nelbo_nats"], full["nelbo_nats"][100:300], rtol=0, atol=1e-12)
    unindexed = importance_sampled_nll(model, _batches(x[100:300], 33), 30, seed=3)["per_example"]
    assert not np.allclose(unindexed["nll_nats"], shard["nll_nats"])      # index 0 != index 100
    from builders.evaluation.image_noise import image_seeds
    seeds = image_seeds(3, np.arange(1000))
    assert len(set(seeds.tolist())) == 1000 and (seeds >= 0).all()
    assert not set(seeds.tolist()) & set(image_seeds(4, np.arange(1000)).tolist())


def test_real_model_draws_per_image(quick_model):
    """The attentive VAE takes the per-image noise: an image scored alone at index 1 equals the
    same image scored in a batch of two (batch composition aside, bit for bit on the CPU)."""
    model, x = quick_model
    pair = importance_sampled_nll(model, [x[:2]], 6, chunk=4, seed=5)["per_example"]["nll_nats"]
    alone = importance_sampled_nll(model, [x[1:2]], 6, chunk=6, seed=5, indices=[1])["per_example"]["nll_nats"]
    assert alone[0] == pytest.approx(pair[1], rel=1e-6)


def test_automatic_chunk_and_bits_per_dim(toy):
    model, x = toy
    r = importance_sampled_nll(model, _batches(x), 40, dims=model.D, seed=0)
    assert 1 <= r["chunk"] <= 40
    assert r["bits_per_dim"] == pytest.approx(r["nll_nats"] / (model.D * math.log(2)))
    assert r["bits_per_dim_stderr"] == pytest.approx(r["nll_stderr_nats"] / (model.D * math.log(2)))
    assert r["seconds"] > 0 and r["images_per_s"] > 0
    binary = importance_sampled_nll(model, _batches(x), 4, seed=0)
    assert binary["bits_per_dim"] is None and binary["bits_per_dim_stderr"] is None
    assert auto_chunk(model, x[:16], 1000, budget_bytes=1) == 1
    assert auto_chunk(model, x[:16], 1000, budget_bytes=1 << 40) == 1000


def test_data_dims_from_the_spec():
    cifar = load_spec(ROOT / "specs" / "cifar10_l16.yaml").spec
    quick = load_spec(ROOT / "specs" / "quickstart.yaml").spec
    assert data_dims(SimpleNamespace(spec=cifar)) == 3 * 32 * 32          # 8-bit: bits/dim
    assert data_dims(SimpleNamespace(spec=quick)) is None                  # binary: nats only


# ------------------------------------------------------------------ the attentive VAE

@pytest.fixture(scope="module")
def quick_model():
    from builders.network.build import build_model
    from builders.evaluation.evaluate import eval_images
    resolved = load_spec(ROOT / "specs" / "quickstart.yaml")
    model = build_model(resolved.spec).eval()
    return model, eval_images(resolved.spec, "test", limit=6)


def test_attention_maps_and_kl_per_layer(quick_model):
    model, x = quick_model
    L = len(model.layers)
    kl = kl_per_layer(model, _batches(x, 3))
    assert kl.shape == (L,) and np.all(np.isfinite(kl)) and np.all(kl >= 0)
    maps = attention_maps(model, _batches(x, 3))
    for path, attr in (("generative", "gen_sources"), ("inference", "inf_sources")):
        m = maps[path]
        assert m.shape == (L, L + 1)
        for l, layer in enumerate(model.layers):
            sources = getattr(layer, attr)
            assert set(np.flatnonzero(~np.isnan(m[l]))) == set(sources)
            if sources:                         # softmax over the sources at every pixel
                assert np.nansum(m[l]) == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.isnan(maps["generative"][0]))          # layer 0's prior is N(0, I)


def test_real_model_reproducible_with_seed(quick_model):
    model, x = quick_model
    a = importance_sampled_nll(model, [x[:2]], 4, chunk=2, seed=11)
    b = importance_sampled_nll(model, [x[:2]], 4, chunk=2, seed=11)
    assert a["nll_nats"] == b["nll_nats"] and math.isfinite(a["nll_nats"])
    assert a["nll_nats"] <= a["nelbo_nats"]


# ------------------------------------------------------------------ loading and the CLI

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny quickstart run: two training steps of batch 8 with EMA (checkpoints/last.pt)."""
    from builders.train.training import train
    out = tmp_path_factory.mktemp("runs") / "tiny"
    resolved = load_spec(ROOT / "specs" / "quickstart.yaml",
                         ["train.batch_size=8", "train.ema={decay: 0.5}"])
    train(resolved, out, device="cpu", max_steps=2, progress_mode="quiet")
    assert (out / "checkpoints" / "last.pt").is_file()
    return out


def test_load_trained(run_dir, tmp_path):
    from builders.checkpoint import load_checkpoint
    model, resolved, run = load_trained(run_dir, "cpu")
    assert run == run_dir and resolved.spec.name == "quickstart" and not model.training
    assert model.avi_checkpoint["ema"] and model.avi_checkpoint["step"] == 2
    ck = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    name = "constant"
    assert torch.equal(model.state_dict()[name], ck["ema"][name])
    plain, _, _ = load_trained(run_dir / "checkpoints" / "last.pt", "cpu", use_ema=False)
    assert torch.equal(plain.state_dict()[name], ck["model"][name])
    with pytest.raises(RunError, match="no such"):
        load_trained(tmp_path / "missing", "cpu")
    with pytest.raises(RunError, match="holds no checkpoint"):
        load_trained(tmp_path, "cpu")
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes()[:500])
    with pytest.raises(RunError, match="corrupt"):
        load_trained(bad, "cpu")


def _avi(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _png(path: Path, shape=None) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image)
    if shape is not None:
        assert pixels.shape[:2] == shape
    assert pixels.std() > 0
    return pixels


def test_cli_eval_json(run_dir, tmp_path):
    r = _avi("eval", str(run_dir), "--importance-samples", "50", "--limit", "3", "--device", "cpu",
             "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for key in ("importance_samples", "examples", "nll_nats", "nll_stderr_nats", "nelbo_nats",
                "bits_per_dim"):
        assert key in doc
    assert doc["importance_samples"] == 50 and doc["examples"] == 3
    assert math.isfinite(doc["nll_nats"]) and math.isfinite(doc["nelbo_nats"])
    assert doc["nll_nats"] < doc["nelbo_nats"]                # the IWAE bound is tighter
    assert doc["bits_per_dim"] is None                        # binary data: nats
    saved = json.loads((run_dir / "eval.json").read_text())["results"]
    assert saved[-1]["nll_nats"] == doc["nll_nats"]


def test_cli_pictures(run_dir, tmp_path):
    r = _avi("sample", str(run_dir), "--n", "4", "--temperature", "0.8", "--out", "s.png",
             "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "s.png"
    _png(tmp_path / "s.png", (2 + 2 * 30, 2 + 2 * 30))        # 2x2 tiles of 28x28, 2 px padding

    r = _avi("reconstruct", str(run_dir), "--n", "2", "--out", "r.png", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _png(tmp_path / "r.png", (2 + 2 * 30, 2 + 2 * 30))       # two rows of (image, reconstruction)
    r = _avi("sample", str(run_dir), "--n", "4", "--temperature", "0.8", "--scale", "3", "--out", "big.png",
             "--device", "cpu",
             cwd=tmp_path)                                    # issue 23 item 10: a size for slides
    assert r.returncode == 0, r.stderr
    _png(tmp_path / "big.png", (3 * 62, 3 * 62))
    from PIL import Image
    with Image.open(tmp_path / "s.png") as small, Image.open(tmp_path / "big.png") as big:
        assert np.array_equal(np.asarray(big)[::3, ::3], np.asarray(small))   # same draw, pixels x3
    for command in ("eval", "sample"):
        assert ".safetensors" in _avi(command, "--help", cwd=tmp_path).stdout

    r = _avi("plot", "kl", str(run_dir), str(run_dir / "checkpoints" / "last.pt"), "--limit", "4",
             "--json", "--out", "kl.svg", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)["runs"]
    assert [doc["label"] for doc in runs] == ["tiny", "tiny/last"]
    for doc in runs:
        assert len(doc["kl_per_layer_nats"]) == 4 and doc["kl_total_nats"] > 0
    assert runs[0]["kl_per_layer_nats"] == runs[1]["kl_per_layer_nats"]     # the same weights
    svg = (tmp_path / "kl.svg").read_text()
    assert "KL divergence per stochastic layer" in svg and "tiny/last" in svg
    # the figure says what it measured: split, images, and which weights of which run
    assert "test split, 4 images, one posterior sample each" in svg
    assert f"tiny: {run_dir / 'checkpoints' / 'last.pt'} (step 2, EMA weights)" in svg

    r = _avi("plot", "attention", str(run_dir), "--limit", "4", "--json", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["generative"]) == 4 and len(doc["inference"][0]) == 5
    assert doc["generative"][0][0] is None                    # NaN (no source) -> null
    _png(run_dir / "plots" / "attention.png")
    r = _avi("plot", "attention", str(run_dir), "--limit", "4", "--out", "a.svg", "--device", "cpu",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    svg = (tmp_path / "a.svg").read_text()
    assert "tiny: " in svg and "(step 2, EMA weights); test split, 4 images" in svg
    # layer 1 of the prior has one source: hatched and explained, not a dark 1.00
    assert "only source of layer l (score 1 by construction)" in svg and "1.00" not in svg


def test_cli_bad_input(run_dir, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for args in (["eval", str(tmp_path / "missing")], ["sample", str(bad)],
                 ["plot", "kl", str(tmp_path)]):
        r = _avi(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert "error:" in r.stderr and "Traceback" not in r.stderr
    r = _avi("eval", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "avi eval runs/" in r.stdout
    # a spec where a trained run belongs: said so (it was "is corrupt (Weights only load failed ...")
    spec = ROOT / "specs" / "quickstart.yaml"
    r = _avi("eval", str(spec), cwd=tmp_path)
    assert r.returncode == 2 and f"{spec} is a spec, not a trained run" in r.stderr, r.stderr
    assert "corrupt" not in r.stderr and f"avi train {spec}" in r.stderr


def test_one_device_resolver_and_its_exit_code(run_dir, tmp_path):
    from builders.devices import DeviceError, resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda", local_rank=0).type == "cuda"
        return
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda")
    for args in (["eval", str(run_dir), "--device", "cuda"],
                 ["train", str(ROOT / "specs" / "quickstart.yaml"), "--device", "cuda",
                  "--out", str(tmp_path / "run")]):
        r = _avi(*args, cwd=tmp_path)
        assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr


def test_eval_images_are_padded_as_in_training():
    unpadded = load_spec(ROOT / "specs" / "quickstart.yaml",
                         ["data.pad=0", "data.distribution.crop=0", "hierarchy.latent.size=7"]).spec
    from builders.evaluation.evaluate import eval_images
    assert eval_images(unpadded, "test", limit=3).shape == (3, 1, 28, 28)
    assert data_dims(SimpleNamespace(spec=unpadded)) is None           # binary: nats only


class _SlowModel(nn.Module):
    """log_weights costs `cold` seconds on its first call, then `per_row` per row; records
    the (images, samples) of every call."""

    def __init__(self, cold: float, per_row: float):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.cold, self.per_row, self.calls = cold, per_row, []

    def log_weights(self, x, k):
        import time
        time.sleep((self.cold if not self.calls else 0.0) + self.per_row * x.shape[0] * k)
        self.calls.append((x.shape[0], k))
        return torch.zeros(x.shape[0], k)


def test_eta_probe_is_warm_and_at_the_real_k():
    """Issue 23 item 6: the estimate came from one cold pass at K = 1 (2.48 minutes for a
    66 s run). The probe runs the real K in a pass as large as a real one, twice, and times
    the warm one."""
    from builders.evaluation.eta import probe_seconds_per_sample, time_left
    model = _SlowModel(cold=0.5, per_row=0.002)
    x = torch.zeros(10, 1, 4, 4)
    per_sample = probe_seconds_per_sample(model, x, k=40, batch_size=8, chunk=5)
    assert model.calls == [(1, 40), (1, 40)]            # rows = min(K, 8 images x chunk 5)
    assert 0.0015 < per_sample < 0.004                   # the cold 0.5 s is not in it
    model = _SlowModel(cold=0.0, per_row=0.0)
    probe_seconds_per_sample(model, x, k=10**20, batch_size=8, chunk=3)
    assert model.calls == [(1, 24), (1, 24)]             # a huge K is projected, never run
    assert time_left(0, 10, 5.0) is None and time_left(5, 10, 5.0) == 5.0


def test_cli_eval_progress_lines_say_the_time_left(run_dir, tmp_path, monkeypatch):
    """Off a terminal the progress lines name the images done, the pace and the time left."""
    from typer.testing import CliRunner

    import cli.eval
    from cli.main import app
    monkeypatch.setattr(cli.eval._Progress, "LINE_SECONDS", 0.0)
    r = CliRunner().invoke(app, ["eval", str(run_dir), "-k", "2", "--limit", "6", "--batch-size", "2",
                                 "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("eval K=2: ")]
    assert [line.split(",")[0] for line in lines] == ["eval K=2: 2/6 images", "eval K=2: 4/6 images"]
    assert all(line.endswith(" left") for line in lines), lines
