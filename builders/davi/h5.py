"""Read the authors' Keras HDF5 weight files (`model.save_weights`, `final_model.h5`).

Keras writes one group per top-level layer, in the model's layer order, each holding that
layer's weights in Keras tracking order (trainable first, then non-trainable) under names
that carry global counters (`conv2d_87/.../weight_norm_53/kernel:0`) which change from run
to run. Keras itself loads such files by position; so does this reader. It lists, for a
model built from the same flags, their attribute paths in Keras' order (`keras_order`),
assigns the file's tensors to them one by one, and checks every shape on the way.

The file may come from anybody, so nothing is read before everything is checked: the reader
follows hard links only (a soft or external link, or a dataset whose data lives in another
file, external storage or a virtual dataset, is refused: it could pull in any file on the
machine), and every dataset's declared shape and dtype must be the model's before a byte of
it is read, which bounds memory by the model's own size.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from torch import nn

from .declared import check_declared, expected_shapes
from .source import open_regular
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


MAX_NAMES = 1 << 16        # entries of a layer_names / weight_names list (a model has thousands)
MAX_NAME_BYTES = 1 << 12   # bytes of one entry of such a list


def read_h5(path: str | Path, model: nn.Module) -> dict[str, np.ndarray]:
    """Their tensors keyed by attribute path, read by position from a Keras HDF5 weights file
    for a model of `model`'s configuration (a meta-device model will do). ConversionError,
    naming the place in the file, on a file that does not fit or that reaches outside itself."""
    groups = keras_order(model)
    shapes = expected_shapes(model)
    with _open(Path(path)) as f:
        try:
            full = f.get("model_weights", getlink=True) is not None   # model.save(): a full model
        except Exception as e:                                        # a damaged link table
            raise ConversionError(f"{path}: cannot be read ({_first_line(e)})") from None
        root = _resolve(f, "model_weights", path, want="group") if full else f
        layer_names = _names(root, "layer_names", path, (len(groups),), "the file", "top-level layers",
                             f" ({', '.join(t for t, _, _ in groups)})")
        plan = []
        for name, (top, expected, optional) in zip(layer_names, groups):
            g = _resolve(root, name, path, want="group")
            names = _names(g, "weight_names", path, (len(expected), len(expected) - len(optional)),
                           f"layer '{name}' ({top})", "tensors")
            if len(names) == len(expected) - len(optional):
                expected = [p for p in expected if p not in optional]     # an older Keras
            for n, p in zip(names, expected):
                where = f"{path}: {g.name.rstrip('/')}/{n}"
                d = _resolve(g, n, path, want="dataset", shown=where)
                _check_dataset(d, p, shapes, where)
                plan.append((d, p, where))
        # Only now, with every declaration checked, is anything read.
        return {p: _read(d, where) for d, p, where in plan}


@contextmanager
def _open(path: Path) -> Iterator:
    """The HDF5 file at `path`, opened on a descriptor checked to be a regular file (a FIFO
    would block for ever, a device never ends) so that it cannot be swapped after the check."""
    h5py = _h5py()
    with open_regular(path) as fobj:
        try:
            f = h5py.File(fobj, "r")
        except Exception as e:           # h5py's OSError, or ValueError on a damaged superblock
            raise ConversionError(f"{path}: not a readable HDF5 file ({_first_line(e)})") from None
        with f:
            yield f


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ConversionError("reading .h5 files needs h5py: pip install h5py (in a checkout of avi: "
                              "pip install -e '.[import]'), or pass their weights as a .npz keyed "
                              "by attribute path") from None
    return h5py


def _resolve(group, name: str, path, want: str, shown: str | None = None):
    """The object `name` (a/b/c) below `group`, reached through hard links only."""
    h5py = _h5py()
    shown = shown or f"{path}: {group.name.rstrip('/')}/{name}"
    node = group
    parts = name.split("/")
    if any(part in ("", ".") for part in parts):
        raise ConversionError(f"{shown}: '{name}' is not a name of an object in the file")
    for i, part in enumerate(parts):
        try:
            link = node.get(part, getlink=True)
            if isinstance(link, h5py.SoftLink):
                raise ConversionError(f"{shown}: a soft link (to {link.path}) where a "
                                      f"{_noun(want)} belongs; avi follows no links in a weights file")
            if isinstance(link, h5py.ExternalLink):
                raise ConversionError(f"{shown}: an external link (to {link.path} in {link.filename}); "
                                      "avi reads nothing outside the weights file")
            if link is None:
                raise ConversionError(f"{shown}: no such {_noun(want)} in the file")
            if not isinstance(link, h5py.HardLink):
                raise ConversionError(f"{shown}: a link of an unknown kind; avi follows no links")
            node = node[part]
        except ConversionError:
            raise
        except Exception as e:                           # a damaged file: h5py's KeyError, OSError ...
            raise ConversionError(f"{shown}: cannot be read ({_first_line(e)})") from None
        kind = "group" if i < len(parts) - 1 or want == "group" else "dataset"
        cls = h5py.Group if kind == "group" else h5py.Dataset
        if not isinstance(node, cls):
            what = "a group" if isinstance(node, h5py.Group) else (
                "a dataset" if isinstance(node, h5py.Dataset) else "a named datatype")
            raise ConversionError(f"{shown}: {what} where a {_noun(kind)} belongs")
    return node


def _noun(want: str) -> str:
    return "group" if want == "group" else "tensor (dataset)"


def _names(group, attr: str, path, counts: tuple[int, ...], what: str, unit: str,
           detail: str = "") -> list[str]:
    """A list attribute (layer_names, weight_names), its size and type checked before it is read."""
    where = f"{path}: {group.name} attribute {attr}"
    try:
        if attr not in group.attrs:
            raise ConversionError(f"{where}: missing; {what} is not a Keras weights file")
        aid = group.attrs.get_id(attr)
        shape, dtype = aid.shape, aid.dtype
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"{where}: cannot be read ({_first_line(e)})") from None
    empty = shape == (0,)                # Keras writes an empty list as float64[0]
    if not empty and (shape is None or len(shape) != 1 or dtype.kind not in "SOU" or dtype.itemsize > MAX_NAME_BYTES \
            or (dtype.kind == "O" and _h5py().check_string_dtype(dtype) is None)):
        raise ConversionError(f"{where}: expected a list of names, found {dtype} of shape {shape}")
    n = shape[0]
    if n not in counts or n > MAX_NAMES:
        need = " or ".join(str(c) for c in sorted(set(counts)))
        raise ConversionError(f"{where}: {what} holds {n} {unit}; the model built from the flags "
                              f"has {need}{detail}")
    if empty:
        return []
    try:
        raw = group.attrs[attr]
        names = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in raw]
    except Exception as e:
        raise ConversionError(f"{where}: cannot be read as names ({_first_line(e)})") from None
    if any(len(v.encode()) > MAX_NAME_BYTES for v in names):
        raise ConversionError(f"{where}: a name longer than {MAX_NAME_BYTES} bytes")
    return names


def _check_dataset(d, their_path: str, shapes: dict, where: str) -> None:
    """Refuse what would read outside the file or more than the model holds, before reading."""
    try:
        virtual, external = d.is_virtual, d.external
        shape, dtype, chunks = d.shape, d.dtype, d.chunks
        stored = d.id.get_storage_size()
    except Exception as e:            # a type h5py cannot map, a damaged header
        raise ConversionError(f"{where}: cannot be read ({_first_line(e)})") from None
    if virtual:
        raise ConversionError(f"{where}: a virtual dataset (its data lives in other files); "
                              "avi reads nothing outside the weights file")
    if external:
        raise ConversionError(f"{where}: its data is stored in an external file ({external[0][0]!r}); "
                              "avi reads nothing outside the weights file")
    check_declared(their_path, shape, dtype, shapes, where)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if chunks is not None and int(np.prod(chunks, dtype=np.int64)) * dtype.itemsize > max(nbytes, 1 << 20):
        raise ConversionError(f"{where}: its chunks {chunks} are larger than the tensor {shape}")
    if nbytes and not stored:
        raise ConversionError(f"{where}: declares {shape} but stores no data")


def _read(d, where: str) -> np.ndarray:
    try:
        return np.asarray(d[()])
    except Exception as e:            # damaged data, a filter this HDF5 lacks
        raise ConversionError(f"{where}: cannot be read ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
