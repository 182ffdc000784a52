"""Spec -> model: the one entry point that turns a resolved spec into a DeepAttentiveVAE.

The attention wiring is read from avi_spec's graph (never re-derived here), so what
`avi graph` shows is exactly what gets built.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from avi_spec.derived import derive
from avi_spec.graph import attention_sources, build_graph
from avi_spec.schema import Spec

from .model import DeepAttentiveVAE


def build_model(spec: Spec, device: str | torch.device = "cpu") -> DeepAttentiveVAE:
    """Instantiate the model of a validated spec. device="meta" builds shapes only (the
    119M-parameter model in about a second, without allocating its memory)."""
    sources = attention_sources(build_graph(spec))
    with torch.device(device):
        if device != "meta":
            torch.manual_seed(spec.train.seed)
        return DeepAttentiveVAE(spec, derive(spec), sources)


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_groups(model: DeepAttentiveVAE) -> "OrderedDict[str, int]":
    """Trainable parameters by the component groups of docs/model.md section 14."""
    g: OrderedDict[str, int] = OrderedDict()
    layers = model.layers
    g["preprocess"] = _count(model.preprocess)
    g["encoder cells"] = _count(model.encoders)
    g["decoder cells"] = sum(_count(l.decoder) for l in layers)
    g["top-down merges"] = sum(_count(l.merge) for l in layers)
    g["bottom-up merges"] = sum(_count(l.bottomup_merge) for l in layers)
    g["prior heads"] = sum(_count(l.prior_head) for l in layers)
    g["posterior heads"] = sum(_count(l.posterior_head) for l in layers)
    g["layer-0 constant"] = model.constant.numel()
    g["generative attention"] = sum(_count(l.gen_attention) for l in layers)
    g["inference attention"] = sum(_count(l.inf_attention) for l in layers)
    g["context layer norms"] = sum(_count(l.renorm_old) for l in layers)
    g["final merge"] = _count(model.final_merge)
    g["postprocess"] = _count(model.postprocess)
    g["data head"] = _count(model.head)
    assert sum(g.values()) == _count(model), "parameter groups must cover the whole model"
    return g


def layer_table(model: DeepAttentiveVAE) -> list[dict]:
    """Per stochastic layer: its parameters split into prior / posterior / attention, and the
    layers it attends to."""
    rows = []
    for l, layer in enumerate(model.layers):
        rows.append({
            "layer": l,
            "latent": [model.derived.latent_channels, model.derived.feature_size,
                       model.derived.feature_size],
            "encoder": _count(model.encoders[l]),
            "prior": _count(layer.merge) + _count(layer.decoder) + _count(layer.prior_head),
            "posterior": _count(layer.bottomup_merge) + _count(layer.posterior_head),
            "attention": (_count(layer.gen_attention) + _count(layer.inf_attention)
                          + _count(layer.renorm_old)),
            "generative_sources": list(layer.gen_sources),
            "inference_sources": list(layer.inf_sources),
        })
    return rows


def summary(model: DeepAttentiveVAE) -> dict:
    """What `avi build --json` prints. `parameters_reference_count` leaves out the per-depth
    context layer norms, as the authors' counter did (docs/model.md section 14)."""
    groups = parameter_groups(model)
    total = sum(groups.values())
    return {
        "name": model.spec.name,
        "parameters": total,
        "parameters_reference_count": total - groups["context layer norms"],
        "groups": dict(groups),
        "layers": layer_table(model),
        "widths": {"bottom_up": model.derived.bottom_up_width,
                   "context": model.derived.context_width,
                   "decoder": [model.derived.decoder_width(l) for l in range(model.derived.layers)],
                   "postprocess": model.derived.post_width},
    }
