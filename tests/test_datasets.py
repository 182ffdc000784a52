"""Dataset loaders (real on-disk formats built in tmp_path) and batch preprocessing."""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from avi_spec import load_spec
from avi_spec.schema import Flips
from builders.data.datasets import DatasetError, load_images, load_mnist5k_labels, load_spec_images
from builders.data.preprocess import (BinarizedTestSet, EpochBatches, binarize, likelihood_dims, process_share,
                                 model_input_binary, model_input_cifar, pad_images, prepare_batch,
                                 random_flip, to_unit)

RNG = np.random.default_rng(123)


def idx_bytes(images: np.ndarray, magic: int = 2051) -> bytes:
    header = np.array([magic, *images.shape], dtype=">u4").tobytes()
    return header + images.astype(np.uint8).tobytes()


# ------------------------------------------------------------------------------------ mnist

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz):
    imgs = {"train": RNG.integers(0, 256, (7, 28, 28), dtype=np.uint8),
            "test": RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)}
    for split, stem in (("train", "train"), ("test", "t10k")):
        raw = idx_bytes(imgs[split])
        name = f"{stem}-images-idx3-ubyte"
        if gz:
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (tmp_path / name).write_bytes(raw)
    for split in ("train", "test"):
        out = load_images("mnist", tmp_path, split)
        assert out.dtype == np.uint8 and out.shape == (len(imgs[split]), 1, 28, 28)
        np.testing.assert_array_equal(out[:, 0], imgs[split])


def test_mnist_missing_names_files_and_folder(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_images("mnist", tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-images-idx3-ubyte" in msg
    assert str(tmp_path / "nowhere") in msg and "yann.lecun.com" in msg


@pytest.mark.parametrize("kind", ["magic", "truncated", "header", "badgzip"])
def test_mnist_corrupt(tmp_path, kind):
    good = idx_bytes(RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8))
    name = "train-images-idx3-ubyte"
    if kind == "magic":
        (tmp_path / name).write_bytes(idx_bytes(np.zeros((4, 28, 28)), magic=2049))
    elif kind == "truncated":
        (tmp_path / name).write_bytes(good[:-100])
    elif kind == "header":
        (tmp_path / name).write_bytes(good[:10])
    else:
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress(good)[:50])
    with pytest.raises(DatasetError, match="MNIST"):
        load_images("mnist", tmp_path, "train")


# --------------------------------------------------------------------------------- omniglot

def test_omniglot_chardata_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    train = RNG.random((5, 28, 28)).astype(np.float32)
    test = RNG.random((2, 28, 28)).astype(np.float32)
    # MATLAB layout: one image per column, flattened column-major (as in IWAE's chardata.mat).
    to_cols = lambda a: np.stack([im.reshape(-1, order="F") for im in a], axis=1)
    scipy_io.savemat(tmp_path / "chardata.mat", {"data": to_cols(train), "testdata": to_cols(test)})
    for split, ref in (("train", train), ("test", test)):
        out = load_images("omniglot", tmp_path, split)
        assert out.dtype == np.float32 and out.shape == (len(ref), 1, 28, 28)
        np.testing.assert_allclose(out[:, 0], ref)
    # Same orientation as the IWAE loader's reshape((-1, 28, 28)) / reshape(order="F") chain.
    cols = to_cols(train)
    iwae = cols.T.reshape((-1, 28, 28)).reshape((-1, 784), order="F").reshape(-1, 28, 28)
    np.testing.assert_allclose(load_images("omniglot", tmp_path, "train")[:, 0], iwae)


def test_omniglot_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetError, match=r"chardata\.mat.*iwae") as e:
        load_images("omniglot", tmp_path, "train")
    assert str(tmp_path) in str(e.value)
    (tmp_path / "chardata.mat").write_bytes(b"MATLAB 5.0 MAT-file garbage" * 3)
    with pytest.raises(DatasetError, match="OMNIGLOT"):
        load_images("omniglot", tmp_path, "train")


def test_omniglot_declared_size_is_checked_before_reading(tmp_path, monkeypatch):
    """A compressed variable can declare an array far larger than its file: the shape in its
    header is checked before scipy allocates it (bound lowered here to keep the test small)."""
    import scipy.io as scipy_io

    from builders.data import datasets
    monkeypatch.setattr(datasets, "OMNIGLOT_MAX_IMAGES", 10)
    read = []
    monkeypatch.setattr(scipy_io, "loadmat", lambda *a, **k: read.append(a) or {})
    scipy_io.savemat(tmp_path / "chardata.mat", {"data": np.zeros((784, 11), np.uint8),
                                                 "testdata": np.zeros((784, 3), np.uint8)},
                     do_compression=True)
    with pytest.raises(DatasetError, match=r"declares shape \(784, 11\).*N <= 10 images"):
        load_images("omniglot", tmp_path, "train")
    assert read == []                                   # refused before any data was read
    scipy_io.savemat(tmp_path / "chardata.mat", {"data": np.zeros((28, 28, 5), np.uint8)})
    with pytest.raises(DatasetError, match=r"declares shape \(28, 28, 5\)"):
        load_images("omniglot", tmp_path, "train")


# ---------------------------------------------------------------------------------- cifar10

def cifar_batches(n_per_batch=4):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    imgs = {n: RNG.integers(0, 256, (n_per_batch, 3, 32, 32), dtype=np.uint8) for n in names}
    blobs = {n: pickle.dumps({b"data": imgs[n].reshape(n_per_batch, 3072),
                              b"labels": list(range(n_per_batch))}) for n in names}
    return imgs, blobs


@pytest.mark.parametrize("layout", ["root", "subdir", "tar"])
def test_cifar_roundtrip(tmp_path, layout):
    imgs, blobs = cifar_batches()
    if layout == "tar":
        with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        folder = tmp_path / "cifar-10-batches-py" if layout == "subdir" else tmp_path
        folder.mkdir(exist_ok=True)
        for name, blob in blobs.items():
            (folder / name).write_bytes(blob)
    train, test = load_images("cifar10", tmp_path, "train"), load_images("cifar10", tmp_path, "test")
    assert train.dtype == np.uint8 and train.shape == (20, 3, 32, 32) and test.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(train, np.concatenate([imgs[f"data_batch_{i}"] for i in range(1, 6)]))
    np.testing.assert_array_equal(test, imgs["test_batch"])


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_images("cifar10", tmp_path, "train")
    msg = str(e.value)
    assert "data_batch_1" in msg and "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg
    assert "cs.toronto.edu" in msg
    _, blobs = cifar_batches()
    for name, blob in blobs.items():  # truncated pickle
        (tmp_path / name).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="pickle"):
        load_images("cifar10", tmp_path, "test")
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}))
    with pytest.raises(DatasetError, match="3072"):
        load_images("cifar10", tmp_path, "test")
    tar_root = tmp_path / "t"
    tar_root.mkdir()
    (tar_root / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not really a tarball")
    with pytest.raises(DatasetError, match="corrupt"):
        load_images("cifar10", tar_root, "train")


# ----------------------------------------------------------------------------------- folder

def test_npy_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    singles = RNG.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    for i, im in enumerate(singles):
        np.save(tmp_path / "train" / f"{i:03d}.npy", im)
    stacked = RNG.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "test" / "all.npy", stacked)
    train, test = load_images("folder", tmp_path, "train"), load_images("folder", tmp_path, "test")
    assert train.shape == (3, 1, 8, 8) and train.dtype == np.uint8
    np.testing.assert_array_equal(train[:, 0], singles)
    assert test.shape == (5, 3, 8, 8)
    np.testing.assert_array_equal(test, stacked.transpose(0, 3, 1, 2))
    with pytest.raises(DatasetError, match="train"):
        load_images("folder", tmp_path / "empty", "train")


# ---------------------------------------------------------------------------------- mnist5k

def test_mnist5k_split():
    train, test = load_images("mnist5k", None, "train"), load_images("mnist5k", None, "test")
    assert train.shape == (4500, 1, 28, 28) and test.shape == (500, 1, 28, 28)
    assert train.dtype == np.uint8 and test.dtype == np.uint8
    assert np.bincount(load_mnist5k_labels("test"), minlength=10).tolist() == [50] * 10
    assert np.bincount(load_mnist5k_labels("train"), minlength=10).tolist() == [450] * 10
    np.testing.assert_array_equal(test, load_images("mnist5k", "/ignored", "test"))  # deterministic
    assert 25 < train.mean() < 45 and train.max() == 255 and test.min() == 0
    # Real digits: the 2-pixel border is (almost) empty, the centre is where the ink is.
    assert train[..., :2, :].mean() < 1 and train[..., 10:18, 10:18].mean() > 60
    # Train and test are disjoint images.
    flat = lambda a: {x.tobytes() for x in a.reshape(len(a), -1)}
    assert not flat(train) & flat(test)


# -------------------------------------------------------------------------------- preprocess

def test_unit_pad_and_inputs():
    raw = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    u = to_unit(raw)
    assert u.dtype == torch.float32 and torch.allclose(u * 255, raw.float())
    p = pad_images(u, 2)
    assert p.shape == (4, 1, 32, 32)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (p[..., border] == 0).all() and torch.equal(p[..., 2:30, 2:30], u)
    assert torch.equal(model_input_binary(torch.tensor([0.0, 1.0])), torch.tensor([-1.0, 1.0]))
    c = model_input_cifar(torch.tensor([0, 255], dtype=torch.uint8))
    assert torch.allclose(c, torch.tensor([-1.0, 1.0]))


def test_binarisation_dynamic_train_fixed_test():
    raw = load_images("mnist5k", None, "test")[:64]
    gen = torch.Generator().manual_seed(0)
    a = prepare_batch(raw, "binary", gen, train=True, pad=2)
    b = prepare_batch(raw, "binary", gen, train=True, pad=2)
    assert a.shape == (64, 1, 32, 32) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, b)  # a fresh draw for every training batch
    assert (a[..., :2, :] == -1).all() and (a[..., :, -2:] == -1).all()  # padding enters as -1
    t1, t2 = BinarizedTestSet(raw, seed=7, pad=2), BinarizedTestSet(raw, seed=7, pad=2)
    assert torch.equal(t1.bits, t2.bits) and torch.equal(t1[:], t2[:])
    assert not torch.equal(t1.bits, BinarizedTestSet(raw, seed=8, pad=2).bits)
    assert torch.equal(prepare_batch(t1.bits[:5], "binary", None, train=False), t1[:5])
    assert sum(len(x) for x in t1.batches(10)) == 64
    # Bernoulli draw follows p: mean of many draws approaches the grey level.
    p = torch.full((20000,), 0.3)
    assert abs(binarize(p, torch.Generator().manual_seed(1)).mean().item() - 0.3) < 0.02


def test_cifar_prepare_and_flips():
    raw = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    ev = prepare_batch(raw, "cifar", None, train=False)
    assert ev.dtype == torch.float32 and ev.min() >= -1 and ev.max() <= 1
    assert torch.allclose(ev, raw.float() / 127.5 - 1)
    tr = prepare_batch(raw, "cifar", torch.Generator().manual_seed(3), train=True, flips=Flips())
    for i in range(16):  # every image is one of its four flips
        cands = [ev[i], ev[i].flip(-1), ev[i].flip(-2), ev[i].flip(-1).flip(-2)]
        assert any(torch.equal(tr[i], c) for c in cands)
    assert not torch.equal(tr, ev)
    only_h = random_flip(ev, torch.Generator().manual_seed(3), vertical=False)
    assert all(torch.equal(only_h[i], ev[i]) or torch.equal(only_h[i], ev[i].flip(-1))
               for i in range(16))
    # The spec's switches go through prepare_batch: the same coins, only left-right flips.
    h = prepare_batch(raw, "cifar", torch.Generator().manual_seed(3), train=True,
                      flips=Flips(vertical=False))
    assert torch.equal(h, only_h)
    assert torch.equal(prepare_batch(raw, "cifar", None, train=True), ev)       # flips: null


def test_padding_follows_the_spec_for_both_kinds():
    raw = load_images("mnist5k", None, "test")[:8]
    gen = torch.Generator().manual_seed(0)
    for p in (0, 2, 3):
        x = prepare_batch(raw, "binary", gen, train=True, pad=p)
        assert x.shape == (8, 1, 28 + 2 * p, 28 + 2 * p)
        assert BinarizedTestSet(raw, pad=p)[:].shape == x.shape
    x = prepare_batch(raw, "binary", gen, train=True, pad=3)
    assert (x[..., :3, :] == -1).all() and (x[..., -3:] == -1).all()
    c = prepare_batch(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), "cifar", None,
                      train=False, pad=1)
    assert c.shape == (2, 3, 34, 34) and (c[..., 0, :] == -1).all()     # zeros map to -1


def test_likelihood_dims_is_the_scored_pixels():
    specs = Path(__file__).resolve().parents[1] / "specs"
    assert likelihood_dims(load_spec(specs / "quickstart.yaml").spec) == 28 * 28
    assert likelihood_dims(load_spec(specs / "cifar10_l16.yaml").spec) == 3 * 32 * 32
    padded = load_spec(specs / "quickstart.yaml", ["data.distribution.crop=1"]).spec
    assert likelihood_dims(padded) == 30 * 30           # one padding pixel per side is scored


def test_spec_images_must_have_the_spec_shape(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        np.save(tmp_path / split / "images.npy", np.zeros((4, 32, 32), np.uint8))
    data = load_spec(Path(__file__).resolve().parents[1] / "specs" / "quickstart.yaml",
                     ["data.dataset=folder", f"data.root={tmp_path}"]).spec.data
    with pytest.raises(DatasetError, match=r"1 x 32x32 .*data.image: \{channels: 1, size: 28\}"):
        load_spec_images(data, "train")


def test_epoch_batches():
    images = np.arange(103)  # images are just their own indices here
    def collect(**kw):
        return [b.tolist() for b in EpochBatches(images, 10, seed=5, **kw)]
    e0 = collect(epoch=0)
    assert e0 == collect(epoch=0) and e0 != collect(epoch=1)
    assert len(e0) == 11 and sorted(sum(e0, [])) == list(range(103))  # each index exactly once
    assert len(collect(epoch=0, drop_last=True)) == 10
    assert collect(epoch=0, start_batch=4) == e0[4:]  # resume mid-epoch
    assert len(EpochBatches(images, 10, 5, 0, start_batch=4)) == 7
    whole = collect(epoch=0, drop_last=True)
    ranks = [[b[process_share(len(b), r, 2)] for b in whole] for r in range(2)]
    for k in range(10):  # the ranks' shares partition each global batch, in order
        assert ranks[0][k] + ranks[1][k] == e0[k] and len(ranks[0][k]) == 5
    with pytest.raises(ValueError):
        process_share(10, 0, 3)
    t = EpochBatches(torch.arange(103) * 2, 10, seed=5, epoch=0)
    assert [b.tolist() for b in t][0] == [2 * i for i in e0[0]]


def test_transpose_swaps_rows_and_columns(tmp_path):
    """data.transpose: the orientation the authors' OMNIGLOT reader gives their models."""
    from types import SimpleNamespace
    from builders.data.datasets import load_spec_images
    import numpy as np
    import scipy.io
    data = np.random.RandomState(0).rand(784, 3).astype(np.float32)
    scipy.io.savemat(tmp_path / "chardata.mat", {"data": data, "testdata": data})
    spec = SimpleNamespace(dataset="omniglot", root=str(tmp_path), transpose=False,
                           image=SimpleNamespace(channels=1, size=28))
    upright = load_spec_images(spec, "test")
    spec.transpose = True
    theirs = load_spec_images(spec, "test")
    np.testing.assert_array_equal(theirs, upright.swapaxes(-1, -2))
    # Their reader: each column reshaped row-major.
    np.testing.assert_array_equal(theirs[:, 0], data.T.reshape(-1, 28, 28))


def test_compressed_data_files_are_bounded(tmp_path, monkeypatch):
    """A few KB of gzip can expand to gigabytes (a data.root in a run someone sent you): an
    MNIST .gz or a CIFAR-10 archive member larger than such a file can be is refused before
    it is read whole."""
    import builders.data.datasets as datasets
    monkeypatch.setattr(datasets, "MAX_MNIST_BYTES", 4000)
    monkeypatch.setattr(datasets, "MAX_CIFAR_BATCH_BYTES", 20000)
    raw = idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8))        # 7,856 bytes
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError, match="expands to more than"):
        load_images("mnist", tmp_path, "train")
    _, blobs = cifar_batches()
    blobs["data_batch_2"] = b"\0" * 25000
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DatasetError, match="data_batch_2 holds 25,000 bytes"):
        load_images("cifar10", tmp_path, "train")
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(DatasetError, match="data_batch_2 holds 25,000 bytes"):
        load_images("cifar10", tmp_path, "train")


def test_readme_data_section_covers_every_dataset_and_the_folder_layout(tmp_path):
    """Issue 23 item 7: the README says where every dataset comes from and how a folder
    dataset is laid out; the layout it shows loads, and its links are the loader's own."""
    from PIL import Image

    from builders.data.datasets import CIFAR_URL, DATASETS, MNIST_URL
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    data = readme[readme.index("## Data\n"):readme.index("\n## ", readme.index("## Data\n") + 1)]
    for name in DATASETS:
        assert f"\n| {name} | `dataset: {name}`" in data, name
    for text in (MNIST_URL, CIFAR_URL, "yburda/iwae", "chardata.mat", "cifar-10-python.tar.gz",
                 "train/", "test/", "data/shapes/"):
        assert text in data, text
    root = tmp_path / "shapes"                            # the README's example layout
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / split / f"{i:05d}.png")
    assert load_images("folder", root, "train").shape == (3, 1, 28, 28)
    np.save(root / "test" / "all.npy", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8))
    for p in (root / "test").glob("*.png"):
        p.unlink()
    assert load_images("folder", root, "test").shape == (4, 1, 28, 28)   # one stacked .npy
