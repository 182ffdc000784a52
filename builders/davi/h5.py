"""Read the authors' Keras HDF5 weight files (`model.save_weights`, `final_model.h5`).

Keras writes one group per top-level layer, in the model's layer order, each holding that
layer's weights in Keras tracking order (trainable first, then non-trainable) under names
that carry global counters (`conv2d_87/.../weight_norm_53/kernel:0`) which change from run
to run. Keras itself loads such files by position; so does this reader. It lists, for a
model built from the same flags, their attribute paths in Keras' order (`keras_order`),
assigns the file's tensors to them one by one, and checks every shape on the way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from .weights import SCALE_SUFFIX, ConversionError, tf_paths

# Among the children of one Keras object, the order in which Keras tracks them: own weights
# first (gamma, enc_gamma), then sub-layers in the order their attributes were assigned.
_SIBLING_ORDER = [
    "gamma", "enc_gamma", "constant",
    "_encoder_network", "_decoder_network", "_merge_decoder_network", "_merge_encoder_network",
    "_posterior_network", "_prior_network", "_decoder_attention", "_attention_layer_norm_layer",
    "_attention_layer_norm_layer2", "_ctx_layer_norm_layer", "_encoder_attention",
    "_cond_attention_layer_norm_layer", "_encoder_attention_layer_norm_layer",
    "_preproc_layer", "_data_dist", "_params_network", "_residual_blocks", "_stem_layer",
    "_shortcut", "_nodes", "layer_with_weights-0", "_conv2d_layers", "_conv2d_layer",
    "_conv2d_layer_a", "_batch_norm_layer", "_nonlocal_layer", "query_conv", "key_conv", "value_conv",
    "_alignment_function", "scale", "conv_1", "conv_2", "conv_3", "conv_4",
    "v", "g", "layer", "bias", "beta", "moving_mean", "moving_variance", "initialized",
]
_RANK = {name: i for i, name in enumerate(_SIBLING_ORDER)}
_NON_TRAINABLE = ("/moving_mean", "/moving_variance", "/initialized")


def _key(path: str) -> tuple:
    out = []
    for seg in path.split("/"):
        if seg.isdigit():
            out.append((0, int(seg)))
        elif seg in _RANK:
            out.append((1, _RANK[seg]))
        else:
            raise ConversionError(f"no Keras order known for '{seg}' in {path}")
    return tuple(out)


def _top_level(model: nn.Module) -> list[str]:
    """Their DeepVAE's layers, in `model.layers` order (= the file's groups)."""
    L = model.derived.layers
    tops = ["_merge_decoder", "_data_layer", "_preproc_encoder/0"]
    tops += [f"_latent_layer/{l}" for l in range(L)]
    if model.spec.attention.generative is not None:
        tops += [f"_ctx_layer_norm/{l}" for l in range(L)]
    return tops


def their_paths(model: nn.Module) -> tuple[list[str], set[str]]:
    """Every tensor path of their model for `model`'s spec, and the optional ones: the
    depth-wise attention-score scales, which only Keras versions that track tf.Module
    attributes write (and which an avi model with a fixed temperature does not hold)."""
    paths = [p for _, p, _ in tf_paths(model)]
    paths += [p[:-2] + "/initialized" for p in paths if p.endswith("/v")]
    optional: set[str] = set()
    for l, layer in enumerate(model.layers):
        for att, name in ((layer.gen_attention, "_decoder_attention"), (layer.inf_attention, "_encoder_attention")):
            if att is not None:
                p = f"_latent_layer/{l}/{name}/{SCALE_SUFFIX}"
                optional.add(p)
                if p not in paths:
                    paths.append(p)
    return paths, optional


def keras_order(model: nn.Module) -> list[tuple[str, list[str], set[str]]]:
    """[(top-level prefix, its paths in Keras order, optional paths)] for the file's groups."""
    paths, optional = their_paths(model)
    groups = []
    for top in _top_level(model):
        mine = [p for p in paths if p.startswith(top + "/")]
        key = lambda p: _key(p[len(top) + 1:])                        # noqa: E731
        trainable = sorted((p for p in mine if not p.endswith(_NON_TRAINABLE)), key=key)
        frozen = sorted((p for p in mine if p.endswith(_NON_TRAINABLE)), key=key)
        groups.append((top, trainable + frozen, {p for p in mine if p in optional}))
    return groups


def _names(group, attr: str = "weight_names") -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get(attr, [])]


def read_h5(path: str | Path, model: nn.Module) -> dict[str, np.ndarray]:
    """Their tensors keyed by attribute path, read by position from a Keras HDF5 weights file
    for a model of `model`'s configuration. ConversionError on a file that does not fit."""
    try:
        import h5py
    except ImportError:
        raise ConversionError("reading .h5 files needs h5py: pip install h5py (in a checkout of avi: "
                              "pip install -e '.[import]'), or pass their weights as a .npz keyed "
                              "by attribute path") from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConversionError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        layer_names = _names(root, "layer_names")
        groups = keras_order(model)
        if len(layer_names) != len(groups):
            raise ConversionError(f"{path} holds {len(layer_names)} top-level layers; the model built from "
                                  f"the flags has {len(groups)} ({', '.join(t for t, _, _ in groups)})")
        out: dict[str, np.ndarray] = {}
        for name, (top, expected, optional) in zip(layer_names, groups):
            g = root[name]
            names = _names(g)
            if len(names) == len(expected) - len(optional):
                expected = [p for p in expected if p not in optional]     # an older Keras
            if len(names) != len(expected):
                raise ConversionError(f"{path}: layer '{name}' ({top}) holds {len(names)} tensors; the model "
                                      f"built from the flags needs {len(expected)}")
            for n, p in zip(names, expected):
                out[p] = np.asarray(g[n][()])
            # Shapes are checked by convert(), which names the tensor; initialized flags are
            # scalars anywhere, so a shifted file fails there on the first mismatch.
        return out
