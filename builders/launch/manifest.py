"""DIR/sweep.json, the record of a sweep, and the state of each of its runs.

    {"version": 1, "launcher": "slurm", "grid_fields": [...], "max_steps": ..., "eval": {...},
     "runs": [{"name", "source", "grid", "spec_hash", "run_dir", "job_id", "state",
               "attempts", "log"}]}   (log: the job's stdout and stderr)

The state is derived, never trusted from a previous write: there is no accounting database
on many clusters (sacct fails), so it comes from files and the queue:

    done       DIR/.sweep/<run>/done.json, written by the job after training (and eval)
    pending    queued and never started (squeue), or not submitted yet
    requeued   queued again after a start (squeue + the job's attempts)
    running    squeue says it runs
    failed     started or submitted, not done, no longer in the queue

Each start of a job appends a line to DIR/.sweep/<run>/attempts.jsonl. sweep.json is written
atomically (a reader sees the old or the new one) by `avi sweep` and `avi sweep status`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from ..files import write_atomically

MANIFEST = "sweep.json"
BOOKKEEPING = ".sweep"
STATES = ("pending", "running", "requeued", "done", "failed")
_SQUEUE_STATES = {"PD": "pending", "CF": "pending", "R": "running", "CG": "running",
                  "S": "running", "RQ": "requeued", "RS": "requeued", "RH": "requeued", "SE": "requeued"}


class QueueError(Exception):
    """SLURM's queue cannot be read: the states would be guesses, so none are given."""


def job_files(sweep_dir: Path, name: str) -> Path:
    """DIR/.sweep/<run>/: the job's own files (resolved spec, attempts, done marker)."""
    return Path(sweep_dir) / BOOKKEEPING / name


def read(sweep_dir: Path) -> dict | None:
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write(sweep_dir: Path, manifest: dict) -> None:
    write_atomically(Path(sweep_dir) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def attempts(sweep_dir: Path, name: str) -> list[dict]:
    path = job_files(sweep_dir, name) / "attempts.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:               # a line cut by a kill
            pass
    return rows


def job_key(spec_hash: str, max_steps: int | None, eval_args: list[str] | None) -> str:
    """What a job does: its spec, --max-steps and eval options. A done marker counts only
    for the same key (a re-issued sweep with more steps or another K runs the job again)."""
    text = json.dumps([spec_hash, max_steps, eval_args])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def done_record(sweep_dir: Path, name: str, key: str) -> dict | None:
    """The done marker of a run that did this very job (see job_key), else None."""
    path = job_files(sweep_dir, name) / "done.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """{job id: squeue's short state} of the jobs still queued or running; None where there
    is no squeue (the local launcher, a laptop)."""
    if shutil.which("squeue") is None:
        return None
    ids = sorted({j.split("_")[0] for j in job_ids if j})
    if not ids:
        return {}
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i %t"],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise QueueError("squeue did not answer in 60 s (is slurmctld up?)") from None
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise QueueError(f"squeue failed: {proc.stderr.strip()}")
    states = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.strip().partition(" ")
        states[job] = state
    return states


def derive_state(sweep_dir: Path, run: dict, queue: dict[str, str] | None, alive=None) -> str:
    """The state of one run of sweep.json now (see the module docstring). ``alive``: for the
    local launcher (no queue), whether its process still runs."""
    if done_record(sweep_dir, run["name"], run["key"]):
        return "done"
    started = len(attempts(sweep_dir, run["name"]))
    job = run.get("job_id")
    if not job:
        return "pending"
    if queue is not None:
        short = queue.get(job)
        if short is None:
            return "failed"
        state = _SQUEUE_STATES.get(short, "running")
        return "requeued" if state == "pending" and started else state
    if alive is not None and alive(run):
        return "running" if started else "pending"
    return "failed"


def refresh(sweep_dir: Path, manifest: dict, alive=None) -> dict:
    """Every run's state and attempts brought up to date (from files and squeue)."""
    queue = queue_states([r.get("job_id") for r in manifest["runs"]]) \
        if manifest.get("launcher") == "slurm" else None
    for run in manifest["runs"]:
        run["attempts"] = len(attempts(sweep_dir, run["name"]))
        run["state"] = derive_state(sweep_dir, run, queue, alive)
    return manifest
