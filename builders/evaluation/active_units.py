"""Which latent channels a trained model uses: the KL of every layer's every channel, and
the channels whose KL is above a threshold ("active units", as the NVAE and Efficient-VDVAE
authors count them).

The KL of channel c of layer l is KL(q(z_l | x, z_<l) || p(z_l | z_<l)) summed over the
channel's S x S positions and averaged over the images (nats per image, one posterior sample
each); the channels of a layer add up to that layer's KL (evaluate.kl_per_layer). A channel
whose KL stays near 0 carries no information about x: its posterior is its prior.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from ..network.distributions import Gaussian, kl
from .evaluate import mean_per_image

DEFAULT_THRESHOLD = 0.1        # nats per image and channel; NVAE's choice


def kl_per_channel(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """[L, Z]: the mean KL (nats per image) of every latent channel of every layer."""
    def batch_sum(m, x):
        latents = m(x, record_latents=True).latents
        return torch.stack([_channel_kl(lat).double().sum(0) for lat in latents])   # [L, Z]
    return mean_per_image(model, batches, batch_sum)


def _channel_kl(lat: dict) -> torch.Tensor:
    """[B, Z]: a layer's KL summed over the positions of each channel."""
    q = Gaussian(lat["q_loc"].float(), lat["q_scale"].float())
    p = (Gaussian.standard(q.mean) if lat["p_loc"] is None
         else Gaussian(lat["p_loc"].float(), lat["p_scale"].float()))
    return kl(q, p).flatten(2).sum(2)


def active_units(kl_channels: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The summary `avi eval --json` and `avi plot active` report."""
    active = kl_channels > threshold
    return {"threshold_nats": float(threshold), "active": int(active.sum()), "channels": int(active.size),
            "active_per_layer": active.sum(1).tolist(), "kl_per_channel_nats": kl_channels.tolist()}
