"""Hostile run directories, result files, model files and terminals (issue 20 items 4-11): a
run directory whose entries are links, FIFOs or junk, interrupted evaluations and exports,
model files with non-finite or enormous contents, result files built to exhaust memory,
evaluations of other images, escape sequences and mathtext in what avi prints or draws.
Each must be one clear message (exit 2 through the CLI), write nothing outside the run
directory and never replace a result with another one.

One tiny run (2 layers, 8 filters, 2 steps on 48 images) is trained once for the module.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from avi_spec import load_spec
from builders.data.datasets import load_images
from builders.train.run_dir import LOCK_NAME, TrainingError
from builders.train.training import train

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "specs" / "quickstart.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
SPEC = """extends: {base}
name: hostile
data: {{dataset: folder, root: {root}}}
hierarchy: {{layers: 2, latent: {{channels: 4, size: 8}}}}
cells:
  preprocess: {{filters: 8}}
  decoder: {{filters: 8}}
train: {{batch_size: 16, epochs: 2, kl_warmup: {{epochs: 1, start: 0.1}}, log_every: 1, checkpoint_every: 2}}
eval: {{importance_samples: 2, batch_size: 16}}
"""


def make_data(folder: Path, n_train: int = 48, n_test: int = 16) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        np.save(folder / split / "images.npy", load_images("mnist5k", None, split)[:n, 0])
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_runs")
    make_data(root / "data")
    spec = root / "tiny.yaml"
    spec.write_text(SPEC.format(base=QUICKSTART, root=root / "data"))
    run = root / "run"
    train(load_spec(spec), run, device="cpu", max_steps=2, progress_mode="quiet")
    return SimpleNamespace(root=root, spec=spec, run=run)


def copy_run(tiny, tmp_path: Path, name: str = "run") -> Path:
    return shutil.copytree(tiny.run, tmp_path / name)


def avi(*args, cwd=REPO, env=None, check=None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=cwd,
                       env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600, **kw)
    if check is not None:
        assert r.returncode == check, f"rc {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        if check == 2:
            assert "Traceback" not in r.stderr and "bug in avi" not in r.stderr, r.stderr
    return r


def resume(tiny, run: Path, steps: int = 3):
    train(load_spec(tiny.spec), run, resume=True, device="cpu", max_steps=steps, progress_mode="quiet")


# ------------------------------------------------------------- 4: run-directory entries

@pytest.mark.parametrize("entry", [LOCK_NAME, "metrics.jsonl", "samples", "checkpoints"])
@pytest.mark.parametrize("dangling", [False, True])
def test_a_linked_run_entry_is_refused_and_nothing_outside_changes(tiny, tmp_path, entry, dangling):
    run = copy_run(tiny, tmp_path)
    outside = tmp_path / "outside"
    is_dir = entry in ("samples", "checkpoints")
    if not dangling:
        if is_dir:
            outside.mkdir()
            (outside / "mine.tmp").write_text("keep")
            (outside / ".x.tmp.1").write_text("keep")
            for p in (run / entry).iterdir():
                shutil.copy2(p, outside / p.name)
        else:
            outside.write_text("precious\n")
    before = {p: p.read_bytes() for p in outside.rglob("*")} if is_dir and not dangling else None
    shutil.rmtree(run / entry) if (run / entry).is_dir() else (run / entry).unlink(missing_ok=True)
    (run / entry).symlink_to(outside, target_is_directory=is_dir)
    with pytest.raises(TrainingError, match=rf"{entry} -> .*symbolic link"):
        resume(tiny, run)
    if dangling:
        assert not outside.exists()
    elif is_dir:
        assert {p: p.read_bytes() for p in outside.rglob("*")} == before
    else:
        assert outside.read_text() == "precious\n"


def test_a_linked_lock_through_the_cli_is_exit_2(tiny, tmp_path):
    run = copy_run(tiny, tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (run / LOCK_NAME).unlink(missing_ok=True)
    (run / LOCK_NAME).symlink_to(victim)
    r = avi("train", run, "--resume", "--max-steps", "3", "-q", check=2)
    assert "symbolic link" in r.stderr and victim.read_text() == "precious\n"


def test_clean_up_removes_only_avis_own_temporaries(tiny, tmp_path):
    run = copy_run(tiny, tmp_path)
    mine = [run / "notes.tmp", run / "samples" / "draft.tmp", run / "checkpoints" / "keep.pt.tmp",
            run / "checkpoints" / ".hidden.tmp"]
    stale = [run / ".spec.yaml.tmp.999999", run / "checkpoints" / ".last.pt.prev.tmp.999999",
             run / "samples" / "epoch_0001.png.tmp", run / "checkpoints" / ".last.pt.tmp.42"]
    for p in mine + stale:
        p.write_text("x")
    planted = run / "checkpoints" / f".last.pt.tmp.{os.getpid()}"      # this process's own name
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    planted.symlink_to(victim)
    resume(tiny, run)
    assert all(p.read_text() == "x" for p in mine)
    assert not any(os.path.lexists(p) for p in stale + [planted])
    assert victim.read_text() == "precious\n"


def test_a_live_writers_temporary_is_kept(tmp_path):
    """A temporary whose writer still holds its lock is not a dead writer's: kept."""
    from builders.files import create_temporary, remove_dead_temporaries, write_atomically
    target = tmp_path / "eval.json"
    mine, fd = create_temporary(target)
    tmp = tmp_path / ".eval.json.tmp.1"            # as if another process (pid 1) were writing
    os.rename(mine, tmp)                           # (the lock goes with the open file)
    try:
        assert remove_dead_temporaries(tmp_path) == [] and tmp.exists()
        write_atomically(target, b"{}")                # another writer of the same target
        assert tmp.exists() and target.read_bytes() == b"{}"
    finally:
        os.close(fd)
    assert remove_dead_temporaries(tmp_path) == [tmp] and not tmp.exists()


@pytest.mark.parametrize("content", ["fifo", "binary", "devzero", "directory"])
def test_a_metrics_file_that_is_not_text_is_a_clear_error(tiny, tmp_path, content):
    run = copy_run(tiny, tmp_path)
    metrics = run / "metrics.jsonl"
    metrics.unlink()
    if content == "fifo":
        os.mkfifo(metrics)
    elif content == "binary":
        metrics.write_bytes(b"\x00\xff\xfe" * 1000)
    elif content == "directory":
        metrics.mkdir()
    else:
        os.mknod(metrics, 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 5)) if os.geteuid() == 0 \
            else pytest.skip("a device node needs root; /dev/zero by link is the symlink case")
    with pytest.raises(TrainingError, match="metrics.jsonl"):
        resume(tiny, run)


def test_eval_refuses_to_write_through_a_linked_eval_folder(tiny, tmp_path):
    run = copy_run(tiny, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "eval").symlink_to(outside, target_is_directory=True)
    r = avi("eval", run, "-k", "1", "--limit", "4", "--json", check=0)
    assert "not saved" in r.stderr and "symbolic link" in r.stderr
    assert list(outside.iterdir()) == [] and not (run / "eval.json").exists()



def test_sample_and_plot_refuse_a_linked_default_folder(tiny, tmp_path):
    run = copy_run(tiny, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(run / "samples")
    (run / "samples").symlink_to(outside, target_is_directory=True)
    (run / "plots").symlink_to(outside, target_is_directory=True)
    r = avi("sample", run, "--n", "1", check=2)
    assert "samples -> " in r.stderr and "symbolic link" in r.stderr
    r = avi("plot", "curves", run, check=2)
    assert "plots -> " in r.stderr
    assert list(outside.iterdir()) == []

# ------------------------------------------------------------- 11: interrupted eval and export

def test_the_next_eval_and_export_remove_what_interrupted_ones_left(tiny, tmp_path):
    run = copy_run(tiny, tmp_path)
    (run / "eval").mkdir()
    left = [run / ".eval.json.tmp.999999", run / "eval" / ".test_k9_n4_last_raw.npz.tmp.999999",
            run / ".hostile.safetensors.tmp.999999"]
    users = [run / "notes.tmp", run / "eval" / "notes.tmp", run / "eval" / ".mine.tmp",
             run / ".other.safetensors.tmp.999999"]        # another export's: not this one's
    for p in left + users:
        p.write_bytes(b"partial")
    avi("eval", run, "-k", "1", "--limit", "4", "--json", check=0)
    assert not any(p.exists() for p in left[:2]) and left[2].exists()
    r = avi("export", run, "--json", check=0)
    assert json.loads(r.stdout)["file"] == str(run / "hostile.safetensors")
    assert not any(p.exists() for p in left)
    assert all(p.read_bytes() == b"partial" for p in users)


# ------------------------------------------------------------- 8: non-finite weights in every model file

@pytest.fixture(scope="module")
def exported(tiny):
    from builders.export import export_run
    path, _ = export_run(tiny.run, tiny.root / "tiny.safetensors")
    return path


def _altered_export(exported: Path, dest: Path, change) -> Path:
    """A copy of an export with ``change(weights, metadata)`` applied."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(exported), framework="pt") as f:
        metadata = dict(f.metadata())
    weights = load_file(str(exported))
    change(weights, metadata)
    save_file(weights, str(dest), metadata=metadata)
    return dest


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_in_an_export_are_refused_everywhere(exported, tmp_path, value):
    def poison(weights, _):
        name = next(k for k, t in weights.items() if t.is_floating_point())
        weights[name].view(-1)[0] = value
    bad = _altered_export(exported, tmp_path / "bad.safetensors", poison)
    r = avi("sample", bad, "--out", tmp_path / "s.png", check=2)
    assert "non-finite weights" in r.stderr and not (tmp_path / "s.png").exists()
    from builders import load_run
    from builders.loading import RunError
    with pytest.raises(RunError, match="non-finite weights"):
        load_run(bad, device="cpu")


# ------------------------------------------------------------- 6: result files

def _npy(array: np.ndarray, shape=None) -> bytes:
    """An .npy member: ``array``'s header (with ``shape`` declared instead, if given) and data."""
    import io
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                                  "fortran_order": False,
                                                  "shape": shape if shape is not None else array.shape})
    return buffer.getvalue() + array.tobytes()


def _archive(members: dict, compressed: dict | None = None) -> bytes:
    """An .npz archive of raw .npy members; ``compressed`` members are deflated streams of
    (header, number of zero bytes)."""
    import io
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)
        for name, (header, zeros) in (compressed or {}).items():
            info = zipfile.ZipInfo(name + ".npy")
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                f.write(header)
                block = bytes(1 << 20)
                for _ in range(zeros >> 20):
                    f.write(block)
    return buffer.getvalue()


def _identity(text: str | None = None) -> bytes:
    from builders.evaluation.per_example import FORMAT
    return _npy(np.array(text if text is not None else json.dumps({"format": FORMAT})))


def _planted(tmp_path: Path, data: bytes) -> tuple[Path, dict]:
    """A run folder whose eval.json refers to ``data`` as its per-example file (sha256 right)."""
    from builders.evaluation.per_example import sha256
    run = tmp_path / "planted"
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "eval" / "x.npz").write_bytes(data)
    return run, {"split": "test", "examples": 3, "per_example": {"file": "eval/x.npz", "sha256": sha256(data)}}


def _zip_bomb() -> bytes:
    """About 250 KB that inflates to 256 MiB of float32 zeros."""
    n = 1 << 26
    header = _npy(np.zeros(0, np.float32), shape=(n,))
    good = {"index": _npy(np.arange(3, dtype=np.int32)), "nelbo_nats": _npy(np.zeros(3, np.float32)),
            "identity": _identity()}
    return _archive(good, {"nll_nats": (header, n * 4)})


HOSTILE_ARCHIVES = {
    "zip bomb": (_zip_bomb, "compressed"),
    "header claims 2^40 elements": (lambda: _archive({
        "index": _npy(np.arange(3, dtype=np.int32)), "nll_nats": _npy(np.zeros(3, np.float32), shape=(1 << 40,)),
        "nelbo_nats": _npy(np.zeros(3, np.float32)), "identity": _identity()}), "declares"),
    "identity nested 100,000 deep": (lambda: _archive({
        "index": _npy(np.arange(3, dtype=np.int32)), "nll_nats": _npy(np.zeros(3, np.float32)),
        "nelbo_nats": _npy(np.zeros(3, np.float32)), "identity": _identity("[" * 100_000 + "]" * 100_000)}),
        "nested too deep"),
    "no images": (lambda: _archive({
        "index": _npy(np.arange(0, dtype=np.int32)), "nll_nats": _npy(np.zeros(0, np.float32)),
        "nelbo_nats": _npy(np.zeros(0, np.float32)), "identity": _identity()}), "no image"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ARCHIVES))
def test_hostile_per_example_files_are_refused_in_bounded_memory(tmp_path, case):
    import resource
    from builders.evaluation.per_example import PerExampleError, read
    make, message = HOSTILE_ARCHIVES[case]
    data = make()
    assert len(data) < 4 << 20
    run, doc = _planted(tmp_path, data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PerExampleError, match=message):
        read(run, doc)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 << 10     # KiB: < 200 MB


def test_avi_diff_with_hostile_results_is_clear_and_strict_json(tiny, tmp_path):
    """eval.json whose results are not a list, and a run whose per-example file holds no
    images: avi diff warns or says why the runs are not paired; --json stays strict JSON."""
    from builders.evaluation.eval_results import record_result
    a, b, c = (copy_run(tiny, tmp_path, n) for n in ("a", "b", "c"))
    doc = {"split": "test", "importance_samples": 2, "examples": 3, "nll_nats": 90.0, "dataset": "folder",
           "checkpoint": "last.pt", "ema": False, "data_sha256": "s"}
    record_result(a / "eval.json", doc, {"nll_nats": [1.0, 2.0, 3.0], "nelbo_nats": [2.0, 3.0, 4.0]})
    saved = record_result(b / "eval.json", doc, {"nll_nats": [1.0, 2.5, 3.0], "nelbo_nats": [2.0, 3.0, 4.0]})
    empty = _archive({"index": _npy(np.arange(0, dtype=np.int32)), "nll_nats": _npy(np.zeros(0, np.float32)),
                      "nelbo_nats": _npy(np.zeros(0, np.float32)), "identity": _identity()})
    (b / saved["per_example"]["file"]).write_bytes(empty)
    from builders.evaluation.per_example import sha256
    text = (b / "eval.json").read_text().replace(saved["per_example"]["sha256"], sha256(empty))
    (b / "eval.json").write_text(text)
    (c / "eval.json").write_text(json.dumps({"format": "avi-evaluations", "results": 5}))
    r = avi("diff", a, b, c, "--no-params", "--json", check=0)
    result = json.loads(r.stdout)                        # strict: NaN would not parse
    assert "NaN" not in r.stdout
    assert "results is int, not a list" in r.stderr.replace('"', "")
    reasons = result["paired"]["comparisons"][1]["reasons"]
    assert "holds the estimates of no image" in reasons[0]


# ------------------------------------------------------------- 7: a result is keyed by its images

def test_a_score_on_other_images_never_replaces_the_runs_result(tiny, tmp_path):
    from builders.evaluation.eval_results import best_result, read_results
    from builders.evaluation.per_example import read
    run = copy_run(tiny, tmp_path)
    other = tmp_path / "other"
    for split in ("train", "test"):                     # the same shapes, other pixels
        (other / split).mkdir(parents=True)
        images = np.load(tiny.root / "data" / split / "images.npy")
        np.save(other / split / "images.npy", 255 - images)
    own = json.loads(avi("eval", run, "-k", "1", "--limit", "4", "--json", check=0).stdout)
    avi("eval", run, "-k", "1", "--limit", "4", "--json", "--set", f"data.root={other}", check=0)
    results = read_results(run / "eval.json")
    assert len(results) == 2 and results[0]["data_sha256"] == own["data_sha256"] != results[1]["data_sha256"]
    assert results[1]["overrides"] == [f"data.root={other}"]
    assert results[0]["per_example"]["file"] != results[1]["per_example"]["file"]
    for doc in results:                                 # neither file replaced the other's
        assert read(run, doc).nll_nats.shape == (4,)
    assert best_result(results) is results[0]           # the run is compared by its own data


# ------------------------------------------------------------- 9: the terminal

HOSTILE_TEXT = "a\x1b[2J\x1b]0;owned\x07b\x9b31m\x9d8;;http://x\x9c[red]c[/]\u202ed:smile:"
RAW = ("\x1b", "\x07", "\x9b", "\x9d", "\u202e")


def test_one_escaping_function_for_markup_and_every_control_sequence():
    from rich.console import Console
    from cli.common import _escape
    console = Console(record=True, width=200, emoji=False, force_terminal=False)
    console.print(_escape(HOSTILE_TEXT))
    console.print(_escape(HOSTILE_TEXT, markup=False), markup=False)
    shown = console.export_text()
    assert not any(c in shown for c in RAW)
    assert shown.count("[red]c[/]") == 2 and shown.count("\\x1b]0;owned\\x07") == 2


def test_eval_json_fields_reach_the_terminal_escaped(tiny, tmp_path):
    a, b = copy_run(tiny, tmp_path, "a"), copy_run(tiny, tmp_path, "b")
    doc = {"split": HOSTILE_TEXT, "importance_samples": 2, "examples": HOSTILE_TEXT, "nll_nats": 90.0,
           "dataset": HOSTILE_TEXT, "checkpoint": HOSTILE_TEXT, "full_split": True,
           "per_example": {"file": "eval/x.npz", "sha256": HOSTILE_TEXT}}
    for run, dataset in ((a, HOSTILE_TEXT), (b, "other" + HOSTILE_TEXT)):
        (run / "eval.json").write_text(json.dumps({"format": "avi-evaluations",
                                                   "results": [{**doc, "dataset": dataset}]}))
    for layout in ("fields", "switches"):
        r = avi("diff", a, b, "--no-params", "--layout", layout)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
        assert "owned" in r.stdout and not any(c in r.stdout + r.stderr for c in RAW), r.stdout


def test_out_names_and_paths_are_printed_escaped(exported, tmp_path):
    name = tmp_path / "x\x1b]0;owned\x07[red]y.safetensors"
    shutil.copy(exported, tmp_path / "m.safetensors")
    r = avi("sample", tmp_path / "m.safetensors", "--n", "1", "--out", name.with_suffix(".png"), check=0)
    assert name.with_suffix(".png").is_file() and "owned" in r.stdout
    assert not any(c in r.stdout + r.stderr for c in RAW) and "[red]y" in r.stdout
    r = avi("eval", tmp_path / "nowhere\x1b[2J", check=2)
    assert "nowhere\\x1b[2J" in r.stderr and "\x1b" not in r.stderr


# ------------------------------------------------------------- 5: enormous model specs

def _grown(document: dict, filters: int = 4096) -> dict:
    grown = json.loads(json.dumps(document))
    grown["cells"]["preprocess"]["filters"] = filters
    return grown


def test_a_small_model_file_describing_an_enormous_model_is_refused_unbuilt(tiny, exported, tmp_path):
    import resource
    from builders.checkpoint import load_checkpoint, save_checkpoint
    from builders.loading import RunError, load_trained
    from builders.export import SPEC_KEY

    def grow(_, metadata):
        metadata[SPEC_KEY] = json.dumps(_grown(json.loads(metadata[SPEC_KEY])))
    big_export = _altered_export(exported, tmp_path / "big.safetensors", grow)
    payload = load_checkpoint(tiny.run / "checkpoints" / "last.pt")
    payload["spec"] = _grown(payload["spec"])
    big_pt = save_checkpoint(tmp_path / "big.pt", {k: v for k, v in payload.items()
                                                    if k not in ("format", "format_version")})
    assert big_export.stat().st_size < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in (big_export, big_pt):
        with pytest.raises(RunError, match=r"do not fit the model of its spec \([\d,]{14,} values\)"):
            load_trained(path, "cpu")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 << 10     # KiB
    r = avi("eval", big_export, check=2)
    assert "do not fit" in r.stderr


def test_training_a_model_too_large_for_memory_is_refused_with_the_estimate(tiny, tmp_path):
    r = avi("train", tiny.spec, "--set", "cells.preprocess.filters=4096", "--out", tmp_path / "big",
            "--max-steps", "1", "-q", check=2)
    assert "parameters and buffers" in r.stderr and "GB" in r.stderr and "cells.*.filters" in r.stderr
    assert not (tmp_path / "big").exists()


# ------------------------------------------------------------- 10: figures

def test_curves_leave_out_what_cannot_be_drawn_and_never_parse_names(tmp_path):
    from typer.testing import CliRunner
    from cli.main import app
    named = tmp_path / "kl$\\foo$"
    big = tmp_path / "big"
    for run in (named, big):
        run.mkdir()
    (named / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "lr": 0.001}\n'
                                         '{"step": 2, "loss": 4.0, "lr": 0.001, "test_nelbo": 9.0}\n')
    (big / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 1e308, "lr": 0.001}\n{"step": 2, "loss": -1e308, "lr": 1e400}\n'
        '{"step": 1e309, "loss": 3.0, "lr": 0.001}\n{"step": 100000000000000000000000000000000000000'
        + "0" * 400 + ', "loss": 3.0}\n{"step": 3, "loss": 2.0, "lr": 0.001, "test_nelbo": -1e300}\n'
        '{"step": 4, "loss": 1.0, "lr": 0.001, "test_nelbo": 5.0}\n')
    for axis in ("step", "epoch"):
        out = tmp_path / f"curves_{axis}.svg"
        r = CliRunner().invoke(app, ["plot", "curves", str(named), str(big), "--out", str(out), "--x", axis])
        assert r.exit_code == 0, r.output
        assert "5 point(s) left out" in r.stderr and out.is_file()
        assert "kl$\\foo$" in out.read_text()                  # the name as written, not mathtext


def test_kl_bars_leave_out_infinite_layers(tmp_path):
    from builders.evaluation.figures import kl_figure, plottable, save_figure
    values = np.array([1.0, np.inf, 1e305, -np.inf])
    assert plottable(values)[1] == 3
    path = save_figure(kl_figure({"a$\\x$": values, "b": np.array([2.0, 3.0])}), tmp_path / "kl.svg")
    assert "a$\\x$" in path.read_text()


def test_recording_beside_edited_results_of_any_type(tmp_path):
    """Fields of an edited eval.json of any JSON type neither crash the next `avi eval`'s
    record nor get dropped."""
    from builders.evaluation.eval_results import best_result, read_results, record_result
    odd = [{"split": [1], "per_example": {"file": [1]}, "overrides": {"x": 1}},
           {"split": {"a": 1}, "examples": [2], "checkpoint": 5, "per_example": 7}]
    (tmp_path / "eval.json").write_text(json.dumps({"format": "avi-evaluations", "results": odd}))
    doc = {"split": "test", "importance_samples": 2, "examples": 2, "checkpoint": "last.pt",
           "ema": False, "data_sha256": "a" * 64}
    saved = record_result(tmp_path / "eval.json", doc, {"nll_nats": [1.0, 2.0], "nelbo_nats": [1.0, 2.0]})
    results = read_results(tmp_path / "eval.json")
    assert results[:2] == odd and best_result(results) == saved


def test_avi_build_on_the_cpu_refuses_a_model_larger_than_memory(tiny):
    from typer.testing import CliRunner
    from cli.main import app
    args = ["build", str(tiny.spec), "--set", "cells.preprocess.filters=4096"]
    r = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert r.exit_code == 2 and "parameters and buffers" in r.stderr and "--device meta" in r.stderr
    assert CliRunner().invoke(app, [*args, "--json"]).exit_code == 0      # meta: counted, no memory


def test_a_checkpoint_that_is_a_fifo_device_or_dangling_link_is_named_so(tmp_path):
    from builders.checkpoint import CheckpointError, load_checkpoint
    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "nowhere")
    for name, what in (("fifo.pt", "not a regular file"), ("zero.pt", "not a regular file"),
                       ("dangling.pt", "dangling symbolic link"), ("absent.pt", "does not exist")):
        with pytest.raises(CheckpointError, match=what):
            load_checkpoint(tmp_path / name)
