"""How long an importance-sampled evaluation will take, before and while it runs.

Before: `probe_seconds_per_sample` times one warm pass at the evaluation's own K and pass
size. A pass of K = 1 on a cold model (what `avi eval` used to time) costs the bottom-up
pass once per sample instead of once per K samples, and the first pass of a process pays
for allocations and kernel set-up: it projected 2.48 minutes for a 66 s run. While: the
estimate is replaced by the measured pace (`time_left`).
"""
from __future__ import annotations

import time

from torch import nn

from .evaluate import auto_chunk, importance_sampled_nll


def probe_seconds_per_sample(model: nn.Module, x, k: int, batch_size: int,
                             chunk: int | None = None, seed: int = 0) -> float:
    """Seconds per image-sample of `model` on images `x` at K = k: one image with as many
    samples as a real pass holds rows (batch_size images x the chunk, at most k), run once
    to warm up and once timed. The probe costs about two passes of the real work, whatever
    k is (a huge k is refused from it without running)."""
    first = x[:min(batch_size, x.shape[0])]
    per_image = chunk or auto_chunk(model, first.to(next(model.parameters()).device), k)
    rows = max(1, min(k, per_image * first.shape[0]))
    one = x[:1]
    importance_sampled_nll(model, [one], rows, chunk=rows, seed=seed, dims=0)      # warm-up
    t0 = time.perf_counter()
    importance_sampled_nll(model, [one], rows, chunk=rows, seed=seed, dims=0)
    return (time.perf_counter() - t0) / rows


def time_left(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the pace so far (None before anything is done)."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0, total - done) * elapsed / done
