"""Residual cells: nodes, blocks and cell groups (docs/model.md section 4.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import WNConv2d
from .nonlocal_block import NonLocal

RESIDUAL_SCALE = 0.1  # fixed, as in NVAE


def swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


class Node(nn.Module):
    """BN -> [non-local] -> swish -> conv3x3."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, nonlocal_key: int | None = None):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in, eps=1e-5, momentum=0.1)  # = Keras momentum 0.9
        self.nonlocal_block = NonLocal(c_in, nonlocal_key) if nonlocal_key else None
        self.conv = WNConv2d(c_in, c_out, 3, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        if self.nonlocal_block is not None:
            x = self.nonlocal_block(x)
        return self.conv(swish(x))


class FactorizedReduce(nn.Module):
    """Stride-2 shortcut: four 1x1 stride-2 convs on the input and its 1-pixel shifts.

    The shifts let the four convs together see every pixel of each 2x2 cell.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        q = c_out // 4
        widths = (q, q, q, c_out - 3 * q)
        self.convs = nn.ModuleList(WNConv2d(c_in, w, 1, 2) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = swish(x)
        views = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(v) for conv, v in zip(self.convs, views)], dim=1)


class ResidualBlock(nn.Module):
    """shortcut(x) + 0.1 * main(x); scale 0 keeps size, -2 halves it (2c), +2 doubles it (c//2)."""

    def __init__(self, c: int, scale: int = 0, nonlocal_key: int | None = None,
                 num_nodes: int = 2):
        super().__init__()
        if scale not in (0, -2, 2):
            raise ValueError(f"block scale must be 0, -2 or +2, got {scale}")
        if num_nodes < 1:
            raise ValueError("a block needs at least one node")
        self.scale = scale
        c_out = {0: c, -2: 2 * c, 2: c // 2}[scale]
        self.out_channels = c_out
        stride = 2 if scale == -2 else 1
        self.nodes = nn.Sequential(
            Node(c, c_out, stride, nonlocal_key),
            *(Node(c_out, c_out, 1, nonlocal_key) for _ in range(num_nodes - 1)))
        if scale == 0:
            self.shortcut = nn.Identity()
        elif scale == -2:
            self.shortcut = FactorizedReduce(c, c_out)
        else:
            # The reference's shortcut layer has use_bias off, for its conv and for the
            # q/k/v convs of its non-local block alike.
            self.shortcut = nn.Sequential(
                _Upsample("bilinear"),
                *([NonLocal(c, nonlocal_key, bias=False)] if nonlocal_key else []),
                WNConv2d(c, c_out, 1, bias=False))
        self.upsample = _Upsample("nearest") if scale == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + RESIDUAL_SCALE * self.nodes(self.upsample(x))


class _Upsample(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=True)


class CellGroup(nn.Module):
    """Optional stem conv3x3 (no norm/activation), then one residual block per scale.

    `c_in` is the group's input width; with a stem it must equal stem[0] and the blocks
    start at stem[1].
    """

    def __init__(self, c_in: int, scales: list[int], nonlocal_key: int | None = None,
                 stem: tuple[int, int] | None = None, num_nodes: int = 2):
        super().__init__()
        self.stem = None
        c = c_in
        if stem is not None:
            if stem[0] != c_in:
                raise ValueError(f"stem input width {stem[0]} != group input width {c_in}")
            self.stem = WNConv2d(stem[0], stem[1], 3)
            c = stem[1]
        blocks = []
        for s in scales:
            blocks.append(ResidualBlock(c, s, nonlocal_key, num_nodes))
            c = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        return self.blocks(x)
