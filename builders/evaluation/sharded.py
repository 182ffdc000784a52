"""Importance-sampled evaluation split across the processes of a launch (`avi eval --devices N`,
or `avi eval` under torchrun or srun).

Process r of W scores a contiguous block of whole batches, the very batches one process forms
(images [r * nb // W * B, (r+1) * nb // W * B) of nb = ceil(N / B) batches of B), each image
drawing its samples from its own generator seeded from (seed, its index in the split)
(builders.evaluation.image_noise). All processes use one chunk size (the smallest any of them
picks). The per-image estimates are gathered in image order on every process and summarised
as one process would: on the same kind of device the result is bit-identical to the unsharded
one (tests/test_distributed_eval.py checks it on the CPU).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..launch.process_group import Distributed
from .evaluate import _model_device, _summary, auto_chunk, batched, data_dims, importance_sampled_nll


def shard_bounds(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of the images process ``rank`` scores: a contiguous run of whole batches."""
    batches = -(-n // batch_size)
    first, last = rank * batches // world, (rank + 1) * batches // world
    return min(n, first * batch_size), min(n, last * batch_size)


def agreed_chunk(model, images: torch.Tensor, k: int, batch_size: int, chunk: int | None,
                 ddp: Distributed) -> int:
    """The chunk every process uses: the given one, else the smallest auto_chunk of any
    process for a full batch (the first batch of the split, which one process would probe)."""
    if chunk is None:
        chunk = auto_chunk(model, images[:batch_size].to(_model_device(model)), k)
    if ddp.world_size > 1:
        t = torch.tensor([chunk], dtype=torch.int64, device=_collective_device(model))
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        chunk = int(t.item())
    return chunk


def _collective_device(model) -> torch.device:
    """NCCL reduces CUDA tensors, gloo CPU ones."""
    return _model_device(model) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_agree_max(value: float, model, ddp: Distributed) -> float:
    """The largest of every process's ``value`` (e.g. a time estimate all must act on alike)."""
    if ddp.world_size <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device(model))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sharded_nll(model, images: torch.Tensor, k: int, batch_size: int, ddp: Distributed, *,
                chunk: int | None = None, seed: int = 0,
                progress: Callable[[int], None] | None = None) -> dict:
    """importance_sampled_nll's result over all ``images`` (the full split, on every process),
    each process scoring its shard; every process returns the gathered result."""
    chunk = agreed_chunk(model, images, k, batch_size, chunk, ddp)
    start, stop = shard_bounds(images.shape[0], batch_size, ddp.rank, ddp.world_size)
    t0 = time.perf_counter()
    nll = nelbo = np.zeros(0)
    if stop > start:
        r = importance_sampled_nll(model, batched(images[start:stop], batch_size), k, chunk,
                                   progress, dims=0, seed=seed, indices=np.arange(start, stop))
        nll, nelbo = r["per_example"]["nll_nats"], r["per_example"]["nelbo_nats"]
    parts = [(start, nll, nelbo)]
    if ddp.world_size > 1:
        parts = [None] * ddp.world_size
        dist.all_gather_object(parts, (start, nll, nelbo))
    seconds = all_agree_max(time.perf_counter() - t0, model, ddp)
    parts.sort(key=lambda p: p[0])
    all_nll = np.concatenate([p[1] for p in parts])
    all_nelbo = np.concatenate([p[2] for p in parts])
    if all_nll.shape[0] != images.shape[0]:
        raise RuntimeError(f"gathered {all_nll.shape[0]} estimates for {images.shape[0]} images")
    summary = _summary(all_nll, all_nelbo, data_dims(model) or 0, seconds)
    return {"importance_samples": int(k), "examples": summary.pop("examples"), "chunk": int(chunk),
            "processes": ddp.world_size, **summary}
