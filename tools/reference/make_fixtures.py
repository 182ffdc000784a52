"""Regenerate the equivalence fixtures with the authors' TensorFlow code (not run in CI).

Run it in a TensorFlow environment holding a copy of their repository (ifiaposto/
Deep_Attentive_VI, with the compatibility patches of docs/reference.md), e.g.

    TF_USE_LEGACY_KERAS=1 python tools/reference/make_fixtures.py \\
        --src /path/to/Deep_Attentive_VI/src --config live_omniglot --out fixtures/live_omniglot

For a configuration (a set of their run.py flags, CONFIGS below or --flags FILE) it builds
their model, gives every weight a random value -- including the residual gates, layer
norms, attention-score scales and batch-norm statistics that start at 0 or 1, so that every
path of the model moves the output -- and writes:
  config.json           the flags, batch and seed
  weights.h5            their Keras HDF5 (model.save_weights; what their trainer writes)
  weights_by_path.npz   the same tensors keyed by attribute path (tf.train.Checkpoint keys)
  io.npz                x (model input batch, NHWC, before their preprocess), eps_l
                        ([1, B, S, S, Z]) and, for eval__ (moving statistics) and train__
                        (batch statistics): kl_l, q_loc_l, q_scale_l, p_loc_l, p_scale_l,
                        z_l, log_px_z and data_dist_params (their raw head output).
tests/test_equivalence.py reads these with avi (no TensorFlow).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile

import numpy as np

CONFIGS = {
    # OMNIGLOT-shaped: both attentions with layer norms, non-local merges and a non-local
    # block in the post-processing cells (and hence in its up-sampling shortcut).
    "live_omniglot": {
        "dataset": "omniglot",
        "hparams": "layer_latent_shape=[16,16,3],num_layers=3,num_proc_blocks=1,data_distribution=bernoulli",
        "decoder_attention_hparams": "key_dim=4,query_dim=4,use_layer_norm=True",
        "encoder_attention_hparams": "key_dim=4,query_dim=4,use_layer_norm=True",
        "merge_encoder_hparams": "use_nonlocal=True,nonlocop_hparams=[key_dim=4,query_dim=4]",
        "merge_decoder_hparams": "use_nonlocal=True,nonlocop_hparams=[key_dim=4,query_dim=4]",
        "decoder_hparams": "scale=[0],num_blocks=1,num_filters=4",
        "encoder_hparams": "scale=[0],num_blocks=1,num_filters=4",
        "preproc_encoder_hparams": "scale=[0,-2],num_nodes=2,num_blocks=2,num_filters=4",
        "postproc_decoder_hparams": "scale=[2,0],num_nodes=2,use_nonlocal=True,nonlocop_hparams=[key_dim=4,query_dim=4],num_blocks=2,num_filters=4",
        "posterior_hparams": "log_scale_upper_bound=5,log_scale_low_bound=-5",
        "prior_hparams": "log_scale_upper_bound=5,log_scale_low_bound=-5",
    },
    # CIFAR-shaped: non-local blocks inside every cell, asymmetric prior bounds, a mixture.
    "live_cifar": {
        "dataset": "cifar10",
        "hparams": "layer_latent_shape=[16,16,3],num_layers=2,data_distribution=discretized_logistic_mixture",
        "decoder_attention_hparams": "key_dim=4,query_dim=4,use_layer_norm=True",
        "encoder_attention_hparams": "key_dim=4,query_dim=4,use_layer_norm=False",
        "decoder_hparams": "scale=[0],use_nonlocal=True,nonlocop_hparams=[key_dim=4,query_dim=4],num_blocks=1,num_filters=4",
        "encoder_hparams": "scale=[0],use_nonlocal=True,nonlocop_hparams=[key_dim=4,query_dim=4],num_blocks=1,num_filters=4",
        "preproc_encoder_hparams": "scale=[0,-2],use_nonlocal=True,nonlocop_hparams=[key_dim=4,query_dim=4],num_blocks=2,num_filters=4",
        "postproc_decoder_hparams": "scale=[2,0],num_blocks=2,num_filters=4",
        "posterior_hparams": "log_scale_upper_bound=5,log_scale_low_bound=-5",
        "prior_hparams": "log_scale_upper_bound=5,log_scale_low_bound=-1.0",
        "data_dist_hparams": "num_logistic_mix=3",
    },
}
IMAGES = {"cifar10": {"shape": (32, 32, 3), "high": 255, "low": 0, "binary": False, "pad_size": 0},
          "omniglot": {"shape": (28, 28, 1), "high": 1, "low": 0, "binary": True, "pad_size": 2}}


def their_model(flags: dict):
    """Their DeepVAE for run.py flags, built the way their run.py builds it."""
    from layers import LAYER
    from layers.attention import DepthWiseAttention
    from model import DeepVAE
    from stat_tools import DISTRIBUTION
    h = DeepVAE.get_default_hparams().update_config(flags.get("hparams", ""))
    nets = lambda: DeepVAE.get_default_network_hparams(h)                       # noqa: E731
    att = lambda f: (DepthWiseAttention.get_default_hparams().update_config(flags[f])  # noqa: E731
                     if flags.get(f) else None)
    return DeepVAE(
        hparams=h, image_info=IMAGES[flags["dataset"]],
        data_dist_hparams=DISTRIBUTION[h.data_distribution].get_default_hparams().update_config(flags.get("data_dist_hparams", "")),
        prior_hparams=DISTRIBUTION[h.prior_type].get_default_hparams().update_config(flags.get("prior_hparams", "")),
        posterior_hparams=DISTRIBUTION[h.posterior_type].get_default_hparams().update_config(flags.get("posterior_hparams", "")),
        preproc_encoder_hparams=nets().preproc_encoder.update_config(flags.get("preproc_encoder_hparams", "")),
        encoder_hparams=nets().encoder.update_config(flags.get("encoder_hparams", "")),
        decoder_hparams=nets().decoder.update_config(flags.get("decoder_hparams", "")),
        postproc_decoder_hparams=nets().postproc_decoder.update_config(flags.get("postproc_decoder_hparams", "")),
        merge_encoder_hparams=LAYER[h.merge_encoder_type].get_default_hparams().update_config(flags.get("merge_encoder_hparams", "")),
        merge_decoder_hparams=LAYER[h.merge_decoder_type].get_default_hparams().update_config(flags.get("merge_decoder_hparams", "")),
        decoder_attention_hparams=att("decoder_attention_hparams"),
        encoder_attention_hparams=att("encoder_attention_hparams"))


def input_batch(flags: dict, batch: int, rng: np.random.RandomState) -> np.ndarray:
    """x as their evaluation feeds it, after their DatasetTransform (binarised and padded
    for binary data, raw 0..255 for CIFAR-10), NHWC float32."""
    info = IMAGES[flags["dataset"]]
    h, w, c = info["shape"]
    if info["binary"]:
        x = (rng.rand(batch, h, w, c) < 0.3).astype(np.float32)
        p = info["pad_size"]
        return np.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    return rng.randint(0, 256, size=(batch, h, w, c)).astype(np.float32)


def randomise(model, rng: np.random.RandomState) -> None:
    """Move every weight that starts at a constant: residual gates, layer/batch norms, the
    attention-score scales and the batch-norm statistics. Random kernels keep their init."""
    for v in model.variables:
        name, shape = v.name.split("/")[-1].split(":")[0], tuple(v.shape)
        if name in ("gamma", "enc_gamma") and shape == ():
            value = rng.uniform(0.3, 0.8) * rng.choice([-1.0, 1.0])
        elif name == "scale":
            value = rng.uniform(0.5, 1.5)
        elif name == "gamma":
            value = 1.0 + 0.3 * rng.randn(*shape)
        elif name == "beta":
            value = 0.3 * rng.randn(*shape)
        elif name == "moving_mean":
            value = 0.2 * rng.randn(*shape)
        elif name == "moving_variance":
            value = rng.uniform(0.5, 2.0, size=shape)
        else:
            continue
        v.assign(np.asarray(value, dtype=np.float32).reshape(shape))


class Recorder:
    """Posterior noise in, per-layer terms out: patches their GaussianDiag.sample (the only
    random operation of a forward pass without noise_stddev) and VariationalLayer.infer."""

    def __init__(self):
        import tensorflow as tf
        from model.variational_layer import VariationalLayer
        from stat_tools.gaussian_diag import GaussianDiag
        self.noise, self.terms = [], []
        sample, infer = GaussianDiag.sample, VariationalLayer.infer
        rec = self

        def sample_with_noise(dist, condition, training=True, num_samples=1, initial_params=None):
            if not rec.noise:                          # the prior's sample (generation): as is
                return sample(dist, condition, training, num_samples, initial_params)
            dist.call(condition=condition, training=training, initial_params=initial_params)
            q = dist._p[-1]
            return q.loc + q.scale.diag * tf.constant(rec.noise.pop(0))

        def infer_and_record(layer, condition, direction, training, **kw):
            out = infer(layer, condition, direction, training, **kw)
            if direction == "top-down":
                q, p = layer._posterior_network._p[-1], (layer._prior_network._p[0] if layer._prior_network else None)
                rec.terms.append({"kl": out[2], "q_loc": q.loc, "q_scale": q.scale.diag, "z": out[0],
                                  "p_loc": None if p is None else p.loc,
                                  "p_scale": None if p is None else p.scale.diag})
            return out

        GaussianDiag.sample, VariationalLayer.infer = sample_with_noise, infer_and_record

    def run(self, model, x: np.ndarray, eps: list[np.ndarray], training: bool) -> dict:
        import tensorflow as tf
        self.noise, self.terms = [e.copy() for e in eps], []
        nll, _, _ = model.call(inputs=tf.constant(x), training=training)
        assert not self.noise, "a layer did not draw its posterior sample"
        out = {"log_px_z": -nll.numpy(), "data_dist_params": model._data_layer._data_dist._params.numpy()}
        for l, t in enumerate(self.terms):
            out.update({f"{k}_{l}": v.numpy() for k, v in t.items() if v is not None})
        return out


def by_path(model) -> dict[str, np.ndarray]:
    """The model's tensors keyed by attribute path (tf.train.Checkpoint's object graph)."""
    import tensorflow as tf
    with tempfile.TemporaryDirectory() as d:
        path = tf.train.Checkpoint(model=model).write(os.path.join(d, "ck"))
        head, tail = "model/", "/.ATTRIBUTES/VARIABLE_VALUE"
        return {n[len(head):-len(tail)]: tf.train.load_variable(path, n)
                for n, _ in tf.train.list_variables(path) if n.startswith(head) and n.endswith(tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description="Regenerate avi's equivalence fixtures with the authors' code.")
    ap.add_argument("--src", required=True, help="their repository's src/ (patched)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", choices=sorted(CONFIGS))
    ap.add_argument("--flags", help="a file holding a run.py command instead of --config")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    sys.path.insert(0, a.src)
    import tensorflow as tf
    if a.flags:
        toks = [t[2:].split("=", 1) for t in shlex.split(open(a.flags).read().replace("\\\n", " "))
                if t.startswith("--") and "=" in t]
        flags = {k: v for k, v in toks}
    else:
        flags = dict(CONFIGS[a.config])
    rng = np.random.RandomState(a.seed)
    tf.keras.utils.set_random_seed(a.seed)
    model = their_model(flags)
    x = input_batch(flags, a.batch, rng)
    model.call(inputs=tf.constant(x[:2]), training=False)     # eager build, as their eval does
    model.built = True
    randomise(model, rng)
    eps = [rng.randn(1, a.batch, *[int(d) for d in s]).astype(np.float32) for s in model._layer_latent_shape]
    # Save before the passes: a training-mode pass updates the batch-norm moving statistics.
    os.makedirs(a.out, exist_ok=True)
    model.save_weights(os.path.join(a.out, "weights.h5"))
    np.savez_compressed(os.path.join(a.out, "weights_by_path.npz"), **by_path(model))
    rec = Recorder()
    io = {"x": x, **{f"eps_{l}": e for l, e in enumerate(eps)}}
    for mode in ("eval", "train"):
        io.update({f"{mode}__{k}": v for k, v in rec.run(model, x, eps, mode == "train").items()})
    np.savez_compressed(os.path.join(a.out, "io.npz"), **io)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump({"config": a.config or a.flags, "flags": flags, "batch": a.batch, "seed": a.seed,
                   "tensorflow": tf.__version__}, f, indent=1)
    print(f"wrote {a.out}: {len(io)} arrays; log p(x|z) eval {io['eval__log_px_z']}")


if __name__ == "__main__":
    main()
