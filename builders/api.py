"""The Python API: a trained model in two lines.

    import avi                                          # re-exports this module
    images = avi.load_run("runs/quickstart").sample(16)     # [16, C, H, W] floats in [0, 1]

    run = load_run("runs/quickstart")                   # latents (builders.latents)
    z = run.encode(x)                                   # x: model input, e.g. eval_images(run.spec)
    run.decode(z)                                       # images from the posterior means
    run.interpolate(x[0], x[1], steps=8, up_to_layer=3, temperature=0.7)

load_run takes what the `avi` commands take: a run directory of `avi train`, one of its .pt
checkpoints, or a .safetensors file of `avi export`.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .loading import load_trained
from .latents import Latents, encode, interpolation_latents, per_layer


class TrainedRun:
    """A trained model with its resolved spec. `model` is the torch module (eval mode),
    `spec` the validated avi_spec.Spec, `document` the resolved spec as a plain dict."""

    def __init__(self, model: torch.nn.Module, resolved, run_dir: Path | None):
        self.model, self.resolved, self.run_dir = model, resolved, run_dir
        self.spec, self.document = resolved.spec, resolved.document

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sample(self, n: int, temperature: float = 1.0, seed: int | None = None,
               mode: str = "mean") -> torch.Tensor:
        """n images from the prior, [n, C, H, W] in [0, 1] on the CPU. temperature scales every
        latent's noise; seed makes the draw reproducible; binary data: mode "mean" gives pixel
        probabilities, "sample" Bernoulli draws."""
        with _seeded(seed, self.device), torch.no_grad():
            return self.model.sample(n, temperature, mode).float().cpu()

    def readjust_bn(self, temperature: float = 1.0, passes: int = 100, batch_size: int = 64,
                    seed: int | None = None) -> int:
        """Re-estimate the batch-norm statistics of the sampling path on prior samples at
        `temperature` (NVAE's readjust_bn; builders.evaluation.readjust_bn), in this model
        only (no file changes). Returns the number of batch norms re-estimated."""
        from .evaluation.readjust_bn import readjust_batch_norm
        with _seeded(seed, self.device):
            return readjust_batch_norm(self.model, temperature, passes, batch_size)

    def reconstruct(self, images: torch.Tensor, seed: int | None = None,
                    mode: str = "mean", temperature: float = 1.0) -> torch.Tensor:
        """Model-input images ([N, C, H, W] in [-1, 1], as builders.evaluation.evaluate.eval_images gives
        them) through the posterior and back: [N, C, H', W'] in [0, 1] on the CPU. Every z_l is
        drawn at `temperature` (0: its posterior mean). ValueError names the expected shape
        when `images` have another (e.g. the unpadded output of `sample`)."""
        images = self._model_input(images, "reconstruct")
        with _seeded(seed, self.device), torch.no_grad():
            return self.model.reconstruct(images, mode, temperature).float().cpu()

    # ------------------------------------------------------------------ latents

    def encode(self, images: torch.Tensor, temperature: float = 1.0, seed: int | None = None) -> Latents:
        """Every layer's posterior for model-input images (as `reconstruct` takes them):
        Latents with mean and scale ([N, L, Z, S, S], along the path where every z_l is its
        posterior mean) and sample (one posterior draw at `temperature`, the draw
        `reconstruct` makes with the same seed). See builders.latents."""
        images = self._model_input(images, "encode")
        with _seeded(seed, self.device), torch.no_grad():
            return encode(self.model, images, temperature)

    def encode_file(self, path, temperature: float = 1.0, seed: int | None = None,
                    binarization_seed: int = 0) -> Latents:
        """encode for the images of a .npy, .npz or .png file (builders.data.image_files)."""
        from .data.image_files import model_input, read_image_file
        raw = read_image_file(path, self.spec.data)
        return self.encode(model_input(self.spec, raw, binarization_seed), temperature, seed)

    def decode(self, latents, temperature: float = 1.0, seed: int | None = None,
               mode: str = "mean") -> torch.Tensor:
        """Images [N, C, H, W] in [0, 1] (CPU) from latents: a Latents (its means are decoded)
        or an [N, L, Z, S, S] tensor / array of every layer's z."""
        z = latents.mean if isinstance(latents, Latents) else latents
        given = per_layer(self.model, z, self.device)
        with _seeded(seed, self.device), torch.no_grad():
            return self.model.decode(given, temperature, mode).float().cpu()

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8,
                    up_to_layer: int | None = None, temperature: float = 1.0,
                    seed: int | None = None, mode: str = "mean") -> torch.Tensor:
        """[steps, C, H, W] images along the straight line between the posterior means of two
        model-input images a and b ([C, H, W] or [1, C, H, W]). up_to_layer: interpolate
        layers 0..up_to_layer only and draw the later ones from their prior at `temperature`,
        with the same noise at every step (None: every layer interpolated)."""
        ends = [self.encode(v if v.dim() == 4 else v.unsqueeze(0), temperature=0.0) for v in (a, b)]
        with _seeded(seed, self.device), torch.no_grad():
            given, noise = interpolation_latents(self.model, *ends, steps, up_to_layer, self.device)
            return self.model.decode(given, temperature, mode, noise).float().cpu()

    def _model_input(self, images, what: str) -> torch.Tensor:
        data = self.spec.data
        side = self.model.derived.input_size           # the padded side the encoder takes
        expected = (data.image.channels, side, side)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{what} takes model input [N, {expected[0]}, {side}, {side}] in [-1, 1] "
                             f"(the {data.image.size}x{data.image.size} images padded by data.pad = "
                             f"{data.pad}, as builders.evaluation.evaluate.eval_images gives them); got {got}")
        return images.to(self.device)


    def evaluate(self, k: int | None = None, split: str = "test", limit: int | None = None,
                 seed: int = 0, batch_size: int | None = None) -> dict:
        """-log p(x) by importance sampling with k samples (default: the spec's
        eval.importance_samples) and the ELBO over the first `limit` images of `split`, as
        `avi eval` computes them (nothing is written). Returns the dict of
        builders.evaluation.evaluate.importance_sampled_nll: nll_nats, nll_stderr_nats,
        nelbo_nats, bits_per_dim, per_example, ..."""
        from .evaluation.evaluate import batched, eval_images, importance_sampled_nll
        x = eval_images(self.spec, split, limit)
        return importance_sampled_nll(self.model, batched(x, batch_size or self.spec.eval.batch_size),
                                      k or self.spec.eval.importance_samples, seed=seed)


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    """torch's generators seeded for one call and restored after (seed None: left alone)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def load_run(path: str | Path, device: str = "auto", ema: bool = True) -> TrainedRun:
    """Load a trained run (see the module's docstring) onto `device` (auto: CUDA if there is
    one). ema=False takes the trained weights even where the run kept EMA weights. Raises
    builders.loading.RunError for a path that holds no trained avi model."""
    return TrainedRun(*load_trained(path, device, ema))


def train(spec, out: str | Path | None = None, overrides=(), resume: bool = False,
          device: str = "auto", max_steps: int | None = None, progress: str = "auto") -> dict:
    """Train a spec (a file path or an avi_spec.ResolvedSpec) into `out` (default
    runs/<name>, as `avi train`), `overrides` being --set strings ("train.epochs=2").
    progress: auto, lines, quiet or jsonl. Returns the summary `avi train` prints (step,
    epoch, finished, test_nelbo, out_dir). Raises SpecError for a bad spec and the errors of
    builders.train.training.train."""
    from avi_spec import ResolvedSpec, load_document, load_spec

    from .train.training import train as run_training
    if isinstance(spec, ResolvedSpec):
        resolved = load_document(spec.document, list(overrides)) if overrides else spec
    else:
        resolved = load_spec(spec, overrides)
    out = Path(out) if out is not None else Path("runs") / resolved.spec.name
    return run_training(resolved, out, resume=resume, device=device, max_steps=max_steps,
                        progress_mode=progress)

