"""Latent Gaussians, bounding functions and the data distributions (docs/model.md section 8)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .conv import WNConv2d

MEAN_BOUND = 5.0
SIGMA_FLOOR = 0.01
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
MIN_LOG_SCALE = -7.0
LN2 = math.log(2.0)


def bound_symmetric(u: torch.Tensor, b: float) -> torch.Tensor:
    """b * tanh(u / (2b)): range (-b, b) with slope 1/2 at 0 (not the identity)."""
    return b * torch.tanh(u / (2 * b))


def bound_asymmetric(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """lo + (hi - lo) * smoothstep, clamped: exactly lo / hi with zero gradient outside."""
    t = ((u - lo) / (hi - lo)).clamp(0.0, 1.0)
    return lo + (hi - lo) * t * t * (3 - 2 * t)


def bound_log_scale(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    lo, hi = bounds
    return bound_symmetric(u, hi) if lo == -hi else bound_asymmetric(u, lo, hi)


def scale_of(log_scale: torch.Tensor, kind: str = "exp") -> torch.Tensor:
    """The standard deviation (before the 0.01 floor) of a bounded log-scale s.

    exp:      exp(s), the paper's.
    softplus: softplus with beta = ln 2, i.e. log2(1 + 2^s): 1 at s = 0 like exp(s), close to
              2^s / ln 2 below 0 and to s above it. Efficient-VDVAE's "gradient smoothing": the
              scale and its gradient grow linearly, not exponentially, with s.
    """
    if kind == "softplus":
        return F.softplus(log_scale, beta=LN2)
    if kind != "exp":
        raise ValueError(f"unknown scale parameterisation {kind!r} (exp or softplus)")
    return log_scale.exp()


class BatchRows(NamedTuple):
    """Where a forward's images sit in the batch of one optimizer step: rows start, start + 1,
    ... of a batch of ``total`` images (one process's share, or one micro-batch of it)."""
    total: int
    start: int


def randn_as(t: torch.Tensor, rows: BatchRows | None = None) -> torch.Tensor:
    """N(0, 1) draws of t's shape, dtype and device, filled in logical (NCHW) order whatever
    t's memory format: randn_like on a channels_last map would give each pixel other
    numbers, so a seed would not reproduce a run across memory formats.

    With ``rows`` the draw is made for the whole batch and t's rows are kept, so that an image
    gets the numbers it gets in one forward of the whole batch, however the batch is split
    across processes or micro-batches (at the cost of drawing the whole batch's numbers; the
    rows are copied out, so the rest is freed at once rather than kept for the backward)."""
    if rows is None or rows.total == t.shape[0]:          # the whole batch: nothing to cut
        return torch.randn(t.shape, dtype=t.dtype, device=t.device)
    full = torch.randn((rows.total, *t.shape[1:]), dtype=t.dtype, device=t.device)
    return full[rows.start:rows.start + t.shape[0]].clone()


def rand_as(t: torch.Tensor) -> torch.Tensor:
    """U(0, 1) draws like randn_as."""
    return torch.rand(t.shape, dtype=t.dtype, device=t.device)


@dataclass
class Gaussian:
    """Diagonal Gaussian given by its mean and standard deviation (same shapes)."""
    mean: torch.Tensor
    sigma: torch.Tensor
    log_scale: torch.Tensor | None = None    # the bounded log-scale (from_raw), for diagnostics

    @classmethod
    def from_raw(cls, raw_mean: torch.Tensor, raw_log_scale: torch.Tensor,
                 log_scale_bounds: tuple[float, float] = (-5.0, 5.0), scale: str = "exp") -> "Gaussian":
        """Bound raw head outputs as the model does: mean in (-5, 5), sigma = g(f(s)) + 0.01
        with g = exp (the paper) or the smoothed softplus (hierarchy.scale, scale_of)."""
        log_scale = bound_log_scale(raw_log_scale, log_scale_bounds)
        return cls(bound_symmetric(raw_mean, MEAN_BOUND), scale_of(log_scale, scale) + SIGMA_FLOOR, log_scale)

    @classmethod
    def standard(cls, like: torch.Tensor) -> "Gaussian":
        """N(0, I) (the layer-0 prior; no sigma floor)."""
        return cls(torch.zeros_like(like), torch.ones_like(like))

    def sample(self, temperature: float = 1.0, eps: torch.Tensor | None = None,
               rows: BatchRows | None = None) -> torch.Tensor:
        """mean + temperature * sigma * eps; eps ~ N(0, I) (randn_as with ``rows``) unless
        given (same shape)."""
        if eps is None:
            eps = randn_as(self.mean, rows)
        elif eps.shape != self.mean.shape:
            raise ValueError(f"noise of shape {list(eps.shape)} for a latent of shape {list(self.mean.shape)}")
        return self.mean + temperature * self.sigma * eps.to(self.mean.dtype)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((z - self.mean) / self.sigma) ** 2 - self.sigma.log() - _HALF_LOG_2PI

    def kl(self, p: "Gaussian") -> torch.Tensor:
        return kl(self, p)


def kl(q: Gaussian, p: Gaussian) -> torch.Tensor:
    """Analytic KL(q || p) per element."""
    ratio = (q.sigma / p.sigma) ** 2
    diff = ((q.mean - p.mean) / p.sigma) ** 2
    return 0.5 * (ratio + diff - 1) - 0.5 * ratio.log()


class BernoulliHead(nn.Module):
    """ELU -> conv3x3(c -> 1) logits over the padded grid; likelihood over the central crop."""

    def __init__(self, c_in: int, crop: int = 2):
        super().__init__()
        self.crop = crop
        self.conv = WNConv2d(c_in, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.elu(x))

    def _crop(self, t: torch.Tensor) -> torch.Tensor:
        c = self.crop
        return t[..., c:t.shape[-2] - c, c:t.shape[-1] - c] if c else t

    def log_prob(self, logits: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
        """Per-example [B]; target may be the padded grid or already cropped."""
        logits = self._crop(logits).float()
        if target01.shape[-2:] != logits.shape[-2:]:
            target01 = self._crop(target01)
        nll = F.binary_cross_entropy_with_logits(logits, target01.float(), reduction="none")
        return -nll.flatten(1).sum(1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._crop(logits))

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(self.mean(logits).contiguous())   # draws in logical order


class DiscretizedLogisticMixtureHead(nn.Module):
    """ELU -> conv3x3 -> mixture of discretized logistics with autoregressive channel coupling.

    Output channel layout: [mixture logits (M) | locations (M*C) | log-scales (M*C) |
    coupling coefficients (M*K)], K = C(C-1)/2 (3 for RGB: a, b, c of docs/model.md section 8; the
    coupling generalises as mu_c + sum_{j<c} coef_cj x_j). Each block is component-major.
    """

    LOWER_EDGE = -0.999
    FALLBACK_DELTA = 1e-5

    def __init__(self, c_in: int, image_channels: int = 3, mixtures: int = 5,
                 upper_edge: float = 0.99, min_log_scale: float = MIN_LOG_SCALE):
        super().__init__()
        self.c, self.m, self.upper_edge = image_channels, mixtures, upper_edge
        self.min_log_scale = min_log_scale
        self.k = image_channels * (image_channels - 1) // 2
        self.conv = WNConv2d(c_in, mixtures * (1 + 2 * image_channels + self.k), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.elu(x))

    def _split(self, params: torch.Tensor):
        b, _, h, w = params.shape
        m, c, k = self.m, self.c, self.k
        logit_pi, loc, log_s, coef = params.split([m, m * c, m * c, m * k], dim=1)
        return (logit_pi, loc.reshape(b, m, c, h, w),
                log_s.reshape(b, m, c, h, w).clamp(min=self.min_log_scale),
                torch.tanh(coef.reshape(b, m, k, h, w)))

    def _couple(self, loc: torch.Tensor, coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Component means mu_c + sum_{j<c} coef_cj * x_j; x is [B,(1|M),C,H,W]."""
        means, idx = [loc[:, :, 0]], 0
        for ch in range(1, self.c):
            mu = loc[:, :, ch]
            for j in range(ch):
                mu = mu + coef[:, :, idx] * x[:, :, j]
                idx += 1
            means.append(mu)
        return torch.stack(means, dim=2)

    def log_prob_per_pixel(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per pixel [B,H,W]; x in [-1, 1] (value k -> 2k/255 - 1). float32."""
        logit_pi, loc, log_s, coef = self._split(params.float())
        x = x.float().unsqueeze(1)                          # [B,1,C,H,W]
        centered = x - self._couple(loc, coef, x)
        inv_s = torch.exp(-log_s)
        plus_in = inv_s * (centered + 1 / 255)
        min_in = inv_s * (centered - 1 / 255)
        log_cdf_plus = plus_in - F.softplus(plus_in)        # log sigmoid, stable
        log_one_minus_cdf_min = -F.softplus(min_in)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - log_s - 2 * F.softplus(mid_in)
        # Clamp inside the log so the untaken branch of `where` cannot produce NaN gradients.
        log_mid = torch.where(cdf_delta > self.FALLBACK_DELTA,
                              cdf_delta.clamp(min=1e-12).log(),
                              log_pdf_mid - math.log(127.5))
        lp = torch.where(x < self.LOWER_EDGE, log_cdf_plus,
                         torch.where(x > self.upper_edge, log_one_minus_cdf_min, log_mid))
        lp = lp.sum(2) + torch.log_softmax(logit_pi, dim=1)  # [B,M,H,W]
        return torch.logsumexp(lp, dim=1)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example log-likelihood [B], summed over all pixels and channels."""
        return self.log_prob_per_pixel(params, x).flatten(1).sum(1)

    def sample(self, params: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Gumbel-max component, logistic sample per channel, coupling on clipped samples.

        `temperature` scales the logistic noise. Returns images in [0, 1].
        """
        logit_pi, loc, log_s, coef = self._split(params.float())
        u = rand_as(logit_pi).clamp(1e-5, 1 - 1e-5)
        pick = (logit_pi - torch.log(-torch.log(u))).argmax(dim=1, keepdim=True)
        one_hot = F.one_hot(pick, self.m).movedim(-1, 1).float()   # [B,M,1,H,W]
        loc, log_s = (loc * one_hot).sum(1), (log_s * one_hot).sum(1)
        coef = (coef * one_hot).sum(1) if self.k else None
        u = rand_as(loc).clamp(1e-5, 1 - 1e-5)
        raw = loc + temperature * log_s.exp() * (u.log() - (-u).log1p())
        out, idx = [], 0
        for ch in range(self.c):
            v = raw[:, ch]
            for j in range(ch):
                v = v + coef[:, idx] * out[j]
                idx += 1
            out.append(v.clamp(-1, 1))
        return (torch.stack(out, dim=1) + 1) / 2
