"""`avi build`: instantiate a spec's model and show what was built."""
from __future__ import annotations

import json
import sys
import time
from enum import Enum
from typing import Annotated

import typer

from .common import JsonOption, SetOption, _escape, err, load_valid, out


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
    as_json: JsonOption = False,
) -> None:
    """Build a spec's PyTorch model and print its parameters by module group.

    The spec is validated first; the attention wiring of every layer, the latent sizes and
    the total follow the parameter table.

    Example:

        avi build specs/cifar10_l16.yaml
    """
    resolved = load_valid(spec, overrides)

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
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return

    out.print(_group_table(info, resolved.short_hash))
    out.print(_layer_table(info))
    w = info["widths"]
    out.print(f"widths: bottom-up {w['bottom_up']}, context {w['context']}, "
              f"decoder {min(w['decoder'])}..{max(w['decoder'])}, postprocess {w['postprocess']}")
    err.print(f"built on {device.value} in {seconds:.2f} s")


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
