"""Latents of a trained model: encode images into every layer's posterior, decode latents
into images, and interpolate between two images in latent space (TrainedRun's encode,
decode and interpolate; `avi encode`).

Every layer's latent has the same shape [Z, S, S], so the latents of N images are stacked
as [N, L, Z, S, S] arrays.

encode runs the top-down pass twice:
  mean / scale   every z_l set to its posterior mean (temperature 0). The posterior of layer
                 l depends on z_<l, so these are the means along the mean path, and
                 decode(mean) is the model's deterministic reconstruction.
  sample         z_l drawn from the posterior at `temperature`, the draw `reconstruct` makes
                 with the same seed, so decode(sample) is that reconstruction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Latents:
    """Per image and layer [N, L, Z, S, S] (CPU float32)."""
    mean: torch.Tensor       # posterior means along the mean path
    scale: torch.Tensor      # posterior standard deviations along the mean path
    sample: torch.Tensor     # one posterior draw at the encode temperature

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays `avi encode` writes to its .npz."""
        return {"mean": self.mean.numpy(), "scale": self.scale.numpy(), "sample": self.sample.numpy()}


def _stack(latents: list[dict], key: str) -> torch.Tensor:
    return torch.stack([lat[key].float().cpu() for lat in latents], 1)


def encode(model, x: torch.Tensor, temperature: float = 1.0) -> Latents:
    """Latents of model-input images x (see the module docstring); draws from torch's generator."""
    drawn = model.encode(x, temperature=temperature)     # first: the draws reconstruct makes
    mean_path = model.encode(x, temperature=0.0)
    return Latents(_stack(mean_path, "q_loc"), _stack(mean_path, "q_scale"), _stack(drawn, "z"))


def per_layer(model, z, device: torch.device) -> list[torch.Tensor]:
    """[N, L, Z, S, S] (a tensor or array) -> the L tensors [N, Z, S, S] the model takes;
    ValueError names the expected shape."""
    d = model.derived
    want = (d.layers, d.latent_channels, d.feature_size, d.feature_size)
    z = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z)
    if z.dim() != 5 or tuple(z.shape[1:]) != want:
        raise ValueError(f"latents must be [N, {', '.join(map(str, want))}] (images, layers, channels, "
                         f"height, width), got {list(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("latents hold values that are not finite")
    z = z.to(device=device, dtype=torch.float32)
    return [z[:, l] for l in range(d.layers)]


def interpolation_latents(model, a: Latents, b: Latents, steps: int, up_to_layer: int | None,
                          device: torch.device) -> tuple[list, list]:
    """(given, noise) for model.decode: layers 0..up_to_layer (all when None) on the straight
    line from a's posterior means to b's, one point per step; the layers below drawn from
    their prior with one noise shared by every step, so only the interpolated layers move."""
    L = model.derived.layers
    last = L - 1 if up_to_layer is None else up_to_layer
    if not 0 <= last < L:
        raise ValueError(f"up_to_layer must be in 0..{L - 1} (the model has {L} layers), got {up_to_layer}")
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    t = torch.linspace(0, 1, steps).view(steps, 1, 1, 1, 1)
    path = ((1 - t) * a.mean[:1] + t * b.mean[:1]).to(device)          # [steps, L, Z, S, S]
    shape = (1, *a.mean.shape[2:])
    given = [path[:, l] if l <= last else None for l in range(L)]
    noise = [torch.randn(shape).expand(steps, -1, -1, -1).to(device) for _ in range(L)]
    return given, noise
