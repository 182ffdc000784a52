"""Turn raw image batches into model input (docs/model.md section 2).

One path for both kinds of data (``prepare_batch``), driven by the spec: images are zero-padded
by ``data.pad`` pixels per side (28 -> 32 for the binary datasets with pad 2), then
binary data (MNIST, OMNIGLOT): grey level p in [0, 1] dynamically binarised b ~ Bernoulli(p)
  for every training batch, fed as 2b - 1. The test split is binarised once with a fixed seed
  (``BinarizedTestSet``) so that evaluations are comparable.
8-bit data (CIFAR-10): uint8 -> x / 127.5 - 1, with the spec's random flips when training.
The data dimension D of bits/dim is ``likelihood_dims`` (training and evaluation share it).

All randomness goes through an explicit ``torch.Generator`` so that runs (and resumed runs) are
reproducible. Draws are made on the generator's device and moved to the data's device, which
keeps the random stream identical whether the batch lives on the CPU or a GPU.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

def _tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    a = np.asarray(images)
    # A read-only memory map (the folder cache) is copied: torch tensors assume writable memory.
    return torch.as_tensor(a if a.flags.writeable else np.array(a))


def to_unit(images) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1]; floating input is returned as float32 unchanged."""
    x = _tensor(images)
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    return x.to(torch.float32)


def pad_images(images: torch.Tensor, amount: int) -> torch.Tensor:
    """Zero-pad ``amount`` pixels on every side of the last two (H, W) dimensions."""
    return F.pad(images, (amount, amount, amount, amount), value=0) if amount else images


def data_kind(spec) -> str:
    """"binary" for a Bernoulli likelihood, "cifar" for 8-bit images (the prepare_batch kinds)."""
    from avi_spec.schema import Bernoulli
    return "binary" if isinstance(spec.data.distribution, Bernoulli) else "cifar"


def likelihood_dims(spec) -> int:
    """D, the number of values the likelihood scores: C * side^2 with side the padded image
    less the Bernoulli crop (image.size when crop == pad; the mixture scores the whole image,
    which validation keeps unpadded). Bits/dim = nats / (D ln 2) in training and evaluation."""
    d = spec.data
    side = d.image.size + 2 * d.pad - 2 * getattr(d.distribution, "crop", 0)
    return d.image.channels * side ** 2


def binarize(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli(p) draw per pixel, as float in {0, 1}."""
    draw = torch.bernoulli(p.to(device=generator.device, dtype=torch.float32), generator=generator)
    return draw.to(p.device)


def model_input_binary(b: torch.Tensor) -> torch.Tensor:
    """Binary pixels {0, 1} -> encoder input {-1, 1} (padding zeros enter as -1)."""
    return 2.0 * b.to(torch.float32) - 1.0


def model_input_cifar(x) -> torch.Tensor:
    """uint8 0..255 -> [-1, 1]; the same values are the likelihood target."""
    return _tensor(x).to(torch.float32) / 127.5 - 1.0


def random_flip(x: torch.Tensor, generator: torch.Generator,
                horizontal: bool = True, vertical: bool = True) -> torch.Tensor:
    """Flip each image of ``x`` [B, C, H, W] left-right and/or up-down with probability 1/2.

    Both coins are drawn even when a switch is off, so turning one direction off does not
    shift the random stream of the other.
    """
    coins = torch.rand(2, x.shape[0], generator=generator, device=generator.device) < 0.5
    coins = coins.to(x.device)[:, :, None, None, None]
    if horizontal:
        x = torch.where(coins[0], x.flip(-1), x)
    if vertical:
        x = torch.where(coins[1], x.flip(-2), x)
    return x


class BinarizedTestSet:
    """A test split padded by ``pad`` pixels per side and binarised once with a fixed seed.

    Two constructions with the same images, pad and seed hold identical bits, so test ELBOs of
    different runs and evaluations are computed on the same binary images.
    """

    def __init__(self, images, seed: int = 0, pad: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.bits = binarize(pad_images(to_unit(images), pad), gen).to(torch.bool)  # [N, C, S, S]

    def __len__(self) -> int:
        return self.bits.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        """Model input (2b - 1) of the selected images."""
        return model_input_binary(self.bits[index])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Model-input batches in order (the last one may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield self[start:start + batch_size]


class EpochBatches:
    """Deterministic shuffled global batches of one epoch.

    The permutation of epoch ``epoch`` comes from a generator seeded with ``seed + epoch``, so
    (seed, epoch, batch index) fixes the data of every step: a resumed run passes
    ``start_batch`` to continue exactly where it stopped. Global batch k holds
    ``perm[k*batch_size:(k+1)*batch_size]``; with ``drop_last=False`` the last one may be short
    (data-parallel training drops it: it might not split evenly). Iterating yields raw image
    batches (torch tensors, dtype as stored). Every process of a data-parallel run reads the
    whole global batch, draws the step's random numbers for all of it and keeps its share
    (process_share; builders.train.train_loop.Trainer._inputs).
    """

    def __init__(self, images, batch_size: int, seed: int, epoch: int, drop_last: bool = False,
                 start_batch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be positive")
        self.images, self.batch_size, self.start_batch = images, batch_size, start_batch
        n = len(images)
        gen = torch.Generator().manual_seed(seed + epoch)
        self.permutation = torch.randperm(n, generator=gen)
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.num_batches}")

    def __len__(self) -> int:
        """Batches still to be yielded (from ``start_batch`` to the end of the epoch)."""
        return self.num_batches - self.start_batch

    def indices(self, batch: int) -> torch.Tensor:
        """Dataset indices of global batch ``batch``."""
        return self.permutation[batch * self.batch_size:(batch + 1) * self.batch_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in range(self.start_batch, self.num_batches):
            idx = self.indices(batch)
            if isinstance(self.images, torch.Tensor):
                yield self.images[idx]
            else:
                yield torch.as_tensor(np.asarray(self.images)[idx.numpy()])


def process_share(n: int, rank: int, world_size: int) -> slice:
    """The rows of an n-image global batch that process ``rank`` of ``world_size`` trains on:
    the rank-th of world_size equal, contiguous shares."""
    if n % world_size or not 0 <= rank < world_size:
        raise ValueError(f"a batch of {n} cannot be shared by process {rank} of {world_size} "
                         f"in equal parts")
    size = n // world_size
    return slice(rank * size, (rank + 1) * size)


def prepare_batch(raw, dataset_kind: str, generator: torch.Generator | None, train: bool,
                  flips=None, pad: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Raw batch [B, C, H, W] -> model input float32 [B, C, H + 2 pad, W + 2 pad] in [-1, 1].

    Padding pixels are 0 before the mapping, so they enter the encoder as -1.
    binary: pad, then binarise with ``generator`` (a fresh draw per call: dynamic
      binarisation). A bool batch is already binary and is only padded and mapped (the bits of
      ``BinarizedTestSet`` are padded already: pass pad=0). For evaluation prefer
      ``BinarizedTestSet``; with ``train=False`` a non-bool batch is binarised with the
      generator the caller passes.
    cifar: uint8, padded, then x / 127.5 - 1.
    flips: the spec's ``data.flips`` (anything with ``horizontal`` and ``vertical``) or None;
      applied per image with ``generator`` only when ``train``.
    """
    x = _tensor(raw)
    if device is not None:
        x = x.to(device)
    if dataset_kind == "binary":
        if x.dtype == torch.bool:
            out = model_input_binary(pad_images(x.to(torch.float32), pad))
        elif generator is None:
            raise ValueError("binary datasets need a generator to binarise the batch")
        else:
            out = model_input_binary(binarize(pad_images(to_unit(x), pad), generator))
    elif dataset_kind == "cifar":
        if x.dtype != torch.uint8:
            raise ValueError(f"cifar batches must be uint8 0..255, got {x.dtype}")
        out = model_input_cifar(pad_images(x, pad))
    else:
        raise ValueError(f"dataset_kind must be 'binary' or 'cifar', got {dataset_kind!r}")
    if train and flips is not None:
        if generator is None:
            raise ValueError("random flips need a generator")
        out = random_flip(out, generator, flips.horizontal, flips.vertical)
    return out
