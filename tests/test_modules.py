"""Unit tests for the building blocks in builders/ (conv, non-local, cells, attention, heads)."""
import math
from pathlib import Path
from typing import Sequence

import pytest
import torch
import torch.nn.functional as F

from builders.network.cells import CellGroup, FactorizedReduce, Node, ResidualBlock
from builders.network.conv import WNConv2d
from builders.network.depthwise_attention import (ChannelLayerNorm, ResidualGeluNorm,
                                          depthwise_attend)
from builders.network.distributions import (BernoulliHead, DiscretizedLogisticMixtureHead, Gaussian,
                                    bound_asymmetric, bound_symmetric, kl)
from builders.network.nonlocal_block import NonLocal


def depthwise_attend_loop(query: torch.Tensor, keys_list: Sequence[torch.Tensor],
                          values_list: Sequence[torch.Tensor],
                          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3-4 written out pixel by pixel and candidate by candidate (the test reference)."""
    b_, _, h_, w_ = query.shape
    n = len(keys_list)
    out = torch.zeros(b_, values_list[0].shape[1], h_, w_, dtype=torch.float64)
    scores = torch.zeros(b_, n, h_, w_, dtype=torch.float64)
    for b in range(b_):
        for i in range(h_):
            for j in range(w_):
                q = query[b, :, i, j].double()
                logits = [temperature * float(q @ keys_list[m][b, :, i, j].double())
                          for m in range(n)]
                top = max(logits)
                weights = [torch.exp(torch.tensor(l - top, dtype=torch.float64)) for l in logits]
                total = sum(weights)
                for m in range(n):
                    a = weights[m] / total
                    scores[b, m, i, j] = a
                    out[b, :, i, j] += a * values_list[m][b, :, i, j].double()
    return out, scores



def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- WNConv2d

@pytest.mark.parametrize("k,c_in,c_out,bias", [(3, 7, 5, True), (1, 4, 9, False), (3, 138, 50, True)])
def test_wnconv_param_count(k, c_in, c_out, bias):
    conv = WNConv2d(c_in, c_out, k, bias=bias)
    assert n_params(conv) == k * k * c_in * c_out + c_out + (c_out if bias else 0)


def test_wnconv_init_effective_weight_and_ranges():
    conv = WNConv2d(16, 8, 3)
    assert torch.allclose(conv.weight, math.exp(0.01) * conv.v, rtol=1e-5, atol=0)
    a = math.sqrt(0.99 / (9 * 16))
    assert conv.v.abs().max() <= a and conv.v.abs().max() > 0.9 * a
    assert conv.bias.abs().max() <= math.sqrt(0.99 / 8)


def test_wnconv_forward_matches_conv2d_and_tf_padding():
    conv = WNConv2d(3, 4, 3, stride=2)
    x = torch.randn(2, 3, 8, 8)
    y = conv(x)
    assert y.shape == (2, 4, 4, 4)
    # TF "same" for stride 2: nothing on top/left, one row/column on bottom/right.
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
    assert torch.allclose(y, ref, atol=1e-6)
    assert not torch.allclose(y, F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1))
    assert WNConv2d(3, 4, 3)(x).shape == (2, 4, 8, 8)
    assert WNConv2d(3, 4, 1, stride=2)(x).shape == (2, 4, 4, 4)


def test_wnconv_scale_invariant_in_v():
    conv = WNConv2d(3, 4, 3)
    w = conv.weight.detach().clone()
    with torch.no_grad():
        conv.v.mul_(3.7)
    assert torch.allclose(conv.weight, w, atol=1e-6)


# ---------------------------------------------------------------- parameter counts (ARCH 11)

def test_nonlocal_param_count():
    assert n_params(NonLocal(276, 32)) == 94_522
    c, d = 64, 8
    assert n_params(NonLocal(c, d)) == 2 * (c * d + 2 * d) + c * c + 2 * c + 2


def test_block_and_group_param_counts():
    node = 2 * 276 + 94_522 + (9 * 276 * 276 + 2 * 276)
    assert n_params(ResidualBlock(276, 0, 32)) == 2 * node
    assert n_params(CellGroup(276, [0, 0], 32)) == 3_124_840
    # Preprocessing of the NVAE baseline: stem 3->128 (3,712), block(0) at 128, block(-2) 128->256.
    pre = CellGroup(3, [0, -2], None, stem=(3, 128))
    stem = 9 * 3 * 128 + 2 * 128
    b0 = 2 * (2 * 128 + 9 * 128 * 128 + 2 * 128)
    b1 = (2 * 128 + 9 * 128 * 256 + 2 * 256) + (2 * 256 + 9 * 256 * 256 + 2 * 256) + (128 * 256 + 2 * 256)
    assert n_params(pre) == stem + b0 + b1 == 1_219_456  # ARCH 11, baseline preprocessing
    # Postprocessing of the attentive model (no non-local), ARCH 11.
    assert n_params(CellGroup(276, [2, 0])) == 897_690


@pytest.mark.parametrize("group,count", [
    (lambda: CellGroup(3, [0, -2], 32, stem=(3, 138)), 1_596_214),   # CIFAR attentive preprocessing
    (lambda: CellGroup(316, [0, 0], 32), 4_083_240),                 # middle decoder cell
    (lambda: CellGroup(1, [0, 0, -2], None, stem=(1, 36)), 120_852),  # OMNIGLOT preprocessing
    (lambda: CellGroup(72, [2, 0, 0], 8), 108_042),                  # OMNIGLOT postprocessing (no
    # q/k/v biases in the up-sampling shortcut's non-local block, as the authors' code: issue 9)
])
def test_published_group_counts(group, count):
    with torch.device("meta"):
        assert n_params(group()) == count


def test_block_shapes_and_group_attributes():
    x = torch.randn(2, 8, 8, 8)
    assert ResidualBlock(8, 0, 4)(x).shape == (2, 8, 8, 8)
    assert ResidualBlock(8, -2, 4)(x).shape == (2, 16, 4, 4)
    assert ResidualBlock(8, 2, 4)(x).shape == (2, 4, 16, 16)
    assert FactorizedReduce(8, 10)(x).shape == (2, 10, 4, 4)
    g = CellGroup(3, [0, -2], 4, stem=(3, 6))
    assert g.out_channels == 12
    assert g(torch.randn(2, 3, 8, 8)).shape == (2, 12, 4, 4)
    up = CellGroup(12, [2, 0])
    assert up.out_channels == 6
    assert up(torch.randn(2, 12, 4, 4)).shape == (2, 6, 8, 8)
    with pytest.raises(ValueError):
        CellGroup(4, [0], stem=(3, 6))


def test_scale0_block_is_residual():
    block = ResidualBlock(6, 0).eval()
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(block(x), x + 0.1 * block.nodes(x))


def test_everything_constructs_on_meta():
    with torch.device("meta"):
        modules = [WNConv2d(276, 276, 3), NonLocal(276, 32), Node(276, 276, 2, 32),
                   FactorizedReduce(138, 276), ResidualBlock(276, 2, 32),
                   CellGroup(3, [0, -2], 32, stem=(3, 138)), ResidualGeluNorm(276),
                   BernoulliHead(36), DiscretizedLogisticMixtureHead(138)]
    for m in modules:
        assert all(p.is_meta for p in m.parameters())


# ---------------------------------------------------------------- non-local

def test_nonlocal_matches_textbook_formula():
    block = NonLocal(6, 3)
    with torch.no_grad():
        block.gamma.fill_(0.7)
        block.temperature.fill_(0.6)
    x = torch.randn(2, 6, 4, 5)
    q = F.conv2d(x, block.query.weight, block.query.bias).flatten(2)   # [B,d,N]
    k = F.conv2d(x, block.key.weight, block.key.bias).flatten(2)
    v = F.conv2d(x, block.value.weight, block.value.bias).flatten(2)   # [B,C,N]
    a = torch.softmax(0.6 * q.transpose(1, 2) @ k, dim=-1)             # [B,N_i,N_j]
    y = (v @ a.transpose(1, 2)).reshape(x.shape)
    assert torch.allclose(block(x), x + 0.7 * y, atol=1e-5)
    assert torch.equal(NonLocal(6, 3)(x), x)  # gamma = 0 at init


# ---------------------------------------------------------------- depth-wise attention

@pytest.mark.parametrize("n", [1, 5])
def test_depthwise_attend_matches_loop(n):
    b, d, c, h, w = 2, 4, 3, 3, 4
    q = torch.randn(b, d, h, w)
    keys = [torch.randn(b, d, h, w) for _ in range(n)]
    vals = [torch.randn(b, c, h, w) for _ in range(n)]
    out, scores = depthwise_attend(q, torch.stack(keys), torch.stack(vals), 0.8)
    ref_out, ref_scores = depthwise_attend_loop(q, keys, vals, 0.8)
    assert out.shape == (b, c, h, w) and scores.shape == (b, n, h, w)
    assert torch.allclose(out.double(), ref_out, atol=1e-5)
    assert torch.allclose(scores.double(), ref_scores, atol=1e-6)
    assert torch.allclose(scores.sum(1), torch.ones(b, h, w), atol=1e-6)
    out_list, _ = depthwise_attend(q, keys, vals, 0.8)  # list inputs accepted
    assert torch.allclose(out_list, out)


def test_depthwise_attend_mask():
    n, b, d, c, h, w = 4, 2, 3, 2, 3, 3
    q = torch.randn(b, d, h, w)
    keys, vals = torch.randn(b, n, d, h, w), torch.randn(b, n, c, h, w)
    mask = torch.tensor([True, False, True, False])
    out, scores = depthwise_attend(q, keys.transpose(0, 1), vals.transpose(0, 1), mask=mask)
    ref_out, ref_scores = depthwise_attend_loop(q, list(keys[:, mask].unbind(1)),
                                                list(vals[:, mask].unbind(1)))
    assert torch.all(scores[:, ~mask] == 0)
    assert torch.allclose(scores[:, mask].double(), ref_scores, atol=1e-6)
    assert torch.allclose(out.double(), ref_out, atol=1e-5)


def test_depthwise_attend_autocast_scores_are_float32():
    q, keys, vals = torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 4, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, scores = depthwise_attend(q, keys, vals)
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, depthwise_attend(q, keys, vals)[1])


def test_channel_layer_norm_and_residual_gelu():
    x = torch.randn(2, 5, 3, 4)
    ln = ChannelLayerNorm(5)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (5,), eps=1e-5).permute(0, 3, 1, 2)
    assert torch.allclose(ln(x), ref, atol=1e-6)
    assert n_params(ln) == 10
    rg = ResidualGeluNorm(5)
    assert torch.allclose(rg(x), x + F.gelu(ref, approximate="tanh"), atol=1e-6)


# ---------------------------------------------------------------- Gaussians and bounds

def test_gaussian_kl_matches_monte_carlo():
    q = Gaussian(torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.5, 1.3, 0.2]))
    p = Gaussian(torch.tensor([0.0, -0.5, 1.0]), torch.tensor([1.0, 0.7, 0.9]))
    z = q.mean + q.sigma * torch.randn(400_000, 3)
    terms = (q.log_prob(z) - p.log_prob(z)).double()
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(len(terms))
    assert torch.all((mc - kl(q, p).double()).abs() < 5 * se + 1e-4)
    assert torch.allclose(q.kl(q), torch.zeros(3), atol=1e-6)


def test_gaussian_log_prob_and_sample():
    g = Gaussian(torch.tensor([0.5]), torch.tensor([2.0]))
    ref = torch.distributions.Normal(0.5, 2.0).log_prob(torch.tensor([1.7]))
    assert torch.allclose(g.log_prob(torch.tensor([1.7])), ref)
    assert torch.equal(g.sample(temperature=0.0), g.mean)
    g = Gaussian.from_raw(torch.tensor([100.0]), torch.tensor([-100.0]))
    assert g.mean.item() == pytest.approx(5.0, abs=1e-4)
    assert g.sigma.item() == pytest.approx(math.exp(-5) + 0.01, rel=1e-3)


def test_bound_symmetric():
    u = torch.zeros(1, requires_grad=True)
    bound_symmetric(u, 5.0).backward()
    assert u.grad.item() == pytest.approx(0.5)
    big = torch.tensor([-1e4, -30.0, 30.0, 1e4])
    out = bound_symmetric(big, 5.0)
    assert torch.all(out.abs() <= 5.0) and out[0] == pytest.approx(-5.0) and out[-1] == pytest.approx(5.0)
    assert torch.allclose(bound_symmetric(big, 5.0), 5 * torch.tanh(big / 10))


def test_bound_asymmetric():
    lo, hi = -1.0, 5.0
    u = torch.tensor([-3.0, -1.0, 0.5, 2.0, 4.9, 5.0, 8.0], requires_grad=True)
    out = bound_asymmetric(u, lo, hi)
    out.sum().backward()
    assert out[0].item() == lo and out[-1].item() == hi
    assert out[1].item() == pytest.approx(lo) and out[5].item() == pytest.approx(hi)
    assert u.grad[0] == 0 and u.grad[-1] == 0
    assert torch.all(u.grad[2:5] > 0)
    assert torch.all((out >= lo) & (out <= hi))
    mid = bound_asymmetric(torch.tensor(2.0), lo, hi)  # smoothstep(0.5) = 0.5
    assert mid.item() == pytest.approx(2.0)


# ---------------------------------------------------------------- data heads

def test_bernoulli_log_prob_matches_bce():
    head = BernoulliHead(4)
    logits = head(torch.randn(2, 4, 32, 32))
    target = torch.bernoulli(torch.full((2, 1, 32, 32), 0.3))
    ref = -F.binary_cross_entropy_with_logits(logits[..., 2:30, 2:30], target[..., 2:30, 2:30],
                                              reduction="none").sum((1, 2, 3))
    assert torch.allclose(head.log_prob(logits, target), ref, atol=1e-4)
    assert torch.allclose(head.log_prob(logits, target[..., 2:30, 2:30]), ref, atol=1e-4)
    s = head.sample(logits)
    assert s.shape == (2, 1, 28, 28) and set(s.unique().tolist()) <= {0.0, 1.0}
    assert head.mean(logits).shape == (2, 1, 28, 28)


def _grid_values():
    return torch.arange(256, dtype=torch.float32) * 2 / 255 - 1


def test_dlm_head_width():
    assert DiscretizedLogisticMixtureHead(138).conv.c_out == 50
    assert n_params(DiscretizedLogisticMixtureHead(138)) == 62_200  # ARCH 11 data head
    assert DiscretizedLogisticMixtureHead(8, image_channels=1).conv.c_out == 15


def test_dlm_single_channel_sums_to_one():
    head = DiscretizedLogisticMixtureHead(4, image_channels=1, mixtures=3, upper_edge=0.999)
    params = torch.randn(2, 9, 2, 3)   # [logits 3 | locations 3 | log-scales 3]
    params[:, 3:6] *= 0.8
    params[:, 6:9] -= 2.0      # log-scales: include narrow components
    x = _grid_values().view(256, 1, 1, 1, 1).expand(256, 2, 1, 2, 3).reshape(512, 1, 2, 3)
    lp = head.log_prob_per_pixel(params.repeat(256, 1, 1, 1), x).view(256, 2, 2, 3)
    assert torch.allclose(lp.double().exp().sum(0), torch.ones(2, 2, 3, dtype=torch.float64),
                          atol=1e-4)
    assert torch.allclose(head.log_prob(params, x[:2]), lp[0].flatten(1).sum(1))


def test_dlm_upper_edge_099_double_counts_top_bins():
    head = DiscretizedLogisticMixtureHead(4, image_channels=1, mixtures=1, upper_edge=0.99)
    params = torch.tensor([0.0, 0.998, -6.0]).view(1, 3, 1, 1)  # mass right at the top
    x = _grid_values().view(256, 1, 1, 1)
    total = head.log_prob_per_pixel(params.expand(256, 3, 1, 1), x).exp().sum()
    assert total > 1.5  # 254 (0.992) and 255 are both open upper bins under 0.99
    head.upper_edge = 0.999
    total = head.log_prob_per_pixel(params.expand(256, 3, 1, 1), x).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-4)


def test_dlm_rgb_coupled_sums_to_one_exhaustively():
    head = DiscretizedLogisticMixtureHead(4, image_channels=3, mixtures=2, upper_edge=0.999)
    params = torch.randn(1, 2 * 10, 1, 1)
    params[:, 2:8] *= 0.5
    params[:, 8:14] = params[:, 8:14] * 0.3 - 3.0   # log-scales around -3
    params[:, 14:] *= 2.0                           # strong coupling
    v = _grid_values()
    gb = torch.stack(torch.meshgrid(v, v, indexing="ij"), 0).reshape(2, -1)  # [2, 65536]
    total = torch.zeros((), dtype=torch.float64)
    chunk = 32
    for r0 in range(0, 256, chunk):
        r = v[r0:r0 + chunk]
        x = torch.cat([r.repeat_interleave(gb.shape[1])[None], gb.repeat(1, len(r))], 0)
        x = x.T.reshape(-1, 3, 1, 1)
        lp = head.log_prob_per_pixel(params.expand(len(x), -1, -1, -1), x)
        total += lp.double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-3)


def test_dlm_sample_range_and_concentration():
    head = DiscretizedLogisticMixtureHead(4, image_channels=3, mixtures=2)
    params = torch.zeros(3, 20, 4, 4)
    params[:, 0] = 20.0                 # component 0 always chosen
    params[:, 2:5] = torch.tensor([-0.5, 0.0, 0.5]).view(1, 3, 1, 1)  # locations of comp 0
    params[:, 8:14] = -7.0               # tiny scales
    s = head.sample(params)
    assert s.shape == (3, 3, 4, 4) and s.min() >= 0 and s.max() <= 1
    # With zero coupling (tanh(0) = 0) the sample sits at the locations.
    expected = (torch.tensor([-0.5, 0.0, 0.5]) + 1) / 2
    assert torch.allclose(s.mean((0, 2, 3)), expected, atol=0.02)
    # Coupling: G mean gets + tanh(coef) * x_R.
    params[:, 14] = 10.0                 # a = tanh(10) ~ 1 for component 0
    s = head.sample(params)
    assert torch.allclose(s[:, 1].mean(), torch.tensor((0.0 - 0.5 + 1) / 2), atol=0.02)


def test_benchmark_layer_loop_reference_agrees_with_vectorised():
    """bench/bench.py times the vectorised op against this per-layer loop: they must agree."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "bench.py"
    spec = importlib.util.spec_from_file_location("avi_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(3)
    q = torch.randn(2, 5, 4, 4)
    keys = [torch.randn(2, 5, 4, 4) for _ in range(7)]
    vals = [torch.randn(2, 6, 4, 4) for _ in range(7)]
    ref = bench.attend_layer_loop(q, keys, vals)
    assert torch.allclose(depthwise_attend(q, keys, vals)[0], ref, atol=1e-5)


def test_depthwise_attend_gradients_are_exact_in_float64():
    torch.manual_seed(5)
    q = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    ks = [torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    vs = [torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    fn = lambda q, *kv: depthwise_attend(q, list(kv[:3]), list(kv[3:]), 0.7)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, *ks, *vs))


def test_depthwise_attend_sums_mixed_dtypes_in_the_widest():
    """Under autocast a layer-normed map (fp32) can meet a conv output (bf16)."""
    q = torch.randn(1, 2, 2, 2)
    ks = [torch.randn(1, 2, 2, 2) for _ in range(2)]
    vs = [torch.randn(1, 3, 2, 2).bfloat16(), torch.randn(1, 3, 2, 2)]
    out, _ = depthwise_attend(q, ks, vs)
    assert out.dtype == torch.float32


def test_strided_1x1_conv_trains_on_an_odd_channels_last_batch():
    """torch 2.13's CPU backward of a 1x1 stride-2 conv on a channels_last batch of odd size
    corrupts the heap (the process aborts); WNConv2d computes it as a 1x1 conv of every
    other pixel, the same numbers. Run in a child process: a crash must fail this test, not
    end the test session."""
    import subprocess
    import sys
    code = """
import torch, torch.nn.functional as F
from builders.network.conv import WNConv2d
torch.manual_seed(0)
conv = WNConv2d(8, 4, 1, 2).to(memory_format=torch.channels_last)
x = torch.randn(7, 8, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
y = conv(x)
ref = F.conv2d(x.detach().contiguous(), conv.weight.detach(), conv.bias.detach(), stride=2)
assert y.shape == (7, 4, 16, 16) and torch.allclose(y, ref, atol=1e-6)
y.square().sum().backward()
assert torch.isfinite(x.grad).all() and conv.v.grad is not None
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
