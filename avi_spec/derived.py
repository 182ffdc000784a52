"""Quantities a spec implies but does not state: channel widths, resolutions, attention sources.

The widths follow docs/model.md section 11: keys and queries of the depth-wise attention are
extra output channels of the cells, so turning attention on widens the cells. Keeping these
rules in one place lets the graph, the validator, the builders and `avi build` agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .schema import DepthwiseAttention, Explicit, LastK, Spec


def _walk(width: int, size: int, scales: list[int]) -> tuple[int, int]:
    """Width and side after a run of residual blocks: -2 halves the side and doubles the
    channels, +2 doubles the side and halves the channels (integer division, as the code)."""
    for s in scales:
        if s == -2:
            width, size = width * 2, size // 2
        elif s == 2:
            width, size = width // 2, size * 2
    return width, size


def generative_sources(att: DepthwiseAttention | None, layers: int) -> dict[int, list[int]]:
    """Layers m whose context layer l's prior may attend to, as the spec asks (validated
    separately: the paper's factorisation needs m < l)."""
    if att is None:
        return {}
    out: dict[int, list[int]] = {}
    for l in range(1, layers):
        if att.sources == "all":
            out[l] = list(range(l))
        elif isinstance(att.sources, LastK):
            out[l] = list(range(max(0, l - att.sources.last), l))
        else:
            assert isinstance(att.sources, Explicit)
            out[l] = sorted(att.sources.explicit.get(l, list(range(l))))
    return out


def inference_sources(att: DepthwiseAttention | None, layers: int) -> dict[int, list[int]]:
    """Bottom-up maps e_m that layer l's posterior may attend to; m = layers is the
    preprocessing output (docs/model.md section 7: candidates e_l .. e_L)."""
    if att is None:
        return {}
    out: dict[int, list[int]] = {}
    for l in range(layers):
        if att.sources == "all":
            out[l] = list(range(l, layers + 1))
        elif isinstance(att.sources, LastK):
            out[l] = list(range(l, min(layers, l + att.sources.last - 1) + 1))
        else:
            assert isinstance(att.sources, Explicit)
            out[l] = sorted(att.sources.explicit.get(l, list(range(l, layers + 1))))
    return out


@dataclass(frozen=True)
class Derived:
    """Everything the builder needs that is computed rather than configured."""

    layers: int
    latent_channels: int
    input_size: int          # padded image side the encoder sees
    stages: int              # P: net number of halvings in preprocess
    feature_size: int        # side of the bottom-up features after preprocess
    encoder_size: int        # side after one encoder cell (must equal feature_size)
    post_size: int           # side after postprocess (must equal input_size)
    k_e: int                 # inference key channels on bottom-up maps
    q_e: int                 # inference query channels (first q_e of the context)
    k_d: int                 # generative key channels on contexts
    q_d: int                 # generative query channels
    stem_width: int
    c_e: int                 # bottom-up value channels
    c_d: int                 # top-down value channels
    post_width: int
    gen_sources: dict[int, list[int]] = field(default_factory=dict)
    inf_sources: dict[int, list[int]] = field(default_factory=dict)

    @property
    def bottom_up_width(self) -> int:
        return self.c_e + self.k_e

    @property
    def context_width(self) -> int:
        """Values carried down by every layer: [ctx (C_D + q_E)]."""
        return self.c_d + self.q_e

    def emits_key(self, l: int) -> bool:
        """A generative key is emitted by every layer that some later layer may read."""
        return self.k_d > 0 and l <= self.layers - 2

    def has_gen_attention(self, l: int) -> bool:
        return l >= 1 and bool(self.gen_sources.get(l))

    def has_inf_attention(self, l: int) -> bool:
        return bool(self.inf_sources.get(l))

    def decoder_width(self, l: int) -> int:
        """Width of layer l's decoder output: [ctx | kD | qD] (docs/model.md section 11)."""
        return (self.context_width + (self.k_d if self.emits_key(l) else 0)
                + (self.q_d if self.has_gen_attention(l) else 0))

    def stored_width(self, l: int) -> int:
        return self.context_width + (self.k_d if self.emits_key(l) else 0)


def derive(spec: Spec) -> Derived:
    gen, inf = spec.attention.generative, spec.attention.inference
    k_e = inf.key_dim if inf else 0
    q_e = inf.query_dim if inf else 0
    k_d = gen.key_dim if gen else 0
    q_d = gen.query_dim if gen else 0
    pre = spec.cells.preprocess
    input_size = spec.data.image.size + 2 * spec.data.pad
    stages = pre.scales.count(-2) - pre.scales.count(2)
    # The stem is widened by k_E / 2^P so that the down-sampling blocks double the extra
    # channels into exactly k_E key channels at latent resolution (docs/model.md section 11).
    extra = k_e // (2 ** stages) if stages >= 0 else k_e
    stem_width = pre.filters + extra
    bu_width, feature_size = _walk(stem_width, input_size, pre.scales)
    c_e = bu_width - k_e
    _, encoder_size = _walk(bu_width, feature_size, spec.cells.encoder.scales)
    c_d = spec.cells.decoder.filters * (2 ** stages) if stages >= 0 else spec.cells.decoder.filters
    post_width, post_size = _walk(c_d + q_e, encoder_size, spec.cells.postprocess.scales)
    L = spec.hierarchy.layers
    return Derived(
        layers=L, latent_channels=spec.hierarchy.latent.channels, input_size=input_size,
        stages=stages, feature_size=feature_size, encoder_size=encoder_size, post_size=post_size,
        k_e=k_e, q_e=q_e, k_d=k_d, q_d=q_d, stem_width=stem_width, c_e=c_e, c_d=c_d,
        post_width=post_width,
        gen_sources=generative_sources(gen, L), inf_sources=inference_sources(inf, L),
    )
