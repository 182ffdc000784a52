"""A tiny spec on a 48/16-image folder of mnist5k digits (2 layers, 8 filters, 3 steps per
epoch), shared by the tests of latents, sampling and training diagnostics."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from builders.data.datasets import load_images

REPO = Path(__file__).resolve().parents[1]
SPEC = """extends: {base}
name: tiny
data: {{dataset: folder, root: {root}}}
hierarchy: {{layers: 2, latent: {{channels: 4, size: 8}}}}
cells:
  preprocess: {{filters: 8}}
  decoder: {{filters: 8}}
train: {{batch_size: 16, epochs: 2, kl_warmup: {{epochs: 1, start: 0.1}}, log_every: 1, checkpoint_every: 2}}
"""


def make_tiny(root: Path) -> Path:
    """Data under root/data and the spec root/tiny.yaml; returns the spec's path."""
    for split, n in (("train", 48), ("test", 16)):
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        np.save(root / "data" / split / "images.npy", load_images("mnist5k", None, split)[:n, 0])
    spec = root / "tiny.yaml"
    spec.write_text(SPEC.format(base=REPO / "specs" / "quickstart.yaml", root=root / "data"))
    return spec


def train_tiny(root: Path, steps: int = 3) -> Path:
    """make_tiny, trained for ``steps`` steps in this process into root/run; returns the run."""
    from avi_spec import load_spec
    from builders.train.training import train
    spec = make_tiny(root)
    train(load_spec(spec), root / "run", device="cpu", max_steps=steps, progress_mode="quiet")
    return root / "run"
