"""Depth-wise (across-layer, per-pixel) attention, Eq. 3-6 (docs/model.md sections 5-7)."""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Maps = torch.Tensor | Sequence[torch.Tensor]


def _full_precision(device: torch.device):
    # Scores are a softmax over few candidates; fp16/bf16 logits would visibly distort them.
    kind = device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def depthwise_attend(query: torch.Tensor, keys: Maps, values: Maps,
                     temperature: float | torch.Tensor = 1.0,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend over n candidate maps independently at every pixel (Eq. 3-4).

    query [B,d,H,W]; keys: n maps [B,d,H,W] (a list, or stacked source-major [n,B,d,H,W]);
    values: n maps [B,C,H,W] (likewise). mask: optional bool [n], True = may be attended.
    Returns out [B,C,H,W] and scores [B,n,H,W] (softmax over n, float32).

    Nothing is stacked but the n small score maps: the candidate maps are read where they
    lie (stacking them would copy the whole history of contexts at every layer), each once
    for its score and once for the weighted sum, which accumulates in place. Measured in
    bench/bench.py against a stacked single contraction, which is slower on the CPU.
    """
    # Scores in at least float32 (float64 stays float64); values summed in their widest dtype.
    score_dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(score_dtype)
    with _full_precision(query.device):
        if isinstance(keys, torch.Tensor):                                        # [n,B,d,H,W]
            logits = (q.unsqueeze(0) * keys.to(score_dtype)).sum(2)
        else:
            logits = torch.stack([(q * k.to(score_dtype)).sum(1) for k in keys])  # [n,B,H,W]
        logits = logits * temperature
        if mask is not None:
            logits = logits.masked_fill(~mask.to(logits.device)[:, None, None, None],
                                        float("-inf"))
        scores = torch.softmax(logits, dim=0)
    value_dtype = values.dtype if isinstance(values, torch.Tensor) else \
        functools.reduce(torch.promote_types, (v.dtype for v in values))
    weights = scores.to(value_dtype).unsqueeze(2)                                 # [n,B,1,H,W]
    out = weights[0] * values[0].to(value_dtype)
    for m in range(1, len(values)):
        out.addcmul_(weights[m], values[m])   # in place: backward needs only weights and values
    return out, scores.transpose(0, 1)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an NCHW tensor (channels-last LN)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class ContextLayerNorm(ChannelLayerNorm):
    """The per-depth plain LN applied once to a stored context (docs/model.md section 6,
    step 1); its own class so the optimizer can give it the attention L2 strength."""


class ResidualGeluNorm(nn.Module):
    """x + GELU_tanh(LN(x)), Eq. 6."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.norm(x), approximate="tanh")
