"""One job of a sweep, as submitit runs it (on a SLURM node or as a local process): the
ordinary `avi train` of one run into DIR/<run>/ (with --resume once the run has begun), then
`avi eval` of it when the sweep asked for one, then the done marker.

Each step is the avi command itself, in a child process, so the job's log reads as the
commands a user would type and the run directory is exactly what `avi train` writes.

Time limits and pre-emption: SLURM sends the warning signal submitit asked for (USR2, 90 s
before the end). submitit's handler would checkpoint and requeue at once, in the middle of a
training step; instead the job asks `avi train` to stop as Ctrl-C does (SIGINT: it finishes
the step and writes checkpoints/last.pt), waits for it, and then lets submitit requeue the job
with checkpoint(), which resubmits this same job. The requeued job resumes from last.pt, and a
resumed run ends with the weights and metrics of an uninterrupted one (builders.train).

A multi-node job (avi sweep --nodes / --tasks-per-node): submitit starts this job in every
srun task, and each task's `avi train` and `avi eval` inherit the step's environment and join
one process group (builders.launch.environment). Every task runs the commands; global rank 0
alone keeps the sweep's books (attempts, done marker) and, as submitit does, alone requeues.
Whether to --resume is decided before the child starts, and rank 0's child writes nothing
before all processes have joined, so every task decides alike.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit

from ..files import write_atomically
from .manifest import job_files

# The child's interpreter looks for avi where this one found it, not in the working folder.
_AVI = ("import sys; sys.path[:1] = [{root!r}]; sys.argv[0] = 'avi'; "
        "from cli.main import main; sys.exit(main())")


class SweepJob(submitit.helpers.Checkpointable):
    """Train (resume) and evaluate one run; picklable, so submitit can requeue it."""

    def __init__(self, sweep_dir: str, name: str, key: str, max_steps: int | None,
                 eval_args: list[str] | None):
        self.sweep_dir, self.name, self.key = sweep_dir, name, key
        self.max_steps, self.eval_args = max_steps, eval_args
        self._child: subprocess.Popen | None = None
        self._warned = False

    def __call__(self) -> dict:
        requeue = signal.getsignal(submitit.JobEnvironment._usr_sig())
        signal.signal(submitit.JobEnvironment._usr_sig(), self._stop_child)
        rank = submitit.JobEnvironment().global_rank
        if rank == 0:
            self._record_attempt()
        run_dir = Path(self.sweep_dir) / self.name
        spec = job_files(self.sweep_dir, self.name) / "spec.yaml"
        train = ["train", str(spec), "--out", str(run_dir), "--device", "auto"]
        train += ["--resume"] if (run_dir / "spec.yaml").is_file() else []
        train += ["--max-steps", str(self.max_steps)] if self.max_steps else []
        steps = [train] + ([["eval", str(run_dir), *self.eval_args]] if self.eval_args is not None else [])
        for argv in steps:
            if self._warned and callable(requeue):     # warned between two steps, or during one
                return self._requeue(requeue, rank)    # rank 0: checkpoint() + requeue + exit
            code = self._avi(argv)
            if self._warned and code != 0 and callable(requeue):
                return self._requeue(requeue, rank)
            if code != 0:       # the job fails with the command's exit status; its message is above
                print(f"avi sweep: avi {argv[0]} exited with {code}; the run is not done",
                      file=sys.stderr, flush=True)
                raise SystemExit(code if code > 0 else 1)
        record = {"key": self.key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "max_steps": self.max_steps, "evaluated": self.eval_args is not None}
        if rank != 0:
            return {**record, "rank": rank}
        write_atomically(job_files(self.sweep_dir, self.name) / "done.json",
                         (json.dumps(record) + "\n").encode())
        return record

    def _requeue(self, requeue, rank: int) -> dict:
        """submitit's handler: on rank 0 it checkpoints, requeues the job and exits; on the
        other ranks it returns, and this task ends without failing the job it is part of."""
        requeue(submitit.JobEnvironment._usr_sig(), None)
        print(f"avi sweep: task {rank} stopped; rank 0 requeues the job", file=sys.stderr, flush=True)
        return {"key": self.key, "rank": rank, "requeued": True}

    def _avi(self, argv: list[str]) -> int:
        root = str(Path(__file__).resolve().parents[2])
        cmd = [sys.executable, "-c", _AVI.format(root=root), *argv]
        print("+ avi " + " ".join(argv), flush=True)
        # The child ignores the warning signal (SLURM may send it to the whole step): only
        # this job decides, and it asks the child to stop with SIGINT.
        env = dict(os.environ)
        if "OMP_NUM_THREADS" not in env and os.environ.get("SLURM_CPUS_PER_TASK"):
            env["OMP_NUM_THREADS"] = os.environ["SLURM_CPUS_PER_TASK"]    # torch: the CPUs granted
        self._child = subprocess.Popen(cmd, preexec_fn=_ignore_warning_signal, env=env)
        try:
            return self._child.wait()
        finally:
            self._child = None

    def _stop_child(self, signum, frame) -> None:
        self._warned = True
        print(f"avi sweep: got {signal.Signals(signum).name}: stopping after this step to "
              f"checkpoint and requeue", file=sys.stderr, flush=True)
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGINT)

    def _record_attempt(self) -> None:
        env = submitit.JobEnvironment()
        line = json.dumps({"job_id": env.job_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        folder = job_files(self.sweep_dir, self.name)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "attempts.jsonl", "a", encoding="utf-8") as f:
            f.write(line)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The requeued job is this one again: it resumes the run from checkpoints/last.pt."""
        fresh = SweepJob(self.sweep_dir, self.name, self.key, self.max_steps, self.eval_args)
        return submitit.helpers.DelayedSubmission(fresh)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_child"] = None
        return state


def _ignore_warning_signal() -> None:
    signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)
