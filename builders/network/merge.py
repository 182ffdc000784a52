"""Merge cells that join the top-down and bottom-up streams (docs/model.md section 4.4)."""
from __future__ import annotations

import torch
from torch import nn

from .conv import WNConv2d
from .nonlocal_block import NonLocal


class TopDownMerge(nn.Module):
    """[context values | z] -> conv1x1 -> [non-local]: feeds the next decoder cell."""

    def __init__(self, c_context: int, c_latent: int, c_out: int, nonlocal_key: int | None):
        super().__init__()
        self.conv = WNConv2d(c_context + c_latent, c_out, 1)
        self.nonlocal_block = NonLocal(c_out, nonlocal_key) if nonlocal_key else None

    def forward(self, context: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.conv(torch.cat([context, z], dim=1))
        return self.nonlocal_block(y) if self.nonlocal_block is not None else y


class BottomUpMerge(nn.Module):
    """A(h) + conv1x1(prior condition) -> [non-local]; A is the identity when the widths agree,
    otherwise a conv1x1 (with inference attention the output also carries the merged key)."""

    def __init__(self, c_features: int, c_condition: int, c_out: int, nonlocal_key: int | None):
        super().__init__()
        self.features = nn.Identity() if c_features == c_out else WNConv2d(c_features, c_out, 1)
        self.condition = WNConv2d(c_condition, c_out, 1)
        self.nonlocal_block = NonLocal(c_out, nonlocal_key) if nonlocal_key else None

    def forward(self, h: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        y = self.features(h) + self.condition(condition)
        return self.nonlocal_block(y) if self.nonlocal_block is not None else y
