"""Load image datasets from their real distribution formats into numpy arrays.

Every loader returns images as ``[N, C, H, W]``: uint8 (0..255) for mnist5k, mnist, cifar10
and uint8 folders; float32 in [0, 1] for omniglot (chardata.mat stores grey levels as floats).
Nothing here needs torch; turning images into model input is ``builders.data.preprocess``'s job.

Any missing, truncated or malformed file raises ``DatasetError`` with a message that names the
files expected, the folder searched and where to obtain them, never a raw traceback. So do
values a model cannot use (NaN, grey levels outside [0, 1], bytes outside 0..255).

Nothing here runs code from a data file: ``data.root`` comes from a spec, and a spec can come
from a run directory someone sent you. CIFAR-10 batches are pickles, so they are read by an
unpickler that admits only what those files hold; .npy files are read without pickles.
"""
from __future__ import annotations

import codecs
import gzip
import io
import pickle
import tarfile
import zlib
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

DATASETS = ("mnist5k", "mnist", "omniglot", "cifar10", "folder")
NEEDS_ROOT = ("mnist", "omniglot", "cifar10", "folder")   # read from the user's files
BINARY_DATASETS = ("mnist5k", "mnist", "omniglot")  # Bernoulli likelihood, padded 28 -> 32

MNIST_URL = "http://yann.lecun.com/exdb/mnist/"
OMNIGLOT_URL = "the IWAE repository github.com/yburda/iwae, datasets/OMNIGLOT/chardata.mat"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class DatasetError(Exception):
    """A dataset's files are missing, truncated or not in the expected format."""


def load_images(dataset: str, root: str | Path | None = None, split: str = "train") -> np.ndarray:
    """Images of ``split`` ("train" or "test") of ``dataset`` as ``[N, C, H, W]``.

    ``root`` is the folder holding the dataset's files (default ``data/<dataset>``); it is
    ignored for ``mnist5k``, which ships inside the package.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    loaders = {"mnist5k": _load_mnist5k, "mnist": _load_mnist, "omniglot": _load_omniglot,
               "cifar10": _load_cifar10, "folder": _load_folder}
    if dataset not in loaders:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    folder = Path(root) if root is not None else Path("data") / dataset
    return loaders[dataset](folder, split)


def load_spec_images(data, split: str = "train", report=None) -> np.ndarray:
    """``load_images`` for a spec's ``data`` section, checked against ``data.image``: images of
    another shape (a folder of, say, 32x32 images under a 28x28 spec) are a DatasetError here
    rather than a shape error deep inside the model.

    A spec without ``data.root`` for a dataset read from files is valid (building a model
    needs no data: an imported run of the authors' code has none); reading it is the error."""
    require_root(data)
    if data.dataset == "folder":
        from .folder import Options, load_folder
        images = load_folder(Path(data.root), split, Options.of(data), report)
    else:
        images = load_images(data.dataset, data.root, split)
    want = (data.image.channels, data.image.size, data.image.size)
    if tuple(images.shape[1:]) != want:
        c, h, w = images.shape[1:]
        raise DatasetError(f"the {split} images of {data.dataset} are {c} x {h}x{w} (channels x "
                           f"height x width), but the spec says data.image: {{channels: {want[0]}, "
                           f"size: {want[1]}}}; set data.image to the images' shape")
    if data.transpose:
        images = np.ascontiguousarray(images.swapaxes(-1, -2))
    return images


def require_root(data) -> None:
    """DatasetError naming the field and the flags that set it, when ``data.root`` is needed."""
    if data.dataset in NEEDS_ROOT and not data.root:
        raise DatasetError(f"dataset {data.dataset} is read from files, so it needs data.root (the "
                           f"folder holding them; for omniglot the .mat file), found none: add "
                           f"data.root to the spec, pass --set data.root=DIR, or for a run imported "
                           f"with avi import-davi, import it with --data-root DIR")


# ---------------------------------------------------------------------------------- mnist5k

MNIST5K_TEST_PER_CLASS = 50


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Cached: the file is small and the split is asked for twice (train and test).
    with resources.files("builders").joinpath("data/mnist5k.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as npz:
            return npz["images"], npz["labels"]


def mnist5k_split_indices(split: str) -> np.ndarray:
    """Sorted indices of the fixed stratified mnist5k split (4,500 train / 500 test).

    Within each class (in class order) one ``default_rng(0)`` stream permutes the class's
    indices and the first 50 go to test, so the split never changes between runs or machines.
    """
    _, labels = _mnist5k_arrays()
    rng = np.random.default_rng(0)
    test = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test.append(idx[rng.permutation(len(idx))[:MNIST5K_TEST_PER_CLASS]])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def load_mnist5k_labels(split: str = "train") -> np.ndarray:
    """Labels (uint8) matching ``load_images("mnist5k", None, split)`` row for row."""
    return _mnist5k_arrays()[1][mnist5k_split_indices(split)]


def _load_mnist5k(_root: Path, split: str) -> np.ndarray:
    images, _ = _mnist5k_arrays()
    return images[mnist5k_split_indices(split)][:, None]  # fancy indexing copies: cache stays intact


# ------------------------------------------------------------------------------------ mnist

_IDX_IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions


def _load_mnist(root: Path, split: str) -> np.ndarray:
    stem = "train-images-idx3-ubyte" if split == "train" else "t10k-images-idx3-ubyte"
    candidates = [root / stem, root / (stem + ".gz")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DatasetError(
            f"MNIST files not found in {root}: expected train-images-idx3-ubyte[.gz], "
            f"t10k-images-idx3-ubyte[.gz]. Download them from {MNIST_URL} and pass data.root=...")
    try:
        raw = _gunzip(path) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"MNIST file {path} is not a readable gzip file ({e}); "
                           f"download it again from {MNIST_URL}") from e
    return parse_idx_images(raw, path)[:, None]


# MNIST's training images are 47,040,016 bytes and a CIFAR-10 batch pickle about 31 MB: what
# decompresses to more is not such a file (a few KB of gzip can expand to gigabytes).
MAX_MNIST_BYTES = 128 << 20
MAX_CIFAR_BATCH_BYTES = 64 << 20
# chardata.mat holds 24,345 + 8,070 images; its variables are zlib-compressed, so a small file
# can declare a huge array. The declared shapes are read (headers only) before any data.
OMNIGLOT_MAX_IMAGES = 200_000


def _gunzip(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        raw = f.read(MAX_MNIST_BYTES + 1)
    if len(raw) > MAX_MNIST_BYTES:
        raise DatasetError(f"MNIST file {path} expands to more than {MAX_MNIST_BYTES:,} bytes; "
                           f"MNIST's largest file is 45 MiB (is it an MNIST image file?)")
    return raw


def parse_idx_images(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """Parse an IDX3 unsigned-byte image file: big-endian header (magic, N, rows, cols), pixels."""
    if len(raw) < 16:
        raise DatasetError(f"MNIST file {path} is truncated: {len(raw)} bytes, no full header")
    magic, n, rows, cols = (int(v) for v in np.frombuffer(raw, dtype=">u4", count=4))
    if magic != _IDX_IMAGE_MAGIC:
        raise DatasetError(f"MNIST file {path} has magic number {magic}, expected "
                           f"{_IDX_IMAGE_MAGIC} (IDX image file); is it a label file or corrupt?")
    if (rows, cols) != (28, 28):
        raise DatasetError(f"MNIST file {path} holds {rows}x{cols} images, expected 28x28")
    expected = 16 + n * rows * cols
    if len(raw) != expected:
        raise DatasetError(f"MNIST file {path} has {len(raw)} bytes but its header ({n} images "
                           f"of {rows}x{cols}) needs {expected}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()


# --------------------------------------------------------------------------------- omniglot

def _load_omniglot(root: Path, split: str) -> np.ndarray:
    # data.root may name the .mat file itself (the authors' run.py takes --dataset_path=FILE).
    path = root if root.suffix == ".mat" else root / "chardata.mat"
    if not path.is_file():
        raise DatasetError(f"OMNIGLOT file not found in {root}: expected chardata.mat. "
                           f"Download it from {OMNIGLOT_URL} and pass data.root=...")
    try:
        import scipy.io
    except ImportError as e:
        raise DatasetError("reading OMNIGLOT's chardata.mat needs scipy: pip install scipy") from e
    key = "data" if split == "train" else "testdata"
    try:
        _check_declared_size(scipy.io.whosmat(str(path)), key, path)
        mat = scipy.io.loadmat(str(path), variable_names=[key])
    except DatasetError:
        raise
    except Exception as e:  # scipy raises a zoo of types (ValueError, MatReadError, OSError...)
        raise DatasetError(f"OMNIGLOT file {path} could not be read as a MATLAB file ({e}); "
                           f"download it again from {OMNIGLOT_URL}") from e
    if key not in mat:
        raise DatasetError(f"OMNIGLOT file {path} has no variable {key!r}; "
                           f"expected the IWAE chardata.mat from {OMNIGLOT_URL}")
    data = np.asarray(mat[key])
    if data.ndim != 2 or data.shape[0] != 784 or not np.issubdtype(data.dtype, np.number):
        raise DatasetError(f"OMNIGLOT variable {key!r} in {path} is {data.dtype} of shape {data.shape}, "
                           f"expected numbers of shape [784, N]")
    # One image per column, each column a 28x28 image flattened in column-major (MATLAB) order,
    # so the upright image is column.reshape(28, 28, order="F") = its C-order reshape transposed.
    # This equals what the IWAE loader feeds its models: data.T.reshape(-1, 28, 28) followed by
    # reshape((-1, 784), order="F"), later viewed row-major as 28x28 for plotting.
    images = data.T.reshape(-1, 28, 28).transpose(0, 2, 1)
    images = np.ascontiguousarray(images, dtype=np.float32)
    check_grey_levels(images, f"OMNIGLOT variable {key!r} in {path}")
    return images[:, None]


def _check_declared_size(variables: list, key: str, path: Path) -> None:
    for name, shape, _ in variables:
        if name == key and (len(shape) != 2 or shape[0] != 784 or shape[1] > OMNIGLOT_MAX_IMAGES):
            raise DatasetError(f"OMNIGLOT variable {key!r} in {path} declares shape {tuple(shape)}, "
                               f"expected [784, N] with N <= {OMNIGLOT_MAX_IMAGES:,} images; "
                               f"expected the IWAE chardata.mat from {OMNIGLOT_URL}")


def check_grey_levels(values: np.ndarray, where: str) -> None:
    """Float grey levels must be finite and in [0, 1]: a NaN would reach torch.bernoulli as a
    crash (or the loss as NaN), a value outside as a wrong likelihood."""
    bad = ~np.isfinite(values)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DatasetError(f"{where} holds {int(bad.sum()):,} values that are not finite (NaN or inf; "
                           f"the first at index {at}); grey levels must be numbers in [0, 1]")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise DatasetError(f"{where} has values outside [0, 1] (min {values.min():g}, max {values.max():g}); "
                           f"float grey levels must be in [0, 1] (or save 8-bit images as uint8)")


# ---------------------------------------------------------------------------------- cifar10

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TAR = "cifar-10-python.tar.gz"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _load_cifar10(root: Path, split: str) -> np.ndarray:
    names = _CIFAR_FILES[split]
    for folder in (root, root / _CIFAR_DIR):
        if all((folder / n).is_file() for n in names):
            for n in names:
                _check_batch_size(folder / n, (folder / n).stat().st_size)
            return _cifar_stack([(folder / n, (folder / n).read_bytes()) for n in names])
    tar_path = root if root.is_file() else root / _CIFAR_TAR
    if tar_path.is_file():
        return _cifar_stack(_read_cifar_tar(tar_path, names))
    raise DatasetError(
        f"CIFAR-10 files not found in {root}: expected {_CIFAR_DIR}/ with data_batch_1..5 and "
        f"test_batch (in {root} or {root / _CIFAR_DIR}) or the archive {_CIFAR_TAR}. "
        f"Download the python version from {CIFAR_URL} and pass data.root=...")


def _check_batch_size(where, size: int) -> None:
    """Refuse a batch larger than a CIFAR-10 batch can be before reading it whole."""
    if size > MAX_CIFAR_BATCH_BYTES:
        raise DatasetError(f"CIFAR-10 batch {where} holds {size:,} bytes, more than the "
                           f"{MAX_CIFAR_BATCH_BYTES:,} a CIFAR-10 batch may hold; "
                           f"download {_CIFAR_TAR} again from {CIFAR_URL}")


def _read_cifar_tar(tar_path: Path, names: list[str]) -> list[tuple[str, bytes]]:
    # Members are read straight from the archive; nothing is extracted to disk.
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise DatasetError(f"CIFAR-10 archive {tar_path} lacks {', '.join(missing)}; "
                                   f"download {_CIFAR_TAR} again from {CIFAR_URL}")
            for n in names:
                _check_batch_size(f"{tar_path}: {n}", members[n].size)
            return [(f"{tar_path}:{members[n].name}", tar.extractfile(members[n]).read())
                    for n in names]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"CIFAR-10 archive {tar_path} is truncated or corrupt ({e}); "
                           f"download {_CIFAR_TAR} again from {CIFAR_URL}") from e


def _cifar_stack(batches: list[tuple[object, bytes]]) -> np.ndarray:
    return np.concatenate([_parse_cifar_batch(raw, where) for where, raw in batches])


def _numpy_core():
    return getattr(np, "_core", None) or np.core        # numpy 2 renamed numpy.core


# Every global a CIFAR-10 batch refers to: the numpy array reconstruction of each pickle
# protocol (the official files: protocol 2, numpy.core.multiarray) and _codecs.encode, which
# is how protocol 2 spells bytes when Python 3 writes it. Nothing here can run code.
_CIFAR_GLOBALS = {
    **{(f"{core}.multiarray", "_reconstruct"): lambda: _numpy_core().multiarray._reconstruct
       for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.numeric", "_frombuffer"): lambda: _numpy_core().numeric._frombuffer
       for core in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class _Refused(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; refuses any other global (the
    way a pickle runs code: `open`, `os.system`, ...) before it is called."""

    def find_class(self, module: str, name: str):
        get = _CIFAR_GLOBALS.get((module, name))
        if get is None:
            raise _Refused(f"{module}.{name}")
        return get()


def _parse_cifar_batch(raw: bytes, where: object) -> np.ndarray:
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as e:
        raise DatasetError(f"CIFAR-10 batch {where} was refused: unpickling it would call {e}, which "
                           f"CIFAR-10 batches never do (a pickle can run code, so only dicts, lists, bytes "
                           f"and numpy arrays are read); download it again from {CIFAR_URL}") from None
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError...
        raise DatasetError(f"CIFAR-10 batch {where} is not a valid pickle ({e!r}); "
                           f"download it again from {CIFAR_URL}") from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or data.dtype.kind not in "ui":
        raise DatasetError(f"CIFAR-10 batch {where} has no b'data' array of integers of shape [N, 3072]; "
                           f"expected the python version from {CIFAR_URL}")
    labels = batch.get(b"labels")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise DatasetError(f"CIFAR-10 batch {where}: b'labels' is not a list as long as b'data'")
    if data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255):
        raise DatasetError(f"CIFAR-10 batch {where} has pixel values outside 0..255 "
                           f"(min {data.min()}, max {data.max()})")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)


# ----------------------------------------------------------------------------------- folder

def _load_folder(root: Path, split: str) -> np.ndarray:
    """A folder of .npy or image files read as stored (no resizing, no cache); a spec's
    folder goes through ``load_spec_images``, which applies data.folder (builders.data.folder)."""
    from .folder import load_folder
    return load_folder(root, split)
