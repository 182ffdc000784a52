"""Why a training step went non-finite: which term of the loss, which layer, which module.

When a step is skipped (its loss or gradient norm is not finite), the trainer asks
`diagnose` for a plain account before the step's gradients are dropped:

  terms        the reconstruction term (NLL) and the KL of every stochastic layer, each
               flagged when it is not finite (the first layer named is where to look);
  log-scales   per layer, the share of posterior / prior log-scales sitting at a bound of
               hierarchy.*.log_scale (a saturated tanh passes no gradient and often precedes
               a blow-up), and log-scales or means that are not finite;
  gradients    the gradient norm of every module group (preprocess, encoders.l, layers.l,
               constant, final_merge, postprocess, head), the non-finite ones named;
  weights      the largest |weight| of every module group: an earlier update that overflowed
               shows as weights far above the rest, or not finite.

The account goes to metrics.jsonl (a record with "diagnosis") and, shortened, to stderr, with
the usual remedies (`remedies`). The forward pass is rerun once under no_grad with the step's
seed to read the log-scales; the trainer puts back the batch-norm statistics afterwards.
"""
from __future__ import annotations

import math

import torch

AT_BOUND = 1e-3        # a log-scale within this share of (hi - lo) of a bound counts as at it
SHOWN = 3              # layers / groups named on stderr (all of them are in the record)


def module_group(name: str) -> str:
    """The group of a parameter: its top-level module, with the layer index for the per-layer
    lists (layers.3.prior_head.conv.weight -> layers.3)."""
    parts = name.split(".")
    if parts[0] in ("layers", "encoders") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


@torch.no_grad()
def group_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """The L2 norm of the gradients of every module group (groups without gradients left out)."""
    squares: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = module_group(name)
        sq = p.grad.detach().float().pow(2).sum()
        squares[g] = squares[g] + sq if g in squares else sq
    return {g: math.sqrt(v) if math.isfinite(v := float(s)) else v for g, s in squares.items()}


@torch.no_grad()
def weight_max_abs(model: torch.nn.Module) -> dict[str, float]:
    """The largest |weight| of every module group (inf or nan where one is not finite): an
    update that overflowed shows here as a group of weights many orders above the rest."""
    out: dict[str, float] = {}
    for name, p in model.named_parameters():
        g = module_group(name)
        t = p.detach().float()
        v = float(t.abs().max()) if bool(torch.isfinite(t).all()) else math.nan
        prev = out.get(g, 0.0)
        out[g] = math.nan if math.isnan(v) or math.isnan(prev) else max(prev, v)
    return out


def _finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _bound_shares(log_scale: torch.Tensor | None, bounds: tuple[float, float]) -> tuple[float, bool]:
    """(share of entries within AT_BOUND of a bound, whether any entry is not finite)."""
    if log_scale is None:
        return 0.0, False
    t = log_scale.detach().float()
    lo, hi = bounds
    tol = AT_BOUND * (hi - lo)
    at = ((t - lo).abs() <= tol) | ((t - hi).abs() <= tol)
    return float(at.float().mean()), not bool(torch.isfinite(t).all())


def latent_report(latents: list[dict], post_bounds, prior_bounds) -> list[dict]:
    """Per layer: share of log-scales at a bound and non-finite parts, posterior and prior."""
    rows = []
    for l, lat in enumerate(latents):
        q_at, q_bad = _bound_shares(lat.get("q_log_scale"), post_bounds)
        p_at, p_bad = _bound_shares(lat.get("p_log_scale"), prior_bounds)
        rows.append({"layer": l, "posterior_log_scale_at_bound": q_at, "prior_log_scale_at_bound": p_at,
                     "posterior_log_scale_non_finite": q_bad, "prior_log_scale_non_finite": p_bad,
                     "posterior_mean_non_finite": not bool(torch.isfinite(lat["q_loc"]).all())})
    return rows


def diagnose(values: dict, kl_per_layer: list[float], grad_norms: dict[str, float],
             latents: list[dict] | None, post_bounds, prior_bounds,
             weights: dict[str, float] | None = None) -> dict:
    """The account of one skipped step (a JSON-able dict, non-finite numbers kept as floats)."""
    layers = latent_report(latents, post_bounds, prior_bounds) if latents is not None else []
    # In the order of the top-down pass: the first term named is where the trouble starts
    # (a non-finite z_l spoils every later layer and the reconstruction).
    terms = [f"KL of layer {l}" for l, v in enumerate(kl_per_layer) if not _finite(v)]
    if not _finite(values["nll"]):
        terms.append("reconstruction (NLL)")
    suspects = []
    for row in layers:
        l = row["layer"]
        for part in ("posterior", "prior"):
            if row[f"{part}_log_scale_non_finite"]:
                suspects.append(f"{part} log-scale of layer {l} is not finite")
        if row["posterior_mean_non_finite"]:
            suspects.append(f"posterior mean of layer {l} is not finite")
        for part in ("posterior", "prior"):
            share = row[f"{part}_log_scale_at_bound"]
            if share > 0.01:
                suspects.append(f"{share:.0%} of the {part} log-scales of layer {l} are at their bound")
    bad_groups = [g for g, v in grad_norms.items() if not _finite(v)]
    finite_groups = sorted(((v, g) for g, v in grad_norms.items() if _finite(v)), reverse=True)
    return {"loss": values["loss"], "nll": values["nll"], "kl": values["kl"],
            "grad_norm": values["grad_norm"], "kl_per_layer": kl_per_layer,
            "non_finite_terms": terms, "suspects": suspects,
            "weight_max_abs_per_group": weights or {},
            "non_finite_weight_groups": [g for g, v in (weights or {}).items() if not _finite(v)],
            "grad_norm_per_group": grad_norms, "non_finite_grad_groups": bad_groups,
            "largest_grad_groups": [g for _, g in finite_groups[:SHOWN]], "layers": layers}


def summary(d: dict) -> str:
    """The account in one or two lines for stderr: terms, suspects, gradient groups."""
    parts = []
    weights = d.get("weight_max_abs_per_group") or {}
    if d.get("non_finite_weight_groups"):
        parts.append("the weights themselves are not finite (an earlier update overflowed) in "
                     + _few(d["non_finite_weight_groups"]))
    elif weights:
        top = max(weights, key=weights.get)
        parts.append(f"largest |weight| {weights[top]:.3g} in {top}")
    if d["non_finite_terms"]:
        parts.append("non-finite term(s): " + _few(d["non_finite_terms"]))
    else:
        parts.append("every loss term is finite (the gradient is not)")
    if d["suspects"]:
        parts.append(_few(d["suspects"]))
    if d["non_finite_grad_groups"]:
        parts.append("non-finite gradient in " + _few(d["non_finite_grad_groups"]))
    elif d["largest_grad_groups"]:
        norms = d["grad_norm_per_group"]
        parts.append("largest gradient norms: " + ", ".join(
            f"{g} {norms[g]:.3g}" for g in d["largest_grad_groups"]))
    return "; ".join(parts)


def _few(items: list[str]) -> str:
    more = len(items) - SHOWN
    return ", ".join(items[:SHOWN]) + (f" (+{more} more)" if more > 0 else "")


def remedies(cfg) -> str:
    """The usual remedies, with the run's current values."""
    clip = ("set train.grad_clip (e.g. 200)" if cfg.grad_clip is None
            else f"lower train.grad_clip (now {cfg.grad_clip:g})")
    return (f"Usual remedies: lower train.optimizer.lr (now {cfg.optimizer.lr:g}) or lengthen "
            f"train.schedule.warmup_epochs (now {cfg.schedule.warmup_epochs:g}); {clip}; "
            f"narrow hierarchy.*.log_scale or try hierarchy.scale: softplus; raise "
            f"train.max_skipped (now {cfg.max_skipped}) to ride out rare spikes.")
