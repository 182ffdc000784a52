"""Paired comparison of runs scored on the same images (`avi diff`).

Two runs evaluated on the same test images differ mostly by which image is hard, not by which
model is better: the standard errors of their means overlap where the per-image differences
are consistently of one sign. Pairing image by image removes that shared part. For each run
and the reference run (the first, or `avi diff --baseline`):

    d_i = NLL_i(run) - NLL_i(reference)        (and the same for -ELBO), i = 1..n
    mean paired difference  = mean(d)
    standard error          = sd(d, ddof=1) / sqrt(n)
    95% interval            = mean +- t_{0.975, n-1} * standard error

The t quantile (not 1.96) keeps the interval honest for a `--limit`ed evaluation of a few
dozen images (t = 2.26 for n = 10) and is 1.96 to two decimals from n ~ 1,000 on. A
difference is significant when its interval excludes 0 (a two-sided t test at 5%, per
comparison: no correction for comparing many runs with one reference). Negative: the run
is better (lower NLL) than the reference. Bits/dim for 8-bit data, nats otherwise.

Two evaluations are paired only when they scored the same images the same way: the same
data set and split, the same K, the same binarisation seed (binary data), the same number
of images and the same pixels (data_sha256 of the model-input images). Otherwise the
comparison says which of these differ.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .eval_results import rank
from .per_example import PerExampleError, read

CONFIDENCE = 0.95
COMPARED = (("dataset", "data set"), ("split", "split"), ("importance_samples", "K"),
            ("binarization_seed", "binarisation seed"), ("examples", "number of images"))
NOT_EVALUATED = "{} no evaluation: run avi eval"
NO_ESTIMATES = "{} no per-example estimates (evaluated before avi kept them): re-run avi eval"


def t_quantile(df: int, p: float = 0.5 + CONFIDENCE / 2) -> float:
    """The p quantile of Student's t with df degrees of freedom."""
    from scipy.special import stdtrit
    return float(stdtrit(df, p))


def paired_difference(reference: np.ndarray, other: np.ndarray, scale: float = 1.0) -> dict:
    """Mean of other - reference (times ``scale``), its standard error, the 95% t interval
    and whether that interval excludes 0. stderr and the interval are None for one image."""
    d = (np.asarray(other, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) * scale
    n = int(d.shape[0])
    mean = float(d.mean())
    if n < 2:
        return {"mean": mean, "stderr": None, "low": None, "high": None, "significant": False,
                "examples": n}
    stderr = float(d.std(ddof=1) / math.sqrt(n))
    half = t_quantile(n - 1) * stderr
    return {"mean": mean, "stderr": stderr, "low": mean - half, "high": mean + half,
            "significant": bool(mean - half > 0 or mean + half < 0), "examples": n}


def reasons_not_paired(a: dict, b: dict) -> list[str]:
    """Why two evaluation documents did not score the same images ([] when they did)."""
    reasons = [f"{label} differs ({_text(a.get(key))} vs {_text(b.get(key))})"
               for key, label in COMPARED if a.get(key) != b.get(key)]
    if not reasons and a.get("data_sha256") != b.get("data_sha256"):
        reasons.append("the images differ (same data set, split and count, other pixels: "
                       "data files, data.pad or binarisation)")
    return reasons


def _text(v) -> str:
    return "unrecorded" if v is None else str(v)


def _with_estimates(results: list[dict]) -> list[dict]:
    return [d for d in results if isinstance(d.get("per_example"), dict)]


def choose_pair(reference: list[dict], other: list[dict]) -> tuple[dict, dict] | list[str]:
    """The best pair of evaluations (one of each run) that scored the same images (the test
    split before train, the full split, the largest K, the most images, the latest), or the
    reasons their best evaluations cannot be paired."""
    for docs, who, hint in ((reference, "the reference has", " (or pick an evaluated one with --baseline)"),
                            (other, "this run has", "")):
        if not docs:
            return [NOT_EVALUATED.format(who) + hint]
        if not _with_estimates(docs):
            return [NO_ESTIMATES.format(who)]
    ref, oth = _with_estimates(reference), _with_estimates(other)
    pairs = [(a, b) for b in reversed(oth) for a in reversed(ref) if not reasons_not_paired(a, b)]
    if pairs:
        return max(pairs, key=lambda p: rank(p[0]))        # max keeps the first: the latest
    best = lambda docs: max(reversed(docs), key=rank)          # noqa: E731
    return reasons_not_paired(best(ref), best(oth))


def compare(reference: tuple[Path, list[dict]], other: tuple[Path, list[dict]]) -> dict:
    """The paired comparison of run ``other`` with ``reference``, each (run directory, its
    eval.json documents): {"paired": True, "evaluated", "unit", "nll", "nelbo"} with the
    statistics of paired_difference, or {"paired": False, "reasons": [...]}. A run without
    a directory has no documents."""
    chosen = choose_pair(reference[1], other[1])
    if isinstance(chosen, list):
        return {"paired": False, "reasons": chosen}
    try:
        a, b = read(reference[0], chosen[0]), read(other[0], chosen[1])
    except PerExampleError as e:
        return {"paired": False, "reasons": [str(e)]}
    if not np.array_equal(a.index, b.index):
        return {"paired": False, "reasons": ["the per-example files hold other images"]}
    finite = [np.isfinite(e.nll_nats).all() and np.isfinite(e.nelbo_nats).all() for e in (a, b)]
    if not all(finite):
        who = "the reference" if not finite[0] else "this run"
        return {"paired": False, "reasons": [f"{who} has non-finite estimates (a diverged model?)"]}
    doc = chosen[0]
    unit, scale = _unit(doc)
    with np.errstate(over="ignore", invalid="ignore"):
        nll, nelbo = (paired_difference(a.nll_nats, b.nll_nats, scale),
                      paired_difference(a.nelbo_nats, b.nelbo_nats, scale))
    if not all(v is None or math.isfinite(v) for d in (nll, nelbo) for v in (d["mean"], d["stderr"])):
        return {"paired": False, "reasons": ["the estimates are too large to compare (their "
                                             "differences overflow): an altered per-example file?"]}
    return {"paired": True, "unit": unit, "split": doc.get("split"),
            "importance_samples": doc.get("importance_samples"), "examples": int(a.index.shape[0]),
            "binarization_seed": doc.get("binarization_seed"), "nll": nll, "nelbo": nelbo}


def _unit(doc: dict) -> tuple[str, float]:
    """("bits_per_dim", 1 / (D log 2)) for 8-bit data (dims D recorded), else ("nats", 1). A
    dims that is not a positive whole number (an edited eval.json) counts as not recorded."""
    dims = doc.get("dims")
    if isinstance(dims, int) and not isinstance(dims, bool) and 0 < dims < 1 << 53:
        return "bits_per_dim", 1 / (dims * math.log(2))
    return "nats", 1.0


def compare_runs(runs: list[tuple[Path | None, list[dict]]], baseline: int = 0) -> dict:
    """Every run compared with run ``baseline``: {"baseline": index, "confidence": 0.95,
    "comparisons": [None for the baseline, compare(...) for the others]}. A run is (its
    directory, its eval.json documents); (None, []) for a spec without a run."""
    comparisons = [None if i == baseline else compare(runs[baseline], run) for i, run in enumerate(runs)]
    return {"baseline": baseline, "confidence": CONFIDENCE, "comparisons": comparisons}
