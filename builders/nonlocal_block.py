"""Non-local (spatial self-attention) block (ARCHITECTURE 2.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import WNConv2d


class NonLocal(nn.Module):
    """out = x + gamma * softmax_j(t <Q_i, K_j>) V_j over all H*W positions.

    The scaling is the learnable temperature t alone (no 1/sqrt(d)); gamma starts at 0 so a
    freshly built block is the identity. `bias=False` drops the biases of Q, K and V: the
    reference builds the block with its host layer's use_bias, which is off in the
    up-sampling shortcut (layers/resnet.py: the shortcut's hparams set use_bias=False).
    """

    def __init__(self, channels: int, key_dim: int, bias: bool = True):
        super().__init__()
        self.query = WNConv2d(channels, key_dim, 1, bias=bias)
        self.key = WNConv2d(channels, key_dim, 1, bias=bias)
        self.value = WNConv2d(channels, channels, 1, bias=bias)
        self.temperature = nn.Parameter(torch.ones(()))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, 1 head, N, d]; SDPA wants a python-float scale, so t is folded into q instead.
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1) * self.temperature
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.gamma * y
