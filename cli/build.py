"""`avi build`: instantiate a spec's model and show what was built."""
from __future__ import annotations

import json
import sys
import time
from enum import Enum
from typing import Annotated, Optional

import typer

from .common import JsonOption, SetOption, UserError, _escape, err, load_valid, out


class BuildDevice(str, Enum):
    meta = "meta"
    cpu = "cpu"
    cuda = "cuda"


def _sources(xs: list[int]) -> str:
    if not xs:
        return "-"
    if xs == list(range(xs[0], xs[-1] + 1)) and len(xs) > 2:
        return f"{xs[0]}..{xs[-1]}"
    return ",".join(map(str, xs))


def build(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="Spec file or run directory.")],
    overrides: SetOption = None,
    device: Annotated[BuildDevice, typer.Option(help="meta builds shapes only: no memory, seconds for 119M parameters.")] = BuildDevice.meta,
    batch: Annotated[Optional[int], typer.Option("--batch", min=1, metavar="B", help="Estimate the peak training memory per device at B images per forward pass (a micro-batch: train.batch_size / processes / train.accumulate).")] = None,
    gpu_memory: Annotated[Optional[str], typer.Option("--gpu-memory", metavar="SIZE", help="Say whether the estimate fits a device of SIZE (80GiB, 24GB, ...), and the largest batch that does; B defaults to the spec's train.batch_size / train.accumulate.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Build a spec's PyTorch model and print its parameters by module group.

    The spec is validated first; the attention wiring of every layer, the latent sizes and
    the total follow the parameter table. With --batch, the peak training memory per device:
    weights, gradients, optimizer state and the activations a training forward saves,
    counted on the meta device (nothing is allocated).

    Example:

        avi build specs/cifar10_l16.yaml --batch 10 --gpu-memory 32GiB
    """
    resolved = load_valid(spec, overrides)
    limit = _parse_limit(gpu_memory)

    import torch

    from builders.network.build import build_model, summary

    from .common import UserError
    if device is BuildDevice.cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use meta or cpu)")
    if device is not BuildDevice.meta:        # counted on the meta device before allocating
        from builders.network.size import ModelSizeError, check_fits
        try:
            check_fits(resolved.spec, device.value, "build")
        except ModelSizeError as e:
            raise UserError(f"{e}; --device meta counts it without memory") from None
    t0 = time.perf_counter()
    model = build_model(resolved.spec, device.value)
    seconds = time.perf_counter() - t0
    info = summary(model)
    info.update(hash=resolved.hash, device=device.value, build_seconds=round(seconds, 3))
    if batch is not None or limit is not None:
        info["memory"] = _memory(resolved.spec, batch, limit)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return

    out.print(_group_table(info, resolved.short_hash))
    out.print(_layer_table(info))
    w = info["widths"]
    out.print(f"widths: bottom-up {w['bottom_up']}, context {w['context']}, "
              f"decoder {min(w['decoder'])}..{max(w['decoder'])}, postprocess {w['postprocess']}")
    if "memory" in info:
        out.print(_memory_table(info["memory"]))
        for line in _memory_verdict(info["memory"]):
            out.print(line, markup=False)
    err.print(f"built on {device.value} in {seconds:.2f} s")


def _parse_limit(text: str | None) -> int | None:
    if text is None:
        return None
    from builders.train.memory import parse_bytes
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise UserError(f"--gpu-memory: {e}") from None


def _memory(spec, batch: int | None, limit: int | None) -> dict:
    """The estimate as a dict (bytes), with the verdict against `limit` when given."""
    from builders.train.memory import estimate_training_memory
    train = spec.train
    est = estimate_training_memory(spec, batch or max(1, train.batch_size // train.accumulate))
    info = est.as_dict()
    if limit is not None:
        most = est.largest_batch(limit)
        info.update(limit=limit, fits=est.peak <= limit, largest_batch=most,
                    batch_size=train.batch_size, accumulate=_accumulate_for(train.batch_size, most))
    return info


def _accumulate_for(batch_size: int, most: int) -> int | None:
    """The smallest train.accumulate that splits batch_size into micro-batches of <= most
    images on one device (None: not even one image fits)."""
    return next((k for k in range(1, batch_size + 1) if batch_size % k == 0 and batch_size // k <= most), None)


def _memory_table(m: dict):
    from rich.table import Table
    gib = 2 ** 30
    t = Table(title=f"peak training memory per device, {m['batch']} images per forward (fp32)",
              title_justify="left")
    t.add_column("part")
    t.add_column("GiB", justify="right")
    for key in ("weights", "gradients", "optimizer", "ema", "buffers", "activations", "workspace"):
        if m[key]:
            t.add_row(key, f"{m[key] / gib:.3f}")
    t.add_section()
    t.add_row("[bold]peak[/]", f"[bold]{m['peak'] / gib:.3f}[/]")
    t.add_row("activations per further image", f"{m['activations_per_image'] / gib:.3f}")
    return t


def _memory_verdict(m: dict) -> list[str]:
    if "limit" not in m:
        return []
    gib = 2 ** 30
    lines = [f"{'fits' if m['fits'] else 'does not fit'} in {m['limit'] / gib:.1f} GiB "
             f"({100 * m['peak'] / m['limit']:.0f}% at {m['batch']} images per forward); "
             f"at most {m['largest_batch']} images per forward fit"]
    k, n = m["accumulate"], m["batch_size"]
    if k == 1:
        lines.append(f"the spec's train.batch_size {n} fits on one device in one forward pass")
    elif k is not None:
        lines.append(f"on one device, set train.accumulate: {k} to run the spec's train.batch_size "
                     f"{n} as {k} micro-batches of {n // k} images")
    else:
        lines.append("not even one image per forward fits: use a smaller model or a larger device")
    return lines


def _group_table(info: dict, short_hash: str):
    """Parameters by module group, with the share of each and the total."""
    from rich.table import Table
    total = info["parameters"]
    groups = Table(title=_escape(f"{info['name']}  ({short_hash})"), title_justify="left")
    groups.add_column("module group")
    groups.add_column("parameters", justify="right")
    groups.add_column("share", justify="right")
    for name, n in info["groups"].items():
        groups.add_row(name, f"{n:,}", f"{100 * n / total:.1f}%")
    groups.add_section()
    groups.add_row("[bold]total[/]", f"[bold]{total:,}[/]", "100%")
    if info["groups"]["context layer norms"]:
        groups.add_row("total without the context layer norms (the authors' counter)",
                       f"{info['parameters_reference_count']:,}", "")
    return groups


def _layer_table(info: dict):
    """Per stochastic layer: latent shape, prior/posterior/attention parameters, what it reads."""
    from rich.table import Table
    layers = Table(title="stochastic layers (0 = top; pre = preprocessing output)", title_justify="left")
    for col in ("layer", "latent", "prior", "posterior", "attention", "prior reads", "posterior reads"):
        layers.add_column(col, justify="left" if col.endswith("reads") else "right")
    L = len(info["layers"])
    for row in info["layers"]:
        layers.add_row(str(row["layer"]), "x".join(map(str, row["latent"])), f"{row['prior']:,}",
                       f"{row['posterior']:,}", f"{row['attention']:,}",
                       _sources(row["generative_sources"]),
                       _sources(row["inference_sources"]).replace(str(L), "pre"))
    return layers


def register(app: typer.Typer) -> None:
    app.command("build")(build)
