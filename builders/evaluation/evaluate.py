"""Evaluation of a trained model: marginal likelihood by importance sampling, the ELBO,
per-layer KL and depth-wise attention maps (docs/model.md section 10).

Marginal likelihood. For each image, K posterior samples give the importance log-weights
w_k = log p(x|z^k) + log p(z^k) - log q(z^k|x) (``model.log_weights``) and

    log p(x) ~ logsumexp_k w_k - log K        (the IWAE bound; tighter as K grows)
    ELBO     ~ mean_k w_k                      (an unbiased estimate, from the same samples)

The K samples of an image batch are drawn in chunks of ``chunk`` samples per image, each
chunk folded into the batch dimension of one top-down pass; the per-chunk logsumexps are
combined with one more logsumexp, which equals a single logsumexp over all K.

Reproducibility. With ``seed`` every image draws its samples from its own generator, seeded
from (seed, the image's index in the split) (builders.evaluation.image_noise): the estimate of an
image depends on the seed and that image alone, not on the batch size, the chunk size or how
the images are sharded across processes (builders.evaluation.sharded); the same seed gives
bit-identical results for the same batches. This needs the model's noise interface
(``noise_shapes()`` and ``log_weights(x, k, noise)``, which the attentive VAE has); a model
without it draws from the global RNG, reseeded before every batch (mixed with the batch index).

Nothing here parses command lines; ``cli/eval.py``, ``cli/sample.py`` and ``cli/plot.py``
call these functions.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .image_noise import draw_noise, image_generators

CPU_BUDGET_BYTES = 1 << 30        # activations of one chunk on the CPU (conservative: 1 GiB)
CUDA_FREE_FRACTION = 0.5          # of the free GPU memory a chunk may use


# ------------------------------------------------------------------ device helpers

def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def batch_seed(seed: int, index: int) -> int:
    """The seed of image batch ``index``: (seed, index) mixed by numpy's SeedSequence, so that
    neighbouring seeds do not share the noise of shifted batches."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1, np.uint64)[0] >> 1)


def _reseed(seed: int, index: int, device: torch.device) -> None:
    s = batch_seed(seed, index)
    torch.manual_seed(s)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(s)


# ------------------------------------------------------------------ chunk size

def _activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every module output of one importance sample of one image: an upper bound
    of the peak activation memory per batch row (under no_grad most are freed early)."""
    total = 0

    def count(_m, _inp, out):
        nonlocal total
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        model.log_weights(x[:1], 1)
    finally:
        for h in hooks:
            h.remove()
    return total


def auto_chunk(model: nn.Module, x: torch.Tensor, k: int, budget_bytes: int | None = None) -> int:
    """Importance samples per image per top-down pass that fit the memory at hand.

    CUDA: a probe pass measures the peak memory of a few rows; the chunk may use
    CUDA_FREE_FRACTION of the free memory (torch.cuda.mem_get_info plus the allocator's
    cached, unused blocks). CPU: a fixed budget (CPU_BUDGET_BYTES) over the summed module
    outputs of one row. Always between 1 and k.
    """
    b = max(1, x.shape[0])
    dev = x.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        free, _ = torch.cuda.mem_get_info(dev)
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        budget = budget_bytes or int(CUDA_FREE_FRACTION * free)
        rows = min(k, 4)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        model.log_weights(x[:1], rows)
        torch.cuda.synchronize(dev)
        per_row = (torch.cuda.max_memory_allocated(dev) - base) / rows
    else:
        budget = budget_bytes or CPU_BUDGET_BYTES
        per_row = _activation_bytes(model, x)
    per_row = max(per_row, x[0].numel() * 4 * 8)   # never trust a probe below a few images
    return int(min(k, max(1, budget // (per_row * b))))


# ------------------------------------------------------------------ estimator

@torch.no_grad()
def importance_sampled_nll(model: nn.Module, batches: Iterable[torch.Tensor], k: int,
                           chunk: int | None = None,
                           progress: Callable[[int], None] | None = None, *,
                           dims: int | None = None, seed: int | None = None,
                           indices=None) -> dict:
    """Importance-sampled negative log-likelihood (and negative ELBO) over ``batches``.

    model: anything with ``log_weights(x, k) -> [B, k]`` (the attentive VAE, or a test model);
      put in eval mode for the call (and restored after).
    batches: model-input tensors [B, ...]; moved to the model's device.
    k: importance samples per image. chunk: samples per image per pass (None: auto_chunk).
    progress: called with the number of images of each finished batch.
    dims: data dimensions D for bits/dim (0: no bits/dim); None infers it from ``model.spec``
      (``data_dims``: 8-bit data only, binary data is reported in nats).
    seed: draw image i's samples from a generator seeded from (seed, i) (the module docstring).
    indices: the index of every image in batch order (default 0, 1, 2, ...): a shard of the
      images passes their indices in the split, so that each draws what it draws unsharded.

    Returns a dict: importance_samples, examples, chunk, nll_nats (mean -log p(x)),
    nll_stderr_nats, nelbo_nats, nelbo_stderr_nats, bits_per_dim, bits_per_dim_stderr
    (None for binary data), seconds, images_per_s, and per_example: {"nll_nats",
    "nelbo_nats"}, float64 arrays [N] in the order of the images (what paired comparisons of
    two models on the same images need; builders.evaluation.per_example keeps them).
    """
    if k < 1:
        raise ValueError(f"importance samples must be >= 1, got {k}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if dims is None:
        dims = data_dims(model)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    log_px, elbo = [], []
    used_chunk = chunk
    start = time.perf_counter()
    per_image_noise = seed is not None and hasattr(model, "noise_shapes")
    seen = 0
    try:
        for i, x in enumerate(batches):
            x = x.to(device)
            b = x.shape[0]
            if used_chunk is None:
                used_chunk = auto_chunk(model, x, k)       # before reseeding: the probe draws
            generators = None
            if per_image_noise:
                index = np.arange(seen, seen + b) if indices is None else np.asarray(indices)[seen:seen + b]
                if len(index) != b:
                    raise ValueError(f"{len(indices)} indices for more images")
                generators = image_generators(seed, index, device)
            elif seed is not None:
                _reseed(seed, i, device)
            seen += b
            lp, lb = _per_image(model, x, k, used_chunk, generators)
            log_px.append(lp)
            elbo.append(lb)
            if progress is not None:
                progress(b)
    finally:
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if not log_px:
        raise ValueError("no images to evaluate")
    summary = _summary(-torch.cat(log_px).numpy(), -torch.cat(elbo).numpy(), dims, seconds)
    return {"importance_samples": int(k), "examples": summary.pop("examples"),
            "chunk": int(used_chunk or k), **summary}


def _per_image(model: nn.Module, x: torch.Tensor, k: int, chunk: int,
               generators: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x) (streaming logsumexp over chunks of the k log-weights, minus log k) and the
    ELBO (their mean) of every image of batch x, float64 on the CPU. ``generators``: one per
    image, the samples' noise is drawn from them (else from the global RNG)."""
    parts, total = [], torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for s in range(0, k, chunk):
        c = min(chunk, k - s)
        if generators is None:
            w = model.log_weights(x, c).double()                    # [b, chunk]
        else:
            noise = draw_noise(generators, model.noise_shapes(), c, x.device)
            w = model.log_weights(x, c, noise).double()
        parts.append(torch.logsumexp(w, dim=1))
        total += w.sum(1)
    return (torch.logsumexp(torch.stack(parts, 1), dim=1) - math.log(k)).cpu(), (total / k).cpu()


def _summary(nll: np.ndarray, nelbo: np.ndarray, dims: int, seconds: float) -> dict:
    n = nll.shape[0]
    nll_mean, nll_se = _mean_stderr(nll)
    nelbo_mean, nelbo_se = _mean_stderr(nelbo)
    bpd = bpd_se = None
    if dims:
        bpd = nll_mean / (dims * math.log(2))
        bpd_se = None if nll_se is None else nll_se / (dims * math.log(2))
    return {
        "examples": int(n),
        "nll_nats": nll_mean,
        "nll_stderr_nats": nll_se,
        "nelbo_nats": nelbo_mean,
        "nelbo_stderr_nats": nelbo_se,
        "bits_per_dim": bpd,
        "bits_per_dim_stderr": bpd_se,
        "dims": int(dims) if dims else None,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else None,
        "per_example": {"nll_nats": nll, "nelbo_nats": nelbo},
    }


def _mean_stderr(values: np.ndarray) -> tuple[float, float | None]:
    mean = float(np.mean(values))
    if values.shape[0] < 2:
        return mean, None
    return mean, float(np.std(values, ddof=1) / math.sqrt(values.shape[0]))


def data_dims(model: nn.Module) -> int | None:
    """D of bits/dim (preprocess.likelihood_dims, as training uses) for 8-bit data; None for
    binary data (reported in nats) or a model without a spec."""
    from ..data.preprocess import data_kind, likelihood_dims
    spec = getattr(model, "spec", None)
    if spec is None or data_kind(spec) == "binary":
        return None
    return likelihood_dims(spec)


# ------------------------------------------------------------------ KL and attention

@torch.no_grad()
def kl_per_layer(model: nn.Module, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """Mean KL(q(z_l|x, z_<l) || p(z_l|z_<l)) per layer [L] (nats) over the images, one
    posterior sample each."""
    return mean_per_image(model, batches, lambda m, x: m(x).kl.double().sum(0))


@torch.no_grad()
def mean_per_image(model: nn.Module, batches: Iterable[torch.Tensor],
                   batch_sum: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> np.ndarray:
    """The mean over all images of what ``batch_sum(model, x)`` sums over a batch's images,
    the model in eval mode (put back as it was), in float64 on the CPU."""
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total, n = None, 0
    try:
        for x in batches:
            step = batch_sum(model, x.to(device)).double().cpu()
            total = step if total is None else total + step
            n += x.shape[0]
    finally:
        model.train(was_training)
    if not n:
        raise ValueError("no images to evaluate")
    return (total / n).numpy()


@torch.no_grad()
def attention_maps(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, np.ndarray]:
    """Per attention path ("generative": the priors, "inference": the posteriors) an
    L x (L+1) matrix: entry [l, m] is the mean attention score layer l gives source m
    (the context of layer m for the prior; the bottom-up features e_m for the posterior,
    m = L being the preprocessing output), averaged over pixels and images. NaN where m is
    not a source of l (every entry NaN for a path that is switched off)."""
    device = _model_device(model)
    L = len(model.layers)
    sums = {p: np.zeros((L, L + 1)) for p in ("generative", "inference")}
    counts = {p: np.zeros((L, L + 1)) for p in ("generative", "inference")}
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            att = model(x.to(device), record_attention=True).attention
            for path, attr in (("generative", "gen_sources"), ("inference", "inf_sources")):
                for l, scores in att.get(path, {}).items():
                    sources = getattr(model.layers[l], attr)
                    per_source = scores.double().sum(dim=(0, 2, 3)).cpu().numpy()   # [n]
                    pixels = scores.shape[0] * scores.shape[2] * scores.shape[3]
                    for i, m in enumerate(sources):
                        sums[path][l, m] += per_source[i]
                        counts[path][l, m] += pixels
    finally:
        model.train(was_training)
    return {p: np.where(counts[p] > 0, sums[p] / np.maximum(counts[p], 1), np.nan) for p in sums}


# ------------------------------------------------------------------ data

def eval_images(spec, split: str = "test", limit: int | None = None, seed: int = 0):
    """The evaluation images of a spec's dataset as model input [N, C, S, S] (CPU, float32),
    padded by data.pad as in training.

    Binary data: binarised once with a fixed ``seed`` (BinarizedTestSet; 0 =
    builders.train.training.TEST_BINARIZATION_SEED, so eval scores the bits training tested on).
    8-bit data: mapped to [-1, 1], no flips, as the trainer feeds it. ``limit`` keeps the
    first N images.
    Raises builders.data.datasets.DatasetError when the files are missing or of another shape.
    """
    from ..data.datasets import load_spec_images
    from ..data.preprocess import BinarizedTestSet, data_kind, prepare_batch
    images = load_spec_images(spec.data, split)
    if limit is not None:
        images = images[:limit]
    if data_kind(spec) == "binary":
        return BinarizedTestSet(images, seed, pad=spec.data.pad)[:]
    return prepare_batch(images, "cifar", None, train=False, pad=spec.data.pad)


def batched(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for s in range(0, images.shape[0], batch_size):
        yield images[s:s + batch_size]
