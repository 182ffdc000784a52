"""`dataset: folder` with the user's own images, through `avi data` and `avi train`: JPEG, PNG
and WebP files of other sizes, grey and colour, one 16-bit, in class sub-folders without a
split; decoded once into a cache that follows the files; bad files named."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import builders.data.folder as folder_mod
from builders.data.datasets import DatasetError
from builders.data.folder import Options, load_folder
from cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def make_photos(root: Path) -> int:
    """Two class folders of 12 images of other sizes: grey PNG, colour JPEG, colour WebP, and a
    16-bit grey PNG among the cats. Returns the number of files (25: 23 train, so the last
    batch of 8 has an odd size, and 2 test)."""
    rng = np.random.default_rng(0)
    n = 0
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            h, w = (int(v) for v in rng.integers(20, 64, 2))
            kind = i % 3
            if kind == 0:
                Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(root / cls / f"{i}.png")
            else:
                rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                rgb.save(root / cls / (f"{i}.jpg" if kind == 1 else f"{i}.webp"), quality=90)
            n += 1
    Image.fromarray(rng.integers(0, 65536, (40, 30), dtype=np.uint16)).save(root / "cats" / "deep16.png")
    return n + 1


def write_spec(path: Path, root: Path) -> Path:
    path.write_text(f"""extends: {REPO / 'specs' / 'quickstart.yaml'}
name: photos
data: {{dataset: folder, root: {root}, image: {{channels: 1, size: 28}}}}
hierarchy: {{layers: 2, latent: {{channels: 4, size: 8}}}}
cells:
  preprocess: {{filters: 8}}
  decoder: {{filters: 8}}
train: {{batch_size: 8, epochs: 2, log_every: 1}}
""")
    return path


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    n = make_photos(root)
    return root, n, write_spec(tmp_path / "photos.yaml", root)


def _count_decodes(monkeypatch) -> list:
    calls = []
    real = folder_mod.decode
    monkeypatch.setattr(folder_mod, "decode", lambda p, o: (calls.append(p), real(p, o))[1])
    return calls


def test_mixed_photos_train_decoded_once_then_from_the_cache(photos, tmp_path, monkeypatch):
    root, n, spec = photos
    calls = _count_decodes(monkeypatch)
    d = runner.invoke(app, ["data", str(spec), "--out", str(tmp_path / "grid.png"), "--json"])
    assert d.exit_code == 0, d.output
    info = json.loads(d.stdout)
    train, test = info["splits"]["train"], info["splits"]["test"]
    assert train["images"] + test["images"] == n and test["images"] == 2      # 10% of each class
    assert train["shape"] == [1, 28, 28] and train["dtype"] == "uint8" and train["max"] <= 255
    assert Image.open(tmp_path / "grid.png").size[0] > 32
    assert len(calls) == n and "decoded" in d.stderr
    calls.clear()
    # Two epochs of training: every file was decoded once already; the cache serves both splits.
    t = runner.invoke(app, ["train", str(spec), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert t.exit_code == 0, t.output
    assert calls == [] and t.stderr.count("from the cache") == 2
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["epoch"] for r in steps) == 1 and all(np.isfinite(r.get("loss", 0)) for r in steps)
    # A changed file (another size, a new modification time) makes a new cache of its split.
    changed = root / "dogs" / "0.png"
    Image.fromarray(np.zeros((50, 70), np.uint8), "L").save(changed)
    os.utime(changed, ns=(1, 1))
    caches = sorted((root / ".avi_cache").glob("*.npy"))
    notes = []
    from avi_spec import load_spec
    opts = Options.of(load_spec(spec).spec.data)
    split = "train" if changed in folder_mod.split_files(root, "train", opts) else "test"
    load_folder(root, split, opts, notes.append)
    assert calls and notes[0].startswith(f"{split}: decoded")
    assert len(sorted((root / ".avi_cache").glob("*.npy"))) == len(caches)   # the stale one is gone


def test_sixteen_bit_grey_and_colour_conversion_values(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    levels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(levels).save(tmp_path / "train" / "a.png")                 # 16-bit grey
    Image.fromarray(np.full((8, 8, 3), (255, 0, 0), np.uint8)).save(tmp_path / "test" / "red.png")
    opts = Options(size=8, channels=1, fit="exact", convert=True)
    a = load_folder(tmp_path, "train", opts)
    np.testing.assert_array_equal(a[0, 0], (levels.astype(np.int64) * 255 + 32767) // 65535)
    assert load_folder(tmp_path, "test", opts)[0, 0, 0, 0] == 76               # ITU-R 601 luma of red
    rgb = load_folder(tmp_path, "train", Options(size=8, channels=3, fit="exact", convert=True))
    assert rgb.shape == (1, 3, 8, 8) and (rgb[0, 0] == rgb[0, 2]).all()
    with pytest.raises(DatasetError, match=r"red\.png: 3 channel.*data\.folder\.convert"):
        load_folder(tmp_path, "test", Options(size=8, channels=1, fit="exact", convert=False))
    with pytest.raises(DatasetError, match=r"a\.png: 8x8 pixels.*data\.folder\.fit: center_crop"):
        load_folder(tmp_path, "train", Options(size=4, channels=1, fit="exact"))
    crop = load_folder(tmp_path, "train", Options(size=4, channels=1, fit="center_crop"))
    assert crop.shape == (1, 1, 4, 4)


def test_bad_files_are_named_with_the_reason_and_nothing_trains(photos, tmp_path):
    root, _, spec = photos
    good = (root / "cats" / "1.jpg").read_bytes()
    (root / "cats" / "broken.jpg").write_bytes(good[: len(good) // 3])
    (root / "dogs" / "notes.png").write_text("not an image")
    d = runner.invoke(app, ["data", str(spec)])
    assert d.exit_code == 2 and "Traceback" not in d.output
    assert "notes.png: not a readable image" in d.stderr and "cannot be used" in d.stderr
    assert "broken.jpg" in d.stderr
    t = runner.invoke(app, ["train", str(spec), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert t.exit_code == 2 and "notes.png" in t.stderr and not (tmp_path / "run").exists()
