"""Where this process stands in a multi-process launch, as torchrun or srun tells it.

torchrun (one node or several, ``--nnodes N --node-rank R --rdzv-endpoint HOST:PORT``) exports
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT itself. srun exports its own names;
they are read as submitit's TorchDistributedEnvironment reads them: the rank from SLURM_PROCID,
the local rank from SLURM_LOCALID, the world size from the step's task count, the rendezvous
host is the first node of the allocation (``scontrol show hostnames``) and the port is derived
from the job and step ids (MASTER_PORT, if set, wins). Only a task of an srun step counts:
a batch script has SLURM_NTASKS but no SLURM_STEP_ID, and must not wait for tasks that were
never started.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
from dataclasses import dataclass

PORT_RANGE = (20000, 60000)       # as submitit's TorchDistributedEnvironment


class LaunchError(Exception):
    """The launcher's environment is inconsistent (the CLI turns it into exit 2)."""


@dataclass(frozen=True)
class LaunchEnvironment:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "none"            # "torchrun", "srun" or "none"


def _int(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise LaunchError(f"the launcher set {name}={env.get(name)!r}, not a whole number") from None


def slurm_hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list ("vm", "gpu[01-03,07]"), as `scontrol show hostnames`
    expands it; a plain comma-separated list when scontrol is not there."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    if "[" in nodelist:
        raise LaunchError(f"cannot expand the SLURM node list {nodelist!r} without scontrol")
    return [h for h in nodelist.split(",") if h]


def launch_environment(env: dict | None = None) -> LaunchEnvironment:
    """This process's rank, world size, local rank and rendezvous (torchrun's variables first)."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        port = env.get("MASTER_PORT")
        return LaunchEnvironment(_int(env, "RANK") if "RANK" in env else 0, world,
                                 _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                                 env.get("MASTER_ADDR"), int(port) if port else None,
                                 "torchrun" if world > 1 else "none")
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
        if world <= 1:
            return LaunchEnvironment()
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or socket.gethostname()
        port = env.get("MASTER_PORT")
        if not port:
            rng = random.Random(f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}")
            port = rng.randint(*PORT_RANGE)
        return LaunchEnvironment(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID"),
                                 env.get("MASTER_ADDR") or slurm_hostnames(nodes)[0], int(port), "srun")
    return LaunchEnvironment()


def export_for_torch(launch: LaunchEnvironment) -> None:
    """Set the env:// variables torch.distributed.init_process_group reads (srun does not)."""
    if launch.launcher != "srun":
        return
    os.environ.update({"RANK": str(launch.rank), "WORLD_SIZE": str(launch.world_size),
                       "LOCAL_RANK": str(launch.local_rank), "MASTER_ADDR": str(launch.master_addr),
                       "MASTER_PORT": str(launch.master_port)})
