"""Weight-normalised convolution, the only convolution the model uses (docs/model.md section 4.1)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WNConv2d(nn.Module):
    """Conv with effective kernel exp(log_g[o]) * v[o] / ||v[o]||.

    The magnitude is stored as a log (as the reference does), so the L2 regulariser and
    the optimiser act on log g, not g. Padding follows TF "same"; for strided convs the
    padding is computed from the input size, which for even sizes and k=3 is (0, 1, 0, 1).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1,
                 bias: bool = True):
        super().__init__()
        self.c_in, self.c_out, self.kernel_size, self.stride = c_in, c_out, kernel_size, stride
        self.v = nn.Parameter(torch.empty(c_out, c_in, kernel_size, kernel_size))
        self.log_g = nn.Parameter(torch.empty(c_out))
        self.bias = nn.Parameter(torch.empty(c_out)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Keras variance scaling (scale 0.33, fan-in, uniform): limit sqrt(3 * 0.33 / fan).
        if self.v.is_meta:  # shapes only; nothing to compute
            return
        a = math.sqrt(0.99 / (self.kernel_size ** 2 * self.c_in))
        self.v.uniform_(-a, a)
        # +0.01 so the initial effective kernel is e^0.01 * v, exactly as the reference.
        self.log_g.copy_(self._v_norm().log() + 0.01)
        if self.bias is not None:
            b = math.sqrt(0.99 / self.c_out)
            self.bias.uniform_(-b, b)

    def _v_norm(self) -> torch.Tensor:
        return self.v.flatten(1).norm(dim=1)

    @property
    def weight(self) -> torch.Tensor:
        scale = self.log_g.exp() / self._v_norm()
        return self.v * scale[:, None, None, None]

    def _same_pad(self, size: int) -> tuple[int, int]:
        # TF "same": total = max((ceil(n/s) - 1) * s + k - n, 0), extra pixel at the end.
        out = -(-size // self.stride)
        total = max((out - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return F.conv2d(x, self.weight, self.bias, padding=self.kernel_size // 2)
        if self.kernel_size == 1:
            # A 1x1 conv of stride s is a 1x1 conv of every s-th pixel ("same" pads nothing):
            # the same numbers, without torch's CPU (oneDNN) 1x1 strided backward, which
            # corrupts the heap on a channels_last batch of odd size (torch 2.13; a folder of
            # 23 images trained in batches of 8 aborted; tests/test_modules.py).
            return F.conv2d(x[..., ::self.stride, ::self.stride], self.weight, self.bias)
        top, bottom = self._same_pad(x.shape[-2])
        left, right = self._same_pad(x.shape[-1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, stride=self.stride)

    def extra_repr(self) -> str:
        return (f"{self.c_in}, {self.c_out}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, bias={self.bias is not None}")
