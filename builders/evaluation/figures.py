"""Figures of trained runs, drawn with matplotlib: KL per stochastic layer (several runs side
by side), the depth-wise attention maps (prior and posterior), and training curves (several
runs overlaid).

Everything is drawn on matplotlib's object API with the Agg canvas: no pyplot, no global
figure state, no display. save_figure picks the format from the file's extension; SVG keeps
its text as text (svg.fonttype "none") so titles and labels stay searchable and editable.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from avi_spec.yaml_io import read_text_file

from ..files import write_atomically

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
NOT_A_SOURCE = "0.82"                 # grey of the attention cells that are not sources
DPI = 150


def figure_format(path: str | Path) -> str:
    """The format of an output path from its extension; ValueError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the figure format of {path}: its extension must be "
                         f"{', '.join(FORMATS)}")
    return FORMATS[suffix]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write the figure in the format of the path's extension, atomically."""
    path = Path(path)
    fmt = figure_format(path)
    encoded = io.BytesIO()
    with rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        fig.savefig(encoded, format=fmt, dpi=DPI)
    return write_atomically(path, encoded.getvalue())


PLOTTABLE = 1e300       # beyond this, matplotlib's axis spans and ticks overflow to inf


def plottable(values) -> tuple[np.ndarray, int]:
    """Values as floats, those that cannot be drawn (inf, beyond +-PLOTTABLE, an integer too
    large for a float, not a number at all) as NaN, which matplotlib leaves out of a line or a
    bar; and how many were left out (a missing value, None or NaN, is not counted)."""
    out, left = [], 0
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(math.nan)
            continue
        f = _as_float(v)
        if f is None or not abs(f) <= PLOTTABLE:
            left, f = left + 1, math.nan
        out.append(f)
    return np.array(out, dtype=float), left


def _as_float(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def literal_label(text: str) -> str:
    """A run's name as a legend label drawn as written: a `$` would start matplotlib's mathtext
    (a name like kl$\\foo$ was a parse error), so every one is escaped."""
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ------------------------------------------------------------------ KL per layer

def kl_figure(kl: dict[str, np.ndarray], about: str | None = None) -> Figure:
    """Grouped bars: the mean KL of every stochastic layer (nats per image), one colour per
    run. `kl` maps a run's label to its per-layer KL (layer 0 = the top of the hierarchy);
    `about` (what was measured: split, images, checkpoints) goes under the title."""
    layers = max(len(v) for v in kl.values())
    n = len(kl)
    width = 0.8 / n
    fig = _figure(max(6.0, 1.2 + layers * (0.35 + 0.18 * n)), 4.2)
    ax = fig.add_subplot()
    x = np.arange(layers)
    for i, (label, values) in enumerate(kl.items()):
        v = np.full(layers, np.nan)
        v[:len(values)] = plottable(values)[0]
        bars = ax.bar(x + (i - (n - 1) / 2) * width, v, width, label=literal_label(label))
        if n * layers <= 24:
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, [str(l) for l in x])
    ax.set_xlabel("stochastic layer (0 = top of the hierarchy)")
    ax.set_ylabel("KL(q || p)  [nats per image]")
    ax.set_title("KL divergence per stochastic layer")
    _about(fig, about)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(title="run", fontsize=8)
    return fig


# ------------------------------------------------------------------ attention maps

def _source_labels(columns: int, layers: int) -> list[str]:
    return [str(m) if m < layers else "pre" for m in range(columns)]


def _about(fig: Figure, about: str | None) -> None:
    """What a figure shows, in small type at its foot: the run, checkpoint, split, images."""
    if about:                                  # supxlabel: the layout makes room for it
        fig.supxlabel(literal_label(about), fontsize=7, color="0.3")   # names paths: never mathtext


def _single_sources(matrix: np.ndarray) -> np.ndarray:
    """Cells that are the only source of their row: their score is 1 by construction (a
    softmax over one candidate) and says nothing about the model."""
    finite = np.isfinite(matrix)
    return finite & (finite.sum(axis=1, keepdims=True) == 1)


def _attention_panel(ax, matrix: np.ndarray, layers: int, title: str, annotate: bool):
    cmap = colormaps["Blues"].with_extremes(bad=NOT_A_SOURCE)
    single = _single_sources(matrix)
    image = ax.imshow(np.ma.masked_invalid(np.where(single, np.nan, matrix)), cmap=cmap,
                      vmin=0.0, vmax=1.0)
    for l, m in zip(*np.nonzero(single)):       # white and hatched, not a dark 1.00
        ax.add_patch(Rectangle((m - 0.5, l - 0.5), 1, 1, facecolor="white", edgecolor="0.55",
                               hatch="////", lw=0.0))
    rows, cols = matrix.shape
    ax.set_xticks(range(cols), _source_labels(cols, layers))
    ax.set_yticks(range(rows), [str(l) for l in range(rows)])
    ax.set_xlabel("source layer m")
    ax.set_ylabel("target layer l (0 = top)")
    ax.set_title(title)
    if annotate:
        for (l, m), v in np.ndenumerate(matrix):
            if math.isfinite(v) and not single[l, m]:
                ax.text(m, l, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.55 else "black")
    return image


def attention_figure(generative: np.ndarray, inference: np.ndarray, about: str | None = None) -> Figure:
    """The mean depth-wise attention score of every target layer l (rows) on every source layer
    m (columns): the prior (generative path) left, the posterior (inference path) right. The
    posterior's column "pre" is the preprocessing output; grey cells are not sources of l,
    hatched cells its only source (score 1 by construction). `about` goes at the foot."""
    layers = generative.shape[0]
    gen = generative[:, :layers] if np.isnan(generative[:, layers:]).all() else generative
    side = max(2.6, 0.42 * inference.shape[1] + 1.0)
    fig = _figure(2 * side + 1.4, side + 1.3)
    axes = fig.subplots(1, 2, width_ratios=[gen.shape[1], inference.shape[1]])   # equal cells
    annotate = layers <= 8
    image = _attention_panel(axes[0], gen, layers, "Prior (generative path)", annotate)
    _attention_panel(axes[1], inference, layers, "Posterior (inference path)", annotate)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="mean attention score")
    fig.suptitle("Depth-wise attention: mean score of target layer l on source layer m")
    handles = [Patch(facecolor=NOT_A_SOURCE, edgecolor="0.5", label="not a source of layer l (no attention)")]
    if _single_sources(gen).any() or _single_sources(inference).any():
        handles.append(Patch(facecolor="white", edgecolor="0.55", hatch="////",
                             label="only source of layer l (score 1 by construction)"))
    # `about` as the legend's title: a second text at the foot would overlap the legend
    legend = fig.legend(handles=handles, loc="outside lower center", fontsize=8, frameon=False,
                        ncols=len(handles), title=literal_label(about) if about else None,
                        title_fontsize=7)
    if about:
        legend.get_title().set_color("0.3")
    return fig


# ------------------------------------------------------------------ training curves

MAX_METRICS_BYTES = 1 << 30       # a 1,000,000-step run logged every step is about 250 MB


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl; ValueError names a line that is not a record."""
    records = []
    for number, line in enumerate(read_text_file(path, MAX_METRICS_BYTES).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:      # RecursionError: brackets nested too deep
            raise ValueError(f"line {number} is not a JSON record ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            raise ValueError(f"line {number} is not a JSON object with a step")
        records.append(record)
    return records


class Curves:
    """One run's series from its metrics records: the step records (every `log_every` steps:
    loss, lr) and the epoch-end records (test_nelbo, train_loss) of builders.train.training."""

    def __init__(self, records: list[dict]):
        drawable = [r for r in records if not plottable([r["step"]])[1]]
        self.left_out = len(records) - len(drawable)      # records at a step that cannot be drawn
        self.steps = [r for r in drawable if "loss" in r or "lr" in r]
        self.epochs = [r for r in drawable if "test_nelbo" in r]
        self.bits = bool(self.epochs) and all("test_nelbo_bits_per_dim" in r for r in self.epochs)
        if not self.steps and not self.epochs:
            raise ValueError("it holds no training records (loss, lr or test_nelbo)")

    def x(self, records: list[dict], axis: str) -> np.ndarray:
        steps = plottable(r["step"] for r in records)[0]
        if axis == "step":
            return steps
        # Epochs by position, not by the records' epoch numbers: the k-th epoch-end record
        # closes epoch k, and steps in between are fractions of an epoch.
        ends = np.concatenate([[0.0], plottable(r["step"] for r in self.epochs)[0]])
        if len(ends) < 2:
            raise ValueError("no epoch has finished yet; plot it against the step")
        per_epoch = ends[-1] - ends[-2]
        beyond = steps > ends[-1]
        x = np.interp(steps, ends, np.arange(len(ends), dtype=float))
        x[beyond] = len(ends) - 1 + (steps[beyond] - ends[-1]) / max(per_epoch, 1.0)
        return x

    @staticmethod
    def y(records: list[dict], key: str) -> np.ndarray:
        return plottable(r.get(key, math.nan) for r in records)[0]

    def points_left_out(self) -> int:
        """Records and values that cannot be drawn (non-finite, beyond +-PLOTTABLE)."""
        keys = ("loss", "lr", "test_nelbo", "test_nelbo_bits_per_dim")
        return self.left_out + sum(plottable(r[k] for r in self.steps + self.epochs if k in r)[1]
                                   for k in keys)


def curves_figure(runs: dict[str, Curves], axis: str = "step", about: str | None = None) -> Figure:
    """Training loss (with the KL weight beta on a second axis: its steps at epoch ends are
    the loss's jumps), test NELBO and learning rate against the step or epoch, one colour per
    run (bits/dim for the test NELBO when every run is on 8-bit data, else nats)."""
    fig = _figure(13.0, 4.0)
    loss_ax, test_ax, lr_ax = fig.subplots(1, 3)
    beta_ax = loss_ax.twinx()
    bits = all(c.bits for c in runs.values())
    test_key = "test_nelbo_bits_per_dim" if bits else "test_nelbo"
    for label, c in runs.items():
        steps = c.x(c.steps, axis)
        label = literal_label(label)
        line, = loss_ax.plot(steps, c.y(c.steps, "loss"), lw=1.0, label=label)
        colour = line.get_color()
        beta_ax.plot(steps, c.y(c.steps, "beta"), lw=0.9, ls="--", color=colour, alpha=0.6)
        if c.epochs:
            test_ax.plot(c.x(c.epochs, axis), c.y(c.epochs, test_key), "o-", ms=3.5, lw=1.2,
                         color=colour, label=label)
        lr_ax.plot(steps, c.y(c.steps, "lr"), lw=1.2, color=colour, label=label)
    beta_ax.set_ylim(0.0, 1.05)
    beta_ax.set_ylabel("β, the KL weight (dashed)", color="0.4")
    xlabel = "training step" if axis == "step" else "epoch"
    for ax, title, ylabel in (
            (loss_ax, "Training loss", "loss = NLL + β·KL  [nats per image]"),
            (test_ax, "Test NELBO", "−ELBO  [bits/dim]" if bits else "−ELBO  [nats per image]"),
            (lr_ax, "Learning rate", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _zoom_past_warmup(loss_ax, runs)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    note = _schedule_note(runs)
    if note:                                   # under the axis: the curve fills the panel
        lr_ax.text(0.5, -0.2, note, transform=lr_ax.transAxes, ha="center", va="top",
                   fontsize=7, color="0.3")
    handles, labels = loss_ax.get_legend_handles_labels()
    fig.legend(handles, labels, title="run", loc="outside right center", fontsize=8)
    _about(fig, about)
    return fig


def _zoom_past_warmup(ax, runs: dict[str, Curves]) -> None:
    """The first steps' loss is an order of magnitude above the rest: cap the y range at the
    highest loss after the first tenth of the run so the part worth comparing is readable."""
    tops, bottoms = [], []
    for c in runs.values():
        y = c.y(c.steps, "loss")
        y = y[np.isfinite(y)]
        if len(y):
            tops.append(y[len(y) // 10:].max())
            bottoms.append(y.min())
    if tops:
        low, high = min(bottoms), max(tops)
        pad = 0.05 * max(high - low, 1e-9)
        ax.set_ylim(low - pad, high + pad)
        peak = max(c.y(c.steps, "loss")[np.isfinite(c.y(c.steps, "loss"))].max(initial=-np.inf)
                   for c in runs.values())
        if peak > high + pad:                   # say so: a cut axis must not pass for the data
            ax.text(0.02, 0.98, f"▲ axis cut: the first steps reach {peak:.4g}",
                    transform=ax.transAxes, ha="left", va="top", fontsize=7, color="0.3")


def _schedule_note(runs: dict[str, Curves]) -> str | None:
    """What the learning-rate panel shows, in words: the rate is set every step, and after
    warm-up holds for a schedule epoch of floor(N / B) steps while a data epoch runs
    ceil(N / B) (docs/model.md section 9). From the epoch records of the runs."""
    kinds = set()
    for c in runs.values():
        ends = [int(r["step"]) for r in c.epochs]
        spe = [r.get("lr_steps_per_epoch") for r in c.epochs]
        if len(ends) and isinstance(spe[-1], int):
            kinds.add((spe[-1], ends[0] if len(ends) == 1 else ends[-1] - ends[-2]))
    if len(kinds) != 1:
        return None
    schedule, epoch = kinds.pop()
    if schedule == epoch:
        return f"set every step; after warm-up one value per epoch ({epoch} steps)"
    return (f"set every step; after warm-up one value per {schedule} steps (floor(N/B));\n"
            f"an epoch runs {epoch} steps, so each change comes a step earlier")


# ------------------------------------------------------------------ active units

def active_units_figure(kl_channels: np.ndarray, threshold: float) -> Figure:
    """Heat map of the KL of every latent channel (rows: layers, 0 = top; log colour scale),
    the active channels (KL above `threshold`) ringed, and their count per layer on the right."""
    layers, channels = kl_channels.shape
    fig = _figure(max(5.0, 2.5 + channels * 0.28), max(3.0, 1.4 + layers * 0.3))
    ax = fig.add_subplot()
    shown = np.log10(np.maximum(kl_channels, 1e-6))
    image = ax.imshow(shown, cmap=colormaps["viridis"], aspect="auto", interpolation="nearest")
    rows, cols = np.nonzero(kl_channels > threshold)
    ax.scatter(cols, rows, s=30, facecolors="none", edgecolors="white", linewidths=0.8)
    ax.set_xlabel("latent channel")
    ax.set_ylabel("stochastic layer (0 = top)")
    ax.set_yticks(range(layers), [f"{l}  ({n} active)" for l, n in enumerate((kl_channels > threshold).sum(1))],
                  fontsize=7)
    if channels <= 32:
        ax.set_xticks(range(channels))
    ax.set_title(f"KL per latent channel\n{int((kl_channels > threshold).sum())} of {kl_channels.size} "
                 f"active (KL > {threshold:g} nats, ringed)", fontsize=10)
    fig.colorbar(image, ax=ax, label="log10 KL  [nats per image]")
    return fig
