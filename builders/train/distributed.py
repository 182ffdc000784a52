"""Data parallelism of `avi train` (docs/model.md section 9): the process group torchrun
sets up, decisions all ranks agree on, and DistributedDataParallel with per-process batch
norm statistics."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


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


def setup_distributed(device_name: str | None) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device_name in (None, "auto") and torch.cuda.is_available()) or device_name == "cuda"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world, local, True)


def teardown_distributed(ddp: Distributed) -> None:
    if ddp.initialised and dist.is_initialized():
        dist.destroy_process_group()
