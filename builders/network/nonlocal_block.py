"""Non-local (spatial self-attention) block (paper Sec. 2.6; docs/model.md section 4.3)."""
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

    def _projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Q, K and V as one 1x1 convolution ([2d + C, C, 1, 1]); t scales the Q rows, so
        the scores come out as t <Q_i, K_j> with no pass over the N x N score map."""
        t = self.temperature
        weight = torch.cat([self.query.weight * t, self.key.weight, self.value.weight])
        if self.value.bias is None:
            return weight, None
        return weight, torch.cat([self.query.bias * t, self.key.bias, self.value.bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One projection, then attention on views of it in x's memory format. SDPA's fused
        # (flash) kernel never holds the N x N score map but wants equal widths, so Q and K
        # get C - d zero channels (their dot products are unchanged). Measured on the CPU
        # (docs/benchmarks.md), that pays while C <= 4d, and up to C = 9d once N >= 1024
        # (the map is then 4 MB per image); otherwise two batched matmuls are faster.
        b, c, h, w = x.shape
        d = self.query.c_out
        weight, bias = self._projection()
        qkv = F.conv2d(x, weight, bias)
        if c <= (9 if h * w >= 1024 else 4) * d:
            rows = qkv.permute(0, 2, 3, 1).reshape(b, 1, h * w, 2 * d + c)    # [B, 1, N, .]
            q, k, v = rows.split([d, d, c], dim=3)
            q, k = F.pad(q, (0, c - d)), F.pad(k, (0, c - d))
            y = F.scaled_dot_product_attention(q, k, v, scale=1.0)
            y = y.view(b, h, w, c).permute(0, 3, 1, 2)
        elif qkv.is_contiguous(memory_format=torch.channels_last) and not qkv.is_contiguous():
            rows = qkv.permute(0, 2, 3, 1).reshape(b, h * w, 2 * d + c)         # a view
            q, k, v = rows.split([d, d, c], dim=2)                               # [B, N, .]
            a = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)           # [B, N, N]
            y = torch.bmm(a, v).view(b, h, w, c).permute(0, 3, 1, 2)
        else:
            cols = qkv.reshape(b, 2 * d + c, h * w)
            q, k, v = cols.split([d, d, c], dim=1)                               # [B, ., N]
            a = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)           # [B, N, N]
            y = torch.bmm(v, a.transpose(1, 2)).view(b, c, h, w)
        return torch.addcmul(x, self.gamma, y)
