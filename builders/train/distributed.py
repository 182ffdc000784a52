"""Data parallelism of `avi train` (docs/model.md section 9): the process group torchrun or
srun set up (builders.launch.process_group), decisions all ranks agree on, and
DistributedDataParallel with per-process batch norm statistics."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ..launch.process_group import (Distributed, setup_distributed,  # noqa: F401 (API)
                                    teardown_distributed)


def all_processes_agree(flags: list[bool], ddp: Distributed, device: torch.device) -> list[bool]:
    """Each flag stays true only if it is true in every process (all_reduce MIN), so that
    decisions such as skipping a non-finite update are the same on all ranks."""
    if ddp.world_size == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def wrap_data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel with per-process batch-norm statistics (no buffer broadcast).

    Newer torch deprecates broadcast_buffers (a FutureWarning in every process) for
    forward_sync_buffers, which still syncs buffers at init; its own advice is to keep
    broadcast_buffers=False for rank-local buffers, so that one warning is silenced."""
    from torch.nn.parallel import DistributedDataParallel
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
