"""Learning-rate and KL-warm-up schedules (docs/model.md section 9).

Both are pure functions of the training position, so a resumed run recomputes exactly the
values an uninterrupted run would have used; nothing about them is kept in a checkpoint.

learning_rate(n): the rate of schedule step n, which the trainer sets to the number of the
optimizer step about to run counted from 1 (n = steps taken + 1), as the authors' callback
counts it. With P = ``steps_per_epoch`` (the trainer passes floor(N / B), the authors'
``lr_steps_per_epoch``; an epoch runs ceil(N / B) steps) and W = ``warmup_epochs``:

    n <= W * P      linear warm-up per step from ``warmup_start_lr`` (n = 0) to the peak ``lr``
    after that      the schedule epoch e = floor(n / P) sets the rate:
    cosine          lr * [(1 - a) * 0.5 * (1 + cos(pi * (e - W) / (E - W))) + a],  a = min_lr / lr
    cosine_restart  the same shape over SGDR cycles: the first lasts ``first_cycle_epochs``,
                    each next one ``cycle_mult`` times longer, every restart back at the peak
    constant        lr

When B does not divide N the schedule epoch runs one step ahead of the data epoch per epoch
(the rate of data epoch k changes at its step ceil(N/B) - k), as in the authors' runs.

kl_beta: beta(e) = start + (1 - start) * e / epochs, capped at 1 (changes once per epoch).
"""
from __future__ import annotations

import math


def _cosine(fraction: float, peak: float, floor: float) -> float:
    a = floor / peak if peak > 0 else 0.0
    return peak * ((1.0 - a) * 0.5 * (1.0 + math.cos(math.pi * fraction)) + a)


def learning_rate(step: int, steps_per_epoch: int, schedule, lr: float, epochs: int) -> float:
    """The learning rate of schedule step ``step`` (see the module docstring: the trainer
    passes the 1-based number of the optimizer step about to run).

    ``schedule`` is a spec's ``train.schedule``; ``lr`` the peak (``train.optimizer.lr``);
    ``epochs`` the run's length E; ``steps_per_epoch`` the schedule's epoch length P.
    """
    spe = max(1, int(steps_per_epoch))
    warm = float(schedule.warmup_epochs)
    warm_steps = warm * spe
    if step < warm_steps:
        start = float(schedule.warmup_start_lr)
        return start + (lr - start) * step / warm_steps
    if schedule.name == "constant":
        return lr
    epoch = step // spe
    t = max(0.0, epoch - warm)                       # epochs since the end of warm-up
    if schedule.name == "cosine":
        length = max(float(epochs) - warm, 1e-12)
        return _cosine(min(t / length, 1.0), lr, float(schedule.min_lr))
    if schedule.name == "cosine_restart":
        cycle = float(schedule.first_cycle_epochs)
        while t >= cycle:
            t -= cycle
            cycle *= float(schedule.cycle_mult)
        return _cosine(t / cycle, lr, float(schedule.min_lr))
    raise ValueError(f"unknown learning-rate schedule {schedule.name!r}")


def kl_beta(epoch: int, kl_warmup) -> float:
    """The KL weight beta of (0-based) epoch ``epoch``; ``kl_warmup`` is ``train.kl_warmup``."""
    if kl_warmup is None or kl_warmup.epochs <= 0:
        return 1.0
    start = float(kl_warmup.start)
    return min(1.0, start + (1.0 - start) * epoch / float(kl_warmup.epochs))
