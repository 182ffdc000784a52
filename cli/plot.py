"""`avi plot kl | active | attention | curves`: figures of trained runs (drawn by builders.evaluation.figures with
matplotlib; the format follows the output's extension: .png, .svg or .pdf)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOption, SetOption, UserError, print_path, warn
from .eval import (Device, DeviceOption, LimitOption, NoEmaOption, RunArgument, SeedOption,
                   Split, default_output, images, load_model, print_json)

plot_app = typer.Typer(no_args_is_help=True, add_completion=False,
                       context_settings={"help_option_names": ["-h", "--help"]},
                       help="Figures of trained runs: KL per layer, active latent channels, attention maps, training curves.\n\n"
                            "Example:\n\n    avi plot curves runs/case09 runs/case16 --out curves.svg")

OutOption = Annotated[Optional[Path], typer.Option(
    "--out", "-o", metavar="FILE", help="Where to write the figure; its extension picks the format "
                                        "(.png, .svg, .pdf).")]
RunsArgument = Annotated[list[str], typer.Argument(
    metavar="RUN...", help="Run directories of `avi train` (or .pt checkpoints, .safetensors exports).")]
SplitOption = Annotated[Split, typer.Option("--split", help="Which images to average over.")]
BatchOption = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, metavar="B", help="Images per batch (default: the spec's eval.batch_size).")]


class Axis(str, Enum):
    step = "step"
    epoch = "epoch"


def _output(output: Optional[Path], runs: list[str], name: str) -> Path:
    """--out, checked before any work; default RUN/plots/<name> for one run directory, else
    ./<name>."""
    from builders.evaluation.figures import figure_format
    if output is None:
        run = Path(runs[0]).expanduser()
        output = default_output(run if len(runs) == 1 and run.is_dir() else None, "plots", name)
    try:
        figure_format(output)
    except ValueError as e:
        raise UserError(str(e)) from None
    return output


def _labels(runs: list[str]) -> list[str]:
    """A short legend label per run: its folder or file name, the path where names repeat."""
    names = [_label(Path(r).expanduser().resolve()) for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r) for r in runs]


def _label(p: Path) -> str:
    if p.name == "metrics.jsonl":
        return p.parent.name
    if p.parent.name == "checkpoints":                  # runs/x/checkpoints/best.pt: x/best
        return f"{p.parent.parent.name}/{p.stem}"
    return p.stem if p.is_file() else p.name


def _save(fig, path: Path) -> Path:
    from builders.evaluation.figures import save_figure
    try:
        return save_figure(fig, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _batches(resolved, split: Split, limit, batch_size):
    """(the batches of the split's first `limit` images, how many images)."""
    from builders.evaluation.evaluate import batched
    x = images(resolved, split.value, limit)
    return batched(x, batch_size or resolved.spec.eval.batch_size), x.shape[0]


def _weights(model) -> str:
    """Which weights a figure shows: the checkpoint (or export), its step, EMA or not."""
    info = getattr(model, "avi_checkpoint", None) or {}
    extra = [f"step {info['step']}"] if info.get("step") is not None else []
    extra += ["EMA weights"] if info.get("ema") else []
    return f"{info.get('path', '?')}" + (f" ({', '.join(extra)})" if extra else "")


def _seed(seed: int) -> None:
    import torch
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@plot_app.command("kl")
def kl_command(
    runs: RunsArgument,
    output: OutOption = None,
    split: SplitOption = Split.test,
    limit: LimitOption = None,
    batch_size: BatchOption = None,
    device: DeviceOption = Device.auto,
    seed: SeedOption = 0,
    no_ema: NoEmaOption = False,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Bar chart of the mean KL of every stochastic layer, several runs side by side.

    KL in nats per image; layer 0, on the left, is the top of the hierarchy. Prints the
    figure's path (default RUN/plots/kl.png for one run, ./kl.png for several).

    Example:

        avi plot kl runs/case09 runs/case16 --out kl.pdf --json
    """
    from builders.evaluation.evaluate import kl_per_layer
    from builders.evaluation.figures import kl_figure, plottable

    path = _output(output, runs, "kl.png")
    kl, weights, counts = {}, [], set()
    for label, run in zip(_labels(runs), runs):
        model, resolved, _ = load_model(run, device, not no_ema, overrides)
        _seed(seed)
        batches, n = _batches(resolved, split, limit, batch_size)
        kl[label] = kl_per_layer(model, batches)
        weights.append(f"{label}: {_weights(model)}")
        counts.add(n)
    for label, v in kl.items():
        left = plottable(v)[1]
        if left:
            warn(f"{label}: the KL of {left} layer(s) is infinite or beyond +-1e300 (a diverged "
                 f"model?): left out of the figure")
    images_text = " / ".join(str(n) for n in sorted(counts))
    about = "\n".join([f"{split.value} split, {images_text} images, one posterior sample each", *weights])
    path = _save(kl_figure(kl, about), path)
    if as_json:
        print_json({"runs": [{"run": run, "label": label, "kl_per_layer_nats": v,
                              "kl_total_nats": float(v.sum())}
                             for run, (label, v) in zip(runs, kl.items())],
                    "figure": str(path)})
    else:
        print_path(path)


ThresholdOption = Annotated[float, typer.Option(
    "--threshold", min=0.0, metavar="NATS",
    help="A latent channel is active when its KL (nats per image, summed over its positions) is above this.")]


@plot_app.command("active")
def active_command(
    run: RunArgument,
    output: OutOption = None,
    threshold: ThresholdOption = 0.1,
    split: SplitOption = Split.test,
    limit: LimitOption = None,
    batch_size: BatchOption = None,
    device: DeviceOption = Device.auto,
    seed: SeedOption = 0,
    no_ema: NoEmaOption = False,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Heat map of the KL of every latent channel of every layer, the active ones ringed.

    A channel is active when its KL is above --threshold (nats per image); the count per layer
    shows which layers the model uses. Prints the figure's path (default RUN/plots/active.png).

    Example:

        avi plot active runs/quickstart --threshold 0.1 --out active.png --json
    """
    from builders.evaluation.active_units import active_units, kl_per_channel
    from builders.evaluation.figures import active_units_figure

    path = _output(output, [run], "active.png")
    model, resolved, _ = load_model(run, device, not no_ema, overrides)
    _seed(seed)
    kl = kl_per_channel(model, _batches(resolved, split, limit, batch_size)[0])
    path = _save(active_units_figure(kl, threshold), path)
    if as_json:
        print_json({"run": run, **active_units(kl, threshold), "figure": str(path)})
    else:
        print_path(path)


@plot_app.command("attention")
def attention_command(
    run: RunArgument,
    output: OutOption = None,
    split: SplitOption = Split.test,
    limit: LimitOption = None,
    batch_size: BatchOption = None,
    device: DeviceOption = Device.auto,
    seed: SeedOption = 0,
    no_ema: NoEmaOption = False,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Heatmaps of the mean depth-wise attention scores: prior left, posterior right.

    Rows: the target layer l; columns: the source layer m ("pre" is the posterior's
    preprocessing output); grey where m is not a source of l. Prints the figure's path
    (default RUN/plots/attention.png).

    Example:

        avi plot attention runs/quickstart --out attention.svg
    """
    from builders.evaluation.evaluate import attention_maps
    from builders.evaluation.figures import attention_figure

    path = _output(output, [run], "attention.png")
    model, resolved, _ = load_model(run, device, not no_ema, overrides)
    _seed(seed)
    batches, n = _batches(resolved, split, limit, batch_size)
    maps = attention_maps(model, batches)
    about = f"{_labels([run])[0]}: {_weights(model)}; {split.value} split, {n} images"
    path = _save(attention_figure(maps["generative"], maps["inference"], about), path)
    if as_json:
        print_json({"generative": maps["generative"], "inference": maps["inference"],
                    "rows": "target layer", "columns": "source layer", "figure": str(path)})
    else:
        print_path(path)


@plot_app.command("curves")
def curves_command(
    runs: Annotated[list[str], typer.Argument(
        metavar="RUN...", help="Run directories of `avi train` (or their metrics.jsonl files).")],
    output: OutOption = None,
    x: Annotated[Axis, typer.Option("--x", help="What the horizontal axis counts.")] = Axis.step,
) -> None:
    """Training loss, test NELBO and learning rate of several runs overlaid.

    Reads each run's metrics.jsonl (no model is loaded). Prints the figure's path (default
    RUN/plots/curves.png for one run, ./curves.png for several).

    Example:

        avi plot curves runs/case09 runs/case16 --x epoch --out curves.svg
    """
    from builders.evaluation.figures import Curves, curves_figure, read_metrics

    path = _output(output, runs, "curves.png")
    curves, sources = {}, []
    for label, run in zip(_labels(runs), runs):
        p = Path(run).expanduser()
        metrics = p / "metrics.jsonl" if p.is_dir() else p
        sources.append(f"{label}: {metrics}")
        try:
            curves[label] = Curves(read_metrics(metrics))
            curves[label].x(curves[label].epochs, x.value)      # an epoch axis needs a finished epoch
        except FileNotFoundError:
            raise UserError(f"{metrics} not found (is {run} a run directory of `avi train`?)") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{metrics}: {e}") from None
        left = curves[label].points_left_out()
        if left:
            warn(f"{metrics}: {left} point(s) left out of the figure (infinite, or beyond "
                 f"+-1e300: they cannot be drawn)")
    print_path(_save(curves_figure(curves, x.value, "\n".join(sources)), path))


def register(app: typer.Typer) -> None:
    if any(g.name == "plot" for g in app.registered_groups):
        return
    app.add_typer(plot_app, name="plot")
