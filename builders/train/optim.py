"""Optimizer with the two L2 strengths of the paper (docs/model.md section 9, "Regulariser R").

The reference adds Keras L2 penalties lambda * sum(w^2) to the loss, whose gradient is
2 * lambda * w. Here that is *coupled* weight decay of 2 * lambda per parameter group, i.e.
the term is added to the gradient before the Adam-family update (identical to putting the
penalty in the loss, and cheaper). Two groups:

  attention  lambda = train.optimizer.l2_attention: the layer norms of both depth-wise
             attentions and the per-depth context layer norms, the gammas of both
             depth-wise attentions, the non-local gammas and the layer-0 constant;
  default    lambda = train.optimizer.l2: everything else (conv directions, log-magnitudes,
             biases, batch-norm parameters, temperatures).

``adamax`` with ``eps_mode: keras`` (the default) is KerasAdamax below, the update the
reference code ran; with ``eps_mode: torch`` it is torch.optim.Adamax. ``adamax`` and ``adam``
use coupled ``weight_decay`` (= 2 * lambda). ``adamw`` uses
its decoupled weight decay instead, with the same 2 * lambda per group as the decay rate
(scaled by the learning rate inside AdamW) - a different regulariser, offered for experiments.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..network.attention_paths import GenerativeAttention, InferenceAttention
from ..network.depthwise_attention import ContextLayerNorm
from ..network.nonlocal_block import NonLocal


class KerasAdamax(torch.optim.Optimizer):
    """Adamax as Keras computes it: u_t = max(beta2 u, |g|), step lr / (1 - beta1^t) * m / (u + eps).

    torch.optim.Adamax puts eps inside the max instead (max(beta2 u, |g| + eps)); at the
    paper's eps = 1e-3 the two differ visibly for parameters with small gradients
    (docs/model.md section 9). Coupled weight decay: g <- g + weight_decay * w.
    """

    def __init__(self, params, lr: float = 2e-3, betas=(0.9, 0.999), eps: float = 1e-3,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            (b1, b2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
            for p in params:
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # One iteration count per group, as Keras keeps one per optimizer: a parameter that
            # missed a step (no gradient) must not shift the bias correction of the others.
            group["step"] = group.get("step", 0) + 1
            grads = [p.grad for p in params]
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            m = [self.state[p]["exp_avg"] for p in params]
            u = [self.state[p]["exp_inf"] for p in params]
            torch._foreach_lerp_(m, grads, 1 - b1)                      # m = b1 m + (1 - b1) g
            torch._foreach_mul_(u, b2)
            torch._foreach_maximum_(u, torch._foreach_abs(grads))         # u = max(b2 u, |g|)
            t = group["step"]
            denom = torch._foreach_add(u, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - b1 ** t))
        return loss


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
        elif isinstance(module, ContextLayerNorm):
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
    learning rate is set on every step by the trainer (builders.train.schedules)."""
    groups = parameter_groups(model, cfg.l2, cfg.l2_attention)
    classes = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.name == "adamax" and cfg.eps_mode == "keras":
        return KerasAdamax(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    cls = classes[cfg.name]
    params = [p for g in groups for p in g["params"]]
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **_fast_kwargs(cls, params))
