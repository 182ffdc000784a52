"""The deep attentive VAE: one bottom-up pass, then L stochastic layers top-down.

Read next to docs/model.md sections 3 and 6-8. Layer 0 is the top (sampled first). The
model takes images already mapped to [-1, 1] ([B, C, S_in, S_in]; binary data as 2b - 1).

    bottom-up:  e_L = preprocess(x); e_l = encoder_l(e_{l+1})          (Eq. 10)
    top-down:   layer 0 starts from a learned constant; layer l >= 1 merges the previous
                context with z_{l-1}, runs its decoder cell, and (with generative
                attention) lets its prior attend to the contexts above (Eq. 7-9); the
                posterior merges e_l with the prior condition and (with inference
                attention) attends to the bottom-up maps below (Eq. 11).
    output:     final merge -> postprocess -> data distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from avi_spec.derived import Derived
from avi_spec.schema import Bernoulli, Spec

from .attention_paths import GenerativeAttention, InferenceAttention
from .cells import CellGroup
from .conv import WNConv2d
from .depthwise_attention import ContextLayerNorm
from .distributions import BatchRows, BernoulliHead, DiscretizedLogisticMixtureHead, Gaussian, randn_as
from .merge import BottomUpMerge, TopDownMerge


def _fp32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a distribution head outside autocast: the means and log-scales it produces set the
    likelihood, and bf16's 2^-8 spacing near 1 is about a bin of the 8-bit data (2/255)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return module(x)
    return module(x)


def _key(cfg) -> int | None:
    return cfg.nonlocal_.key_dim if cfg.nonlocal_ is not None else None


@dataclass
class ModelOutput:
    """Per-example terms of the ELBO (nats): -ELBO = nll + kl.sum(1)."""
    nll: torch.Tensor                     # [B] -log p(x | z)
    kl: torch.Tensor                      # [B, L] KL(q(z_l | x, z_<l) || p(z_l | z_<l))
    log_pz: torch.Tensor | None = None    # [B] sum_l log p(z_l | z_<l) (importance weights)
    log_qz: torch.Tensor | None = None    # [B] sum_l log q(z_l | x, z_<l)
    attention: dict = field(default_factory=dict)  # {"generative"|"inference": {l: [B,n,H,W]}}
    # With record_latents=True: per layer {q_loc, q_scale, p_loc, p_scale, z} ([B,Z,S,S];
    # p_* are None for layer 0, whose prior is N(0, I)) and the bounded log-scales the
    # scales come from (q_log_scale, p_log_scale) and the data distribution's raw
    # parameters (the head output: Bernoulli logits or the mixture's channels).
    latents: list[dict] | None = None
    params: torch.Tensor | None = None

    @property
    def nelbo(self) -> torch.Tensor:
        return self.nll + self.kl.sum(1)


class VariationalLayer(nn.Module):
    """Everything that belongs to stochastic layer l: its top-down cell, prior, posterior and
    attention. Layer 0 has no merge, decoder or prior head (its prior is N(0, I))."""

    def __init__(self, spec: Spec, d: Derived, l: int, gen_sources: list[int],
                 inf_sources: list[int]):
        super().__init__()
        self.l = l
        self.gen_sources, self.inf_sources = gen_sources, inf_sources
        Z, cells = d.latent_channels, spec.cells
        gen, inf = spec.attention.generative, spec.attention.inference
        width = d.decoder_width(l)
        if l >= 1:
            self.merge = TopDownMerge(d.context_width, Z, width, _key(cells.topdown_merge))
            self.decoder = CellGroup(width, cells.decoder.scales, _key(cells.decoder),
                                     num_nodes=cells.decoder.nodes)
            self.prior_head = nn.Sequential(nn.ELU(), WNConv2d(d.context_width, 2 * Z, 1))
            self.bottomup_merge = BottomUpMerge(d.c_e, d.context_width, d.bottom_up_width,
                                                _key(cells.bottomup_merge))
            # Per-depth plain LN of the context two layers up, applied once and for good just
            # before this layer runs (reference behaviour, docs/model.md section 6 step 1). Only built when
            # some layer from here on can still read that context.
            self.renorm_old = (ContextLayerNorm(d.stored_width(l - 2))
                               if gen is not None and l >= 2 and _read_later(d, l - 2, l) else None)
        else:
            self.merge = self.decoder = self.prior_head = self.bottomup_merge = None
            self.renorm_old = None
        self.gen_attention = (GenerativeAttention(d.context_width, gen.layer_norm,
                                                  (l - 1) in gen_sources, gen.learn_temperature)
                              if gen is not None and gen_sources else None)
        self.inf_attention = (InferenceAttention(d.c_e, inf.layer_norm, inf.learn_temperature)
                              if inf is not None and inf_sources else None)
        c = d.bottom_up_width
        if l == 0:
            self.posterior_head = nn.Sequential(nn.ELU(), WNConv2d(c, c, 1), nn.ELU(),
                                                WNConv2d(c, 2 * Z, 3))
        else:
            self.posterior_head = WNConv2d(c, 2 * Z, 3)


def _read_later(d: Derived, m: int, l: int) -> bool:
    return any(m in d.gen_sources.get(j, []) for j in range(l, d.layers))


class DeepAttentiveVAE(nn.Module):
    """Built by `builders.network.build.build_model(spec)`; see the module docstring for the flow.

    API used by training, evaluation and sampling:
      forward(x) -> ModelOutput(nll [B], kl [B, L])        one posterior sample per image
      log_weights(x, k) -> [B, k]                          importance log-weights
      sample(n, temperature) -> images in [0, 1]           from the prior
      reconstruct(x) -> images in [0, 1]                   through the posterior
      encode(x) / decode(z) -> per-layer posteriors / images from given latents
      forward(x, record_attention=True).attention          depth-wise attention scores
      forward(x, posterior_noise=[eps_0, ..., eps_{L-1}])  z_l = mu_l + sigma_l * eps_l with
                                                           the given noise ([B, Z, S, S] each)
                                                           instead of fresh N(0, I) draws
      forward(x, record_latents=True).latents / .params    per-layer posterior and prior
                                                           means, scales and z; head output
      forward(x, rows=BatchRows(total, start))             x is rows start.. of a batch of
                                                           total: random draws as in the
                                                           forward of that whole batch
    """

    def __init__(self, spec: Spec, derived: Derived, sources: dict[str, dict[int, list[int]]]):
        super().__init__()
        self.spec, self.derived = spec, derived
        d, cells, L, Z = derived, spec.cells, derived.layers, derived.latent_channels
        img = spec.data.image.channels
        self.preprocess = CellGroup(img, cells.preprocess.scales, _key(cells.preprocess),
                                    stem=(img, d.stem_width), num_nodes=cells.preprocess.nodes)
        # encoders[l] maps e_{l+1} to e_l; every e_l is [h_l (C_E) | kE_l (k_E)].
        self.encoders = nn.ModuleList(
            CellGroup(d.bottom_up_width, cells.encoder.scales, _key(cells.encoder),
                      num_nodes=cells.encoder.nodes) for _ in range(L))
        # Layer 0's context is learned: [ctx (C_D + q_E) | kD (k_D)], broadcast over the batch.
        # Initialised as the reference does (Keras variance scaling, scale 0.33, fan-in,
        # uniform; the fan-in of their [1, S, S, C] variable is S * S): about +-0.06 at 16x16.
        self.constant = nn.Parameter(torch.empty(1, d.stored_width(0), d.feature_size, d.feature_size))
        if not self.constant.is_meta:
            bound = math.sqrt(0.99 / d.feature_size ** 2)
            nn.init.uniform_(self.constant, -bound, bound)
        gen_src, inf_src = sources.get("generative", {}), sources.get("inference", {})
        self.layers = nn.ModuleList(
            VariationalLayer(spec, d, l, gen_src.get(l, []), inf_src.get(l, [])) for l in range(L))
        self.final_merge = TopDownMerge(d.context_width, Z, d.context_width,
                                        _key(cells.topdown_merge))
        self.postprocess = CellGroup(d.context_width, cells.postprocess.scales,
                                     _key(cells.postprocess), num_nodes=cells.postprocess.nodes)
        dist = spec.data.distribution
        if isinstance(dist, Bernoulli):
            self.head = BernoulliHead(d.post_width, crop=dist.crop)
        else:
            self.head = DiscretizedLogisticMixtureHead(d.post_width, img, dist.mixtures,
                                                       dist.upper_edge, dist.min_log_scale)
        h = spec.hierarchy
        self.post_bounds = tuple(h.posterior.log_scale)
        self.prior_bounds = tuple(h.prior.log_scale)
        self.post_noise, self.prior_noise = h.posterior.noise, h.prior.noise
        self.residual = h.posterior.residual
        self.scale = h.scale                  # exp (the paper) or softplus: distributions.scale_of

    # ------------------------------------------------------------------ passes

    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[e_0, e_1, ..., e_L] (e_L = preprocessing output). Independent of z, so importance
        sampling computes it once per image."""
        e = [self.preprocess(x)]
        for l in reversed(range(self.derived.layers)):
            e.append(self.encoders[l](e[-1]))
        return e[::-1]

    def _split_context(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.derived.context_width
        return c[:, :w], c[:, w:]

    def _prior(self, layer: VariationalLayer, condition: torch.Tensor,
               rows: BatchRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu, s = _fp32(layer.prior_head, condition).chunk(2, dim=1)
        if self.training and self.prior_noise > 0:
            s = s + self.prior_noise * randn_as(s, rows)
        return mu, s

    def _context(self, l: int, layer: VariationalLayer, contexts: list[torch.Tensor],
                 z: torch.Tensor | None, n: int, scores: dict | None):
        """Layer l's top-down step (Eq. 7-9): the stored context c_l ([values | key]), its raw
        values and the prior's condition. Layer 0 reads the learned constant."""
        d = self.derived
        if l == 0:
            stored = self.constant.expand(n, -1, -1, -1)
            ctx = stored[:, :d.context_width]
            return stored, ctx, ctx
        if layer.renorm_old is not None:
            contexts[l - 2] = layer.renorm_old(contexts[l - 2])
        values_prev = self._split_context(contexts[l - 1])[0]
        out = layer.decoder(layer.merge(values_prev, z))
        ctx = out[:, :d.context_width]
        key = out[:, d.context_width:d.context_width + d.k_d] if d.emits_key(l) else None
        condition, ctx_next = ctx, ctx
        if layer.gen_attention is not None:
            query = out[:, -d.q_d:]
            ks = [self._split_context(contexts[m])[1] for m in layer.gen_sources]
            vs = [self._split_context(contexts[m])[0] for m in layer.gen_sources]
            condition, ctx_next, a = layer.gen_attention(ctx, query, ks, vs)
            if scores is not None:
                scores["generative"][l] = a.detach()
        stored = torch.cat([ctx_next, key], 1) if key is not None else ctx_next
        return stored, ctx, condition

    def _posterior_params(self, l: int, layer: VariationalLayer, e: list[torch.Tensor],
                          ctx: torch.Tensor, condition: torch.Tensor, scores: dict | None,
                          rows: BatchRows | None = None):
        """Raw (mean, log-scale) of q(z_l | x, z_<l) (Eq. 10-11). The inference query is the
        first q_E channels of this layer's raw context (docs/model.md section 7 step 2)."""
        d = self.derived
        merged = e[0] if l == 0 else layer.bottomup_merge(e[l][:, :d.c_e], condition)
        h_own, k_own = merged[:, :d.c_e], merged[:, d.c_e:]
        if layer.inf_attention is not None:
            ks = [k_own if m == l else e[m][:, d.c_e:] for m in layer.inf_sources]
            vs = [h_own if m == l else e[m][:, :d.c_e] for m in layer.inf_sources]
            h_own, a = layer.inf_attention(h_own, ctx[:, :d.q_e], ks, vs)
            if scores is not None:
                scores["inference"][l] = a.detach()
            merged = torch.cat([h_own, k_own], 1) if d.k_e else h_own
        dmu, ds = _fp32(layer.posterior_head, merged).chunk(2, dim=1)
        if self.training and self.post_noise > 0:
            ds = ds + self.post_noise * randn_as(ds, rows)
        return dmu, ds

    def top_down(self, e: list[torch.Tensor] | None, n: int, temperature: float = 1.0,
                 record_attention: bool = False, noise: list[torch.Tensor] | None = None,
                 record_latents: bool = False, given: list[torch.Tensor | None] | None = None,
                 rows: BatchRows | None = None) -> tuple[torch.Tensor, dict]:
        """Run the L layers. With bottom-up maps `e` (batch n) z comes from the posterior and
        the KL / log-densities are returned; without, z comes from the prior, or is given[l]
        where `given` (one [n, Z, S, S] tensor or None per layer) holds one. `noise` (one
        [n, Z, S, S] tensor per layer) replaces the N(0, I) draws of the samples; `rows`
        (BatchRows) makes every draw for the whole batch the n images belong to (randn_as)."""
        for name, per_layer in (("posterior_noise", noise), ("given latents", given)):
            if per_layer is not None and len(per_layer) != self.derived.layers:
                raise ValueError(f"{name} needs one tensor per layer ({self.derived.layers}), "
                                 f"got {len(per_layer)}")
        d = self.derived
        contexts: list[torch.Tensor] = []       # stored c_0 .. c_{l-1}: [values | key]
        z = None
        kls, log_pz, log_qz, latents = [], 0.0, 0.0, []
        scores: dict = {"generative": {}, "inference": {}}
        recorded = scores if record_attention else None
        for l, layer in enumerate(self.layers):
            stored, ctx, condition = self._context(l, layer, contexts, z, n, recorded)
            contexts.append(stored)
            if l == 0:
                prior = Gaussian.standard(torch.empty(n, d.latent_channels, d.feature_size,
                                                      d.feature_size, device=stored.device))
            else:
                mu_p, s_p = self._prior(layer, condition, rows)
                prior = Gaussian.from_raw(mu_p, s_p, self.prior_bounds, self.scale)
            eps = noise[l] if noise is not None else None
            if e is None:
                z = given[l] if given is not None and given[l] is not None else prior.sample(temperature, eps)
                continue
            dmu, ds = self._posterior_params(l, layer, e, ctx, condition, recorded, rows)
            if l >= 1 and self.residual:
                dmu, ds = mu_p + dmu, s_p + ds
            q = Gaussian.from_raw(dmu, ds, self.post_bounds, self.scale)
            z = q.sample(temperature, eps, rows)
            if record_latents:
                latents.append({"q_loc": q.mean, "q_scale": q.sigma, "z": z,
                                "p_loc": prior.mean if l else None,
                                "p_scale": prior.sigma if l else None,
                                "q_log_scale": q.log_scale, "p_log_scale": prior.log_scale})
            kls.append(q.kl(prior).flatten(1).sum(1))
            log_pz = log_pz + prior.log_prob(z).flatten(1).sum(1)
            log_qz = log_qz + q.log_prob(z).flatten(1).sum(1)

        values_last = self._split_context(contexts[-1])[0]
        h = self.postprocess(self.final_merge(values_last, z))
        stats = {"attention": scores}
        if e is not None:
            stats.update(kl=torch.stack(kls, 1), log_pz=log_pz, log_qz=log_qz, latents=latents)
        return _fp32(self.head, h), stats

    # ------------------------------------------------------------------ API

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the likelihood scores: binary data {0,1} (from 2b - 1), 8-bit data as is."""
        return (x + 1) / 2 if isinstance(self.head, BernoulliHead) else x

    def forward(self, x: torch.Tensor, record_attention: bool = False,
                posterior_noise: list[torch.Tensor] | None = None,
                record_latents: bool = False, rows: BatchRows | None = None) -> ModelOutput:
        """One posterior sample per image. `posterior_noise`: the eps of z_l = mu + sigma * eps
        for every layer (list of L tensors [B, Z, S, S]), to reproduce a given draw exactly.
        `rows`: x is part of a bigger batch; every random draw is that batch's (randn_as)."""
        params, stats = self.top_down(self.bottom_up(x), x.shape[0],
                                      record_attention=record_attention, noise=posterior_noise,
                                      record_latents=record_latents, rows=rows)
        nll = -self.head.log_prob(params.float(), self.target(x))
        return ModelOutput(nll=nll, kl=stats["kl"], log_pz=stats["log_pz"],
                           log_qz=stats["log_qz"], attention=stats["attention"],
                           latents=stats["latents"] if record_latents else None,
                           params=params if record_latents else None)

    def noise_shapes(self) -> list[tuple[int, ...]]:
        """The shape of one sample's N(0, I) noise per layer ([Z, S, S] each): what
        ``log_weights(x, k, noise)`` takes, so that an evaluator can draw every image's noise
        from that image's own generator (builders.evaluation.image_noise)."""
        d = self.derived
        return [(d.latent_channels, d.feature_size, d.feature_size)] * d.layers

    def log_weights(self, x: torch.Tensor, k: int, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[B, k] importance log-weights log p(x|z) + log p(z) - log q(z|x), z ~ q(z|x).

        The bottom-up pass runs once on the B images; the k samples ride in the batch
        dimension of the top-down pass (image-major: rows b*k .. b*k+k-1 belong to image b).
        ``noise``: the eps of every layer ([B*k, Z, S, S], same row order) instead of draws
        from the global generator.
        """
        b = x.shape[0]
        e = [t.repeat_interleave(k, dim=0) for t in self.bottom_up(x)]
        params, stats = self.top_down(e, b * k, noise=noise)
        log_px = self.head.log_prob(params.float(), self.target(x).repeat_interleave(k, dim=0))
        return (log_px + stats["log_pz"] - stats["log_qz"]).view(b, k)

    def _image(self, params: torch.Tensor, mode: str) -> torch.Tensor:
        if isinstance(self.head, BernoulliHead):
            return self.head.mean(params) if mode == "mean" else self.head.sample(params)
        return self.head.sample(params.float())

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, mode: str = "mean") -> torch.Tensor:
        """n images in [0, 1] from the prior; temperature scales every latent's noise.
        Binary data: mode="mean" gives pixel probabilities, "sample" Bernoulli draws."""
        params, _ = self.top_down(None, n, temperature)
        return self._image(params, mode)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mode: str = "mean", temperature: float = 1.0) -> torch.Tensor:
        """Images through the posterior (z_l drawn at `temperature`; 0: every z_l its mean)."""
        params, _ = self.top_down(self.bottom_up(x), x.shape[0], temperature)
        return self._image(params, mode)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, temperature: float = 1.0) -> list[dict]:
        """Per layer the posterior {q_loc, q_scale, z, ...} (see ModelOutput.latents) of one
        top-down pass whose z_l are drawn at `temperature` (0: every z_l its posterior mean)."""
        _, stats = self.top_down(self.bottom_up(x), x.shape[0], temperature, record_latents=True)
        return stats["latents"]

    @torch.no_grad()
    def decode(self, z: list[torch.Tensor | None], temperature: float = 1.0, mode: str = "mean",
               noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Images from given latents: z[l] ([n, Z, S, S]) for every layer that has one, the
        others drawn from their prior at `temperature` (with `noise` where given)."""
        n = next((t.shape[0] for t in z if t is not None), None)
        if n is None:
            raise ValueError("decode needs the latents of at least one layer")
        params, _ = self.top_down(None, n, temperature, noise=noise, given=z)
        return self._image(params, mode)

