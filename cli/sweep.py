"""`avi sweep`: many runs (specs x --grid) through submitit, on SLURM or as local processes;
`avi sweep status DIR` and `avi sweep cancel DIR`. The work is in builders.launch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from .common import JsonOption, SetOption, UserError, _escape, err, out

LOG_LINES = 15
SLURM_TIME_MIN = 60                 # a job's time limit unless --time: short jobs start sooner
LOCAL_TIME_MIN = 30 * 24 * 60       # local processes: no limit worth requeueing for


class _DefaultRun(TyperGroup):
    """`avi sweep SPEC...` is `avi sweep run SPEC...`; status and cancel are subcommands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


sweep_app = typer.Typer(cls=_DefaultRun, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="""Run many trainings (specs x --grid) on SLURM or as local processes, through submitit.

    `avi sweep SPEC... --out DIR` is `avi sweep run SPEC... --out DIR`. The launcher is SLURM
    (a job array) where `sbatch` is on the PATH, else local processes; --launcher chooses.

    Example:

        avi sweep specs/quickstart.yaml --grid train.seed=0,1 --max-steps 20 --eval-k 4 --out sweeps/seeds

        avi sweep status sweeps/seeds

        avi diff sweeps/seeds
    """)


class Launcher(str, Enum):
    auto = "auto"
    slurm = "slurm"
    local = "local"


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    pairs = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"{flag} {item}: expected KEY=VALUE, e.g. {flag} exclusive=1")
        pairs[key.strip()] = value
    return pairs


def _eval_args(k: int | None, limit: int | None, batch_size: int | None) -> list[str] | None:
    if k is None:
        if limit is not None or batch_size is not None:
            raise UserError("--eval-limit and --eval-batch-size need --eval-k")
        return None
    args = ["--importance-samples", str(k)]
    args += ["--limit", str(limit)] if limit else []
    args += ["--batch-size", str(batch_size)] if batch_size else []
    return args


@sweep_app.command("run")
def run_command(
    specs: Annotated[list[str], typer.Argument(metavar="SPEC...", help="Spec files: one run per spec and grid point.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Sweep directory: DIR/<run name>/ per run, DIR/sweep.json.")],
    grid: Annotated[Optional[list[str]], typer.Option(
        "--grid", "-g", metavar="FIELD=V1,V2", help="Run every value of a field (YAML values, as --set). "
        "Repeatable: the runs are the product of all grids.")] = None,
    overrides: SetOption = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop each training after this many steps (smoke runs).")] = None,
    eval_k: Annotated[Optional[int], typer.Option("--eval-k", min=1, metavar="K", help="Evaluate each run after training (avi eval -k K) in the same job.")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", min=1, metavar="N", help="Evaluate on the first N test images only.")] = None,
    eval_batch_size: Annotated[Optional[int], typer.Option("--eval-batch-size", min=1, metavar="B", help="Images per evaluation batch.")] = None,
    launcher: Annotated[Launcher, typer.Option(
        "--launcher", help="slurm: a SLURM job array; local: local processes that avi sweep waits for. "
        "auto (default): slurm where `sbatch` is on the PATH, else local.")] = Launcher.auto,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="local: how many runs at a time.")] = 1,
    array_parallelism: Annotated[int, typer.Option("--array-parallelism", min=1, help="slurm: how many jobs of the array at a time.")] = 256,
    partition: Annotated[Optional[str], typer.Option("--partition", help="slurm: partition.")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option("--gpus-per-node", min=0, help="slurm: GPUs per node of a job.")] = None,
    nodes: Annotated[Optional[int], typer.Option("--nodes", min=1, help="slurm: nodes per run; each run is one multi-node job (default 1).")] = None,
    tasks_per_node: Annotated[Optional[int], typer.Option("--tasks-per-node", min=1, help="slurm: training processes (srun tasks) per node (default: --gpus-per-node, else 1).")] = None,
    cpus_per_task: Annotated[Optional[int], typer.Option("--cpus-per-task", min=1, help="slurm: CPUs per job (per task).")] = None,
    mem: Annotated[Optional[str], typer.Option("--mem", help="slurm: memory per job, e.g. 16G.")] = None,
    time_min: Annotated[Optional[int], typer.Option("--time", min=1, metavar="MINUTES", help="Time limit of each job; reached, the job is requeued and resumes from its checkpoint (default: 60 on SLURM, none locally).")] = None,
    account: Annotated[Optional[str], typer.Option("--account", help="slurm: account.")] = None,
    qos: Annotated[Optional[str], typer.Option("--qos", help="slurm: quality of service.")] = None,
    constraint: Annotated[Optional[str], typer.Option("--constraint", help="slurm: node features.")] = None,
    slurm: Annotated[Optional[list[str]], typer.Option("--slurm", metavar="KEY=VALUE", help="slurm: any other sbatch option, e.g. --slurm exclusive=1. Repeatable.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="slurm: wait until every run is done or failed (Ctrl-C stops waiting, cancels nothing).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train (and evaluate) one run per spec and grid point, each in DIR/<run name>/.

    Every spec and grid point is validated before anything is submitted (exit 2 on a bad field
    or value, nothing submitted). Issued again, it skips finished runs and runs that are queued
    or being written, and resumes the others from their checkpoints. On SLURM a job that reaches
    its time limit or is pre-empted writes a checkpoint and is requeued; the run ends as an
    uninterrupted one would. Ctrl-C on `avi sweep` cancels nothing on SLURM (`avi sweep cancel
    DIR` does); with --launcher local the runs are its child processes: they stop, and the
    same command resumes them from their checkpoints.

    Example:

        avi sweep specs/quickstart.yaml --grid train.seed=0,1 --max-steps 20 --eval-k 4 --launcher slurm --out sweeps/seeds

        avi sweep specs/ablations/case*.yaml --eval-k 1000 --gpus-per-node 1 --time 1440 --partition gpu --out sweeps/table5

        avi sweep specs/cifar10_l16.yaml --nodes 2 --gpus-per-node 4 --time 1440 --partition gpu --out sweeps/cifar
    """
    from builders.launch.grid import expand
    from builders.launch.sweep import Resources

    out_dir = out_dir.absolute()          # the jobs may start in another folder
    chosen = launcher.value if launcher is not Launcher.auto else ("slurm" if shutil.which("sbatch") else "local")
    if chosen == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--launcher slurm: sbatch is not on the PATH (no SLURM here); use --launcher local")
    if time_min is None:
        time_min = SLURM_TIME_MIN if chosen == "slurm" else LOCAL_TIME_MIN
    if chosen == "local" and (nodes is not None or tasks_per_node is not None):
        raise UserError("--nodes and --tasks-per-node need --launcher slurm (a local sweep runs "
                        "one process per run)")
    if chosen == "slurm" and tasks_per_node is None and (nodes is not None or gpus_per_node):
        tasks_per_node = gpus_per_node or 1              # one process per GPU
    res = Resources(partition, gpus_per_node, nodes, tasks_per_node, cpus_per_task, mem, time_min,
                    account, qos, constraint, array_parallelism, _pairs(slurm, "--slurm"))
    evaluation = _eval_args(eval_k, eval_limit, eval_batch_size)
    runs = expand(specs, list(grid or ()), list(overrides or ()))      # SpecError: exit 2, nothing written
    _check_processes(runs, nodes or 1, tasks_per_node or 1)
    _refuse_other_specs(out_dir, runs)
    manifest = {"version": 1, "launcher": chosen, "grid_fields": sorted({k for r in runs for k in r.grid}),
                "specs": list(specs), "overrides": list(overrides or ()), "max_steps": max_steps,
                "eval": evaluation, "runs": []}
    todo, entries = _plan(out_dir, runs, manifest)
    from builders.launch.job import SweepJob
    jobs_ = [SweepJob(str(out_dir), r.name, entries[r.name]["key"], max_steps, evaluation) for r in todo]
    if chosen == "slurm":
        _submit(out_dir, todo, jobs_, res, entries, manifest)
        err.print(f"submitted {len(todo)} of {len(runs)} runs to SLURM", markup=False)
        if wait:
            _wait(out_dir)
    else:
        _run_local(out_dir, todo, jobs_, jobs, time_min, entries, manifest)
    final = _show(out_dir, as_json)
    if any(r["state"] == "failed" for r in final["runs"]):
        raise typer.Exit(1)


def _plan(out_dir: Path, runs: list, manifest: dict) -> tuple[list, dict]:
    """Which runs to submit (the others are done, queued or being written: said on stderr),
    and the sweep.json entry of every run (a skipped one keeps its job id and log)."""
    from builders.launch import manifest as mf
    from builders.launch.sweep import entry, skip_reason
    previous = _read_manifest(out_dir)
    old_runs = {r["name"]: r for r in (previous or {}).get("runs", [])}
    queue = _queue([r.get("job_id") for r in old_runs.values()]) if manifest["launcher"] == "slurm" else None
    entries, todo = {}, []
    for run in runs:
        key = mf.job_key(run.resolved.hash, manifest["max_steps"], manifest["eval"])
        entries[run.name] = entry(run, out_dir, key)
        reason = skip_reason(out_dir, run, key, previous, queue)
        if not reason:
            todo.append(run)
            continue
        err.print(f"skip {run.name}: {reason}", markup=False)
        if run.name in old_runs:
            entries[run.name].update(job_id=old_runs[run.name].get("job_id"), log=old_runs[run.name].get("log"))
    manifest["runs"] = list(entries.values())
    return todo, entries


def _submit(out_dir: Path, todo: list, jobs_: list, res, entries: dict, manifest: dict) -> None:
    """One job array, then sweep.json. If sbatch refuses it (a bad partition, account, ...),
    exit 2 and leave no trace of this sweep: a folder made here is removed."""
    from builders.launch import manifest as mf
    from builders.launch.sweep import submit_slurm, write_specs
    fresh = not out_dir.exists()
    write_specs(out_dir, todo)
    try:
        if todo:
            submit_slurm(out_dir, todo, jobs_, res, entries)
    except Exception as e:          # submitit's FailedJobError, or sbatch missing or not runnable
        if fresh:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise UserError(f"sbatch refused the jobs, nothing was submitted: {str(e).strip()[-600:]}") from None
    mf.write(out_dir, manifest)


def _queue(job_ids: list) -> dict | None:
    from builders.launch import manifest as mf
    try:
        return mf.queue_states(job_ids)
    except mf.QueueError as e:
        raise UserError(f"cannot tell which runs are queued: {e}; nothing was submitted") from None


def _read_manifest(out_dir: Path) -> dict | None:
    from builders.launch import manifest as mf
    try:
        return mf.read(out_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"{out_dir / mf.MANIFEST} is not readable ({e}); move it away or use another --out") from None


def _check_processes(runs: list, nodes: int, tasks: int) -> None:
    """Every run's batch must split over nodes x tasks processes: refused here, before
    submitting, rather than by each job once it has waited for its nodes."""
    if nodes * tasks == 1:
        return
    from builders.train.training import TrainingError, check_batch_size
    for r in runs:
        train = r.resolved.spec.train
        try:
            check_batch_size(train.batch_size, nodes * tasks, accumulate=train.accumulate)
        except TrainingError as e:
            raise UserError(f"--nodes {nodes} --tasks-per-node {tasks}: run {r.name} ({r.source}): "
                            f"{e}; nothing was submitted") from None


def _refuse_other_specs(out_dir: Path, runs: list) -> None:
    """A run directory trained from another spec would refuse to resume: say so before submitting."""
    from builders.train.training import _spec_yaml_hash
    clashes = [f"{r.name} (trained with {h[:12]}, now {r.resolved.hash[:12]})" for r in runs
               if (h := _spec_yaml_hash(out_dir / r.name)) and h != r.resolved.hash]
    if clashes:
        raise UserError(f"{out_dir} holds runs trained from other specs: {', '.join(clashes)}; "
                        f"sweep into another --out")


def _run_local(out_dir, todo, jobs_, n, time_min, entries, manifest) -> None:
    from builders.launch import manifest as mf
    from builders.launch.sweep import run_local, write_specs
    write_specs(out_dir, todo)
    mf.write(out_dir, manifest)
    try:
        run_local(out_dir, todo, jobs_, n, time_min, entries, manifest,
                  lambda text: err.print(text, markup=False))
    except KeyboardInterrupt:
        err.print("interrupted: the local runs are stopped; issue the same avi sweep again to "
                  "resume them from their last checkpoints", markup=False)
        raise typer.Exit(130) from None


def _wait(out_dir: Path) -> None:
    from builders.launch import manifest as mf
    try:
        while True:
            try:
                m = mf.refresh(out_dir, mf.read(out_dir))
            except mf.QueueError as e:          # slurmctld busy for a moment: ask again
                err.print(f"warning: {e}", markup=False)
                time.sleep(10)
                continue
            mf.write(out_dir, m)
            if all(r["state"] in ("done", "failed") for r in m["runs"]):
                return
            time.sleep(2)
    except KeyboardInterrupt:
        err.print(f"stopped waiting; the jobs go on (avi sweep status {out_dir}, avi sweep cancel {out_dir})",
                  markup=False)
        raise typer.Exit(130) from None


def _show(out_dir: Path, as_json: bool) -> dict:
    """Refresh sweep.json, print it (table or JSON); exit 1 if a run failed."""
    from builders.launch import manifest as mf
    from builders.launch.sweep import _alive_local
    manifest = _read_manifest(out_dir)
    if manifest is None:
        raise UserError(f"{out_dir} is not a sweep directory (no {mf.MANIFEST})")
    try:
        manifest = mf.refresh(out_dir, manifest, alive=_alive_local)
    except mf.QueueError as e:
        raise UserError(f"cannot tell the states of {out_dir}: {e}") from None
    mf.write(out_dir, manifest)
    if as_json:
        sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
    else:
        _table(manifest)
    return manifest


def _table(manifest: dict) -> None:
    from rich.table import Table
    fields = manifest.get("grid_fields", [])
    t = Table(title=f"sweep ({manifest['launcher']})", title_justify="left")
    for col in ["run", *fields, "state", "attempts", "job", "log"]:
        t.add_column(col, overflow="fold")
    for r in manifest["runs"]:
        t.add_row(r["name"], *[str(r["grid"].get(f, "")) for f in fields], r["state"], str(r["attempts"]),
                  str(r.get("job_id") or "-"), str(r.get("log") or "-"))
    out.print(t)
    for r in manifest["runs"]:
        if r["state"] == "failed" and r.get("log"):
            out.print(f"\n[bold red]{_escape(r['name'])} failed[/]; last lines of {_escape(r['log'])}:")
            out.print(_tail(Path(r["log"]), LOG_LINES), markup=False)


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e.strerror or e})"


@sweep_app.command("status")
def status_command(
    sweep_dir: Annotated[Path, typer.Argument(metavar="DIR", help="A sweep directory (holds sweep.json).")],
    as_json: JsonOption = False,
) -> None:
    """Show each run of a sweep: grid point, state (pending, running, requeued, done, failed),
    attempts, job id and log, with the last lines of a failed run's log. The states come from
    the run directories and squeue (no accounting database needed); sweep.json is updated.
    Exits 1 if a run failed.

    Example:

        avi sweep status sweeps/seeds --json
    """
    manifest = _show(sweep_dir, as_json)
    if any(r["state"] == "failed" for r in manifest["runs"]):
        raise typer.Exit(1)


@sweep_app.command("cancel")
def cancel_command(
    sweep_dir: Annotated[Path, typer.Argument(metavar="DIR", help="A sweep directory (holds sweep.json).")],
) -> None:
    """Cancel the runs of a sweep that are still queued or running (scancel); finished runs
    and their files stay. A cancelled run resumes from its checkpoint when the sweep is issued again.

    Example:

        avi sweep cancel sweeps/seeds
    """
    from builders.launch import manifest as mf
    manifest = _read_manifest(sweep_dir)
    if manifest is None:
        raise UserError(f"{sweep_dir} is not a sweep directory (no {mf.MANIFEST})")
    if manifest["launcher"] != "slurm":
        raise UserError("a local sweep runs inside its `avi sweep`: stop that one (Ctrl-C)")
    try:
        manifest = mf.refresh(sweep_dir, manifest)
    except mf.QueueError as e:
        raise UserError(f"cannot tell what is queued: {e}") from None
    live = [r["job_id"] for r in manifest["runs"] if r["state"] in ("pending", "running", "requeued") and r.get("job_id")]
    if live:
        proc = subprocess.run(["scancel", *live], capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"scancel failed: {proc.stderr.strip()}")
    out.print(f"cancelled {len(live)} job(s): {' '.join(live) or '-'}", markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(sweep_app, name="sweep")
