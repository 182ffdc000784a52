"""The switches of the GPU path, run on the CPU so that CI exercises them without a GPU.

torch.compile (inductor, CPU), bf16 autocast (CPU autocast), channels_last, the foreach and
fused optimizer updates, and device hygiene (a forward on the meta device, and no op that
creates a tensor on any other device than its input's). A tiny model keeps it lean.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from avi_spec import Spec, load_spec
from builders.network.build import build_model
from builders.data.datasets import load_images
from builders.evaluation.evaluate import importance_sampled_nll
from builders.train.optim import KerasAdamax, _fast_kwargs, build_optimizer
from builders.train.training import train

REPO = Path(__file__).resolve().parents[1]

# Everything the full model has, at the smallest size: both depth-wise attentions with layer
# norm, non-local blocks in the merges and the cells, a down- and an up-sampling block.
TINY = {
    "name": "gpu_path",
    "data": {"dataset": "folder", "root": "unused", "image": {"channels": 1, "size": 8},
             "pad": 0, "binarize": "dynamic", "distribution": {"kind": "bernoulli", "crop": 0}},
    "hierarchy": {"layers": 3, "latent": {"channels": 2, "size": 4},
                  "posterior": {"log_scale": [-5, 5], "noise": 0},
                  "prior": {"log_scale": [-5, 5], "noise": 0}},
    "cells": {"preprocess": {"filters": 4, "scales": [-2], "nodes": 1},
              "encoder": {"scales": [0], "nodes": 1, "nonlocal": {"key_dim": 2, "query_dim": 2}},
              "decoder": {"filters": 4, "scales": [0], "nodes": 1},
              "topdown_merge": {"nonlocal": {"key_dim": 2, "query_dim": 2}},
              "bottomup_merge": {"nonlocal": {"key_dim": 2, "query_dim": 2}},
              "postprocess": {"scales": [2], "nodes": 1}},
    "attention": {"generative": {"key_dim": 2, "query_dim": 2, "layer_norm": True},
                  "inference": {"key_dim": 2, "query_dim": 2, "layer_norm": True}},
    "train": {"seed": 0},
}


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(device: str = "cpu") -> torch.nn.Module:
    model = build_model(Spec.model_validate(TINY), device)
    with torch.no_grad():                     # open every gate so that every path acts
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    return model


def images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) > 0.5).float() * 2 - 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The quick-start spec shrunk (2 layers, one block per cell group, 8 filters: the
    compile time grows with the number of ops) on a 64-image folder dataset."""
    root = tmp_path_factory.mktemp("gpu_path")
    for split, n in (("train", 64), ("test", 16)):
        (root / "data" / split).mkdir(parents=True)
        np.save(root / "data" / split / "images.npy", load_images("mnist5k", None, split)[:n, 0])

    def run(name: str, *overrides: str, steps: int = 3) -> list[dict]:
        resolved = load_spec(REPO / "specs" / "quickstart.yaml", [
            f"data.root={root / 'data'}", "data.dataset=folder", "hierarchy.layers=2",
            "hierarchy.latent.size=16", "cells.preprocess.scales=[-2]", "cells.postprocess.scales=[2]",
            "cells.preprocess.filters=8", "cells.decoder.filters=8", "train.batch_size=16",
            "train.log_every=1", *overrides])
        train(resolved, root / name, device="cpu", max_steps=steps, progress_mode="quiet")
        rows = (root / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, rows) if "loss" in r]
    return run


# ------------------------------------------------------------------------- torch.compile

class _Recompiles(logging.Handler):
    """Collects dynamo's recompilation messages (the "recompiles" artifact of torch._logging)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        torch._logging.set_logs(recompiles=True)
        self.logger = logging.getLogger("torch._dynamo.guards.__recompiles")
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        torch._logging.set_logs()


@pytest.fixture
def inductor():
    """Inductor draws its random numbers with its own generator unless told to use aten's;
    with aten's, compiled and eager runs see the same posterior noise and can be compared."""
    import torch._dynamo
    import torch._inductor.config
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def test_compiled_training_equals_eager_without_recompiles(tiny_run, inductor):
    eager = tiny_run("eager")
    with _Recompiles() as log:
        compiled = tiny_run("compiled", "train.compile=true")
    # Tolerance: fp32 with reductions (batch norm, layer norm, the KL and likelihood sums)
    # reordered and fused by inductor; each op agrees to a few ulp (1e-7 relative), and three
    # Adamax steps carry that through. Observed differences are below 1e-5 relative; 1e-4
    # still fails for any real change (a wrong op moves the loss by percents).
    assert [r["step"] for r in compiled] == [1, 2, 3]
    for a, b in zip(eager, compiled):
        for key in ("loss", "nll", "kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
    assert log.messages == [], "the compiled step recompiled after its first call"


def test_compiled_log_weights_equal_eager(inductor):
    """log_weights traces as one graph (fullgraph: no graph break) and gives eager's numbers.
    AOT-eager backend: the inductor code generation is what the training test above already
    pays for (minutes of C++ compilation on a 2-core machine); this checks the tracing."""
    model = tiny_model().eval()
    x = images(3)
    torch.manual_seed(5)
    ref = model.log_weights(x, 4)
    compiled = torch.compile(model.log_weights, backend="aot_eager", fullgraph=True)
    with _Recompiles() as log:
        torch.manual_seed(5)
        got = compiled(x, 4)
        torch.manual_seed(5)
        again = compiled(x, 4)              # second call: same graph, no recompile
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(again, got)
    assert log.messages == []


# ------------------------------------------------------------------------- bf16 autocast

def test_bf16_autocast_train_eval_and_sample(tiny_run):
    """Train, importance-sampled eval and sampling under CPU bf16 autocast; the heads run in
    fp32. The first step's NELBO (same initial weights) bounds the bf16 error."""
    fp32 = tiny_run("fp32", "train.precision=fp32", steps=2)
    bf16 = tiny_run("bf16", "train.precision=bf16", steps=2)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per op); the NELBO sums
    # 1,000 pixel and latent terms whose errors largely cancel: 2% bounds it, a dtype bug
    # (a head in bf16, a softmax over bf16 logits) moves it by more.
    assert bf16[0]["nll"] + bf16[0]["kl"] == pytest.approx(fp32[0]["nll"] + fp32[0]["kl"], rel=0.02)
    assert all(np.isfinite(r["loss"]) for r in bf16)

    model = tiny_model()
    head_inputs = []
    model.head.register_forward_pre_hook(lambda m, a: head_inputs.append(a[0].dtype))
    x = images(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = importance_sampled_nll(model, [x], k=3, seed=0)
        samples = model.sample(4)
    high = importance_sampled_nll(model, [x], k=3, seed=0)
    assert set(head_inputs) == {torch.float32}
    assert low["nll_nats"] == pytest.approx(high["nll_nats"], rel=0.02)
    assert samples.dtype == torch.float32 and samples.shape == (4, 1, 8, 8)
    assert 0 <= samples.min() and samples.max() <= 1


# ------------------------------------------------------------------------- channels_last

def test_channels_last_equals_default():
    model = tiny_model().train()
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = images(4)
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    b = other(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(b.nelbo, a.nelbo, rtol=1e-5, atol=1e-4)
    a.nelbo.mean().backward()
    b.nelbo.mean().backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # Same seed, same draws: random numbers fill the logical order in either format.
    model.eval(), other.eval()
    torch.manual_seed(4)
    a = model.sample(3, mode="sample")
    torch.manual_seed(4)
    assert torch.equal(other.sample(3, mode="sample"), a)


# ------------------------------------------------------------------------- optimizers

def _steps(model, opt, x, n=3):
    for i in range(n):
        torch.manual_seed(i)
        loss = model(x).nelbo.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["adamax", "adam", "adamw"])
def test_foreach_and_fused_updates_equal_the_loop(name):
    cfg = Spec.model_validate(TINY).train.optimizer.model_copy(update={"name": name, "eps_mode": "torch"})
    base = tiny_model().train()
    x = images(4)
    fast = copy.deepcopy(base)
    opt = build_optimizer(fast, cfg)
    assert opt.defaults.get("foreach") is True       # what build_optimizer picks on one device
    got = _steps(fast, opt, x)
    cls = type(opt)
    variants = [{"foreach": False}] + ([{"fused": True}] if name != "adamax" else [])
    for kw in variants:                              # fused: the CPU kernels of Adam(W)
        slow = copy.deepcopy(base)
        groups = [{**g, "params": [dict(slow.named_parameters())[n] for n in names]}
                  for g, names in _group_names(opt, fast)]
        ref = _steps(slow, cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kw), x)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert _fast_kwargs(cls, list(base.parameters())) == {"foreach": True}   # fused: CUDA only


def _group_names(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        yield {"weight_decay": g["weight_decay"]}, [names[id(p)] for p in g["params"]]


def test_keras_adamax_foreach_equals_per_tensor_formula():
    model = tiny_model().train()
    ref = copy.deepcopy(model)
    cfg = Spec.model_validate(TINY).train.optimizer
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, KerasAdamax)
    got = _steps(model, opt, images(4), n=2)
    # Keras Adamax, tensor by tensor: m = b1 m + (1-b1) g; u = max(b2 u, |g|);
    # p -= lr / (1 - b1^t) * m / (u + eps); the L2 term is in the gradient.
    b1, b2 = cfg.betas
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    decay = [wd[id(p)] for p in model.parameters()]
    m = [torch.zeros_like(p) for p in ref.parameters()]
    u = [torch.zeros_like(p) for p in ref.parameters()]
    for t in (1, 2):
        torch.manual_seed(t - 1)
        loss = ref(images(4)).nelbo.mean()
        grads = torch.autograd.grad(loss, list(ref.parameters()), allow_unused=True)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(ref.parameters(), grads)):
                if g is None:
                    continue
                g = g + decay[i] * p
                m[i] = b1 * m[i] + (1 - b1) * g
                u[i] = torch.maximum(b2 * u[i], g.abs())
                p -= cfg.lr / (1 - b1 ** t) * m[i] / (u[i] + cfg.eps)
    for a, b in zip(got, ref.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- devices

class _DeviceGuard(TorchDispatchMode):
    """Fails on any op whose output lies on another device than `device` (e.g. a tensor made
    with a hard-coded or default device inside the model)."""

    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                raise AssertionError(f"{func} made a tensor on {t.device}, not {self.device}")
        self.ops += 1
        return out


def test_forward_backward_sample_on_meta_stay_on_meta():
    model = tiny_model("meta").train()
    x = torch.empty(2, 1, 8, 8, device="meta")
    with _DeviceGuard("meta") as guard:
        out = model(x, record_attention=True)
        out.nelbo.mean().backward()
        lw = model.log_weights(x, 3)
        s = model.sample(2)
    assert guard.ops > 500
    assert out.nll.shape == (2,) and out.kl.shape == (2, 3) and lw.shape == (2, 3)
    assert s.shape == (2, 1, 8, 8) and s.is_meta
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters())


def test_device_guard_catches_a_hard_coded_device():
    model = tiny_model("meta")
    model.layers[1].merge.register_forward_hook(lambda m, a, out: out + torch.zeros(1))
    with pytest.raises(AssertionError, match="made a tensor on cpu"), _DeviceGuard("meta"):
        model(torch.empty(2, 1, 8, 8, device="meta"))


def test_data_parallel_step_parts_stay_on_the_device(monkeypatch):
    """What only runs with several processes, on meta as a GPU stand-in: the packed step values
    and batch norm over the global batch (forward and backward), with the all-reduce itself
    replaced by the identity (gloo cannot reduce meta tensors)."""
    import torch.distributed as dist
    from builders.train.distributed import packed_step
    from builders.train.sync_batch_norm import GlobalBatchNorm2d
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: None)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    norm = GlobalBatchNorm2d(3, device="meta").train()
    x = torch.empty(4, 3, 5, 5, device="meta", requires_grad=True)
    with _DeviceGuard("meta") as guard:
        packed = packed_step(torch.empty(4, device="meta"), True)
        norm(x).sum().backward()
    assert packed.shape == (5,) and packed.is_meta and guard.ops > 10
    assert x.grad.is_meta and norm.weight.grad.is_meta and norm.running_var.is_meta


def test_placing_a_model_on_cuda_turns_tf32_off():
    """fp32 means IEEE fp32 on CUDA too (PyTorch lets cuDNN use TF32 by default; the paper's
    V100s had none). Checked through the switch itself: no GPU is needed to call it."""
    from builders.devices import ieee_fp32
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        ieee_fp32(torch.device("cpu"))
        assert torch.backends.cudnn.allow_tf32        # the CPU path leaves the global flags alone
        ieee_fp32(torch.device("cuda"))
        assert not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])
