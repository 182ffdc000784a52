"""Hostile inputs to `avi import-davi` (issue 20): weights files anybody may have written, flag
files, and an --out that cannot be written. Every case once read a file outside the input,
hung, allocated what a header declared, wrote half an import or crashed with a traceback; each
must now be one message naming the place, exit 2, and nothing written. The files are made
here from the trained fixture (tests/fixtures/davi), mutated with h5py / numpy.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import h5py                    # a test dependency (pyproject [test]): never skipped
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app


FIX = Path(__file__).resolve().parent / "fixtures" / "davi" / "trained_tiny_attn"
runner = CliRunner()


def run_import(*args) -> object:
    r = runner.invoke(app, ["import-davi", *map(str, args)])
    assert "Traceback" not in r.output, r.output
    return r


def refused(tmp_path: Path, weights: Path, *needles: str) -> str:
    out = tmp_path / "imported"
    r = run_import(weights, "--flags", FIX / "train.sh", "--out", out)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("error:") == 1, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".avi-new")]
    return r.stderr


@pytest.fixture
def h5(tmp_path) -> Path:
    path = tmp_path / "w.h5"
    shutil.copy(FIX / "final_model.h5", path)
    return path


def first_weight(f) -> tuple[object, str]:
    """The first layer's group and the name of its first tensor (a (1,1,24,20) kernel)."""
    layer = f.attrs["layer_names"][0]
    g = f[layer.decode() if isinstance(layer, bytes) else layer]
    n = g.attrs["weight_names"][0]
    return g, n.decode() if isinstance(n, bytes) else n


def replace_first(path: Path, make) -> str:
    with h5py.File(path, "r+") as f:
        g, n = first_weight(f)
        del g[n]
        make(g, n)
        return f"{g.name}/{n}"


# ----------------------------------------------------- 1: nothing outside the file is read

def test_external_storage_is_refused_and_the_other_file_not_copied(tmp_path, h5):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(1 * 1 * 24 * 20, 7.0, np.float32).tobytes())
    where = replace_first(h5, lambda g, n: g.create_dataset(
        n, shape=(1, 1, 24, 20), dtype="f4", external=[(str(secret), 0, h5py.h5f.UNLIMITED)]))
    refused(tmp_path, h5, where, "external file")


def test_external_link_is_refused(tmp_path, h5):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros((1, 1, 24, 20), np.float32)
    where = replace_first(h5, lambda g, n: g.__setitem__(n, h5py.ExternalLink(str(other), "/x")))
    refused(tmp_path, h5, where, "external link")


def test_soft_link_loop_is_refused(tmp_path, h5):
    def loop(g, n):
        g[n] = h5py.SoftLink(f"{g.name}/{n}")             # points at itself
    where = replace_first(h5, loop)
    refused(tmp_path, h5, where, "soft link")


def test_soft_link_to_a_tensor_of_the_file_is_refused(tmp_path, h5):
    with h5py.File(h5, "r+") as f:
        g, n = first_weight(f)
        g.move(n, "moved")
        g[n] = h5py.SoftLink(f"{g.name}/moved")
    refused(tmp_path, h5, "soft link")


def test_virtual_dataset_is_refused(tmp_path, h5):
    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as f:
        f["x"] = np.ones((1, 1, 24, 20), np.float32)

    def virtual(g, n):
        layout = h5py.VirtualLayout(shape=(1, 1, 24, 20), dtype="f4")
        layout[...] = h5py.VirtualSource(str(src), "x", shape=(1, 1, 24, 20))
        g.create_virtual_dataset(n, layout)
    where = replace_first(h5, virtual)
    refused(tmp_path, h5, where, "virtual dataset")


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_weights_that_are_not_a_regular_file_are_refused_without_hanging(tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIX / "train.sh", run / "train.sh")
    target = run / "final_model.h5"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        target.symlink_to("/dev/zero")
    else:
        target.mkdir()
    start = time.monotonic()
    r = run_import(run, "--out", tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert "not a regular file" in r.stderr or "is a folder" in r.stderr, r.stderr
    assert time.monotonic() - start < 30 and not (tmp_path / "o").exists()


# ------------------------------------------- 1: declarations checked before anything is read

def test_a_huge_declared_tensor_is_refused_before_it_is_allocated(tmp_path, h5):
    where = replace_first(h5, lambda g, n: g.create_dataset(n, shape=(1 << 38,), dtype="f4"))  # 1 TiB
    assert h5.stat().st_size < 2 << 20
    refused(tmp_path, h5, where, "(274877906944,)", "(1, 1, 24, 20)")


def test_a_tensor_of_the_right_shape_that_stores_nothing_is_refused(tmp_path, h5):
    where = replace_first(h5, lambda g, n: g.create_dataset(n, shape=(1, 1, 24, 20), dtype="f4"))
    refused(tmp_path, h5, where, "stores no data")


def test_chunks_larger_than_the_tensor_are_refused(tmp_path, h5):
    where = replace_first(h5, lambda g, n: g.create_dataset(
        n, data=np.zeros((1, 1, 24, 20), np.float32), maxshape=(None, 1, 24, 20),
        chunks=(1 << 12, 1, 24, 20), compression="gzip"))
    refused(tmp_path, h5, where, "chunks")


@pytest.mark.parametrize("dtype, what", [
    (h5py.string_dtype(), "string"),
    ("S8", "string"),
    (np.dtype([("a", "f4"), ("b", "f4")]), "compound"),
    ("i4", "integer"),
    ("c8", "complex"),
])
def test_a_non_float_dtype_where_a_tensor_belongs_is_refused(tmp_path, h5, dtype, what):
    where = replace_first(h5, lambda g, n: g.create_dataset(n, shape=(1, 1, 24, 20), dtype=dtype))
    refused(tmp_path, h5, where, what)


def test_a_group_where_a_tensor_belongs_is_refused(tmp_path, h5):
    where = replace_first(h5, lambda g, n: g.create_group(n))
    refused(tmp_path, h5, where, "a group where a tensor")


def test_a_dangling_weight_name_is_refused(tmp_path, h5):
    where = replace_first(h5, lambda g, n: None)
    refused(tmp_path, h5, where, "no such tensor")


def test_a_dangling_layer_name_is_refused(tmp_path, h5):
    with h5py.File(h5, "r+") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        del f[names[0]]
    refused(tmp_path, h5, f"/{names[0]}", "no such group")


@pytest.mark.parametrize("value, needle", [
    (None, "missing"),
    (np.arange(9), "expected a list of names"),
    (np.array([b"x"] * 5000), "holds 5000 top-level layers"),
])
def test_a_bad_layer_names_attribute_is_refused(tmp_path, h5, value, needle):
    with h5py.File(h5, "r+") as f:
        if value is None:
            del f.attrs["layer_names"]
        else:
            f.attrs["layer_names"] = value
    refused(tmp_path, h5, "layer_names", needle)


def test_a_layer_names_entry_with_an_empty_component_is_refused(tmp_path, h5):
    with h5py.File(h5, "r+") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        names[0] = "a//b"
        f.attrs["layer_names"] = np.array(names, dtype=h5py.string_dtype())
    refused(tmp_path, h5, "a//b", "is not a name")


def test_a_file_that_is_not_hdf5_is_refused(tmp_path):
    bad = tmp_path / "w.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))
    refused(tmp_path, bad, "not a readable HDF5 file")


# -------------------------------------------------- 1 (sibling): .npz weights, same checks

def npz_with(tmp_path: Path, **replace) -> Path:
    tensors = dict(np.load(FIX / "final_model_by_path.npz"))
    tensors.update(replace)
    path = tmp_path / "w_by_path.npz"
    np.savez(path, **tensors)
    return path


def test_npz_member_declaring_a_huge_array_is_refused_before_reading(tmp_path):
    key = "_latent_layer/1/_merge_decoder_network/_nonlocal_layer/key_conv/g"
    path = npz_with(tmp_path)
    # Rewrite the member's .npy header to claim 2^40 elements (the data stays 16 bytes).
    import zipfile
    members = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            members[info.filename] = z.read(info)
    members[key + ".npy"] = members[key + ".npy"].replace(b"(4,)", b"(1099511627776,)")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    refused(tmp_path, path, key, "(1099511627776,)")


@pytest.mark.parametrize("value, needle", [
    (np.array(["a"] * 4), "string"),
    (np.arange(4, dtype=np.int64), "integer"),
])
def test_npz_member_of_a_wrong_dtype_is_refused(tmp_path, value, needle):
    path = npz_with(tmp_path, **{"_latent_layer/1/_merge_decoder_network/_nonlocal_layer/key_conv/g": value})
    refused(tmp_path, path, "_latent_layer/1/_merge_decoder_network/_nonlocal_layer/key_conv/g", needle)


def test_npz_that_is_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "w_by_path.npz"
    os.mkfifo(fifo)
    refused(tmp_path, fifo, "not a regular file")


def test_non_finite_weights_are_refused(tmp_path):
    key = "_latent_layer/1/_merge_decoder_network/_nonlocal_layer/key_conv/g"
    path = npz_with(tmp_path, **{key: np.array([0, np.nan, 0, np.inf], np.float32)})
    refused(tmp_path, path, key, "non-finite")


def test_flags_asking_for_a_model_too_big_for_memory_are_refused_before_any_read(tmp_path, h5, monkeypatch):
    """A small train.sh asking for filters=4096 (a model of billions of parameters) beside an
    .h5 that could be compressed zeros of those shapes: the meta-device estimate refuses it,
    with the figures, before the weights are read or the model is built."""
    import builders.davi.h5 as h5_module
    import builders.network.size as size
    monkeypatch.setattr(size, "available_memory", lambda device: 8 * 10**9)   # any real machine's figure
    monkeypatch.setattr(h5_module, "read_h5", lambda *a: pytest.fail("the weights were read"))
    flags = tmp_path / "train.sh"
    flags.write_text(their_command().replace("num_filters=8", "num_filters=4096"))
    out = tmp_path / "imported"
    r = run_import(h5, "--flags", flags, "--out", out)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("error:") == 1, r.stderr
    for needle in ("parameters and buffers", "to import it needs at least", "GB", "8 GB free",
                   "nothing was written"):
        assert needle in r.stderr, (needle, r.stderr)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".avi-new")]


def test_build_imported_checks_the_size_before_it_builds(monkeypatch):
    """The library entry point as well: the real model is never built for a model too big."""
    import builders.davi.importer as importer
    import builders.network.size as size
    from builders.davi.command import parse_command
    monkeypatch.setattr(size, "available_memory", lambda device: 10**6)
    monkeypatch.setattr(importer, "build_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(size.ModelSizeError, match="to import it needs at least"):
        importer.build_imported(parse_command(their_command()), "tiny", {})


# ------------------------------------------------------------------ 2: flag files

def flags_refused(tmp_path: Path, text: str | bytes, *needles: str) -> str:
    cmd = tmp_path / "train.sh"
    cmd.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "imported"
    r = run_import(cmd, "--flags-only", "--out", out)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("error:") == 1, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert not out.exists()
    return r.stderr


def their_command() -> str:
    return (FIX / "train.sh").read_text().strip()


def test_unbalanced_quote_is_refused(tmp_path):
    flags_refused(tmp_path, their_command() + " --train_log_subdir='tiny\n", "line 1", "unbalanced quote (')")
    flags_refused(tmp_path, their_command() + ' --train_log_subdir="tiny', "unbalanced quote (\")")
    flags_refused(tmp_path, their_command() + " \\", "backslash at the end")


def test_binary_junk_is_refused(tmp_path):
    junk = bytes(range(256)) * 4
    flags_refused(tmp_path, their_command().encode() + b" " + junk, "binary data", "NUL byte")
    flags_refused(tmp_path, their_command().encode() + b" --mode=\xff\xfe", "not UTF-8")


@pytest.mark.parametrize("replace, needle", [
    ("num_layers=3", "num_layers=inf"),
    ("num_layers=3", "num_layers=nan"),
    ("num_layers=3", "num_layers=1e400"),
    ("num_layers=3", "num_layers=2.5"),
    ("epochs=1", "epochs=1e400"),
    ("batch_size=4", "batch_size=-inf"),
    ("num_filters=8", "num_filters=NaN"),
    ("scale=[0,0]", "scale=[0,inf]"),
    ("key_dim=4", "key_dim=1e300"),
    ("learning_rate=0.01", "learning_rate=nan"),
    ("log_scale_low_bound=-5", "log_scale_low_bound=-inf"),
])
def test_non_finite_or_non_integer_numbers_are_refused(tmp_path, replace, needle):
    text = their_command().replace(replace, needle, 1)
    assert text != their_command()
    flags_refused(tmp_path, text, needle.split("=")[1].split(",")[-1].strip("[]"))


@pytest.mark.parametrize("value, needle", [
    ("layer_latent_shape=[16,16,4,num_layers=3", "'[' without its ']'"),
    ("layer_latent_shape=[16,16,4]],num_layers=3", "--hparams: 'layer_latent_shape=[16,16,4]],"),
    ("layer_latent_shape=[16,16,4]],num_layers=3", "']' without its '['"),
    ("layer_latent_shape", "--hparams: cannot read 'layer_latent_shape': expected key=value"),
])
def test_unbalanced_brackets_in_hparams_are_refused(tmp_path, value, needle):
    text = their_command().replace("layer_latent_shape=[16,16,4],num_layers=3", value, 1)
    flags_refused(tmp_path, text, needle)


def test_rich_markup_in_values_is_printed_literally(tmp_path):
    cmd = tmp_path / "train.sh"
    cmd.write_text(their_command().replace("--train_log_subdir=tiny", "--train_log_subdir=[/x][bold]x[/]", 1))
    r = run_import(cmd, "--flags-only", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "[/x][bold]x[/]" in r.stdout
    flags_refused(tmp_path, their_command() + " --[/x]=1", "--[/x] is not a flag")
    flags_refused(tmp_path, their_command().replace("num_layers=3", "num_layers=[/x]", 1), "num_layers=[/x]")


def test_flag_file_size_is_bounded_and_a_huge_file_is_not_read(tmp_path):
    cmd = tmp_path / "train.sh"
    with open(cmd, "wb") as f:
        f.write(their_command().encode())
        f.truncate(3 << 30)                                  # 3 GB, sparse: no disk used
    r = run_import(cmd, "--flags-only", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "bytes, more than the" in r.stderr, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_flag_file_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIX / "final_model.h5", run / "final_model.h5")
    if kind == "fifo":
        os.mkfifo(run / "train.sh")
    else:
        (run / "train.sh").symlink_to("/dev/zero")
    r = run_import(run, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not a regular file" in r.stderr, r.output
    assert not (tmp_path / "o").exists()


def test_a_long_hparams_list_parses_in_linear_time(tmp_path):
    """80,000 eval_hparams pairs (1 MB) took 37 s when parsing was quadratic; now milliseconds
    (bench/hostile_import.py prints the figures). The bound is generous for a loaded machine."""
    from builders.davi.command import parse_command
    text = their_command() + " --eval_hparams=" + ",".join(f"k{i}={i}" for i in range(80_000))
    start = time.process_time()
    from builders.davi.flags import split_hparams
    assert len(split_hparams(parse_command(text)["eval_hparams"])) == 80_000
    assert time.process_time() - start < 5
    cmd = tmp_path / "train.sh"
    cmd.write_text(text)
    r = run_import(cmd, "--flags-only", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "more rows" in r.stdout and r.stdout.count("\n") < 2000


def test_shell_words_follow_sh():
    from builders.davi.command import shell_words
    assert shell_words("a 'b c' \"d\\\"e\" f\\ g #c\nh#i '' x'y'z") == ["a", "b c", 'd"e', "f g", "h#i", "", "xyz"]


def test_a_long_dataset_path_is_kept_as_given(tmp_path):
    cmd = tmp_path / "train.sh"
    cmd.write_text(their_command().replace("fake_omniglot.mat", "d" * 5000, 1))
    r = run_import(cmd, "--flags-only", "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output        # not looked up beside the flags (too long a name): kept


# ------------------------------------------------------------ 3: an import is all or nothing

def leftovers(folder: Path, inputs: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in inputs)


def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    cmd = FIX / "train.sh"
    f = tmp_path / "file"
    f.write_text("keep me")
    for out, needle in ((f, "exists and is not a folder"), (f / "sub", "a parent of it is a file"),
                        (f / "a" / "b", "a parent of it is a file")):
        r = run_import(cmd, "--flags-only", "--out", out)
        assert r.exit_code == 2 and needle in r.stderr, r.output
    assert f.read_text() == "keep me" and leftovers(tmp_path, {"file"}) == []


def test_out_with_a_name_over_255_bytes_is_refused_before_anything_is_read(tmp_path):
    r = run_import(FIX / "train.sh", "--flags-only", "--out", tmp_path / ("é" * 128))
    assert r.exit_code == 2 and "256 bytes" in r.stderr and "at most 255" in r.stderr, r.output
    assert leftovers(tmp_path, set()) == []


def test_out_that_is_an_empty_folder_is_filled_and_a_full_one_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_import(FIX / "train.sh", "--flags-only", "--out", tmp_path / "empty")
    assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["spec.yaml"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    r = run_import(FIX / "train.sh", "--flags-only", "--out", tmp_path / "full")
    assert r.exit_code == 2 and "not empty" in r.stderr, r.output
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def fault_points(monkeypatch, tmp_path: Path, args: list) -> list[str]:
    from builders import faults
    log = tmp_path / "faults.log"
    monkeypatch.setenv("AVI_FAULT_LOG", str(log))
    faults.reset()
    assert run_import(*args, "--out", tmp_path / "new" / "o").exit_code == 0
    shutil.rmtree(tmp_path / "new")
    monkeypatch.delenv("AVI_FAULT_LOG")
    return log.read_text().splitlines()


@pytest.mark.parametrize("flags_only", [True, False], ids=["flags-only", "with-weights"])
def test_a_full_disk_at_any_write_leaves_nothing_behind(tmp_path, monkeypatch, flags_only):
    """ENOSPC raised in-process at each write, mkdir and rename of an import in turn (the
    fault points builders.faults provides): every one is an exit-2 message and leaves no
    folder, temporary or parent behind."""
    from builders import faults
    work = tmp_path / "work"
    work.mkdir()
    args = [FIX / "train.sh", "--flags-only"] if flags_only else [FIX, "--flags", FIX / "train.sh"]
    points = fault_points(monkeypatch, work, args)
    assert len(points) >= (3 if flags_only else 4), points
    for n in range(1, len(points) + 1):
        faults.reset()
        monkeypatch.setenv("AVI_FAULT_RAISE_AT", f"{n}:ENOSPC")
        r = run_import(*args, "--out", work / "new" / "o")
        assert r.exit_code == 2, (points[n - 1], r.output)
        assert "No space left on device" in r.stderr and "nothing was written" in r.stderr, r.stderr
        assert leftovers(work, {"faults.log"}) == [], (points[n - 1], leftovers(work, {"faults.log"}))
    faults.reset()


# An import stopped in the middle of writing its temporary folder: SIGKILL gives it no chance
# to clean up (create_folder's own clean-up covers every catchable stop).
HALF_IMPORT = """
import sys, time
from pathlib import Path
from builders.folder import create_folder
def fill(d):
    (d / "spec.yaml").write_text("half")
    print(d.name, flush=True)
    time.sleep(600)
create_folder(Path(sys.argv[1]), fill)
"""


def half_import(target: Path):
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", HALF_IMPORT, str(target)], stdout=subprocess.PIPE, text=True)
    name = p.stdout.readline().strip()
    assert name.startswith(".avi-new-"), name
    return p, target.parent / name


def test_a_killed_import_leaves_a_temporary_the_next_import_removes(tmp_path):
    """The next import into the same folder removes a dead import's temporary folder, and only
    that: a live import's (locked), a link under that name (and the folder it points to), a
    file of that name and a user's look-alike names stay."""
    import signal
    work = tmp_path / "work"
    work.mkdir()
    live, live_tmp = half_import(work / "b")
    try:
        dead, dead_tmp = half_import(work / "a")        # its own clean-up leaves the live one
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert (dead_tmp / "spec.yaml").exists() and (live_tmp / "spec.yaml").exists()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "precious").write_text("keep")
        keep = {".avi-new-0123456789ab.tmp": "link", ".avi-new-ba9876543210.tmp": "file",
                ".avi-new-notes.tmp": "folder", "avi-new-0123456789ab.tmp": "folder"}
        for name, kind in keep.items():
            if kind == "link":
                (work / name).symlink_to(elsewhere, target_is_directory=True)
            elif kind == "file":
                (work / name).write_text("mine")
            else:
                (work / name).mkdir()
        r = run_import(FIX / "train.sh", "--flags-only", "--out", work / "c")
        assert r.exit_code == 0, r.output
        assert not os.path.lexists(dead_tmp)
        assert (live_tmp / "spec.yaml").read_text() == "half"
        assert (elsewhere / "precious").read_text() == "keep"
        assert sorted(p.name for p in work.iterdir()) == sorted([*keep, live_tmp.name, "c"])
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("code, needle", [("EROFS", "Read-only file system"), ("EACCES", "Permission denied")])
def test_a_read_only_folder_is_an_exit_2_message(tmp_path, monkeypatch, code, needle):
    from builders import faults
    faults.reset()
    monkeypatch.setenv("AVI_FAULT_RAISE_AT", f"1:{code}")
    r = run_import(FIX / "train.sh", "--flags-only", "--out", tmp_path / "o")
    faults.reset()
    assert r.exit_code == 2 and needle in r.stderr, r.output
    assert leftovers(tmp_path, set()) == []


# ------------------------------------------------------------------- siblings found on the way

def test_big_endian_weights_import(tmp_path, h5):
    """TF on a big-endian machine, or any writer's choice: torch reads native order only."""
    with h5py.File(h5, "r+") as f:
        g, n = first_weight(f)
        data = g[n][()]
        del g[n]
        g.create_dataset(n, data=data.astype(">f4"))
    r = run_import(h5, "--flags", FIX / "train.sh", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output


def test_npz_with_an_encrypted_member_is_refused(tmp_path):
    path = npz_with(tmp_path)
    data = bytearray(path.read_bytes())
    data[data.find(b"PK\x03\x04") + 6] |= 1                 # the "encrypted" flag bit
    data[data.find(b"PK\x01\x02") + 8] |= 1
    path.write_bytes(bytes(data))
    refused(tmp_path, path, "encrypted")


def test_a_message_quoting_a_huge_value_is_clipped(tmp_path):
    stderr = flags_refused(tmp_path, their_command() + " --train_hparams=optimizer=" + "x" * 500_000,
                           "optimizer=xxx", "characters left out")
    assert len(stderr) < 3000


def _edit_layer_names(f, change):
    names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
    return change(f, names)


@pytest.mark.parametrize("case, needle", [
    ("dataset where a layer group belongs", "a dataset where a group belongs"),
    ("model_weights as a soft link", "soft link"),
    ("layer_names a scalar", "expected a list of names"),
    ("layer_names not UTF-8", "cannot be read as names"),
    ("weight_names one short", "holds 51 tensors"),
])
def test_more_malformed_keras_layouts_are_one_message(tmp_path, h5, case, needle):
    with h5py.File(h5, "r+") as f:
        layers = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        if case == "dataset where a layer group belongs":
            del f[layers[0]]
            f[layers[0]] = np.zeros(3, np.float32)
        elif case == "model_weights as a soft link":
            f["model_weights"] = h5py.SoftLink("/")
        elif case == "layer_names a scalar":
            f.attrs["layer_names"] = "concat_conv2d"
        elif case == "layer_names not UTF-8":
            f.attrs["layer_names"] = np.array([b"\xff\xfe"] * len(layers))
        else:
            g = f["res_net_1"]
            g.attrs["weight_names"] = g.attrs["weight_names"][:-1]
    refused(tmp_path, h5, needle)
