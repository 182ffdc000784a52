"""Joining the process group of a launch by torchrun or srun (builders.launch.environment), the
one code path of `avi train` and `avi eval` with several processes.

Every wait is bounded: joining the rendezvous and every collective afterwards give up after
AVI_DIST_TIMEOUT seconds (default 600), so an unreachable rendezvous or a node that died
ends the job with a message instead of a hang (torch's default is 30 minutes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .environment import LaunchError, export_for_torch, launch_environment

DEFAULT_TIMEOUT_S = 600.0


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


class PeerLost(Exception):
    """Another process of the group died or stopped answering during a collective."""


_PEER_FAILURE_TEXT = ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                      "broken pipe", "socket")


def peer_failure(error: BaseException, ddp: Distributed, after: str) -> PeerLost | None:
    """A PeerLost saying what happened, if ``error`` came from the process group failing under
    a multi-process run (torch raises DistError or, from gloo, a RuntimeError naming it);
    None for any other error. ``after``: what the user can rely on (e.g. the last checkpoint)."""
    text = str(error)
    if ddp.world_size <= 1 or not (isinstance(error, dist.DistError)
                                    or any(t in text.lower() for t in _PEER_FAILURE_TEXT)):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return PeerLost(f"process {ddp.rank} of {ddp.world_size} lost contact with the others ({first[:300]}): "
                    f"a process or node died or stopped answering (every wait is bounded by "
                    f"AVI_DIST_TIMEOUT, {dist_timeout().total_seconds():.0f} s). {after}".strip())


def dist_timeout() -> timedelta:
    raw = os.environ.get("AVI_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise LaunchError(f"AVI_DIST_TIMEOUT={raw!r}: give the seconds to wait for other processes (> 0)")
    return timedelta(seconds=seconds)


def setup_distributed(device_name: str | None) -> Distributed:
    """Join the process group when launched by torchrun or srun with more than one process
    (gloo on the CPU, NCCL on GPUs); a single process joins nothing."""
    launch = launch_environment()
    if launch.world_size <= 1:
        return Distributed()
    use_cuda = (device_name in (None, "auto") and torch.cuda.is_available()) or device_name == "cuda"
    if not dist.is_initialized():
        timeout = dist_timeout()
        export_for_torch(launch)
        if use_cuda:
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        try:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
        except (RuntimeError, ValueError, OSError) as e:      # DistNetworkError, DistStoreError ...
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise LaunchError(
                f"process {launch.rank} of {launch.world_size} ({launch.launcher}) could not join the "
                f"process group at {where} within {timeout.total_seconds():.0f} s: is every process "
                f"started and the rendezvous host reachable on that port? ({str(e).splitlines()[0]})"
            ) from None
    return Distributed(launch.rank, launch.world_size, launch.local_rank, True)


def agree(ddp: Distributed, **settings) -> None:
    """Refuse a launch whose processes were started with different settings (the spec edited
    on one node, another --max-steps or -k ...): they would train or score different things,
    or wait for each other's collectives until the timeout. One all_gather_object at the start;
    every process raises the same LaunchError."""
    if ddp.world_size == 1:
        return
    mine = {k: repr(v) for k, v in settings.items()}
    everyone: list = [None] * ddp.world_size
    dist.all_gather_object(everyone, mine)
    differ = [k for k in mine if any(other[k] != everyone[0][k] for other in everyone)]
    if differ:
        values = ", ".join(f"process {r} has {differ[0]} = {other[differ[0]]}"
                           for r, other in enumerate(everyone))
        raise LaunchError(f"the {ddp.world_size} processes were not started with the same settings "
                          f"({', '.join(differ)}): {values}. Start every node with the same command, "
                          f"spec and --set flags.")


def teardown_distributed(ddp: Distributed) -> None:
    if ddp.initialised and dist.is_initialized():
        dist.destroy_process_group()
