"""avi computes what the authors' TensorFlow code computes, number for number.

Fixtures (tests/fixtures/davi/, made by tools/reference/make_fixtures.py with their code;
see docs/reference.md): their weights keyed by attribute path, an input batch, the posterior
noise of every layer, and every per-layer term their model produced with it, with batch
norm on moving statistics (eval__) and on batch statistics (train__). The model is built
from their run.py flags and loaded through the importer's converter; no TensorFlow needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from builders.davi.flags import parse_command
from builders.devices import place
from builders.davi.importer import build_imported
from builders.davi.weights import ConversionError, convert, mixture_channel_order

FIX = Path(__file__).parent / "fixtures" / "davi"
RTOL = 1e-4
TINY = ["tiny_attn", "tiny_nvae", "tiny_cifar"]
# Made by tools/reference/make_fixtures.py with every gate, norm, attention-score scale and
# batch-norm statistic randomised: in the tiny_* models (their fresh initialisation) the
# attention and non-local gates are 0, so only these exercise those paths at full strength.
LIVE = ["live_omniglot", "live_cifar"]
# The same comparisons on another device: AVI_TEST_DEVICE=cuda on a GPU machine (bench/gpu_session.sh).
DEVICE = os.environ.get("AVI_TEST_DEVICE", "cpu")


def _flags(name: str) -> dict[str, str]:
    if name.startswith("trained"):
        return parse_command((FIX / name / "train.sh").read_text())
    return json.loads((FIX / name / "config.json").read_text())["flags"]


def _tensors(name: str) -> dict[str, np.ndarray]:
    stem = "final_model" if name.startswith("trained") else "weights"
    return dict(np.load(FIX / name / f"{stem}_by_path.npz"))


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _close(mine: torch.Tensor, theirs: np.ndarray, what: str) -> None:
    """Within RTOL of the reference, relative to the tensor's largest magnitude (elementwise
    relative error is meaningless for the entries near zero of a mean map)."""
    mine = mine.detach().cpu().double().numpy()
    theirs = theirs.astype(np.float64).reshape(mine.shape)
    err = np.max(np.abs(mine - theirs)) / max(np.max(np.abs(theirs)), 1e-12)
    assert err <= RTOL, f"{what}: relative difference {err:.2e} > {RTOL}"


def run_with_reference_noise(model, io, mode: str):
    """The model on the fixture's batch with its posterior noise; batch norm on moving
    statistics (eval) or on the batch's (train)."""
    dev = next(model.parameters()).device
    x = _nchw(io["x"]).float().to(dev)
    # Their preprocess: binary images 2x - 1, 8-bit ones 2x/255 - 1 (avi's model input).
    x = 2 * x - 1 if model.spec.data.distribution.kind == "bernoulli" else 2 * x / 255 - 1
    noise = [_nchw(io[f"eps_{l}"][0]).float().to(dev) for l in range(model.derived.layers)]
    model.train(mode == "train")
    with torch.no_grad():
        return model(x, posterior_noise=noise, record_latents=True)


def assert_same_terms(model, io, mode: str) -> None:
    """Every per-layer term and the likelihood of `model` equal the fixture's, within RTOL."""
    out = run_with_reference_noise(model, io, mode)
    for l, terms in enumerate(out.latents):
        _close(out.kl[:, l], io[f"{mode}__kl_{l}"], f"{mode} KL of layer {l}")
        for key in ("q_loc", "q_scale", "p_loc", "p_scale", "z"):
            if terms[key] is None:                       # layer 0: N(0, I) prior, not recorded
                assert f"{mode}__{key}_{l}" not in io.files
                continue
            _close(terms[key].permute(0, 2, 3, 1), io[f"{mode}__{key}_{l}"], f"{mode} {key} of layer {l}")
    params = io[f"{mode}__data_dist_params"]
    if hasattr(model.head, "m"):
        params = params[..., mixture_channel_order(model.head.m, model.head.c)]
    _close(out.params.permute(0, 2, 3, 1), params, f"{mode} data distribution parameters")
    _close(-out.nll, io[f"{mode}__log_px_z"], f"{mode} log p(x|z)")


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", TINY + LIVE + ["trained_tiny_attn"])
def test_same_terms_as_the_reference(name, mode):
    model, _, _ = build_imported(_flags(name), name, _tensors(name))
    model = place(model, DEVICE)        # as avi runs it: channels_last, IEEE fp32
    assert_same_terms(model, np.load(FIX / name / "io.npz"), mode)


@pytest.mark.parametrize("name,h5", [("live_omniglot", "weights.h5"),
                                     ("trained_tiny_attn", "final_model.h5")])
def test_h5_read_by_position_equals_the_attribute_paths(name, h5):
    """Keras HDF5 is read by position in Keras' tracking order; every tensor lands on the
    attribute path the authors' object graph gives it (live_omniglot has a non-local block
    in its up-sampling shortcut, the trained file has trained attention-score scales)."""
    pytest.importorskip("h5py", reason="reading .h5 files needs h5py (the [import] extra)")
    from avi_spec.loader import load_document
    from builders.network.build import build_model
    from builders.davi.h5 import read_h5
    from builders.davi.importer import spec_mapping
    model = build_model(load_document(spec_mapping(_flags(name), name).document).spec, "meta")
    got, want = read_h5(FIX / name / h5, model), _tensors(name)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_the_comparison_can_fail():
    """A perturbed weight moves the terms far outside the tolerance (the check has teeth)."""
    tensors = _tensors("tiny_attn")
    key = "_latent_layer/1/_prior_network/_params_network/_conv2d_layers/0/layer/bias"
    tensors[key] = tensors[key] + 1e-2
    model, _, _ = build_imported(_flags("tiny_attn"), "tiny_attn", tensors)
    with pytest.raises(AssertionError, match="eval KL of layer 1"):      # layer 0 is untouched
        assert_same_terms(model, np.load(FIX / "tiny_attn" / "io.npz"), "eval")


def test_noise_is_what_the_posterior_sample_uses():
    """z = loc + scale * eps exactly, and the same noise gives the same draw."""
    model, _, _ = build_imported(_flags("tiny_nvae"), "tiny_nvae", _tensors("tiny_nvae"))
    io = np.load(FIX / "tiny_nvae" / "io.npz")
    out = run_with_reference_noise(model, io, "eval")
    eps = _nchw(io["eps_1"][0]).float()
    t = out.latents[1]
    torch.testing.assert_close(t["z"], t["q_loc"] + t["q_scale"] * eps)
    with pytest.raises(ValueError, match="one tensor per layer"):
        model(torch.zeros(1, 1, 32, 32), posterior_noise=[eps])


def test_missing_tensor_is_named():
    tensors = _tensors("tiny_nvae")
    gone = "_latent_layer/2/_posterior_network/_params_network/_conv2d_layers/0/v"
    del tensors[gone]
    with pytest.raises(ConversionError, match=f"missing tensor {gone}"):
        build_imported(_flags("tiny_nvae"), "tiny_nvae", tensors)


def test_wrong_shape_is_named():
    tensors = _tensors("tiny_nvae")
    key = "_merge_decoder/_conv2d_layer/v"
    tensors[key] = tensors[key][..., :5]
    with pytest.raises(ConversionError, match=r"_merge_decoder/_conv2d_layer/v has shape \(1, 1, 20, 5\); "
                                              r"the model needs \(1, 1, 20, 16\)"):
        build_imported(_flags("tiny_nvae"), "tiny_nvae", tensors)


def test_leftover_tensor_is_named():
    """Weights of another configuration (attention) do not silently load into this one."""
    model, _, _ = build_imported(_flags("tiny_nvae"), "tiny_nvae", _tensors("tiny_nvae"))
    with pytest.raises(ConversionError, match="has no place in the model"):
        convert(_tensors("tiny_attn") | _tensors("tiny_nvae"), model)


def test_layer0_constant_initialised_as_the_reference():
    """Their VariableLayer uses variance scaling (0.33, fan-in, uniform) on a [1, S, S, C]
    variable: fan-in S * S, so U(-sqrt(0.99 / S^2), +sqrt(0.99 / S^2)), about +-0.062 at 16x16."""
    from avi_spec.loader import load_document
    from builders.network.build import build_model
    from builders.davi.importer import spec_mapping
    spec = load_document(spec_mapping(_flags("tiny_nvae"), "t").document).spec
    c = build_model(spec).constant.detach()
    bound = (0.99 / 16 ** 2) ** 0.5
    assert c.abs().max() <= bound and c.abs().max() > 0.9 * bound
    assert c.min() < 0 < c.max()


def test_h5_without_attention_scales_loads(tmp_path):
    """Files written by Keras before TF 2.5 lack the depth-wise attention-score scales (it did
    not track them): they load, with fixed temperatures, and every other tensor in place."""
    h5py = pytest.importorskip("h5py", reason="reading .h5 files needs h5py (the [import] extra)")
    from avi_spec.loader import load_document
    from builders.network.build import build_model
    from builders.davi.h5 import read_h5
    from builders.davi.importer import spec_mapping
    path = tmp_path / "old.h5"
    import shutil
    shutil.copy(FIX / "live_omniglot" / "weights.h5", path)
    dropped = 0
    with h5py.File(path, "r+") as f:
        for name in f.attrs["layer_names"]:
            g = f[name]
            names = [n.decode() if isinstance(n, bytes) else n for n in g.attrs["weight_names"]]
            keep = [n for n in names if not (n.split("/")[-1] == "scale:0" and "nonlocal" not in n)]
            dropped += len(names) - len(keep)
            g.attrs["weight_names"] = [n.encode() for n in keep]
    assert dropped == 5                        # 2 generative + 3 inference attentions
    flags = _flags("live_omniglot")
    tensors = read_h5(path, build_model(load_document(spec_mapping(flags, "x").document).spec, "meta"))
    want = _tensors("live_omniglot")
    assert set(want) - set(tensors) == {k for k in want if k.endswith("_attention/_alignment_function/scale")}
    model, resolved, _ = build_imported(flags, "x", tensors)
    assert not resolved.spec.attention.generative.learn_temperature
    assert float(model.layers[1].gen_attention.temperature) == 1.0
