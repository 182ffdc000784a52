"""`avi sweep`: the runs of builders.launch.grid submitted through submitit, one job each.

SLURM: one job array (submitit's SlurmExecutor under executor.batch()), with the sbatch
options of the command line; with --nodes / --tasks-per-node each job is one multi-node job
whose every srun task runs the job function (one process of the run's training). submitit
asks SLURM for the warning signal before a time limit and requeues a job that gets it
(builders.launch.job). Local: the same jobs as local processes (submitit's LocalExecutor), at
most `jobs` at a time; `avi sweep` waits for them.

Idempotent: a run whose done marker matches its spec is skipped, and so is one that is still
queued or whose run directory is held by a writer (the run lock of builders.train.run_dir), so a
sweep can be issued again after fixing one spec and never starts a second writer on a run.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from avi_spec import dump_yaml

from ..files import write_atomically
from ..train.run_dir import LOCK_NAME
from . import manifest as mf
from .grid import Run
from .job import SweepJob


@dataclass
class Resources:
    """What each job asks the scheduler for (None: the cluster's default)."""
    partition: str | None = None
    gpus_per_node: int | None = None
    nodes: int | None = None                  # several: one multi-node job per run
    tasks_per_node: int | None = None         # one process (srun task) per GPU, each `avi train`
    cpus_per_task: int | None = None
    mem: str | None = None
    time_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 256
    extra: dict[str, str] = field(default_factory=dict)


def slurm_executor(folder: Path, res: Resources):
    import submitit
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=100)
    params = {"partition": res.partition, "gpus_per_node": res.gpus_per_node,
              "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
              "cpus_per_task": res.cpus_per_task, "mem": res.mem, "time": res.time_min,
              "account": res.account, "qos": res.qos, "constraint": res.constraint}
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None},
                         array_parallelism=res.array_parallelism, job_name="avi-sweep",
                         additional_parameters=dict(res.extra), stderr_to_stdout=True)
    return ex


def skip_reason(sweep_dir: Path, run: Run, key: str, previous: dict | None,
                queue: dict | None) -> str | None:
    """Why this run is not submitted again: done, still queued, or being written."""
    if mf.done_record(sweep_dir, run.name, key):
        return "done"
    old = next((r for r in (previous or {}).get("runs", []) if r["name"] == run.name), None)
    if old and old.get("job_id") and queue is not None and old["job_id"] in queue:
        return f"queued or running as job {old['job_id']}"
    holder = lock_holder(sweep_dir / run.name)
    if holder:
        return f"being written by {holder}"
    return None


def lock_holder(run_dir: Path) -> str | None:
    """The live process that holds a run directory's lock ('pid 12 on host'), else None.
    Reads the lock file's text, never takes the lock (that could turn a starting writer away)."""
    path = run_dir / LOCK_NAME
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        pid, host = int(info["pid"]), info["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return None if _lock_free(path) else f"pid {pid} on {host}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return None if _lock_free(path) else f"pid {pid} on {host}"


def _lock_free(path: Path) -> bool:
    """Whether nobody holds the flock: probed with a shared lock released at once."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def write_specs(sweep_dir: Path, runs: list[Run]) -> None:
    """Each run's resolved spec where its job reads it (DIR/.sweep/<run>/spec.yaml)."""
    for run in runs:
        text = f"# resolved spec of sweep run {run.name}; hash {run.resolved.hash}\n" + dump_yaml(run.resolved.document)
        write_atomically(mf.job_files(sweep_dir, run.name) / "spec.yaml", text.encode())


def entry(run: Run, sweep_dir: Path, key: str) -> dict:
    return {"name": run.name, "source": run.source, "grid": run.grid, "spec_hash": run.resolved.hash, "key": key,
            "run_dir": str(sweep_dir / run.name), "job_id": None, "state": "pending",
            "attempts": 0, "log": None}


def submit_slurm(sweep_dir: Path, runs: list[Run], jobs: list[SweepJob], res: Resources,
                 entries: dict[str, dict]) -> list:
    """Submit the jobs as one SLURM job array; fills each entry's job_id and log."""
    ex = slurm_executor(sweep_dir / mf.BOOKKEEPING / "submitit" / "%j", res)
    with ex.batch():
        handles = [ex.submit(job) for job in jobs]
    for run, handle in zip(runs, handles):
        entries[run.name].update(job_id=handle.job_id, log=str(handle.paths.stdout))
    return handles


def run_local(sweep_dir: Path, runs: list[Run], jobs: list[SweepJob], n: int, timeout_min: int,
              entries: dict[str, dict], manifest: dict, say) -> None:
    """The jobs as local processes (submitit's LocalExecutor), n at a time; returns when all
    have ended. Their state is recorded in sweep.json as they start and end."""
    import submitit
    ex = submitit.LocalExecutor(folder=str(sweep_dir / mf.BOOKKEEPING / "submitit" / "%j"))
    ex.update_parameters(timeout_min=timeout_min, stderr_to_stdout=True)
    waiting, running = list(zip(runs, jobs)), []
    while waiting or running:
        while waiting and len(running) < n:
            run, job = waiting.pop(0)
            handle = ex.submit(job)
            entries[run.name].update(job_id=handle.job_id, log=str(handle.paths.stdout))
            running.append((run, job, handle))
            say(f"started {run.name} (process {handle.job_id})")
            mf.write(sweep_dir, manifest)
        for run, job, handle in [x for x in running if x[2].done()]:
            running.remove((run, job, handle))
            ok = mf.done_record(sweep_dir, run.name, job.key) is not None
            say(f"{'finished' if ok else 'FAILED'} {run.name}")
            mf.write(sweep_dir, mf.refresh(sweep_dir, manifest, alive=_alive_local))
        time.sleep(0.5)


def _alive_local(run: dict) -> bool:
    return lock_holder(Path(run["run_dir"])) is not None
