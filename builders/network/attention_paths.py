"""The two uses of depth-wise attention in one stochastic layer.

GenerativeAttention: the prior of layer l reads the contexts of the layers above it
(paper Sec. 2.4, Eq. 7-9; docs/model.md section 6).
InferenceAttention: the posterior of layer l reads the bottom-up features at and below it
(paper Sec. 2.5, Eq. 10-11; docs/model.md section 7).
The per-pixel softmax itself (Eq. 3-4) lives in depthwise_attention.py.
"""
from __future__ import annotations

import torch
from torch import nn

from .depthwise_attention import ChannelLayerNorm, ResidualGeluNorm, depthwise_attend


def _add_temperature(module: nn.Module, learn: bool) -> None:
    # The reference's scale lives in a tf.Module, which Keras before TF 2.5 did not track:
    # the paper's models kept it at 1 and their counts leave it out (docs/reference.md).
    if learn:
        module.temperature = nn.Parameter(torch.ones(()))
    else:
        module.register_buffer("temperature", torch.ones(()), persistent=False)


class GenerativeAttention(nn.Module):
    """Eq. 7-9 for one layer l >= 1, given the layer's fresh context and query.

    Returns the prior condition p_l = ctx' + gamma * A' and ctx', the context that flows down
    (the attention output is deliberately not part of it, as in the reference: docs/model.md section 12, item 2).
    """

    def __init__(self, c_values: int, layer_norm: bool, normalise_newest: bool,
                 learn_temperature: bool):
        super().__init__()
        self.norm_context = ResidualGeluNorm(c_values) if layer_norm else None     # Eq. 5
        # The newest context c_{l-1} has not had its per-depth LN yet; it gets a plain LN
        # for this attention only.
        self.norm_newest = ChannelLayerNorm(c_values) if layer_norm and normalise_newest else None
        self.norm_output = ResidualGeluNorm(c_values) if layer_norm else None      # Eq. 6
        self.gamma = nn.Parameter(torch.zeros(()))                                 # Eq. 9
        _add_temperature(self, learn_temperature)

    def forward(self, ctx: torch.Tensor, query: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self.norm_context(ctx) if self.norm_context is not None else ctx
        if self.norm_newest is not None:
            values = values[:-1] + [self.norm_newest(values[-1])]
        attended, scores = depthwise_attend(query, keys, values, self.temperature)
        if self.norm_output is not None:
            attended = self.norm_output(attended)
        return ctx + self.gamma * attended, ctx, scores


class InferenceAttention(nn.Module):
    """Eq. 10-11 for one layer: the merged features h'_l query the bottom-up maps below.

    Returns h''_l = h'_l + gamma * A (both optionally passed through x + GELU(LN(x))).
    """

    def __init__(self, c_values: int, layer_norm: bool, learn_temperature: bool):
        super().__init__()
        self.norm_output = ResidualGeluNorm(c_values) if layer_norm else None
        self.norm_features = ResidualGeluNorm(c_values) if layer_norm else None
        self.gamma = nn.Parameter(torch.zeros(()))
        _add_temperature(self, learn_temperature)

    def forward(self, h: torch.Tensor, query: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        attended, scores = depthwise_attend(query, keys, values, self.temperature)
        if self.norm_output is not None:
            attended = self.norm_output(attended)
            h = self.norm_features(h)
        return h + self.gamma * attended, scores
