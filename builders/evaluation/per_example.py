"""The per-example estimates of one evaluation: -log p(x) and -ELBO of every image, kept
beside eval.json so that two runs scored on the same images can be compared image by image
(builders.evaluation.paired).

RUN/eval/<split>_k<K>_n<N>_<checkpoint>_<ema|raw>[_bin<seed>].npz, one per kept evaluation,
named by the key eval.json keeps evaluations by (<seed>: the binarisation seed of binary
data), so a new evaluation with the same key replaces it. An uncompressed numpy archive
without pickled objects (np.load(allow_pickle=False) reads it):

    index       int32 [N]    the image's index in the split
    nll_nats    float32 [N]  -log p(x), the importance-sampled estimate with K samples
    nelbo_nats  float32 [N]  -ELBO, the mean log-weight of the same K samples
    identity    str []       JSON: what was evaluated (split, K, binarisation seed, data
                             set, data_sha256 of the model-input images, sampling seed, weights)

float32 keeps 7 significant digits: 4e-4 nats on a CIFAR image's ~6,000 nats, far below any
difference worth reporting; 10,000 CIFAR images take 120 kB.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avi_spec.yaml_io import read_bytes_file

FORMAT = "avi-per-example"
FOLDER = "eval"
MAX_BYTES = 64 << 20              # 5 million images; anything larger is not avi's file
ARRAYS = ("index", "nll_nats", "nelbo_nats")


class PerExampleError(ValueError):
    """A per-example file is missing, unreadable, altered or not avi's."""


@dataclass(frozen=True)
class PerExample:
    index: np.ndarray          # int [N]
    nll_nats: np.ndarray       # float [N]
    nelbo_nats: np.ndarray     # float [N]
    identity: dict


def images_sha256(images) -> str:
    """The fingerprint of the evaluated model-input images (a CPU tensor or array): two
    evaluations scored the same pixels (same data files, split, binarisation, padding) iff
    their fingerprints agree."""
    array = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def file_name(doc: dict) -> str:
    """eval/<split>_k<K>_n<N>_<checkpoint>_<ema|raw>[_bin<seed>].npz for an evaluation document."""
    checkpoint = doc.get("checkpoint")
    stem = Path(checkpoint).name.removesuffix(".pt") if isinstance(checkpoint, str) else "model"
    seed = doc.get("binarization_seed")
    name = (f"{doc.get('split')}_k{doc.get('importance_samples')}_n{doc.get('examples')}_"
            f"{stem}_{'ema' if doc.get('ema') else 'raw'}" + (f"_bin{seed}" if seed is not None else ""))
    return f"{FOLDER}/{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.npz"


IDENTITY_KEYS = ("split", "importance_samples", "examples", "binarization_seed", "dataset",
                 "data_sha256", "seed", "checkpoint", "ema")


def encode(doc: dict, per_example: dict) -> bytes:
    """The file's bytes for an evaluation document and its per-example arrays (those of
    builders.evaluation.evaluate.importance_sampled_nll, in the order of the images 0..N-1)."""
    nll = np.asarray(per_example["nll_nats"], dtype=np.float32)
    nelbo = np.asarray(per_example["nelbo_nats"], dtype=np.float32)
    if nll.shape != nelbo.shape or nll.ndim != 1:
        raise ValueError(f"per-example arrays of shapes {nll.shape} and {nelbo.shape}")
    identity = {k: doc.get(k) for k in IDENTITY_KEYS}
    buffer = io.BytesIO()
    np.savez(buffer, index=np.arange(nll.shape[0], dtype=np.int32), nll_nats=nll, nelbo_nats=nelbo,
             identity=np.array(json.dumps({"format": FORMAT, **identity})))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(run_dir: Path, doc: dict) -> PerExample:
    """The per-example estimates an evaluation document of RUN/eval.json refers to, checked
    against the sha256 the document recorded (PerExampleError: missing, changed, not avi's)."""
    ref = doc.get("per_example")
    if not isinstance(ref, dict) or not isinstance(ref.get("file"), str):
        raise PerExampleError("no per-example estimates (evaluated before avi kept them); re-run avi eval")
    path = Path(run_dir) / ref["file"]
    if Path(ref["file"]).is_absolute() or ".." in Path(ref["file"]).parts:
        raise PerExampleError(f"eval.json names {ref['file']}, outside the run directory")
    try:
        data = read_bytes_file(path, MAX_BYTES)
    except OSError as e:
        raise PerExampleError(f"cannot read {path} ({e.strerror or e}); re-run avi eval") from None
    except ValueError as e:        # a device, FIFO (/dev/zero would fill the memory) or too large
        raise PerExampleError(f"{path} is not a per-example file of avi ({e})") from None
    if sha256(data) != ref.get("sha256"):
        raise PerExampleError(f"{path} changed since its evaluation was recorded; re-run avi eval")
    return _parse(path, data)


def _parse(path: Path, data: bytes) -> PerExample:
    if not data.startswith(b"PK"):         # else numpy takes it for a pickle and says so
        raise PerExampleError(f"{path} is not a per-example file of avi (not a numpy .npz archive)")
    try:
        arrays = _bounded_arrays(data)
        identity = json.loads(str(arrays.pop("identity")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, RecursionError) as e:
        raise PerExampleError(f"{path} is not a per-example file of avi ({_brief(e)})") from None
    shapes = {a.shape for a in arrays.values()}
    if (not isinstance(identity, dict) or identity.get("format") != FORMAT or len(shapes) != 1
            or len(next(iter(shapes))) != 1 or arrays["index"].dtype.kind not in "iu"
            or any(arrays[k].dtype.kind != "f" for k in ARRAYS[1:])):
        raise PerExampleError(f"{path} is not a per-example file of avi (arrays "
                              f"{ {k: (a.dtype.str, a.shape) for k, a in arrays.items()} })")
    if arrays["index"].shape[0] == 0:      # a mean over no images is NaN, not a comparison
        raise PerExampleError(f"{path} holds the estimates of no image; re-run avi eval")
    return PerExample(arrays["index"], arrays["nll_nats"], arrays["nelbo_nats"], identity)


def _brief(e: BaseException) -> str:
    return "nested too deep" if isinstance(e, RecursionError) else str(e)[:300]


def _bounded_arrays(data: bytes) -> dict:
    """The arrays avi writes, read without trusting the archive: every member stored (avi
    writes no compression, so a member cannot inflate to more than the file's own bytes: no
    zip bomb) and every array's header checked against the bytes it has before numpy
    allocates the shape it declares (a 1 KB member claiming 2^40 elements)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {i.filename: i for i in z.infolist()}
        out = {}
        for key in (*ARRAYS, "identity"):
            info = members.get(key + ".npy")
            if info is None:
                raise KeyError(f"no array {key}")
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > MAX_BYTES:
                raise ValueError(f"member {key}.npy is compressed or too large (avi stores its arrays "
                                 f"uncompressed)")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                header = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if header is None:
                    raise ValueError(f"member {key}.npy is in npy format {version}, not avi's")
                shape, _, dtype = header(f)
                if dtype.hasobject:
                    raise ValueError(f"member {key}.npy holds Python objects")
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared > info.file_size:
                    raise ValueError(f"member {key}.npy declares {declared:,} bytes of data in "
                                     f"{info.file_size:,}")
            with z.open(info) as f:
                out[key] = np.lib.format.read_array(f, allow_pickle=False)
        return out
