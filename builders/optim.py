"""Optimizer with the two L2 strengths of the paper (ARCHITECTURE.md section 7, "Regulariser R").

The reference adds Keras L2 penalties lambda * sum(w^2) to the loss, whose gradient is
2 * lambda * w. Here that is *coupled* weight decay of 2 * lambda per parameter group, i.e.
the term is added to the gradient before the Adam-family update (identical to putting the
penalty in the loss, and cheaper). Two groups:

  attention  lambda = train.optimizer.l2_attention: the layer norms of both depth-wise
             attentions and the per-depth context layer norms, the gammas of both
             depth-wise attentions, the non-local gammas and the layer-0 constant;
  default    lambda = train.optimizer.l2: everything else (conv directions, log-magnitudes,
             biases, batch-norm parameters, temperatures).

``adamax`` and ``adam`` use PyTorch's coupled ``weight_decay`` (= 2 * lambda). ``adamw`` uses
its decoupled weight decay instead, with the same 2 * lambda per group as the decay rate
(scaled by the learning rate inside AdamW) - a different regulariser, offered for experiments.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .attention_paths import GenerativeAttention, InferenceAttention
from .nonlocal_block import NonLocal


def attention_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters regularised with
    ``l2_attention``."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (GenerativeAttention, InferenceAttention)):
            for p_name, _ in module.named_parameters():
                if p_name != "temperature":          # layer norms and gamma; t stays in default
                    names.add(prefix + p_name)
        elif isinstance(module, NonLocal):
            names.add(prefix + "gamma")
        elif mod_name.endswith("renorm_old"):
            for p_name, _ in module.named_parameters():
                names.add(prefix + p_name)
    if any(n == "constant" for n, _ in model.named_parameters()):
        names.add("constant")
    return names


def parameter_groups(model: nn.Module, l2: float, l2_attention: float) -> list[dict]:
    """Two optimizer parameter groups, ``default`` and ``attention``, covering every trainable
    parameter once; ``weight_decay`` is 2 * lambda (coupled L2, see the module docstring)."""
    special = attention_parameter_names(model)
    default, attention = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (attention if name in special else default).append(p)
    return [{"name": "default", "params": default, "weight_decay": 2.0 * l2},
            {"name": "attention", "params": attention, "weight_decay": 2.0 * l2_attention}]


def _fast_kwargs(cls, params: list[torch.Tensor]) -> dict:
    """``foreach=True`` where the optimizer supports it (all parameters on one device);
    ``fused`` is only used by PyTorch for CUDA Adam/AdamW and is left to its default."""
    sig = inspect.signature(cls.__init__).parameters
    kw = {}
    if "foreach" in sig and params and len({p.device for p in params}) == 1:
        kw["foreach"] = True
    if "fused" in sig and cls in (torch.optim.Adam, torch.optim.AdamW) and params and \
            all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params):
        kw.pop("foreach", None)
        kw["fused"] = True
    return kw


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer of ``train.optimizer`` (``cfg``) over ``model``'s two L2 groups. The
    learning rate is set on every step by the trainer (builders.schedules)."""
    groups = parameter_groups(model, cfg.l2, cfg.l2_attention)
    classes = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    cls = classes[cfg.name]
    params = [p for g in groups for p in g["params"]]
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **_fast_kwargs(cls, params))
