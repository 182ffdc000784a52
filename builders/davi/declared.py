"""What the model built from their flags expects of each of their tensors, checked on what a
weights file declares (shape, dtype) before a byte of the tensor is read.

A weights file may come from anybody: its header can declare a 1 TiB tensor in a 1 MB file,
or strings where floats belong. Reading first and checking after would allocate whatever the
file declares; checking the declaration against the model first bounds every read by the
model's own size.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from .weights import IGNORED_SUFFIXES, SCALE_SUFFIX, ConversionError, _theirs, tf_paths

FLOAT_SIZES = (2, 4, 8)          # float16/32/64: what TF writes for weights


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Their attribute path -> the shape their model holds it in, for `model`'s configuration
    (a meta-device model: no memory). Weight norm's `initialized` flags and the attention-score
    scales are scalars (written by their Keras, held or not by avi)."""
    state = model.state_dict()
    shapes = {path: tuple(_theirs(tuple(state[key].shape), to_avi)) for key, path, to_avi in tf_paths(model)}
    for path in list(shapes):
        if path.endswith("/v"):
            shapes[path[:-2] + "/initialized"] = ()
    return shapes


def check_declared(path: str, shape: tuple | None, dtype: np.dtype, shapes: dict[str, tuple],
                   where: str) -> None:
    """ConversionError naming `where` (the tensor's place in the file) unless a tensor that
    declares `shape` and `dtype` can be their `path` in the model `shapes` describes."""
    flag = path.endswith(IGNORED_SUFFIXES)
    want = shapes.get(path, () if path.endswith(SCALE_SUFFIX) else None)
    if want is None:
        raise ConversionError(f"{where}: tensor {path} has no place in the model built from the flags")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise ConversionError(f"{where}: a compound or array type ({dtype}) where the tensor {path} "
                              "(floating point) belongs")
    ok = dtype.kind in "biuf" if flag else (dtype.kind == "f" and dtype.itemsize in FLOAT_SIZES)
    if not ok:
        raise ConversionError(f"{where}: {_kind(dtype)} where the tensor {path} belongs "
                              f"({'a flag' if flag else 'float16, float32 or float64'})")
    if shape is None:
        raise ConversionError(f"{where}: an empty (null) dataspace where the tensor {path} belongs")
    if tuple(shape) != want:
        raise ConversionError(f"{where}: tensor {path} has shape {tuple(shape)}; the model built "
                              f"from the flags needs {want}")


def _kind(dtype: np.dtype) -> str:
    if (dtype.metadata or {}).get("vlen") in (str, bytes):          # h5py's variable-length strings
        return "a string type (variable-length)"
    kinds = {"O": "an object or variable-length type", "S": "a string type", "U": "a string type",
             "i": "an integer type", "u": "an integer type", "b": "a boolean type",
             "V": "an opaque type", "c": "a complex type", "M": "a date type", "m": "a time type"}
    return f"{kinds.get(dtype.kind, 'a non-float type')} ({dtype})" if dtype.kind != "f" \
        else f"a {dtype.itemsize * 8}-bit float"
