"""Data parallelism of `avi train` (docs/model.md section 9): the process group torchrun or
srun set up (builders.launch.process_group), the values and decisions of a step, the same on every rank, and
DistributedDataParallel with per-process batch norm statistics (global ones with
train.sync_batch_norm: builders.train.sync_batch_norm)."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ..launch.process_group import (Distributed, setup_distributed,  # noqa: F401 (API)
                                    teardown_distributed)


def step_across_processes(values: torch.Tensor, stop: bool, ddp: Distributed,
                          device: torch.device) -> tuple[list[float], bool]:
    """A step's values as the global batch's, and whether any process was asked to stop, in
    one all-reduce. ``values`` are the means over this process's share (loss, NLL, KL ...,
    equal shares), so their mean over processes is the global batch's mean; a value that is
    the same everywhere (the gradient norm after DDP's average) stays itself. A NaN or inf on
    any process makes the mean non-finite everywhere, so every process skips the same steps."""
    if ddp.world_size == 1:
        return values.tolist(), stop
    t = packed_step(values, stop).to(device)
    dist.all_reduce(t)
    return (t[:-1] / ddp.world_size).tolist(), bool(t[-1].item() > 0)


def packed_step(values: torch.Tensor, stop: bool) -> torch.Tensor:
    """The values and the stop flag in one float64 tensor on the values' device (a GPU's for
    NCCL: tests/test_gpu_path.py checks no part of it is made elsewhere)."""
    flag = torch.tensor([float(stop)], dtype=torch.float64, device=values.device)
    return torch.cat([values.detach().double().flatten(), flag])


def wrap_data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel without buffer broadcast: batch-norm running statistics are
    per process (or equal everywhere with train.sync_batch_norm).

    Newer torch deprecates broadcast_buffers (a FutureWarning in every process) for
    forward_sync_buffers, which still syncs buffers at init; its own advice is to keep
    broadcast_buffers=False for rank-local buffers, so that one warning is silenced."""
    from torch.nn.parallel import DistributedDataParallel
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
