"""NVAE's --readjust_bn: batch-norm statistics re-estimated on the model's own samples.

A model trained with batch norm keeps running statistics of the activations it saw in
training, where every z_l came from the posterior. Samples from the prior, above all at a low
temperature, feed the decoder other activations; NVAE (Vahdat & Kautz 2020, section 5 and
their --readjust_bn flag) runs the model in training mode on prior samples at the chosen
temperature before sampling, which makes low-temperature samples much sharper.

Here the statistics of every batch norm the sampling pass uses are reset and re-estimated as
the exact average over ``passes`` batches of prior samples (momentum None: a cumulative
average), at ``temperature``. Nothing else changes: no parameter, no other buffer, and the
batch norms the sampling pass does not reach (the encoder's) keep their statistics. The
model's training-time noise on log-scales (hierarchy.*.noise) stays off while it runs.
"""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def readjust_batch_norm(model: torch.nn.Module, temperature: float = 1.0, passes: int = 100,
                        batch_size: int = 64) -> int:
    """Re-estimate the batch-norm statistics of the sampling path (see the module docstring);
    leaves the model in eval mode. Returns the number of batch norms re-estimated. Draws from
    torch's global generator."""
    if passes < 1 or batch_size < 1:
        raise ValueError(f"passes and batch_size must be at least 1, got {passes} and {batch_size}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    kept = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms]
    momenta = [m.momentum for m in norms]
    noise = (model.post_noise, model.prior_noise)
    try:
        model.post_noise = model.prior_noise = 0.0
        for m in norms:
            m.reset_running_stats()
            m.momentum = None                       # cumulative average over the passes
        model.train()
        for _ in range(passes):
            model.sample(batch_size, temperature)
    finally:
        model.post_noise, model.prior_noise = noise
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    untouched = 0
    for m, before in zip(norms, kept):
        if int(m.num_batches_tracked) == 0:         # not on the sampling path: as it was
            for k, b in m.named_buffers(recurse=False):
                b.copy_(before[k])
            untouched += 1
        else:                                       # the count as training would have it
            m.num_batches_tracked.copy_(before["num_batches_tracked"])
    return len(norms) - untouched
