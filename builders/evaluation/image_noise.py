"""Per-image noise of importance sampling: the draws of an image depend on (seed, image index)
alone, not on the batch it is in, the chunk size or the process that scores it.

Image i owns a torch.Generator seeded with ``image_seeds(seed, [i])`` (a 64-bit mix of the two
numbers, computed for a whole batch at once in numpy). Its K samples are drawn from it in order,
one ``torch.randn`` call per sample that fills the noise of every layer and pixel of that
sample; so sample j of image i is the j-th draw of i's generator whatever the chunking. A pass
over ``b`` images and ``c`` samples makes ``b * c`` such calls (vectorised over layers and
pixels; a few microseconds each, next to a top-down pass of the whole network per row), then
one split per layer into the [b * c, Z, S, S] tensors ``log_weights(x, k, noise)`` takes, in
its image-major row order.

Sharded evaluation (builders.evaluation.sharded) relies on this: a process scoring images
100..199 draws for image 150 exactly what one process scoring all images draws for it.
"""
from __future__ import annotations

import numpy as np
import torch

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(v: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014), elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        v = (v + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        v = ((v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        v = ((v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return v ^ (v >> np.uint64(31))


def image_seeds(seed: int, indices) -> np.ndarray:
    """The generator seed of every image index (int64 >= 0, as torch.Generator.manual_seed takes):
    splitmix64(splitmix64(seed) + index), so that neighbouring seeds and indices share nothing."""
    base = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    with np.errstate(over="ignore"):
        mixed = _splitmix64(base + np.asarray(indices, dtype=np.int64).astype(np.uint64))
    return (mixed >> np.uint64(1)).astype(np.int64)


def image_generators(seed: int, indices, device: torch.device) -> list[torch.Generator]:
    """One generator per image, on the device the noise is drawn on."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in image_seeds(seed, indices)]


def draw_noise(generators: list[torch.Generator], shapes: list[tuple[int, ...]], samples: int,
               device: torch.device, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The next ``samples`` draws of every image's generator, as one tensor per layer
    [len(generators) * samples, *shape] (rows image-major)."""
    sizes = [int(np.prod(s)) for s in shapes]
    total = sum(sizes)
    rows = [torch.randn(total, generator=g, device=device, dtype=dtype)
            for g in generators for _ in range(samples)]
    flat = torch.stack(rows)                                    # [b * samples, total]
    return [part.reshape(-1, *shape) for part, shape in zip(flat.split(sizes, dim=1), shapes)]
