"""Figures (builders.evaluation.figures, `avi plot curves`) and image grids (builders.evaluation.images): the files
open in Pillow at the size the figure claims, are not blank, carry their titles and labels
as SVG text, and bad output paths or metrics are a user's error (exit 2)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from builders.evaluation.figures import (DPI, NOT_A_SOURCE, Curves, attention_figure, curves_figure,
                              kl_figure, save_figure)
from builders.evaluation.images import grid, save_grid
from cli.main import app

runner = CliRunner()


def _open_png(path: Path, fig=None) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        if fig is not None:                   # the size the figure claims, in pixels
            w, h = fig.get_size_inches() * DPI
            assert image.size == (round(w), round(h))
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20          # not blank
    return pixels


def _svg_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    return text


def test_kl_figure_puts_runs_side_by_side(tmp_path):
    kl = {"attentive": np.array([12.0, 5.5, 3.25, 0.5]), "baseline": np.array([10.0, 4.0, 1.0])}
    fig = kl_figure(kl)
    _open_png(save_figure(fig, tmp_path / "kl.png"), fig)
    svg = _svg_text(save_figure(fig, tmp_path / "kl.svg"))
    for text in ("KL divergence per stochastic layer", "nats per image", "stochastic layer",
                 "attentive", "baseline", "12.0", "3.2"):
        assert text in svg, text
    bars = [p for p in fig.axes[0].patches]
    assert len(bars) == 8                                     # 4 layers x 2 runs (one NaN)
    assert max(b.get_height() for b in bars) == 12.0


def test_attention_figure_titles_panels_and_explains_grey(tmp_path):
    nan = math.nan
    gen = np.array([[nan, nan, nan, nan], [1.0, nan, nan, nan], [0.3, 0.7, nan, nan]])
    inf = np.array([[nan, 0.2, 0.3, 0.5], [nan, nan, 0.4, 0.6], [nan, nan, nan, 1.0]])
    fig = attention_figure(gen, inf)
    pixels = _open_png(save_figure(fig, tmp_path / "attention.png"), fig)
    grey = round(float(NOT_A_SOURCE) * 255)
    assert (np.abs(pixels.astype(int) - grey) <= 1).all(-1).sum() > 500     # the NaN cells
    svg = _svg_text(save_figure(fig, tmp_path / "attention.svg"))
    for text in ("Prior (generative path)", "Posterior (inference path)", "source layer m",
                 "target layer l", "mean attention score", "not a source of layer l", "pre", "0.70"):
        assert text in svg, text
    prior, posterior = fig.axes[0].images[0], fig.axes[1].images[0]
    assert prior.get_array().shape == (3, 3)                  # the prior has no "pre" column
    assert posterior.get_array().shape == (3, 4)
    assert save_figure(fig, tmp_path / "attention.pdf").read_bytes().startswith(b"%PDF")


def _metrics(run: Path, steps_per_epoch: int, epochs: int, lr: float, start_loss: float) -> Path:
    run.mkdir()
    lines = []
    for e in range(epochs):
        for s in range(e * steps_per_epoch + 5, (e + 1) * steps_per_epoch + 1, 5):
            lines.append({"step": s, "epoch": e, "lr": lr * min(1.0, s / 20), "beta": 1.0,
                          "loss": start_loss / math.sqrt(s), "nll": 1.0, "kl": 1.0})
        lines.append({"step": (e + 1) * steps_per_epoch, "epoch": e, "train_loss": 100.0 - e,
                      "test_nelbo": 110.0 - 2 * e, "skipped": 0,
                      "lr_steps_per_epoch": steps_per_epoch - 1})
    lines[1]["loss"] = math.inf                              # json writes Infinity; read as a gap
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return run


def test_curves_epoch_axis_counts_finished_epochs(tmp_path):
    from builders.evaluation.figures import read_metrics
    c = Curves(read_metrics(_metrics(tmp_path / "a", 10, 2, 1e-3, 400.0) / "metrics.jsonl"))
    assert c.x(c.epochs, "epoch").tolist() == [1.0, 2.0]
    assert c.x([{"step": 5}, {"step": 15}, {"step": 25}], "epoch").tolist() == [0.5, 1.5, 2.5]
    assert c.x(c.steps, "step")[0] == 5.0
    with pytest.raises(ValueError, match="no epoch has finished"):
        Curves([{"step": 5, "loss": 1.0, "lr": 1e-3}]).x([{"step": 5}], "epoch")


def test_avi_plot_curves_overlays_runs(tmp_path):
    a = _metrics(tmp_path / "attentive", 20, 3, 1e-3, 500.0)
    b = _metrics(tmp_path / "baseline", 20, 2, 2e-3, 700.0)
    svg = tmp_path / "curves.svg"
    r = runner.invoke(app, ["plot", "curves", str(a), str(b / "metrics.jsonl"), "--x", "epoch",
                            "--out", str(svg)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(svg)
    text = _svg_text(svg)
    for label in ("Training loss", "Test NELBO", "Learning rate", "epoch", "nats per image",
                  "attentive", "baseline"):
        assert label in text, label
    assert "KL weight" in text                  # issue 23 item 10: beta is shown
    assert "axis cut" not in text               # the baseline's first loss is in range
    one = tmp_path / "one.svg"
    assert runner.invoke(app, ["plot", "curves", str(a), "--out", str(one)]).exit_code == 0
    words = _svg_text(one)                      # one <text> per line of a note
    assert "per 19 steps (floor(N/B));" in words and "an epoch runs 20 steps" in words
    assert "axis cut: the first steps reach 223.6" in words
    r = runner.invoke(app, ["plot", "curves", str(a)])
    assert r.exit_code == 0, r.output
    fig = curves_figure({"attentive": Curves([json.loads(l) for l in
                                              (a / "metrics.jsonl").read_text().splitlines()])})
    _open_png(a / "plots" / "curves.png", fig)


def test_avi_plot_bad_input_exits_2(tmp_path):
    a = _metrics(tmp_path / "run", 10, 1, 1e-3, 400.0)
    cases = {
        ("plot", "curves", str(a), "--out", str(tmp_path / "c.gif")): "extension must be",
        ("plot", "curves", str(tmp_path / "missing")): "not found",
        ("plot", "kl", str(a), "--out", str(tmp_path / "kl.bmp")): "extension must be",
        ("sample", str(a), "--out", str(tmp_path / "s.xyz")): "cannot write images as .xyz",
        ("reconstruct", str(a), "--out", str(tmp_path / "r")): "cannot write images as a file",
    }
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2, "lo\n')
    cases[("plot", "curves", str(tmp_path / "bad"))] = "line 2 is not a JSON record"
    for args, message in cases.items():
        r = runner.invoke(app, list(args))
        assert r.exit_code == 2 and message in r.stderr, (args, r.output)
    assert not (tmp_path / "c.gif").exists()


def test_grids_are_written_with_pillow_and_read_back_exactly(tmp_path):
    images = np.stack([np.full((1, 3, 2), v) for v in (0.0, 0.5, 1.0)])          # [3, 1, 3, 2]
    path = save_grid(tmp_path / "g.png", images, columns=2)
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (2 + 2 * 4, 2 + 2 * 5)
        pixels = np.asarray(image)
    assert np.array_equal(pixels, grid(images, columns=2))
    assert pixels[2, 2] == 0 and pixels[2, 6] == 128 and pixels[7, 2] == 255
    rgb = save_grid(tmp_path / "rgb.png", np.random.default_rng(0).random((4, 3, 5, 5)))
    with Image.open(rgb) as image:
        assert image.mode == "RGB" and image.size == (2 + 2 * 7, 2 + 2 * 7)
    with pytest.raises(ValueError, match="cannot write images as .xyz"):
        save_grid(tmp_path / "g.xyz", images)


def test_grid_of_a_diverged_models_samples_has_no_cast_warning():
    """NaN and inf pixels (samples of a model whose weights blew up) are drawn black / white,
    without numpy's 'invalid value encountered in cast' on stderr."""
    import warnings
    a = np.full((2, 1, 2, 2), 0.5, dtype=np.float32)
    a[0, 0, 0, 0], a[1, 0, 1, 1] = np.nan, np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = grid(a, columns=2, pad=0)
    assert g[0, 0] == 0 and g[1, 3] == 255 and g[0, 1] == 128
