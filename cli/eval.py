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

from .common import JsonOption, SetOption, UserError, _escape, err, fail, out, warn
from .relaunch import launched, relaunch


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Split(str, Enum):
    test = "test"
    train = "train"


RunArgument = Annotated[str, typer.Argument(
    metavar="RUN_OR_CHECKPOINT", help="A run directory of `avi train` (its checkpoints/best.pt, "
    "else checkpoints/last.pt), a .pt checkpoint file or a .safetensors file of `avi export`.")]
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
    """builders.loading.load_trained (``overrides``: --set on the run's spec), with the user's
    mistakes turned into UserError."""
    from builders.devices import DeviceError
    from builders.loading import RunError, load_trained
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
    """Progress on stderr: a rich bar with images/s and the time left on a terminal, else a
    line at least every LINE_SECONDS with the images done, images/s and the time left (a
    long evaluation shows it is alive in a log file too). The time left is the measured
    pace so far, so it refines the probe's estimate as the run goes."""

    LINE_SECONDS = 30.0

    def __init__(self, total: int, description: str, shown: bool = True):
        import time
        self.bar, self.total, self.done, self.description = None, total, 0, description
        self.t0 = self.last_line = time.monotonic()
        self.shown = shown
        if err.is_terminal and shown:
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

        from builders.evaluation.eta import time_left
        from builders.train.reporting import format_duration
        self.done += n
        if not self.shown:
            return
        if self.bar is not None:
            self.bar.advance(self.task, n)
            speed = self.bar.tasks[0].speed
            self.bar.update(self.task, rate=f"{speed:.1f} images/s" if speed else "")
            return
        now = time.monotonic()
        if now - self.last_line >= self.LINE_SECONDS and self.done < self.total:
            self.last_line = now
            left = time_left(self.done, self.total, now - self.t0)
            sys.stderr.write(f"{self.description}: {self.done}/{self.total} images, "
                             f"{self.done / (now - self.t0):.1f} images/s"
                             + (f", {format_duration(left)} left" if left is not None else "") + "\n")
            sys.stderr.flush()


MAX_EVAL_SECONDS = 7 * 24 * 3600      # refuse an evaluation estimated to take longer
SAY_ESTIMATE_SECONDS = 30             # say the estimate of an evaluation longer than this


def _check_feasible(model, x, k: int, b: int, chunk: int | None, seed: int, ddp=None) -> None:
    """Project the run's time from a warm probe at the real K (builders.evaluation.eta), over
    the processes of a sharded run, which all act on the slowest one's estimate: refuse what
    would run for more than a week (e.g. -k 1e20), and say how long a long one will take (the
    progress refines it)."""
    from builders.evaluation.eta import probe_seconds_per_sample
    from builders.evaluation.sharded import all_agree_max
    world = ddp.world_size if ddp is not None else 1
    per_sample = probe_seconds_per_sample(model, x, k, b, chunk, seed)
    if ddp is not None:
        per_sample = all_agree_max(per_sample, model, ddp)
    estimate = per_sample * k * x.shape[0] / world
    if estimate > MAX_EVAL_SECONDS:
        raise UserError(f"-k {k} over {x.shape[0]} images would take about {_duration(estimate)} "
                        f"here ({per_sample * 1e3:.2f} ms per image and sample"
                        f"{f' in each of {world} processes' if world > 1 else ''}); use a smaller -k "
                        f"or --limit")
    if estimate > SAY_ESTIMATE_SECONDS and (ddp is None or ddp.main):
        err.print(f"estimated time: {_duration(estimate)} ({x.shape[0]} images x K = {k}; "
                  f"refined as it runs)", markup=False)


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
    devices: Annotated[Optional[int], typer.Option(
        "--devices", min=1, metavar="N",
        help="Split the images across N processes on this machine (relaunches itself under "
             "torchrun); the result equals one process's.")] = None,
    active_threshold: Annotated[float, typer.Option(
        "--active-threshold", min=0.0, metavar="NATS",
        help="A latent channel counts as active when its KL (nats per image) is above this.")] = 0.1,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Marginal log-likelihood of a trained model by importance sampling, and its ELBO.

    RUN is a run directory, a .pt checkpoint or a .safetensors file of `avi export`.
    Prints -log p(x) in nats (mean over the images, +- standard error), bits/dim for 8-bit
    data, and the negative ELBO. Given a run directory, adds the result to RUN/eval.json,
    where every evaluation is kept by split, K and number of images (`avi diff` shows the
    full test split at the largest K), and the estimates of every image to RUN/eval/*.npz
    (`avi diff` pairs two runs scored on the same images). Also counts the active latent
    channels (KL above --active-threshold; `avi plot active` draws them). --set changes the
    run's spec (e.g. data.root=...).

    Several processes (--devices N, or N processes started by torchrun or srun) split the
    images; every image draws its samples from its own generator, seeded from --seed and the
    image's index, so the numbers are those of one process. Process 0 alone prints and writes.

    Example:

        avi eval runs/quickstart --importance-samples 500 --json

        avi eval runs/quickstart -k 20 --limit 64 --devices 2 --device cpu
    """
    from builders.launch.environment import LaunchError
    from builders.launch.process_group import peer_failure, setup_distributed, teardown_distributed

    if devices and devices > 1 and not launched():
        model, resolved, _ = load_model(run, "cpu", not no_ema, overrides)    # one clear message here,
        images(resolved, split.value, limit, binarization_seed)             # not one per process
        raise typer.Exit(relaunch(devices))
    try:
        ddp = setup_distributed(device.value)
    except LaunchError as e:
        raise UserError(str(e)) from None
    try:
        _evaluate(run, importance_samples, split.value, batch_size, chunk, device, seed, limit,
                  no_ema, binarization_seed, overrides, as_json, ddp, active_threshold)
    except UserError:
        if not ddp.main:             # every process meets the same mistake; process 0 says it
            raise typer.Exit(2) from None
        raise
    except RuntimeError as e:        # a process or node died: nothing was written, say so
        lost = peer_failure(e, ddp, "Nothing was written.")
        if lost is None:
            raise
        fail(str(lost), code=1)
    finally:
        teardown_distributed(ddp)


def _evaluate(run, importance_samples, split: str, batch_size, chunk, device, seed: int, limit,
              no_ema: bool, binarization_seed: int, overrides, as_json: bool, ddp,
              active_threshold: float = 0.1) -> None:
    from builders.devices import DeviceError, resolve_device
    from builders.evaluation.sharded import shard_bounds, sharded_nll
    from builders.launch.environment import LaunchError
    from builders.launch.process_group import agree

    try:
        where = str(resolve_device(device.value, ddp.local_rank))
    except DeviceError as e:
        raise UserError(str(e)) from None
    model, resolved, run_dir = load_model(run, where, not no_ema, overrides)
    try:                             # the same run and settings on every process
        agree(ddp, spec=resolved.hash[:16], k=importance_samples, split=split,
              batch_size=batch_size, chunk=chunk, device=where.split(":")[0], seed=seed, limit=limit,
              no_ema=no_ema, binarization_seed=binarization_seed, active_threshold=active_threshold)
    except LaunchError as e:
        raise UserError(str(e)) from None
    spec = resolved.spec
    k = importance_samples or spec.eval.importance_samples
    b = batch_size or spec.eval.batch_size
    x = images(resolved, split, binarization_seed=binarization_seed)
    total = x.shape[0]
    x = x[:limit] if limit is not None else x
    _check_feasible(model, x, k, b, chunk, seed, ddp)
    start, stop = shard_bounds(x.shape[0], b, ddp.rank, ddp.world_size)
    what = f"eval K={k}" + (f" (process 0 of {ddp.world_size})" if ddp.world_size > 1 else "")
    with _Progress(stop - start, what, shown=ddp.main) as progress:
        result = sharded_nll(model, x, k, b, ddp, chunk=chunk, seed=seed, progress=progress)
    if not ddp.main:
        return
    per_example = result.pop("per_example")
    result["active_units"] = _active_units(model, x, b, seed, active_threshold)
    document = {**result, **_provenance(model, resolved, split, b, seed),
                "limit": limit, "full_split": x.shape[0] == total, "overrides": list(overrides or []),
                **_evaluated_images(spec, x, binarization_seed)}
    if as_json:
        print_json(document)
    else:
        _print_table(document)
    if run_dir is not None and Path(run).expanduser().is_dir():
        _record(run_dir / "eval.json", document, per_example, quiet=as_json)


def _active_units(model, x, batch_size: int, seed: int, threshold: float) -> dict:
    """KL per latent channel over the evaluated images (one posterior sample each, seeded)."""
    import torch

    from builders.evaluation.active_units import active_units, kl_per_channel
    from builders.evaluation.evaluate import batched
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return active_units(kl_per_channel(model, batched(x, batch_size)), threshold)


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
    au = d.get("active_units")
    if au:
        t.add_row(f"active latent channels (KL > {au['threshold_nats']:g})", f"{au['active']} / {au['channels']}")
    t.add_row("images/s", f"{d['images_per_s']:.1f}" if d["images_per_s"] else "-")
    out.print(t)
    out.print(_escape(f"± is one standard error over images; checkpoint {d['checkpoint']}"
                      f"{' (EMA weights)' if d['ema'] else ''}"))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
