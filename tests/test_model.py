"""Faithfulness tests of the whole model (builders/network/model.py, builders/network/build.py).

What is checked, against docs/model.md sections 6-8, 10 and 14:
  * parameter counts of every shipped spec against the published numbers and our exact
    independent counts (docs/model.md section 14), including the Table 5 G/I swap;
  * every shipped spec builds; a forward/backward pass reaches every parameter;
  * the factorisation order: priors never see later latents, posteriors only see the
    bottom-up maps at and below their layer, and the attention wiring (sources) is exactly
    the one asked for;
  * at initialisation (gamma = 0) the depth-wise attentions are switched off exactly;
  * the analytic KL and the importance weights agree with Monte Carlo estimates;
  * sampling shapes/ranges and bf16 autocast.

The numerical tests use tiny specs (8x8 images, 4x4 latents, 4 layers) built in double
precision (the latent/data distributions themselves are evaluated in float32 by design).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from avi_spec.derived import derive
from avi_spec.loader import load_spec
from avi_spec.schema import Spec
from avi_spec.validate import validate
from builders.network.build import build_model, parameter_groups, summary
from builders.network.distributions import Gaussian

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
ALL_SPEC_FILES = sorted(SPECS.glob("*.yaml")) + sorted((SPECS / "ablations").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models here are tiny: one thread is as fast and does not stall on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers

def _merge(base: dict, over: dict) -> dict:
    """Deep merge, `over` wins; a None in `over` replaces whatever was there. A distribution
    is replaced as a whole (its fields depend on its kind)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "distribution":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


TINY = {
    "name": "tiny",
    "data": {"dataset": "folder", "root": "unused", "image": {"channels": 1, "size": 8},
             "pad": 0, "binarize": "dynamic", "distribution": {"kind": "bernoulli", "crop": 0}},
    "hierarchy": {"layers": 4, "latent": {"channels": 3, "size": 4},
                  "posterior": {"log_scale": [-5, 5], "noise": 0},
                  "prior": {"log_scale": [-5, 5], "noise": 0}},
    "cells": {"preprocess": {"filters": 4, "scales": [-2], "nodes": 1},
              "encoder": {"scales": [0], "nodes": 1},
              "decoder": {"filters": 4, "scales": [0], "nodes": 1},
              "postprocess": {"scales": [2], "nodes": 1}},
    "attention": {"generative": {"key_dim": 4, "query_dim": 4, "layer_norm": True},
                  "inference": {"key_dim": 4, "query_dim": 4, "layer_norm": True}},
    "train": {"seed": 0},
}


def tiny_spec(**over) -> Spec:
    """The tiny spec with nested overrides, e.g. tiny_spec(attention={"generative": None}).

    The spec must pass the validator, except that a window `sources: {last: 1}` is allowed
    here (the validator rejects it as pointless: a single candidate makes the softmax
    identically 1), because the builder must still wire it correctly.
    """
    spec = Spec.model_validate(_merge(TINY, over))
    problems = [p for p in validate(spec) if not p.path.endswith("sources.last")]
    assert problems == [], "the test spec itself must be sound"
    return spec


def tiny_model(spec: Spec | None = None, gammas: tuple[float, float] | None = (0.7, 0.5),
               **over) -> nn.Module:
    """Built, double precision, eval mode (BN statistics frozen). `gammas` sets the gates of
    the generative / inference depth-wise attentions so that attention actually acts."""
    model = build_model(spec or tiny_spec(**over)).double().eval()
    if gammas is not None:
        set_attention_gammas(model, *gammas)
    return model


@torch.no_grad()
def set_attention_gammas(model, gen: float, inf: float) -> None:
    for layer in model.layers:
        if layer.gen_attention is not None:
            layer.gen_attention.gamma.fill_(gen)
        if layer.inf_attention is not None:
            layer.inf_attention.gamma.fill_(inf)


def binary_images(n: int, size: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, 1, size, size, generator=g) > 0.5).double() * 2 - 1)


class FixedLatents:
    """Replaces Gaussian.sample so that layer l's latent is exactly zs[l] (the l-th call in a
    top-down pass): the latents become inputs we control, independent of any parameter."""

    def __init__(self, monkeypatch, zs: list[torch.Tensor]):
        self.zs, self.calls = zs, 0
        fixed = self

        def sample(self_, temperature=1.0, eps=None, rows=None):
            z = fixed.zs[fixed.calls % len(fixed.zs)]
            fixed.calls += 1
            assert z.shape == self_.mean.shape
            return z.to(self_.mean.dtype)

        monkeypatch.setattr(Gaussian, "sample", sample)


class Recorder:
    """Forward hooks that keep the raw prior-head and posterior-head outputs of every layer."""

    def __init__(self, model):
        self.prior, self.post, self.handles = {}, {}, []
        for l, layer in enumerate(model.layers):
            if layer.prior_head is not None:
                self.handles.append(layer.prior_head.register_forward_hook(self._keep(self.prior, l)))
            self.handles.append(layer.posterior_head.register_forward_hook(self._keep(self.post, l)))

    @staticmethod
    def _keep(store, l):
        def hook(_module, _inputs, output):
            store[l] = output
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def random_latents(model, n: int, seed: int = 3) -> list[torch.Tensor]:
    d = model.derived
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d.latent_channels, d.feature_size, d.feature_size, generator=g,
                        dtype=torch.float64) for _ in range(d.layers)]


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True where a real dependency shows; False only for bit-identical results."""
    if torch.equal(a, b):
        return False
    assert (a - b).abs().max() > 1e-6, "tiny non-zero difference: neither clearly equal nor changed"
    return True


# ================================================================ 1. parameter counts

# Published counts (docs/model.md section 14; README for the three released models, the
# paper's Table 5 for the ablations), in parameters.
PUBLISHED = {
    "cifar10_l16.yaml": 118.97e6, "cifar10_l16_nvae.yaml": 79.21e6, "omniglot_l15.yaml": 7.87e6,
    "case01": 39.473e6, "case02": 44.585e6, "case03": 44.716e6, "case04": 50.471e6,
    "case05": 46.3e6, "case06": 52.151e6, "case07": 51.925e6, "case08": 58.451e6,
    "case09": 79.206e6, "case10": 89.602e6, "case11": 90.916e6, "case12": 102.744e6,
    "case13": 92.983e6, "case14": 104.882e6, "case15": 105.541e6, "case16": 118.966e6,
}
# Table 5 G/I swap (docs/model.md section 14): with the reference wiring, inference
# attention alone costs MORE parameters than generative attention alone (it widens the whole
# bottom-up path and every decoder cell by 20 channels), yet the paper prints the smaller
# number for "inference only". The published counts of cases 3-6 and 11-14 therefore belong
# to the other single-path model: our case 3 (I only) is compared with the number printed for
# case 5 (G only), 4 <-> 6, 5 <-> 3, 6 <-> 4, and likewise 11 <-> 13, 12 <-> 14 at L = 16.
# Cases with both switches or neither are unaffected.
TABLE5_SWAP = {3: 5, 4: 6, 5: 3, 6: 4, 11: 13, 12: 14, 13: 11, 14: 12}

# Our exact independent counts (docs/model.md section 14, column "avi").
EXACT = {
    "cifar10_l16.yaml": 118_966_391, "cifar10_l16_nvae.yaml": 79_206_420,
    # OMNIGLOT: 88 below the 7,873,683 of a count with those biases: the non-local block of the up-sampling
    # shortcut has no q/k/v biases (8 + 8 + 72), as in the authors' code (issue 9; their
    # shortcut layer sets use_bias=False and the block inherits it). Still within 1e-3 of
    # the published 7.87 M. The authors' code run on TF >= 2.5 counts 29 more: the
    # depth-wise attention-score scales, which older Keras did not track (learn_temperature).
    "omniglot_l15.yaml": 7_873_595, "mnist_l15.yaml": 25_013_267,   # MNIST: two such shortcuts
    "case01": 39_473_940, "case02": 44_585_108, "case03": 46_300_496, "case04": 52_151_184,
    "case05": 44_718_579, "case06": 50_470_867, "case07": 51_925_575, "case08": 58_458_983,
    "case09": 79_206_420, "case10": 89_601_556, "case11": 92_982_680, "case12": 104_882_776,
    "case13": 90_916_475, "case14": 102_743_771, "case15": 105_541_335, "case16": 118_966_391,
}


def _spec_path(key: str) -> Path:
    return SPECS / "ablations" / f"{key}.yaml" if key.startswith("case") else SPECS / key


def _published_for(key: str) -> float:
    if key.startswith("case"):
        case = int(key[4:])
        return PUBLISHED[f"case{TABLE5_SWAP.get(case, case):02d}"]
    return PUBLISHED[key]


@pytest.mark.parametrize("key", list(PUBLISHED))
def test_parameter_count_matches_published(key):
    s = summary(build_model(load_spec(_spec_path(key)).spec, "meta"))
    ours, published = s["parameters_reference_count"], _published_for(key)
    assert abs(ours - published) / published < 1e-3, (key, ours, published)


@pytest.mark.parametrize("key", list(EXACT))
def test_parameter_count_exact_independent_count(key):
    spec = load_spec(_spec_path(key)).spec
    s = summary(build_model(spec, "meta"))
    assert s["parameters_reference_count"] == EXACT[key]
    # Only the per-depth context LNs are left out: (L-2) x 2 x (C_D + q_E + k_D) with
    # generative attention on, nothing otherwise.
    d, L = derive(spec), spec.hierarchy.layers
    expected = (L - 2) * 2 * (d.c_d + d.q_e + d.k_d) if spec.attention.generative else 0
    assert s["parameters"] - s["parameters_reference_count"] == expected


def test_table5_swap_is_needed():
    """The labelled comparison fails for the swapped cases by 2-3.5% (so the swap is not a
    way of hiding a real mismatch), while the swapped one holds."""
    for case, other in TABLE5_SWAP.items():
        ours = summary(build_model(load_spec(_spec_path(f"case{case:02d}")).spec, "meta"))
        ours = ours["parameters_reference_count"]
        labelled = PUBLISHED[f"case{case:02d}"]
        assert 0.015 < abs(ours - labelled) / labelled < 0.04
        assert abs(ours - PUBLISHED[f"case{other:02d}"]) / ours < 1e-3


GROUPS_SECTION_11 = {
    # component: (CIFAR-10 attentive, NVAE baseline, OMNIGLOT)
    "preprocess": (1_596_214, 1_219_456, 120_852),
    "encoder cells": (49_997_440, 37_814_272, 2_816_640),
    "decoder cells": (60_753_400, 35_450_880, 3_874_176),
    "top-down merges": (1_406_560, 1_067_520, 244_636),
    "bottom-up merges": (2_219_040, 990_720, 232_316),
    "prior heads": (166_800, 154_800, 41_440),
    "posterior heads": (1_667_768, 1_541_888, 395_328),
    "layer-0 constant": (75_776, 65_536, 20_480),
    "generative attention": (24_855, 0, 6_062),
    "inference attention": (16_400, 0, 15),
    "final merge": (82_248, 71_168, 13_282),
    "postprocess": (897_690, 772_480, 108_042),     # OMNIGLOT: see EXACT (shortcut biases)
    "data head": (62_200, 57_700, 326),
}


@pytest.mark.parametrize("col,name,context_ln", [(0, "cifar10_l16.yaml", 8_288),
                                                 (1, "cifar10_l16_nvae.yaml", 0),
                                                 (2, "omniglot_l15.yaml", 13 * 2 * 80)])
def test_parameter_groups_section_11(col, name, context_ln):
    model = build_model(load_spec(SPECS / name).spec, "meta")
    groups = parameter_groups(model)
    for component, counts in GROUPS_SECTION_11.items():
        assert groups[component] == counts[col], component
    assert groups["context layer norms"] == context_ln
    assert set(groups) == set(GROUPS_SECTION_11) | {"context layer norms"}
    s = summary(model)
    assert s["parameters"] == sum(groups.values())
    assert s["parameters"] - s["parameters_reference_count"] == context_ln


def test_cifar_unit_sizes_section_11():
    """Handy unit sizes of the CIFAR-10 model: one encoder cell and one middle decoder cell."""
    model = build_model(load_spec(SPECS / "cifar10_l16.yaml").spec, "meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.encoders[5]) == 3_124_840
    assert count(model.layers[5].decoder) == 4_083_240


# ==================================================== 2. every spec builds; gradients

@pytest.mark.parametrize("path", ALL_SPEC_FILES, ids=lambda p: p.stem)
def test_every_shipped_spec_builds_on_meta(path):
    resolved = load_spec(path)
    model = build_model(resolved.spec, "meta")
    s = summary(model)
    assert s["parameters"] > 0
    L = resolved.spec.hierarchy.layers
    assert len(model.layers) == L and len(model.encoders) == L
    assert all(p.is_meta for p in model.parameters())


def _check_all_gradients(model, x, nonzero: bool):
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = (out.nll + out.kl.sum(1)).mean()
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], f"parameters outside the graph: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if nonzero:
        zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
        assert zero == [], f"parameters with an all-zero gradient: {zero}"


@torch.no_grad()
def _open_all_gates(model, value=0.5):
    """Every gate that starts at 0 (depth-wise and non-local gammas) set to a non-zero value,
    so that every parameter behind a gate can receive a non-zero gradient."""
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.fill_(value)


def test_forward_backward_quickstart_reaches_every_parameter():
    spec = load_spec(SPECS / "quickstart.yaml").spec
    model = build_model(spec).train()
    x = (torch.rand(2, 1, 32, 32) > 0.5).float() * 2 - 1
    # Gates open (as built they are 0): every parameter actually influences the loss.
    _open_all_gates(model)
    _check_all_gradients(model, x, nonzero=True)


def test_forward_backward_cifar_like_reaches_every_parameter():
    """Discretized logistic mixture, non-local cells, asymmetric prior bound, noise."""
    spec = tiny_spec(
        data={"image": {"channels": 3, "size": 8}, "binarize": "none",
              "distribution": {"kind": "discretized_logistic_mixture", "mixtures": 2}},
        hierarchy={"posterior": {"noise": 0.001}, "prior": {"log_scale": [-1, 5], "noise": 0.001}},
        cells={"preprocess": {"nonlocal": {"key_dim": 4, "query_dim": 4}},
               "encoder": {"nonlocal": {"key_dim": 4, "query_dim": 4}},
               "decoder": {"nonlocal": {"key_dim": 4, "query_dim": 4}},
               "topdown_merge": {"nonlocal": {"key_dim": 4, "query_dim": 4}},
               "bottomup_merge": {"nonlocal": {"key_dim": 4, "query_dim": 4}}})
    model = build_model(spec).train()
    x = torch.randint(0, 256, (3, 3, 8, 8)).float() * 2 / 255 - 1
    _check_all_gradients(model, x, nonzero=False)
    _open_all_gates(model)
    _check_all_gradients(model, x, nonzero=True)


@pytest.mark.parametrize("attention", [
    {"generative": {"sources": {"last": 1}}},
    {"generative": {"sources": {"explicit": {3: [1]}}}, "inference": {"sources": {"last": 1}}},
    {"generative": None},
    {"inference": None},
    {"generative": None, "inference": None},
])
def test_no_unused_parameters_in_wiring_variants(attention):
    """Restricted wiring must not leave parameters (e.g. context LNs nobody reads) behind."""
    model = build_model(tiny_spec(attention=attention)).train()
    x = binary_images(2).float()
    _open_all_gates(model)
    _check_all_gradients(model, x, nonzero=True)


# ======================================================================== 3. causality

def test_prior_and_posterior_ignore_later_latents(monkeypatch):
    """p(z_l | z_<l) and q(z_l | x, z_<l): perturbing z_m changes layer l iff m < l."""
    model = tiny_model()
    L, n = model.derived.layers, 2
    x = binary_images(n)
    with torch.no_grad():
        e = model.bottom_up(x)
    zs = random_latents(model, n)
    rec = Recorder(model)
    fixed = FixedLatents(monkeypatch, zs)

    def run(latents, posterior=True):
        fixed.zs, fixed.calls = latents, 0
        rec.prior.clear(), rec.post.clear()
        with torch.no_grad():
            model.top_down(e if posterior else None, n)
        assert fixed.calls == L
        return dict(rec.prior), dict(rec.post)

    for posterior in (True, False):
        base_p, base_q = run(zs, posterior)
        for m in range(L):
            pert = [z.clone() for z in zs]
            pert[m] += torch.randn_like(pert[m])
            p, q = run(pert, posterior)
            for l in range(1, L):
                assert changed(p[l], base_p[l]) == (m < l), ("prior", posterior, l, m)
            if posterior:
                for l in range(L):
                    assert changed(q[l], base_q[l]) == (m < l), ("posterior", l, m)
    rec.close()


INF_WIRING = [
    # (inference sources, expected candidates per layer for L = 4; 4 = preprocessing output)
    ("all", {0: [0, 1, 2, 3, 4], 1: [1, 2, 3, 4], 2: [2, 3, 4], 3: [3, 4]}),
    ({"last": 2}, {0: [0, 1], 1: [1, 2], 2: [2, 3], 3: [3, 4]}),
    ({"last": 1}, {0: [0], 1: [1], 2: [2], 3: [3]}),
    ({"explicit": {1: [1, 3], 2: [2]}}, {0: [0, 1, 2, 3, 4], 1: [1, 3], 2: [2], 3: [3, 4]}),
    (None, {0: [0], 1: [1], 2: [2], 3: [3]}),
]


@pytest.mark.parametrize("sources,expected", INF_WIRING, ids=lambda v: str(v)[:24])
def test_posterior_reads_exactly_its_bottom_up_candidates(monkeypatch, sources, expected):
    """With z_<l held fixed, q(z_l | x, z_<l) depends on e_m iff m is layer l itself or one
    of its inference candidates (never m < l); priors never depend on e at all."""
    inf = None if sources is None else {"sources": sources}
    model = tiny_model(attention={"inference": inf})
    L, n = model.derived.layers, 2
    if sources is not None:
        assert {l: list(layer.inf_sources) for l, layer in enumerate(model.layers)} == expected
    x = binary_images(n)
    with torch.no_grad():
        e = model.bottom_up(x)
    assert len(e) == L + 1
    fixed = FixedLatents(monkeypatch, random_latents(model, n))
    rec = Recorder(model)

    def run(maps):
        fixed.calls = 0
        rec.prior.clear(), rec.post.clear()
        with torch.no_grad():
            model.top_down(maps, n)
        return dict(rec.prior), dict(rec.post)

    base_p, base_q = run(e)
    for m in range(L + 1):
        pert = list(e)
        pert[m] = e[m] + torch.randn_like(e[m])
        p, q = run(pert)
        for l in range(1, L):
            assert not changed(p[l], base_p[l]), ("prior reads e", l, m)
        for l in range(L):
            assert changed(q[l], base_q[l]) == (m in expected[l]), ("posterior", l, m)
    rec.close()


class DecoderProbe:
    """Adds a zero tensor `delta[m]` (a leaf we can differentiate by) to the output of layer m's
    decoder cell, and keeps layer l's attention contribution gamma * A' = p_l - ctx'_l."""

    def __init__(self, model):
        self.delta, self.contribution, self.handles = {}, {}, []
        for m, layer in enumerate(model.layers):
            if layer.decoder is not None:
                self.handles.append(layer.decoder.register_forward_hook(self._add(m)))
            if layer.gen_attention is not None:
                self.handles.append(layer.gen_attention.register_forward_hook(self._keep(m)))

    def _add(self, m):
        def hook(_module, _inputs, out):
            self.delta[m] = torch.zeros_like(out, requires_grad=True)
            return out + self.delta[m]
        return hook

    def _keep(self, l):
        def hook(_module, _inputs, out):
            condition, ctx_next, _scores = out
            self.contribution[l] = condition - ctx_next
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


GEN_WIRING = [
    ("all", {1: [0], 2: [0, 1], 3: [0, 1, 2]}),
    ({"last": 2}, {1: [0], 2: [0, 1], 3: [1, 2]}),
    ({"last": 1}, {1: [0], 2: [1], 3: [2]}),
    ({"explicit": {3: [0, 2]}}, {1: [0], 2: [0, 1], 3: [0, 2]}),
    ({"explicit": {3: [1]}}, {1: [0], 2: [0, 1], 3: [1]}),
]


@pytest.mark.parametrize("sources,expected", GEN_WIRING, ids=lambda v: str(v)[:24])
def test_generative_attention_wiring(monkeypatch, sources, expected):
    """The prior of layer l attends to exactly the contexts its sources name.

    The top-down stream itself carries every earlier context into layer l, so a plain
    dependency test cannot isolate the attention. Two paths that only attention uses do:
      * the generative KEY channels of c_m feed nothing but the attention scores, so (latents
        held fixed) d(gamma A'_l)/d key_m != 0 iff m is a source of l (when l has >= 2
        sources; with one source the softmax is identically 1);
      * the attention output of layer l cannot depend on the decoder output of any layer
        that is neither a source of l, nor on the stream path to a source, nor l itself: in
        particular the newest context c_{l-1} when it is not a source.
    The recorded scores must have one channel per source and sum to 1.
    """
    model = tiny_model(attention={"generative": {"sources": sources}})
    d, L, n = model.derived, model.derived.layers, 2
    assert {l: list(layer.gen_sources) for l, layer in enumerate(model.layers)
            if layer.gen_attention is not None} == expected
    x = binary_images(n)

    out = model(x, record_attention=True)
    scores = out.attention["generative"]
    assert sorted(scores) == sorted(expected)
    for l, a in scores.items():
        assert a.shape == (n, len(expected[l]), d.feature_size, d.feature_size)
        torch.testing.assert_close(a.sum(1), torch.ones_like(a.sum(1)))
        if len(expected[l]) == 1:
            assert torch.equal(a, torch.ones_like(a))
    # Inference scores as wired: all candidates e_l..e_L.
    for l, a in out.attention["inference"].items():
        assert a.shape == (n, L + 1 - l, d.feature_size, d.feature_size)

    FixedLatents(monkeypatch, random_latents(model, n))
    probe = DecoderProbe(model)
    model(x)
    w = d.context_width
    for l in range(1, L):
        y = probe.contribution[l]
        weights = torch.randn_like(y)
        inputs = [model.constant] + [probe.delta[m] for m in range(1, L)]
        grads = torch.autograd.grad((y * weights).sum(), inputs, retain_graph=True,
                                    allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
        for m in range(L - 1):                     # layers that emit a key
            key_grad = grads[m][:, w:w + d.k_d]
            assert key_grad.shape[1] == d.k_d
            # Keys matter through the softmax (>= 2 sources), or, for a context that has
            # had its per-depth plain LN (m <= l - 2: the LN runs over values and key
            # together), through the normalised values.
            reads_key = m in expected[l] and (len(expected[l]) >= 2 or m <= l - 2)
            assert bool(key_grad.abs().sum() > 0) == reads_key, (l, m)
        for m in range(l + 1, L):                  # later layers: nothing at all
            assert not grads[m].abs().sum() > 0, (l, m)
        if l >= 2 and (l - 1) not in expected[l] and len(expected[l]) == 1:
            # The newest context is not read: the decoder output of layer l - 1 (which is
            # also the stream input of layer l, hence of its query, irrelevant with a single
            # candidate) has no influence on the attention output.
            assert not grads[l - 1].abs().sum() > 0, (l, l - 1)
        for m in expected[l]:
            assert grads[m].abs().sum() > 0, (l, m)
    probe.close()


def test_attention_output_is_not_passed_down(monkeypatch):
    """Section 4 step 9: c_l = [ctx' | kD_l]; the attention output A' shapes only layer l's
    prior and posterior. With latents fixed, perturbing the key of the layer-0 context moves
    the prior/posterior of layer 2 (which reads c_0 among two candidates) and nothing else:
    layer 3 does not read c_0, and would only move if A'_2 flowed down the stream."""
    model = tiny_model(attention={"generative": {"sources": {"explicit": {2: [0, 1], 3: [1, 2]}}}})
    L, n, w = model.derived.layers, 2, model.derived.context_width
    x = binary_images(n)
    FixedLatents(monkeypatch, random_latents(model, n))
    rec = Recorder(model)

    def run():
        rec.prior.clear(), rec.post.clear()
        with torch.no_grad():
            model(x)
        return dict(rec.prior), dict(rec.post)

    base_p, base_q = run()
    with torch.no_grad():
        model.constant[:, w:] += torch.randn_like(model.constant[:, w:])
    p, q = run()
    assert [l for l in range(1, L) if changed(p[l], base_p[l])] == [2]
    assert [l for l in range(L) if changed(q[l], base_q[l])] == [2]
    rec.close()


def test_inference_query_is_the_raw_context():
    """Section 5 step 3: the inference query qE_l is the first q_E channels of layer l's raw
    decoder output (layer 0: of the learned constant), read before ctx' = ctx + GELU(LN(ctx))
    and before the generative attention is added; the generative query is the last q_D."""
    model = tiny_model()
    d = model.derived
    decoded, queries = {}, {}
    handles = []
    for l, layer in enumerate(model.layers):
        if layer.decoder is not None:
            handles.append(layer.decoder.register_forward_hook(
                lambda _m, _i, out, l=l: decoded.__setitem__(l, out)))
        handles.append(layer.inf_attention.register_forward_pre_hook(
            lambda _m, inputs, l=l: queries.__setitem__(("inf", l), inputs[1])))
        if layer.gen_attention is not None:
            handles.append(layer.gen_attention.register_forward_pre_hook(
                lambda _m, inputs, l=l: queries.__setitem__(("gen", l), inputs[1])))
    with torch.no_grad():
        model(binary_images(2))
    assert torch.equal(queries[("inf", 0)], model.constant[:, :d.q_e].expand(2, -1, -1, -1))
    for l in range(1, d.layers):
        assert torch.equal(queries[("inf", l)], decoded[l][:, :d.q_e])
        assert torch.equal(queries[("gen", l)], decoded[l][:, -d.q_d:])
    for h in handles:
        h.remove()


def test_attention_contribution_is_real_at_nonzero_gamma():
    """Sanity for the tests above: with gamma != 0 the attention changes the prior."""
    model = tiny_model()
    x = binary_images(2)
    torch.manual_seed(5)
    a = model(x)
    set_attention_gammas(model, 0.0, 0.5)
    torch.manual_seed(5)
    b = model(x)
    assert not torch.equal(a.kl[:, 1:], b.kl[:, 1:])
    assert torch.equal(a.kl[:, 0], b.kl[:, 0])      # layer 0 has no generative attention


# ===================================================== 4. gamma = 0 switches attention off

class WithoutGenerativeAttention(nn.Module):
    """Stands in for a layer's GenerativeAttention: never attends; keeps (or not) the
    layer-norm path ctx' = ctx + GELU(LN(ctx)) of the original."""

    def __init__(self, original, keep_layer_norm: bool):
        super().__init__()
        self.norm = original.norm_context if keep_layer_norm else None

    def forward(self, ctx, query, keys, values):
        c = self.norm(ctx) if self.norm is not None else ctx
        b, _, h, w = ctx.shape
        return c, c, torch.full((b, len(keys), h, w), float("nan"))


class WithoutInferenceAttention(nn.Module):
    def __init__(self, original, keep_layer_norm: bool):
        super().__init__()
        self.norm = original.norm_features if keep_layer_norm else None

    def forward(self, h, query, keys, values):
        b, _, s, t = h.shape
        return (self.norm(h) if self.norm is not None else h), torch.full((b, len(keys), s, t),
                                                                           float("nan"))


def _switched_off(model, keep_layer_norm: bool):
    other = copy.deepcopy(model)
    for layer in other.layers:
        if layer.gen_attention is not None:
            layer.gen_attention = WithoutGenerativeAttention(layer.gen_attention, keep_layer_norm)
        if layer.inf_attention is not None:
            layer.inf_attention = WithoutInferenceAttention(layer.inf_attention, keep_layer_norm)
    return other


def _outputs(model, x, seed=11):
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(x)
    return out.nll, out.kl, out.log_pz, out.log_qz


def _same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gamma_zero_equals_model_without_attention(mode):
    """layer_norm off: at initialisation (gamma = 0) the model is exactly the one whose
    attention modules are removed (same weights, same noise)."""
    model = build_model(tiny_spec(attention={"generative": {"layer_norm": False},
                                             "inference": {"layer_norm": False}})).double()
    getattr(model, mode)()
    gammas = [p for n, p in model.named_parameters() if n.endswith("attention.gamma")]
    assert len(gammas) == 3 + 4 and all(g.item() == 0.0 for g in gammas)
    x = binary_images(3)
    built, off = _outputs(model, x), _outputs(_switched_off(model, False), x)
    assert _same(built, off)
    # Control: the comparison can fail; once attention acts, it does.
    set_attention_gammas(model, 0.3, 0.3)
    assert not _same(_outputs(model, x), off)


def test_gamma_zero_with_layer_norm_differs_only_by_the_norm_path():
    """layer_norm on: with gamma = 0 the attention output is ignored but ctx' = ctx +
    GELU(LN(ctx)) (generative) and h' + GELU(LN(h')) (inference) still apply."""
    model = tiny_model(gammas=None)
    x = binary_images(3)
    built = _outputs(model, x)
    assert _same(built, _outputs(_switched_off(model, True), x))
    assert not _same(built, _outputs(_switched_off(model, False), x))


# ================================================================ 5. KL vs Monte Carlo

def test_kl_matches_monte_carlo(monkeypatch):
    """Per layer: the analytic KL(q(z_l|x,z_<l) || p(z_l|z_<l)) equals E_q[log q - log p]."""
    model = tiny_model(hierarchy={"prior": {"log_scale": [-1, 5]}})
    with torch.no_grad():                       # make posterior and prior clearly differ
        for layer in model.layers:
            conv = layer.posterior_head if layer.l >= 1 else layer.posterior_head[-1]
            conv.bias.add_(0.5 * torch.randn_like(conv.bias))
    n = 4000
    x = binary_images(1)
    calls: list[torch.Tensor] = []
    original = Gaussian.log_prob

    def log_prob(self, z):
        lp = original(self, z)
        calls.append(lp.flatten(1).sum(1))
        return lp

    monkeypatch.setattr(Gaussian, "log_prob", log_prob)
    with torch.no_grad():
        e = [t.expand(n, -1, -1, -1) for t in model.bottom_up(x)]
        _, stats = model.top_down(e, n)
    L = model.derived.layers
    assert len(calls) == 2 * L                   # per layer: log p(z_l), then log q(z_l)
    kl = stats["kl"].double()
    for l in range(L):
        log_p, log_q = calls[2 * l].double(), calls[2 * l + 1].double()
        mc = log_q - log_p
        # Conditionally on z_<l, E[log q - log p] = KL_l exactly: test the difference.
        diff = mc - kl[:, l]
        assert diff.mean().abs() < 4 * diff.std() / math.sqrt(n), l
        assert kl[:, l].mean() > 0.5                # non-trivial KL
    total = (stats["log_qz"] - stats["log_pz"]).double()
    torch.testing.assert_close(total, sum(calls[2 * l + 1] - calls[2 * l] for l in range(L)).double(),
                               rtol=1e-5, atol=1e-3)
    diff = total - kl.sum(1)
    assert diff.mean().abs() < 4 * diff.std() / math.sqrt(n)


# =========================================================== 6. importance weights

@pytest.mark.parametrize("k", [1, 3])
def test_log_weights_are_the_elbo_terms_of_the_same_samples(k):
    """log_weights(x, k)[b, j] = log p(x|z) + log p(z) - log q(z|x) for the very samples that
    forward draws on the image-major batch x.repeat_interleave(k) (same seed): i.e.
    -nll - log_qz + log_pz, with rows b*k .. b*k+k-1 belonging to image b."""
    model = tiny_model()
    x = binary_images(3)
    torch.manual_seed(7)
    with torch.no_grad():
        out = model(x.repeat_interleave(k, 0))
    torch.manual_seed(7)
    with torch.no_grad():
        lw = model.log_weights(x, k)
    assert lw.shape == (3, k)
    expected = (-out.nll - out.log_qz + out.log_pz).to(lw.dtype).view(3, k)
    torch.testing.assert_close(lw, expected, rtol=1e-6, atol=1e-4)


def test_log_weights_mean_is_minus_nelbo_and_iwae_is_tighter():
    model = tiny_model()
    # Two very different images so that a wrong (batch-major) layout would show.
    x = torch.stack([-torch.ones(1, 8, 8), torch.ones(1, 8, 8)]).double()
    k = 1500
    with torch.no_grad():
        lw = model.log_weights(x, k).double()                         # [2, k]
        nelbo = model(x.repeat_interleave(k, 0)).nelbo.double().view(2, k)
    assert lw.shape == (2, k)
    for b in range(2):
        se = math.sqrt(lw[b].var() / k + nelbo[b].var() / k)
        assert (lw[b].mean() + nelbo[b].mean()).abs() < 4 * se, b
    assert (nelbo[0].mean() - nelbo[1].mean()).abs() > 10 * math.sqrt(nelbo.var(1).sum() / k)

    # Jensen on the same samples: log mean exp >= mean, for every draw.
    chunks = lw.view(2, -1, 30)                                       # 50 draws of K = 30
    iwae = torch.logsumexp(chunks, -1) - math.log(30)
    assert (iwae >= chunks.mean(-1) - 1e-9).all()
    # Independent draws: the IWAE bound lies above the ELBO on average, more with larger K.
    with torch.no_grad():
        iwae5 = torch.logsumexp(model.log_weights(x.repeat_interleave(100, 0), 5).double(),
                                1) - math.log(5)
    elbo = lw.mean(1)
    iwae5 = iwae5.view(2, 100).mean(1)
    iwae30 = iwae.mean(1)
    assert (iwae5 > elbo).all() and (iwae30 > iwae5).all()


# ======================================================================= 7. sampling

def test_sample_binary_shapes_range_and_temperature_zero():
    model = build_model(load_spec(SPECS / "quickstart.yaml").spec).eval()
    s = model.sample(4, temperature=1.0)
    assert s.shape == (4, 1, 28, 28)
    assert s.min() >= 0 and s.max() <= 1
    draws = model.sample(3, mode="sample")
    assert draws.shape == (3, 1, 28, 28) and set(draws.unique().tolist()) <= {0.0, 1.0}
    t0 = model.sample(3, temperature=0.0)
    assert torch.equal(t0[0], t0[1]) and torch.equal(t0[0], t0[2])
    assert torch.equal(t0, model.sample(3, temperature=0.0))
    assert not torch.equal(s[0], s[1])
    rec = model.reconstruct(torch.zeros(2, 1, 32, 32) - 1)
    assert rec.shape == (2, 1, 28, 28) and rec.min() >= 0 and rec.max() <= 1


def test_sample_discretized_logistic_shapes_and_range():
    spec = tiny_spec(
        data={"image": {"channels": 3, "size": 32}, "binarize": "none",
              "distribution": {"kind": "discretized_logistic_mixture", "mixtures": 3}},
        hierarchy={"layers": 3, "latent": {"size": 8}},
        cells={"preprocess": {"scales": [-2, -2]}, "postprocess": {"scales": [2, 2]}})
    model = build_model(spec).eval()
    s = model.sample(3, temperature=0.8)
    assert s.shape == (3, 3, 32, 32)
    assert s.min() >= 0 and s.max() <= 1
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() * 2 / 255 - 1
    assert model.reconstruct(x).shape == (2, 3, 32, 32)
    out = model(x)
    assert out.nll.shape == (2,) and out.kl.shape == (2, 3) and torch.isfinite(out.nll).all()


# ========================================================================= 8. autocast

@pytest.mark.parametrize("kind", ["bernoulli", "discretized_logistic_mixture"])
def test_bf16_autocast_cpu(kind):
    if kind == "bernoulli":
        spec = tiny_spec()
        x = binary_images(2).float()
    else:
        spec = tiny_spec(data={"image": {"channels": 3, "size": 8}, "binarize": "none",
                               "distribution": {"kind": kind, "mixtures": 2}})
        x = torch.randint(0, 256, (2, 3, 8, 8)).float() * 2 / 255 - 1
    model = build_model(spec).train()
    set_attention_gammas(model, 0.5, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, record_attention=True)
        lw = model.log_weights(x, 2)
    for t in (out.nll, out.kl, out.log_pz, out.log_qz, lw):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    (out.nll + out.kl.sum(1)).mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    for scores in out.attention["generative"].values():
        assert scores.dtype == torch.float32
    # Same weights, fp32, no autocast: close (bf16 rounding only).
    model.eval()
    torch.manual_seed(0)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        low = model(x)
    torch.testing.assert_close(low.nelbo, ref.nelbo, rtol=0.05, atol=1.0)
