"""`avi train`: train a spec into a run directory (the work is in builders.train.training)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import SetOption, UserError, _escape, fail, load_valid, spec_file
from .relaunch import launched, relaunch


def _interrupted_hint(spec: str, out: Path, processes: int = 1) -> str:
    """What to run after Ctrl-C: --resume only where there is something to resume. The run
    directory, not the spec: it holds the resolved spec that was trained (--set included),
    whereas `SPEC --resume` without the same --set flags is refused as another spec. A run of
    several processes resumes only on as many (builders.train.training.resume_payload)."""
    if (out / "spec.yaml").is_file():
        again = f"avi train {shlex.quote(str(out))} --resume"
        if processes > 1:
            return (f"interrupted; continue with: {again} --devices {processes} (under torchrun "
                    f"or srun: the same launch of {processes} processes running {again})\n")
        return f"interrupted; continue with: {again}\n"
    return (f"interrupted before anything was written; start again with: "
            f"avi train {shlex.quote(spec)} --out {shlex.quote(str(out))}\n")


def _summary(result: dict, epochs: int) -> str:
    """One line: where the run stopped, epochs counted from 1 as in every other message."""
    if result.get("finished"):
        text = f"finished {epochs} epochs at step {result['step']}: {result['out_dir']}"
    else:
        text = (f"stopped at step {result['step']} in epoch {result['epoch'] + 1}/{epochs}: "
                f"{result['out_dir']}")
    nelbo = result.get("test_nelbo")
    if nelbo is not None:
        text += f"  (last test NELBO {nelbo:.2f} nats)"
    return text


def train(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="Spec file (or a run directory, with --resume).")],
    overrides: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: runs/<name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its checkpoints/last.pt (SPEC: the run directory, or the spec with the same --set and --out).")] = False,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu or cuda.")] = "auto",
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many steps in total (last.pt is written).")] = None,
    devices: Annotated[Optional[int], typer.Option("--devices", min=1, help="Data-parallel processes (relaunches itself under torchrun).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print every metrics line as JSON on stdout.")] = False,
) -> None:
    """Train a model: writes spec.yaml, metrics.jsonl, samples/ and checkpoints/ into the run directory.

    Progress goes to stderr: one line per finished epoch (train loss, test NELBO, the
    epoch's time and the time left for the whole run), kept on screen; between them a bar of
    the current epoch on a terminal, or off a terminal a line every 30 s (step out of the
    run's total, time left). Resuming continues at the same step, schedule and data order; it is refused if
    the spec or the number of processes changed. Ctrl-C stops after the current step
    and writes checkpoints/last.pt first, so --resume loses nothing; a run killed at any
    point resumes to the files an uninterrupted run writes. One `avi train` writes a run
    directory at a time (a second one is refused, naming the first).

    Example:

        avi train specs/quickstart.yaml

        avi train specs/quickstart.yaml --set train.epochs=2 --max-steps 50 --out runs/try

        avi train runs/try --resume
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    if quiet and jsonl:
        raise UserError("--quiet and --jsonl cannot be used together")
    resolved = load_valid(spec, overrides)       # nothing is built or written for an invalid spec
    p = Path(spec)
    if out is None:
        out = p if (p.is_dir() and spec_file(p) != p) else Path("runs") / resolved.spec.name

    from builders.checkpoint import CheckpointError
    from builders.data.datasets import DatasetError
    from builders.devices import DeviceError
    from builders.launch.environment import LaunchError
    from builders.launch.process_group import PeerLost
    from builders.train.run_dir import DivergedError
    from builders.train.training import TrainingError, preflight, train as run_training

    user_errors = (CheckpointError, DatasetError, DeviceError, LaunchError, TrainingError)
    if devices and devices > 1 and not launched():
        try:                          # one clear message here, not one traceback per process
            preflight(resolved, out, resume, devices)
        except user_errors as e:
            raise UserError(str(e)) from None
        raise typer.Exit(relaunch(devices))
    from builders.launch.environment import launch_environment
    mode = "quiet" if quiet else "jsonl" if jsonl else "auto"
    try:
        result = run_training(resolved, out, resume=resume, device=device, max_steps=max_steps,
                              progress_mode=mode, devices=devices)
    except DivergedError as e:              # a valid spec whose run failed: exit 1
        if launch_environment().rank:       # every process stops at the same step: rank 0 says why
            raise typer.Exit(1) from None
        fail(str(e), code=1)
    except user_errors as e:
        raise UserError(str(e)) from None
    except PeerLost as e:                   # not the user's input: exit 1, but no traceback
        fail(str(e), code=1)
    except KeyboardInterrupt:               # training wrote checkpoints/last.pt first
        launch = launch_environment()
        if launch.rank == 0:
            sys.stderr.write(_escape(_interrupted_hint(spec, out, launch.world_size),
                                     keep_newlines=True, markup=False))
        raise typer.Exit(130) from None
    if launch_environment().rank == 0:
        _print_result(result, resolved.spec.train.epochs, mode)


def _print_result(result: dict, epochs: int, mode: str) -> None:
    if mode == "jsonl":
        from builders.train.reporting import strict
        sys.stdout.write(json.dumps({"result": strict(result)}, allow_nan=False) + "\n")
    elif mode != "quiet":
        sys.stdout.write(_escape(_summary(result, epochs), markup=False) + "\n")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
