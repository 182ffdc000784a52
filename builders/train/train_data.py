"""The data of a training run: training images, the fixed test set, per-step preprocessing,
and the per-epoch test NELBO."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ..data.datasets import load_spec_images
from .distributed import Distributed
from ..evaluation.evaluate import importance_sampled_nll
from ..data.preprocess import BinarizedTestSet, _tensor, data_kind, likelihood_dims, prepare_batch
from .run_dir import TrainingError

TEST_BINARIZATION_SEED = 0
TEST_NOISE_SEED = 0                 # posterior noise of the per-epoch test NELBO


class TrainData:
    """Training images and the test set of a spec, with the per-step preprocessing.
    An empty split is a TrainingError (before anything is built or written)."""

    def __init__(self, spec, device: torch.device, report=None):
        d = spec.data
        self.kind, self.flips, self.pad = data_kind(spec), d.flips, d.pad
        self.device = device
        self.train = _tensor(load_spec_images(d, "train", report))
        test = load_spec_images(d, "test", report)
        for split, images in (("train", self.train), ("test", test)):
            if len(images) == 0:
                raise TrainingError(f"the {split} split of {d.dataset} (data.root: {d.root}) holds "
                                    f"no images; training needs both a train and a test split")
        if self.kind == "binary":
            self.test = BinarizedTestSet(test, seed=TEST_BINARIZATION_SEED, pad=self.pad)
            self.test_input = lambda idx: self.test[idx]
            self.n_test = len(self.test)
        else:
            self.test_raw = _tensor(test)
            self.test_input = lambda idx: prepare_batch(self.test_raw[idx], "cifar", None,
                                                        train=False, pad=self.pad)
            self.n_test = len(self.test_raw)
        self.dims = likelihood_dims(spec)          # D of bits/dim

    def prepare(self, raw: torch.Tensor, generator: torch.Generator, rows: slice = slice(None)
                ) -> torch.Tensor:
        """Raw batch -> model input of its ``rows`` on the training device. Random draws are
        made for the whole batch on the CPU generator, so the stream does not depend on the
        device nor an image's numbers on which rows are kept."""
        x = prepare_batch(raw, self.kind, generator, train=True, flips=self.flips, pad=self.pad)
        return x[rows].to(self.device, non_blocking=True)


def mean_test_nelbo(model: torch.nn.Module, data: TrainData, batch_size: int, dev: torch.device,
                    autocast: Callable, ddp: Distributed) -> float:
    """Mean single-sample NELBO (nats, beta = 1) over the test set: builders.evaluation.evaluate's
    estimator with K = 1 (model in eval mode, fixed noise seed). Under data parallelism every
    process scores its share and the sums are reduced; each image draws its noise from its own
    generator (seeded from its index), as it would in one process."""
    idx = torch.arange(ddp.rank, data.n_test, ddp.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=dev)
    if len(idx):
        batches = (data.test_input(idx[s:s + batch_size]) for s in range(0, len(idx), batch_size))
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), autocast():
            r = importance_sampled_nll(model, batches, 1, chunk=1, dims=0, seed=TEST_NOISE_SEED,
                                       indices=idx.numpy())
        total += torch.tensor([r["nelbo_nats"] * r["examples"], r["examples"]],
                              dtype=torch.float64, device=dev)
    if ddp.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp_min(1)).item()
