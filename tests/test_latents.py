"""Latents in the Python API and `avi encode` (issue 22): encode gives every layer's
posterior, decode turns latents back into images, interpolate walks between two images."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from builders.api import load_run
from builders.data.image_files import model_input
from builders.evaluation.evaluate import eval_images
from tiny_run import REPO, train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("latents"))


@pytest.fixture(scope="module")
def trained(run):
    return load_run(run, device="cpu")


def test_decode_of_encode_reconstructs_as_reconstruct_does(trained):
    x = eval_images(trained.spec, "test", limit=5)
    z = trained.encode(x, seed=3)
    assert z.mean.shape == z.scale.shape == z.sample.shape == (5, 2, 4, 8, 8)
    assert (z.scale > 0).all() and not torch.equal(z.mean, z.sample)
    assert torch.allclose(trained.decode(z), trained.reconstruct(x, temperature=0.0), atol=1e-6)
    assert torch.allclose(trained.decode(z.sample), trained.reconstruct(x, seed=3), atol=1e-6)
    assert torch.equal(trained.encode(x, seed=3).sample, z.sample)           # the seed reproduces it
    with pytest.raises(ValueError, match=r"latents must be \[N, 2, 4, 8, 8\]"):
        trained.decode(z.mean[:, :1])
    with pytest.raises(ValueError, match="encode takes model input"):
        trained.encode(x[:, :, 2:-2, 2:-2])


def test_interpolate_runs_from_one_image_to_the_other(trained):
    x = eval_images(trained.spec, "test", limit=2)
    ends = [trained.decode(trained.encode(x[i:i + 1])) for i in range(2)]
    path = trained.interpolate(x[0], x[1], steps=5)
    assert path.shape == (5, 1, 28, 28)
    assert torch.allclose(path[0], ends[0][0], atol=1e-6) and torch.allclose(path[-1], ends[1][0], atol=1e-6)
    assert not torch.allclose(path[1], path[2])
    # Layer 0 only, the rest drawn at a temperature with one noise for every step: the same
    # image at both ends gives the same image at every step, and the seed fixes the draw.
    same = trained.interpolate(x[0], x[0], steps=3, up_to_layer=0, temperature=0.8, seed=1)
    assert torch.allclose(same[0], same[1]) and torch.allclose(same[0], same[2])
    part = trained.interpolate(x[0], x[1], steps=3, up_to_layer=0, temperature=0.8, seed=1)
    assert torch.equal(part, trained.interpolate(x[0], x[1], steps=3, up_to_layer=0, temperature=0.8, seed=1))
    assert not torch.allclose(part, path[[0, 2, 4]])
    with pytest.raises(ValueError, match="up_to_layer must be in 0..1"):
        trained.interpolate(x[0], x[1], up_to_layer=2)


def _avi(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_avi_encode_round_trips_through_the_entry_point(run, trained, tmp_path):
    raw = np.load(run.parent / "data" / "test" / "images.npy")[:4]          # uint8 [4, 28, 28]
    np.save(tmp_path / "digits.npy", raw)
    r = _avi("encode", run, "--images", tmp_path / "digits.npy", "--out", tmp_path / "z.npz", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "z.npz")
    with np.load(tmp_path / "z.npz") as f:
        arrays = {k: f[k] for k in f.files}
    assert sorted(arrays) == ["mean", "sample", "scale"] and arrays["mean"].shape == (4, 2, 4, 8, 8)
    x = model_input(trained.spec, raw[:, None])
    api = trained.encode(x, seed=0)
    assert np.allclose(arrays["mean"], api.mean.numpy(), atol=1e-6)
    assert np.allclose(arrays["sample"], api.sample.numpy(), atol=1e-6)
    assert torch.allclose(trained.decode(arrays["mean"]), trained.reconstruct(x, temperature=0.0), atol=1e-6)


def test_avi_encode_refuses_images_of_another_shape(run, tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((2, 32, 32), np.uint8))
    r = _avi("encode", run, "--images", tmp_path / "big.npy", "--out", tmp_path / "z.npz", "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "[2, 32, 32, 1]" in r.stderr and "[N, 28, 28]" in r.stderr and not (tmp_path / "z.npz").exists()
    assert _avi("encode", "--help").stdout.count("avi encode runs/quickstart") == 1
