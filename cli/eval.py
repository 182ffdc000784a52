"""`avi eval`: marginal log-likelihood by importance sampling (and the ELBO) of a trained run.

The work lives in builders.evaluation.evaluate; this module parses flags, shows progress and prints.
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

from .common import JsonOption, SetOption, UserError, _escape, err, out, warn


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


def seed_range(value: int) -> int:
    """A seed torch takes (its generators overflow past 64 bits): a bad flag, not a traceback."""
    if not -(1 << 63) <= value < (1 << 63):
        raise typer.BadParameter("a seed is a whole number from -2**63 to 2**63 - 1")
    return value


SeedOption = Annotated[int, typer.Option("--seed", callback=seed_range,
                                         help="Seed of the sampling (reproducible results).")]
NoEmaOption = Annotated[bool, typer.Option("--no-ema", help="Use the trained weights even if the checkpoint has EMA weights.")]
LimitOption = Annotated[Optional[int], typer.Option("--limit", min=1, metavar="N", help="Use only the first N images of the split.")]


# ------------------------------------------------------------------ shared helpers

def load_model(path: str, device: Device | str = "auto", use_ema: bool = True, overrides=None):
    """builders.evaluation.evaluate.load_trained (``overrides``: --set on the run's spec), with the user's
    mistakes turned into UserError."""
    from builders.devices import DeviceError
    from builders.evaluation.evaluate import RunError, load_trained
    try:
        return load_trained(path, device.value if isinstance(device, Device) else device, use_ema,
                            overrides or (), warn=warn)
    except (DeviceError, RunError) as e:
        raise UserError(str(e)) from None


def images(resolved, split: str = "test", limit: int | None = None, binarization_seed: int = 0):
    """Model-input images of the run's dataset (binary data binarised with a fixed seed)."""
    from builders.data.datasets import DatasetError
    from builders.evaluation.evaluate import eval_images
    try:
        x = eval_images(resolved.spec, split, limit, seed=binarization_seed)
    except (DatasetError, FileNotFoundError) as e:
        raise UserError(f"cannot load the {split} images of {resolved.spec.data.dataset}: {e}") from None
    if x.shape[0] == 0:
        raise UserError(f"the {split} split of {resolved.spec.data.dataset} holds no images")
    return x


def default_output(run: Path | None, *parts: str) -> Path:
    """RUN/<parts...> for a run directory, else ./<last part>. A folder of the run that is a
    symbolic link (RUN/plots -> elsewhere) is refused: avi writes inside the run directory only
    unless --out says otherwise."""
    if run is None:
        return Path(parts[-1])
    from builders.files import linked_entries
    links = linked_entries(run, parts[:1]) if len(parts) > 1 else []
    if links:
        raise UserError(f"{run}: {links[0]} is a symbolic link, and avi writes only inside the run "
                        f"directory; remove the link or give --out")
    return run.joinpath(*parts)


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
    """Progress on stderr: a rich bar with images/s on a terminal, else a line at least every
    LINE_SECONDS (a long evaluation shows it is alive in a log file too)."""

    LINE_SECONDS = 30.0

    def __init__(self, total: int, description: str):
        import time
        self.bar, self.total, self.done, self.description = None, total, 0, description
        self.t0 = self.last_line = time.monotonic()
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
        import time
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task, n)
            speed = self.bar.tasks[0].speed
            self.bar.update(self.task, rate=f"{speed:.1f} images/s" if speed else "")
            return
        now = time.monotonic()
        if now - self.last_line >= self.LINE_SECONDS:
            self.last_line = now
            sys.stderr.write(f"{self.description}: {self.done}/{self.total} images, "
                             f"{self.done / (now - self.t0):.1f} images/s\n")
            sys.stderr.flush()


MAX_EVAL_SECONDS = 7 * 24 * 3600      # refuse an evaluation estimated to take longer


def _check_feasible(model, x, k: int, b: int, seed: int) -> None:
    """Time one batch at K = 1 and project K x N image-samples from it: refuse what would
    run for more than a week (e.g. -k 1e20), and say how long a long one will take."""
    import time

    from builders.evaluation.evaluate import batched, importance_sampled_nll
    first = x[:b]
    t0 = time.perf_counter()
    importance_sampled_nll(model, batched(first, b), 1, chunk=1, seed=seed)
    per_sample = (time.perf_counter() - t0) / len(first)
    estimate = per_sample * k * x.shape[0]
    if estimate > MAX_EVAL_SECONDS:
        raise UserError(f"-k {k} over {x.shape[0]} images would take about {_duration(estimate)} "
                        f"here ({per_sample * 1e3:.2f} ms per image and sample); use a smaller -k "
                        f"or --limit")
    if estimate > 60:
        err.print(f"estimated time: {_duration(estimate)}", markup=False)


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.0f} seconds"


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
    binarization_seed: Annotated[int, typer.Option(
        "--binarization-seed", metavar="S", callback=seed_range,
        help="Binary data: the seed of the one binarisation of the images (default 0: the "
             "bits training tested on). Runs are paired by `avi diff` only on the same bits.")] = 0,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Marginal log-likelihood of a trained model by importance sampling, and its ELBO.

    Prints -log p(x) in nats (mean over the images, +- standard error), bits/dim for 8-bit
    data, and the negative ELBO. Given a run directory, adds the result to RUN/eval.json,
    where every evaluation is kept by split, K and number of images (`avi diff` shows the
    full test split at the largest K), and the estimates of every image to RUN/eval/*.npz
    (`avi diff` pairs two runs scored on the same images). --set changes the run's spec
    (e.g. data.root=...).

    Example:

        avi eval runs/quickstart --importance-samples 500 --json
    """
    from builders.evaluation.evaluate import batched, importance_sampled_nll

    model, resolved, run_dir = load_model(run, device, not no_ema, overrides)
    spec = resolved.spec
    k = importance_samples or spec.eval.importance_samples
    b = batch_size or spec.eval.batch_size
    x = images(resolved, split.value, binarization_seed=binarization_seed)
    total = x.shape[0]
    x = x[:limit] if limit is not None else x
    _check_feasible(model, x, k, b, seed)
    with _Progress(x.shape[0], f"eval K={k}") as progress:
        result = importance_sampled_nll(model, batched(x, b), k, chunk=chunk, progress=progress,
                                        seed=seed)
    per_example = result.pop("per_example")
    document = {**result, **_provenance(model, resolved, split.value, b, seed),
                "limit": limit, "full_split": x.shape[0] == total, "overrides": list(overrides or []),
                **_evaluated_images(spec, x, binarization_seed)}
    if as_json:
        print_json(document)
    else:
        _print_table(document)
    if run_dir is not None and Path(run).expanduser().is_dir():
        _record(run_dir / "eval.json", document, per_example, quiet=as_json)


def _evaluated_images(spec, x, binarization_seed: int) -> dict:
    """Which images were scored: what `avi diff` checks before pairing two evaluations."""
    from builders.evaluation.per_example import images_sha256
    from builders.data.preprocess import data_kind
    return {"binarization_seed": binarization_seed if data_kind(spec) == "binary" else None,
            "data_sha256": images_sha256(x)}


def _provenance(model, resolved, split: str, batch_size: int, seed: int) -> dict:
    """What was evaluated, where and how (the fields around the numbers in eval.json)."""
    import torch
    dev = next(model.parameters()).device
    info, spec = model.avi_checkpoint, resolved.spec
    return {"split": split, "batch_size": batch_size, "seed": seed,
            "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
            "checkpoint": info["path"], "ema": info["ema"], "step": info.get("step"),
            "epoch": info.get("epoch"), "name": spec.name, "spec_hash": resolved.hash,
            "dataset": spec.data.dataset}


def _record(path: Path, document: dict, per_example: dict, quiet: bool) -> None:
    """Keep the result in eval.json and its per-example estimates beside it (RUN/eval/); the
    result is printed already, so a failed write is a warning (e.g. a read-only run
    directory), not an error."""
    from builders.evaluation.eval_results import record_result
    try:
        saved = record_result(path, jsonable(document), per_example)
    except OSError as e:          # name the file at fault: it may be RUN/eval/, not eval.json
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
        warn(f"the result was not saved to {path}: {e.strerror or e}{where}")
        return
    if not quiet:
        out.print(_escape(f"saved to {path} (per image: {path.parent / saved['per_example']['file']})"))


def _fmt(value, se, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _print_table(d: dict) -> None:
    from rich.table import Table
    t = Table(title=_escape(f"{d['name']}  ({d['split']} split, {d['examples']} images, "
                            f"K = {d['importance_samples']})"), title_justify="left")
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
    out.print(_escape(f"± is one standard error over images; checkpoint {d['checkpoint']}"
                      f"{' (EMA weights)' if d['ema'] else ''}"))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
