"""Depth-wise (across-layer, per-pixel) attention, Eq. 3-6 (ARCHITECTURE 2.6, 4, 5)."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Maps = torch.Tensor | Sequence[torch.Tensor]


def _stack(maps: Maps) -> torch.Tensor:
    return maps if isinstance(maps, torch.Tensor) else torch.stack(list(maps), dim=1)


def _full_precision(device: torch.device):
    # Scores are a softmax over few candidates; fp16/bf16 logits would visibly distort them.
    kind = device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def depthwise_attend(query: torch.Tensor, keys: Maps, values: Maps,
                     temperature: float | torch.Tensor = 1.0,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend over n candidate maps independently at every pixel.

    query [B,d,H,W]; keys [B,n,d,H,W]; values [B,n,C,H,W] (lists of n maps also accepted).
    mask: optional bool [n], True = candidate may be attended (at least one must be True).
    Returns out [B,C,H,W] and scores [B,n,H,W] (softmax over n, float32).
    """
    keys, values = _stack(keys), _stack(values)
    with _full_precision(query.device):
        logits = torch.einsum("bdhw,bndhw->bnhw", query.float(), keys.float()) * temperature
        if mask is not None:
            logits = logits.masked_fill(~mask.to(logits.device)[None, :, None, None],
                                        float("-inf"))
        scores = torch.softmax(logits, dim=1)
    out = torch.einsum("bnhw,bnchw->bchw", scores.to(values.dtype), values)
    return out, scores


def depthwise_attend_loop(query: torch.Tensor, keys_list: Sequence[torch.Tensor],
                          values_list: Sequence[torch.Tensor],
                          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for tests: Eq. 3-4 written out pixel by pixel and candidate by candidate."""
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


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an NCHW tensor (channels-last LN)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class ResidualGeluNorm(nn.Module):
    """x + GELU_tanh(LN(x)), Eq. 6."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.norm(x), approximate="tanh")
