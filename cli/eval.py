"""`avi eval`: marginal log-likelihood by importance sampling (and the ELBO) of a trained run.

The work lives in builders.evaluate; this module parses flags, shows progress and prints.
It also holds the helpers the other trained-model commands (sample, reconstruct, plot) share.
"""
from __future__ import annotations

import json
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOption, UserError, err, out


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Split(str, Enum):
    test = "test"
    train = "train"


RunArgument = Annotated[str, typer.Argument(
    metavar="RUN_OR_CHECKPOINT", help="A run directory of `avi train` (its checkpoints/best.pt, "
    "else checkpoints/last.pt) or a .pt checkpoint file.")]
DeviceOption = Annotated[Device, typer.Option("--device", help="Where to run: auto picks cuda when available.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the sampling (reproducible results).")]
NoEmaOption = Annotated[bool, typer.Option("--no-ema", help="Use the trained weights even if the checkpoint has EMA weights.")]
LimitOption = Annotated[Optional[int], typer.Option("--limit", min=1, metavar="N", help="Use only the first N images of the split.")]


# ------------------------------------------------------------------ shared helpers

def load_model(path: str, device: Device | str = "auto", use_ema: bool = True):
    """builders.evaluate.load_trained, with the user's mistakes turned into UserError."""
    from builders.devices import DeviceError
    from builders.evaluate import RunError, load_trained
    try:
        return load_trained(path, device.value if isinstance(device, Device) else device, use_ema)
    except (DeviceError, RunError) as e:
        raise UserError(str(e)) from None


def images(resolved, split: str = "test", limit: int | None = None):
    """Model-input images of the run's dataset (test split binarised with a fixed seed)."""
    from builders.datasets import DatasetError
    from builders.evaluate import eval_images
    try:
        x = eval_images(resolved.spec, split, limit)
    except (DatasetError, FileNotFoundError) as e:
        raise UserError(f"cannot load the {split} images of {resolved.spec.data.dataset}: {e}") from None
    if x.shape[0] == 0:
        raise UserError(f"the {split} split of {resolved.spec.data.dataset} holds no images")
    return x


def default_output(run: Path | None, *parts: str) -> Path:
    """RUN/<parts...> for a run directory, else ./<last part>."""
    return run.joinpath(*parts) if run is not None else Path(parts[-1])


def jsonable(value):
    """NaN/inf -> null, numpy -> lists, so the JSON is strict."""
    import numpy as np
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def print_json(document) -> None:
    sys.stdout.write(json.dumps(jsonable(document), indent=2, allow_nan=False) + "\n")


class _Progress:
    """A rich progress bar with images/s on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, description: str):
        self.bar = None
        if err.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                console=err, transient=True)
            self.task = self.bar.add_task(description, total=total, rate="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)
            speed = self.bar.tasks[0].speed
            self.bar.update(self.task, rate=f"{speed:.1f} images/s" if speed else "")


# ------------------------------------------------------------------ command

def eval_command(
    run: RunArgument,
    importance_samples: Annotated[Optional[int], typer.Option(
        "--importance-samples", "-k", min=1, metavar="K",
        help="Importance samples per image (default: the spec's eval.importance_samples).")] = None,
    split: Annotated[Split, typer.Option("--split", help="Which split to score.")] = Split.test,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", min=1, metavar="B", help="Images per batch (default: the spec's eval.batch_size).")] = None,
    chunk: Annotated[Optional[int], typer.Option(
        "--chunk", min=1, metavar="C",
        help="Importance samples per image in one pass (default: as many as fit in memory).")] = None,
    device: DeviceOption = Device.auto,
    seed: SeedOption = 0,
    limit: LimitOption = None,
    no_ema: NoEmaOption = False,
    as_json: JsonOption = False,
) -> None:
    """Marginal log-likelihood of a trained model by importance sampling, and its ELBO.

    Prints -log p(x) in nats (mean over the images, +- standard error), bits/dim for 8-bit
    data, and the negative ELBO; writes RUN/eval.json when given a run directory.

    Example:

        avi eval runs/quickstart --importance-samples 500 --json
    """
    import torch

    from builders.evaluate import batched, importance_sampled_nll

    model, resolved, run_dir = load_model(run, device, not no_ema)
    spec = resolved.spec
    k = importance_samples or spec.eval.importance_samples
    b = batch_size or spec.eval.batch_size
    x = images(resolved, split.value, limit)
    n = x.shape[0]
    with _Progress(n, f"eval K={k}") as progress:
        result = importance_sampled_nll(model, batched(x, b), k, chunk=chunk, progress=progress,
                                        seed=seed)
    dev = next(model.parameters()).device
    info = model.avi_checkpoint
    document = {
        **result,
        "split": split.value,
        "batch_size": b,
        "seed": seed,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "checkpoint": info["path"],
        "ema": info["ema"],
        "step": info.get("step"),
        "epoch": info.get("epoch"),
        "name": spec.name,
        "spec_hash": resolved.hash,
        "dataset": spec.data.dataset,
    }
    if run_dir is not None and Path(run).expanduser().is_dir():
        path = run_dir / "eval.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(jsonable(document), indent=2, allow_nan=False) + "\n")
        tmp.replace(path)
        document["written"] = str(path)
    if as_json:
        print_json(document)
        return
    _print_table(document)


def _fmt(value, se, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _print_table(d: dict) -> None:
    from rich.table import Table
    t = Table(title=f"{d['name']}  ({d['split']} split, {d['examples']} images, "
                    f"K = {d['importance_samples']})", title_justify="left")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("-log p(x)  (nats)", _fmt(d["nll_nats"], d["nll_stderr_nats"]))
    if d["bits_per_dim"] is not None:
        t.add_row("-log p(x)  (bits/dim)", _fmt(d["bits_per_dim"], d["bits_per_dim_stderr"], 4))
    t.add_row("-ELBO      (nats)", _fmt(d["nelbo_nats"], d["nelbo_stderr_nats"]))
    if d["bits_per_dim"] is not None and d.get("dims"):
        t.add_row("-ELBO      (bits/dim)", f"{d['nelbo_nats'] / (d['dims'] * math.log(2)):.4f}")
    t.add_row("images/s", f"{d['images_per_s']:.1f}" if d["images_per_s"] else "-")
    out.print(t)
    out.print(f"± is one standard error over images; checkpoint {d['checkpoint']}"
              f"{' (EMA weights)' if d['ema'] else ''}", markup=False)
    if d.get("written"):
        out.print(f"wrote {d['written']}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
