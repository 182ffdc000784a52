"""`avi plot kl` (per-layer KL as a bar chart) and `avi plot attention` (mean depth-wise
attention scores as two heatmaps), drawn straight into numpy images (no matplotlib)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .common import JsonOption, SetOption, UserError, out
from .eval import (Device, DeviceOption, LimitOption, NoEmaOption, RunArgument, SeedOption,
                   Split, default_output, images, load_model, print_json)

plot_app = typer.Typer(no_args_is_help=True, add_completion=False,
                       context_settings={"help_option_names": ["-h", "--help"]},
                       help="Pictures of a trained model: per-layer KL, attention maps.\n\n"
                            "Example:\n\n    avi plot kl runs/quickstart --out kl.png")

OutOption = Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE.png",
                                                   help="Where to write the PNG.")]
SplitOption = Annotated[Split, typer.Option("--split", help="Which images to average over.")]
BatchOption = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, metavar="B", help="Images per batch (default: the spec's eval.batch_size).")]


# ------------------------------------------------------------------ drawing

# 3x5 digits (and . -) so the charts can carry their numbers without a font dependency.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000",
}
INK = np.array([40, 40, 40], dtype=np.uint8)


def draw_text(img: np.ndarray, text: str, y: int, x: int, scale: int = 2,
              colour: np.ndarray = INK) -> None:
    """Write digits at (y, x) (top-left), clipped to the image."""
    for i, ch in enumerate(text):
        glyph = np.array([int(c) for c in _GLYPHS.get(ch, _GLYPHS[" "])], bool).reshape(5, 3)
        glyph = np.repeat(np.repeat(glyph, scale, 0), scale, 1)
        y0, x0 = y, x + i * 4 * scale
        h = max(0, min(glyph.shape[0], img.shape[0] - y0))
        w = max(0, min(glyph.shape[1], img.shape[1] - x0))
        if h and w and y0 >= 0 and x0 >= 0:
            img[y0:y0 + h, x0:x0 + w][glyph[:h, :w]] = colour


def text_width(text: str, scale: int = 2) -> int:
    return len(text) * 4 * scale - scale


def _number(v: float) -> str:
    return f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def bar_chart(values, height: int = 220, bar: int = 28, gap: int = 10) -> np.ndarray:
    """RGB bar chart of non-negative values: one bar per entry, its index below and its value
    above; bars scaled to the largest."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    n = len(v)
    label = max([text_width(_number(x)) for x in v] + [bar])
    step = max(bar, label) + gap
    left, top, bottom = 12, 24, 24
    width = left + n * step + 12
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    base = height - bottom
    peak = max(float(v.max(initial=0.0)), 1e-12)
    span = base - top
    for i, x in enumerate(v):
        cx = left + i * step + step // 2
        h = int(round(span * max(x, 0.0) / peak))
        x0 = cx - bar // 2
        img[base - h:base, x0:x0 + bar] = (49, 130, 189)
        draw_text(img, _number(x), base - h - 14, cx - text_width(_number(x)) // 2)
        draw_text(img, str(i), base + 6, cx - text_width(str(i)) // 2)
    img[base:base + 2, left - 4:width - 8] = INK                    # x axis
    return img


def side_by_side(panels: list[np.ndarray], gap: int = 16) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        pad = np.full((h - p.shape[0], p.shape[1], 3), 255, np.uint8)
        parts.append(np.concatenate([p, pad], 0))
        if i < len(panels) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, 1)


def labelled_heatmap(matrix: np.ndarray, cell: int = 24) -> np.ndarray:
    """images.heatmap with the source index above each column and the layer left of each row."""
    from builders.images import heatmap
    core = heatmap(matrix, cell)
    rows, cols = matrix.shape
    margin_top, margin_left = 16, 8 + text_width(str(rows - 1))
    img = np.full((core.shape[0] + margin_top, core.shape[1] + margin_left, 3), 255, np.uint8)
    img[margin_top:, margin_left:] = core
    for m in range(cols):
        s = str(m)
        draw_text(img, s, 2, margin_left + m * cell + (cell - text_width(s)) // 2)
    for l in range(rows):
        s = str(l)
        draw_text(img, s, margin_top + l * cell + (cell - 10) // 2, 2)
    return img


# ------------------------------------------------------------------ commands

def _batches(resolved, split: Split, limit, batch_size):
    from builders.evaluate import batched
    x = images(resolved, split.value, limit)
    return batched(x, batch_size or resolved.spec.eval.batch_size)


def _seed(seed: int) -> None:
    import torch
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _save(path: Path, pixels: np.ndarray) -> Path:
    from builders.images import save_png
    try:
        return save_png(path, pixels)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


@plot_app.command("kl")
def kl_command(
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
    """Bar chart of the mean KL of every stochastic layer (nats per image; layer 0 on the left
    is the top of the hierarchy). Prints the PNG path (default RUN/plots/kl.png).

    Example:

        avi plot kl runs/quickstart --out kl.png --json
    """
    from builders.evaluate import kl_per_layer

    model, resolved, run_dir = load_model(run, device, not no_ema, overrides)
    _seed(seed)
    kl = kl_per_layer(model, _batches(resolved, split, limit, batch_size))
    path = _save(output or default_output(run_dir, "plots", "kl.png"), bar_chart(kl))
    if as_json:
        print_json({"kl_per_layer_nats": kl, "kl_total_nats": float(kl.sum()), "png": str(path)})
    else:
        out.print(str(path), markup=False)


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
    """Mean depth-wise attention scores as two heatmaps side by side: the priors (generative
    path) on the left, the posteriors (inference path) on the right. Rows: the attending
    layer l; columns: the source layer m (for the posterior, column L is the preprocessing
    output); white 0, dark blue 1, grey where m is not a source. Prints the PNG path
    (default RUN/plots/attention.png).

    Example:

        avi plot attention runs/quickstart --out attention.png
    """
    from builders.evaluate import attention_maps

    model, resolved, run_dir = load_model(run, device, not no_ema, overrides)
    _seed(seed)
    maps = attention_maps(model, _batches(resolved, split, limit, batch_size))
    picture = side_by_side([labelled_heatmap(maps["generative"]), labelled_heatmap(maps["inference"])])
    path = _save(output or default_output(run_dir, "plots", "attention.png"), picture)
    if as_json:
        print_json({"generative": maps["generative"], "inference": maps["inference"],
                    "rows": "attending layer", "columns": "source layer", "png": str(path)})
    else:
        out.print(str(path), markup=False)


def register(app: typer.Typer) -> None:
    if any(g.name == "plot" for g in app.registered_groups):
        return
    app.add_typer(plot_app, name="plot")
