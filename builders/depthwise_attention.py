"""Depth-wise (across-layer, per-pixel) attention, Eq. 3-6 (ARCHITECTURE 2.6, 4, 5)."""
from __future__ import annotations

import contextlib
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

    The score map of all n candidates is one batched product. The values are summed
    candidate by candidate into one accumulator instead of being stacked: the maps are the
    large part (C >> d), and stacking them would copy the whole history at every layer.
    """
    keys = keys if isinstance(keys, torch.Tensor) else torch.stack(list(keys))
    with _full_precision(query.device):
        logits = (query.float().unsqueeze(0) * keys.float()).sum(2) * temperature  # [n,B,H,W]
        if mask is not None:
            logits = logits.masked_fill(~mask.to(logits.device)[:, None, None, None],
                                        float("-inf"))
        scores = torch.softmax(logits, dim=0)
    weights = scores.to(values[0].dtype).unsqueeze(2)                             # [n,B,1,H,W]
    out = weights[0] * values[0]
    for m in range(1, len(values)):
        out = torch.addcmul(out, weights[m], values[m])
    return out, scores.transpose(0, 1)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an NCHW tensor (channels-last LN)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class ContextLayerNorm(ChannelLayerNorm):
    """The per-depth plain LN applied once to a stored context (ARCHITECTURE.md section 4,
    step 1); its own class so the optimizer can give it the attention L2 strength."""


class ResidualGeluNorm(nn.Module):
    """x + GELU_tanh(LN(x)), Eq. 6."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.norm(x), approximate="tanh")
