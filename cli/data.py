"""`avi data`: what a spec's data resolves to, and a grid of images as the model sees them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOption, SetOption, UserError, err, load, out


def data_command(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="Spec file or run directory.")],
    overrides: SetOption = None,
    grid_path: Annotated[Optional[Path], typer.Option(
        "--out", "-o", metavar="FILE.png", help="Where to write the grid (default: ./<name>_data.png).")] = None,
    n: Annotated[int, typer.Option("--n", "-n", min=1, max=1024, help="Images in the grid (the first of the train split).")] = 64,
    as_json: JsonOption = False,
) -> None:
    """Show what a spec's data resolves to, with a grid of images as the model sees them.

    Prints the images per split, their shape and value range and how the model is fed them;
    writes the first training images padded (and binarised for binary data). Reads (and for dataset: folder, decodes and caches) both splits. A file that cannot be
    used is named with the reason (exit 2).

    Example:

        avi data specs/quickstart.yaml --set data.dataset=folder --set data.root=photos/ --out grid.png
    """
    from builders.data.datasets import DatasetError, load_spec_images

    resolved = load(spec, overrides)
    d = resolved.spec.data
    notes: list[str] = []
    try:
        splits = {s: load_spec_images(d, s, notes.append) for s in ("train", "test")}
    except DatasetError as e:
        raise UserError(str(e)) from None
    for line in notes:
        err.print(f"data: {line}", markup=False)
    info = {"name": resolved.spec.name, "dataset": d.dataset, "root": d.root,
            "splits": {s: _describe(a) for s, a in splits.items()}, "model_input": _fed(resolved.spec)}
    path = grid_path or Path(f"{resolved.spec.name}_data.png")
    try:
        _write_grid(path, resolved.spec, splits["train"][:n])
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from None
    info["grid"] = str(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    _print(info)


def _describe(images) -> dict:
    import numpy as np
    a = np.asarray(images)
    return {"images": int(a.shape[0]), "shape": list(a.shape[1:]), "dtype": str(a.dtype),
            "min": float(a.min()) if a.size else None, "max": float(a.max()) if a.size else None}


def _fed(spec) -> str:
    from builders.data.preprocess import data_kind
    d = spec.data
    side = d.image.size + 2 * d.pad
    pad = f"padded by {d.pad} to {side}x{side}, " if d.pad else ""
    if data_kind(spec) == "binary":
        return (f"grey levels in [0, 1] (8-bit / 255), {pad}binarised ({d.binarize}: a Bernoulli draw "
                f"per pixel; the test split once, seed 0), fed as -1/1")
    flips = "" if d.flips is None else "random flips in training, "
    return f"8-bit values, {pad}{flips}fed as x / 127.5 - 1 (the mixture scores the 256 levels)"


def _write_grid(path: Path, spec, raw) -> None:
    """The first images as model input, mapped back to [0, 1] for viewing."""
    from builders.data.preprocess import BinarizedTestSet, data_kind, prepare_batch
    from builders.evaluation.images import save_grid
    if data_kind(spec) == "binary":
        x = BinarizedTestSet(raw, seed=0, pad=spec.data.pad)[:]
    else:
        x = prepare_batch(raw, "cifar", None, train=False, pad=spec.data.pad)
    save_grid(path, (x + 1) / 2)


def _print(info: dict) -> None:
    from rich.table import Table
    t = Table(title=f"{info['name']}: dataset {info['dataset']}" +
              (f" from {info['root']}" if info["root"] else ""), title_justify="left")
    for col in ("split", "images", "shape (C, H, W)", "dtype", "min", "max"):
        t.add_column(col, justify="left" if col in ("split", "dtype") else "right")
    for split, s in info["splits"].items():
        t.add_row(split, f"{s['images']:,}", " x ".join(map(str, s["shape"])), s["dtype"],
                  f"{s['min']:g}" if s["min"] is not None else "-", f"{s['max']:g}" if s["max"] is not None else "-")
    out.print(t)
    out.print(f"model input: {info['model_input']}", markup=False)
    out.print(f"wrote {info['grid']}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("data")(data_command)
