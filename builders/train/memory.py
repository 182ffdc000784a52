"""Peak training memory per device, estimated without the device (`avi build SPEC --batch B`).

    peak = max(backward, optimizer step)
    backward       = weights + gradients + optimizer state [+ EMA] + buffers
                     + saved activations(B) + workspace
    optimizer step = weights + gradients + optimizer state [+ EMA] + buffers + 2 x weights

The saved activations are counted, not guessed: the model runs one training forward (batch
norm on batch statistics, posterior samples drawn, loss reduced) on the meta device, where
tensors have shapes but no memory, and a saved-tensors hook adds up every distinct storage
autograd keeps for the backward pass (views share their base's storage and count once; the
weights themselves are counted as weights). That is what a device holds when the backward
starts. The workspace is the transient on top of it: the gradient of the largest saved
activation and the tensor the backward computes from it (2 x the largest saved storage). The
optimizer step holds two weight-sized temporaries (Adamax: the gradient plus weight decay, then
|g| or the denominator; torch's foreach optimizers hold as many). Everything is fp32, as avi
trains by default; bf16 autocast (train.precision) holds less.

bench/memory_estimate.py and tests/test_memory.py compare the estimate with the peak a CPU
training step measures.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

FP32 = 4
_STATE_COPIES = {"adamax": 2, "adam": 2, "adamw": 2}     # exp_avg and exp_inf / exp_avg_sq


@dataclass
class MemoryEstimate:
    batch: int                  # images per forward on one device (a micro-batch)
    weights: int                # bytes, as every field below
    gradients: int
    optimizer: int
    ema: int
    buffers: int
    activations: int            # saved for the backward at `batch`
    activations_per_image: int  # the growth of `activations` per further image
    workspace: int
    peak: int

    def as_dict(self) -> dict:
        return asdict(self)

    def static(self) -> int:
        """Bytes held whatever the batch: weights, gradients, optimizer state, EMA, buffers."""
        return self.weights + self.gradients + self.optimizer + self.ema + self.buffers

    def largest_batch(self, limit: int) -> int:
        """The largest micro-batch whose estimated peak stays within `limit` bytes (0: none)."""
        if self.activations_per_image <= 0:
            return self.batch if self.peak <= limit else 0
        fixed = self.activations - self.activations_per_image * self.batch
        room = limit - self.static() - max(fixed, 0) - self.workspace
        return max(0, room // self.activations_per_image)


class _FusedAttention(TorchFunctionMode):
    """On the meta device scaled_dot_product_attention takes its math path, which keeps the
    N x N score map for the backward; the CPU and CUDA devices run a fused (flash) kernel that
    keeps only its inputs, output and log-sum-exp. Count what the fused kernel keeps."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not kwargs.get("attn_mask") and len(args) == 3:
            q, k, v = args
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return flash(q, k, v, scale=kwargs.get("scale"), is_causal=kwargs.get("is_causal", False))[0]
        return func(*args, **kwargs)


def saved_activation_bytes(model: torch.nn.Module, spec, batch: int) -> tuple[int, int]:
    """(total, largest) bytes of the distinct storages autograd saves in one training forward
    of `batch` images through `model` (built on the meta device), the weights left out."""
    d = spec.data
    side = d.image.size + 2 * d.pad
    x = torch.zeros(batch, d.image.channels, side, side, device="meta")
    x = x.contiguous(memory_format=torch.channels_last)
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    kept = []                          # holds every saved tensor: no storage address is reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        kept.append(t)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FusedAttention():
        out = model(x)
        loss = out.nll.float().mean() + out.kl.float().sum(1).mean()
    del loss, out
    kept.clear()                       # the saved tensors, released at once
    return sum(saved.values()), max(saved.values(), default=0)


def estimate_training_memory(spec, batch: int) -> MemoryEstimate:
    """The peak memory of one training step of `spec` at `batch` images per device."""
    from ..network.build import build_model
    model = build_model(spec, "meta")
    n_weights = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() for p in model.parameters()) * FP32
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    opt = spec.train.optimizer
    optimizer = _STATE_COPIES[opt.name] * n_weights * FP32
    ema = weights + buffers if spec.train.ema is not None else 0
    act, largest = saved_activation_bytes(model, spec, batch)
    act_more, _ = saved_activation_bytes(model, spec, batch + 1)
    workspace = 2 * largest
    static = weights + n_weights * FP32 + optimizer + ema + buffers
    peak = max(static + act + workspace, static + 2 * n_weights * FP32)
    return MemoryEstimate(batch, weights, n_weights * FP32, optimizer, ema, buffers, act,
                          max(act_more - act, 0), workspace, peak)


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '24 GiB', '512MiB', '1e9' -> bytes (GB = 10^9, GiB = 2^30)."""
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMGT]?i?B?)\s*", text or "", re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not an amount of memory; write e.g. 80GiB, 24GB or 512MiB")
    unit = m[2].upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m[1]) * scale)
