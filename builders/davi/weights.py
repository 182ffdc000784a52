"""The authors' tensors, keyed by Keras attribute path, -> avi's state_dict.

Their names are the attribute paths of their Keras objects (what tf.train.Checkpoint and
`weights_by_path.npz` use), e.g.
`_latent_layer/1/_encoder_network/_residual_blocks/0/_nodes/0/_conv2d_layers/0/v`.
`tf_paths(model)` names, for every tensor of an avi model, the tensor of their model that
holds it; `convert` builds the state_dict and says which tensor is missing or mis-shaped.
Kernels are height x width x in x out (avi: out x in x height x width); the layer-0
constant is NHWC (avi: NCHW). Weight norm stores `g` as the log of the norm in both.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..network.cells import CellGroup, FactorizedReduce, Node, ResidualBlock
from ..network.conv import WNConv2d
from ..network.nonlocal_block import NonLocal

# Their tensors that hold no model state: weight norm's data-init flag.
IGNORED_SUFFIXES = ("/initialized",)
# Attention-score scales they track (and train) that an avi model with a fixed temperature
# does not hold; accepted only when they still equal 1 (then the two functions agree).
SCALE_SUFFIX = "_alignment_function/scale"


class ConversionError(ValueError):
    """A tensor is missing, has the wrong shape, or is left over: the model does not match."""


Rule = tuple[str, str, Callable[[np.ndarray], np.ndarray]]   # (avi key, their path, to avi)


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _kernel(a: np.ndarray) -> np.ndarray:      # HWIO -> OIHW
    return a.transpose(3, 2, 0, 1)


def _nhwc(a: np.ndarray) -> np.ndarray:        # NHWC -> NCHW
    return a.transpose(0, 3, 1, 2)


def _conv(key: str, path: str, conv: WNConv2d) -> Iterator[Rule]:
    yield f"{key}.v", f"{path}/v", _kernel
    yield f"{key}.log_g", f"{path}/g", _same
    if conv.bias is not None:
        yield f"{key}.bias", f"{path}/layer/bias", _same


def _norm(key: str, path: str, norm: nn.Module) -> Iterator[Rule]:
    yield f"{key}.weight", f"{path}/gamma", _same
    yield f"{key}.bias", f"{path}/beta", _same
    if isinstance(norm, nn.BatchNorm2d):
        yield f"{key}.running_mean", f"{path}/moving_mean", _same
        yield f"{key}.running_var", f"{path}/moving_variance", _same


def _nonlocal(key: str, path: str, block: NonLocal) -> Iterator[Rule]:
    for mine, theirs in (("query", "query_conv"), ("key", "key_conv"), ("value", "value_conv")):
        yield from _conv(f"{key}.{mine}", f"{path}/{theirs}", getattr(block, mine))
    yield f"{key}.temperature", f"{path}/{SCALE_SUFFIX}", _same
    yield f"{key}.gamma", f"{path}/gamma", _same


def _node(key: str, path: str, node: Node) -> Iterator[Rule]:
    yield from _norm(f"{key}.bn", f"{path}/_batch_norm_layer", node.bn)
    if node.nonlocal_block is not None:
        yield from _nonlocal(f"{key}.nonlocal_block", f"{path}/_nonlocal_layer", node.nonlocal_block)
    yield from _conv(f"{key}.conv", f"{path}/_conv2d_layers/0", node.conv)


def _block(key: str, path: str, block: ResidualBlock) -> Iterator[Rule]:
    # Up-sampling blocks wrap their first node and their shortcut in a keras Sequential
    # (resize, then the layer): Keras names the layer inside `layer_with_weights-0`.
    up = block.scale == 2
    for j, node in enumerate(block.nodes):
        inner = "/layer_with_weights-0" if up and j == 0 else ""
        yield from _node(f"{key}.nodes.{j}", f"{path}/_nodes/{j}{inner}", node)
    if isinstance(block.shortcut, FactorizedReduce):
        for j, conv in enumerate(block.shortcut.convs):
            yield from _conv(f"{key}.shortcut.convs.{j}", f"{path}/_shortcut/conv_{j + 1}", conv)
    elif up:
        inner = f"{path}/_shortcut/layer_with_weights-0"
        for j, part in enumerate(block.shortcut):
            if isinstance(part, NonLocal):
                yield from _nonlocal(f"{key}.shortcut.{j}", f"{inner}/_nonlocal_layer", part)
            elif isinstance(part, WNConv2d):
                yield from _conv(f"{key}.shortcut.{j}", f"{inner}/_conv2d_layers/0", part)


def _cells(key: str, path: str, group: CellGroup) -> Iterator[Rule]:
    if group.stem is not None:
        yield from _conv(f"{key}.stem", f"{path}/_stem_layer", group.stem)
    for i, block in enumerate(group.blocks):
        yield from _block(f"{key}.blocks.{i}", f"{path}/_residual_blocks/{i}", block)


def _merge(key: str, path: str, merge: nn.Module) -> Iterator[Rule]:
    if hasattr(merge, "conv"):                                   # TopDownMerge (concat -> conv)
        yield from _conv(f"{key}.conv", f"{path}/_conv2d_layer", merge.conv)
    else:                                                        # BottomUpMerge (sum)
        if isinstance(merge.features, WNConv2d):
            yield from _conv(f"{key}.features", f"{path}/_conv2d_layer_a", merge.features)
        yield from _conv(f"{key}.condition", f"{path}/_conv2d_layer", merge.condition)
    if merge.nonlocal_block is not None:
        yield from _nonlocal(f"{key}.nonlocal_block", f"{path}/_nonlocal_layer", merge.nonlocal_block)


def _attention(key: str, path: str, module: nn.Module, gamma: str, scale: str,
               norms: dict[str, str]) -> Iterator[Rule]:
    yield f"{key}.gamma", f"{path}/{gamma}", _same
    if isinstance(module.temperature, nn.Parameter):
        yield f"{key}.temperature", f"{path}/{scale}/{SCALE_SUFFIX}", _same
    for mine, theirs in norms.items():
        norm = getattr(module, mine)
        if norm is not None:
            inner = norm.norm if hasattr(norm, "norm") else norm
            sub = f"{key}.{mine}.norm" if hasattr(norm, "norm") else f"{key}.{mine}"
            yield from _norm(sub, f"{path}/{theirs}", inner)


def _layer(l: int, layer: nn.Module) -> Iterator[Rule]:
    key, path = f"layers.{l}", f"_latent_layer/{l}"
    if layer.merge is not None:
        yield from _merge(f"{key}.merge", f"{path}/_merge_decoder_network", layer.merge)
        yield from _cells(f"{key}.decoder", f"{path}/_decoder_network", layer.decoder)
        yield from _conv(f"{key}.prior_head.1", f"{path}/_prior_network/_params_network/_conv2d_layers/0",
                         layer.prior_head[1])
        yield from _merge(f"{key}.bottomup_merge", f"{path}/_merge_encoder_network", layer.bottomup_merge)
    if layer.renorm_old is not None:
        yield from _norm(f"{key}.renorm_old", f"_ctx_layer_norm/{l}", layer.renorm_old)
    if layer.gen_attention is not None:
        yield from _attention(f"{key}.gen_attention", path, layer.gen_attention, "gamma",
                              "_decoder_attention",
                              {"norm_context": "_ctx_layer_norm_layer",
                               "norm_newest": "_attention_layer_norm_layer",
                               "norm_output": "_attention_layer_norm_layer2"})
    if layer.inf_attention is not None:
        yield from _attention(f"{key}.inf_attention", path, layer.inf_attention, "enc_gamma",
                              "_encoder_attention",
                              {"norm_output": "_encoder_attention_layer_norm_layer",
                               "norm_features": "_cond_attention_layer_norm_layer"})
    head = f"{path}/_posterior_network/_params_network/_conv2d_layers"
    convs = [(name, m) for name, m in layer.posterior_head.named_modules(prefix=f"{key}.posterior_head")
             if isinstance(m, WNConv2d)]          # one conv (.posterior_head) or a Sequential's (.i)
    for j, (name, conv) in enumerate(convs):
        yield from _conv(name, f"{head}/{j}", conv)


def tf_paths(model: nn.Module) -> list[Rule]:
    """(avi state_dict key, their attribute path, conversion) for every tensor of `model`
    that their model holds (BatchNorm's num_batches_tracked is avi's alone)."""
    rules: list[Rule] = [("constant", "_latent_layer/0/_decoder_network/constant", _nhwc)]
    rules += _cells("preprocess", "_preproc_encoder/0", model.preprocess)
    for l, enc in enumerate(model.encoders):
        rules += _cells(f"encoders.{l}", f"_latent_layer/{l}/_encoder_network", enc)
    for l, layer in enumerate(model.layers):
        rules += _layer(l, layer)
    rules += _merge("final_merge", "_merge_decoder", model.final_merge)
    rules += _cells("postprocess", "_data_layer/_preproc_layer/0", model.postprocess)
    head = list(_conv("head.conv", "_data_layer/_data_dist/_params_network/_conv2d_layers/0", model.head.conv))
    if hasattr(model.head, "m"):                      # logistic mixture: their channel order
        perm = mixture_channel_order(model.head.m, model.head.c)
        head = [(k, p, _reorder(f, perm)) for k, p, f in head]
    return rules + head


def mixture_channel_order(m: int, c: int) -> np.ndarray:
    """perm with avi_params = their_params[..., perm] for the logistic-mixture head.

    Theirs: [M logits | per component (3 coefficients, 2C values)], where the M x 2C values
    are reshaped (not transposed) to C x 2M and split into locations and log-scales
    [C, M] each. avi's (DiscretizedLogisticMixtureHead): [logits | locations M x C |
    log-scales M x C | coefficients M x K], component-major. A fixed permutation of the last
    conv's output channels, so the two compute the same distribution exactly.
    """
    if c != 3:
        raise ConversionError(f"their logistic mixture is written for 3 colour channels, not {c}")
    avi_of: dict[int, int] = {}
    for t in range(m * (2 * c + 4)):
        if t < m:
            avi_of[t] = t
            continue
        comp, j = divmod(t - m, 2 * c + 3)
        if j < 3:
            avi_of[t] = m + 2 * m * c + comp * 3 + j
            continue
        ch, k = divmod(comp * 2 * c + j - 3, 2 * m)
        avi_of[t] = m + (k * c + ch if k < m else m * c + (k - m) * c + ch)
    perm = np.empty(len(avi_of), dtype=np.int64)
    for t, a in avi_of.items():
        perm[a] = t
    return perm


def _reorder(to_avi, perm: np.ndarray):
    def f(a: np.ndarray) -> np.ndarray:
        return to_avi(a[..., perm])              # output channels are the last axis (HWIO, [O])
    f.__name__ = to_avi.__name__
    f.base = to_avi
    return f


def learned_scales(tensors: Mapping[str, np.ndarray]) -> bool:
    """Whether their depth-wise attention-score scales were trained away from 1 (their TF
    tracked and trained them; an avi model must then learn its temperatures too)."""
    return any(("_decoder_attention/" in k or "_encoder_attention/" in k)
               and k.endswith(SCALE_SUFFIX) and not np.allclose(v, 1.0)
               for k, v in tensors.items())


def convert(tensors: Mapping[str, np.ndarray], model: nn.Module) -> dict[str, torch.Tensor]:
    """A full state_dict for `model` from their tensors. Raises ConversionError naming the
    first missing or mis-shaped tensor, or the tensors of theirs that nothing reads."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, path, to_avi in tf_paths(model):
        if path not in tensors:
            raise ConversionError(f"missing tensor {path} (for avi's {key})")
        value = to_avi(np.asarray(tensors[path]))
        want = tuple(state[key].shape)
        if value.shape != want:
            raise ConversionError(f"tensor {path} has shape {tuple(np.asarray(tensors[path]).shape)}; "
                                  f"the model needs {_theirs(want, to_avi)} (avi's {key} {list(want)})")
        if not np.isfinite(value).all():          # a model file avi would refuse to evaluate
            raise ConversionError(f"tensor {path} holds non-finite values (NaN or infinity)")
        native = value.dtype.newbyteorder("=")           # torch reads native byte order only
        out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=native)).to(state[key].dtype)
        used.add(path)
    left = [k for k in tensors if k not in used and not k.endswith(IGNORED_SUFFIXES)
            and not (k.endswith(SCALE_SUFFIX) and np.allclose(tensors[k], 1.0))]
    if left:
        more = f" (and {len(left) - 3} more)" if len(left) > 3 else ""
        raise ConversionError(f"tensor {left[0]} has no place in the model built from the flags: "
                              f"{', '.join(left[:3])}{more}")
    for key, value in state.items():
        out.setdefault(key, value)          # num_batches_tracked: avi's own counter
    return out


def _theirs(shape: tuple, to_avi) -> tuple:
    to_avi = getattr(to_avi, "base", to_avi)
    if to_avi is _kernel:
        o, i, h, w = shape
        return (h, w, i, o)
    if to_avi is _nhwc:
        n, c, h, w = shape
        return (n, h, w, c)
    return shape
