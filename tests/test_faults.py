"""Faults and careless use around a run: kills at every write, concurrent writers, full or
read-only disks, bad checkpoints, empty splits, relaunching, evaluation results (issue 10
items 6-10, 12-17; issue 11 items 3, 4, 6).

A tiny spec (2 layers, 8 filters) on a 48/16-image folder: 3 steps per epoch, 2 epochs.
CLI cases run `python -m cli.main` in a subprocess; checks of builders' own errors call
builders.train.training.train in the test process.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avi_spec import load_spec
from builders.checkpoint import load_checkpoint, save_checkpoint
from builders.data.datasets import load_images
from builders.train.run_dir import TrainingError
from builders.train.training import train

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "specs" / "quickstart.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
SPEC = """extends: {base}
name: faults
data: {{dataset: folder, root: {root}}}
hierarchy: {{layers: 2, latent: {{channels: 4, size: 8}}}}
cells:
  preprocess: {{filters: 8}}
  decoder: {{filters: 8}}
train: {{batch_size: 16, epochs: 2, kl_warmup: {{epochs: 1, start: 0.1}}, log_every: 1, checkpoint_every: 2}}
"""


def make_data(folder: Path, n_train: int = 48, n_test: int = 16) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        np.save(folder / split / "images.npy", load_images("mnist5k", None, split)[:n, 0])
    return folder


def write_spec(path: Path, root: str | Path) -> Path:
    path.write_text(SPEC.format(base=QUICKSTART, root=root))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_data(root / "data")
    return SimpleNamespace(root=root, spec=write_spec(root / "tiny.yaml", root / "data"))


@pytest.fixture(scope="module")
def run(tiny):
    """A run of 2 steps (last.pt at step 2), trained in this process."""
    out = tiny.root / "run"
    train(load_spec(tiny.spec), out, device="cpu", max_steps=2, progress_mode="quiet")
    return out


def avi(*args, cwd=REPO, env=None, check=None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=cwd,
                       env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600, **kw)
    if check is not None:
        assert r.returncode == check, f"rc {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        if check == 2:
            assert "Traceback" not in r.stderr and "bug in avi" not in r.stderr, r.stderr
    return r


def step_of(path: Path) -> int:
    return load_checkpoint(path)["state"]["step"]


# --------------------------------------------------------------- item 7, 8: kill at every write

def test_every_kill_point_resumes_to_the_uninterrupted_run(tiny, tmp_path):
    """SIGKILL at each write and rename of a run in turn (builders.faults), then --resume:
    the same weights in last.pt, last.prev.pt and best.pt, the same metrics records once
    each, and no temporary file left."""
    r = subprocess.run([sys.executable, str(REPO / "tests" / "kill_points.py"), str(tiny.spec), str(tmp_path)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    ref, points = lines[0]["reference"], lines[0]["points"]
    assert len(points) >= 30 and len(lines) == len(points) + 1
    kinds = {p.split()[1] for p in points}
    assert {"write", "rename", "link", "append"} <= kinds
    assert set(ref["weights"]) == {"best.pt", "last.pt", "last.prev.pt"}
    for row in lines[1:]:
        where = f"killed at {row['n']}: {row['point']}"
        assert row["killed"] == -signal.SIGKILL, where
        assert row["resumed"] == 0, where
        got = row["summary"]
        assert got["weights"] == ref["weights"], where
        assert got["records"] == ref["records"], where
        assert got["files"] == ref["files"], where               # no .tmp files, no extras


def test_stale_temporaries_of_a_killed_run_are_removed(tiny, run, tmp_path):
    import shutil
    run = shutil.copytree(run, tmp_path / "run")
    ckpt = run / "checkpoints"
    stale = [ckpt / ".last.pt.tmp.999999", ckpt / ".last.pt.prev.tmp.999999",
             run / "samples" / "epoch_0001.png.tmp", run / ".spec.yaml.tmp.999999"]
    for p in stale:
        p.write_bytes(b"partial")
    train(load_spec(tiny.spec), run, resume=True, device="cpu", max_steps=3, progress_mode="quiet")
    assert not any(p.exists() for p in stale)
    assert step_of(ckpt / "last.pt") == 3


# --------------------------------------------------------------- item 6: one writer per run

HOLDER = """
import sys, time
from pathlib import Path
from builders.train.run_dir import RunLock
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tiny, tmp_path):
    out = tmp_path / "shared"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = avi("train", tiny.spec, "--out", out, "--max-steps", 1, check=2)
        assert f"process {holder.pid}" in r.stderr and "another `avi train`" in r.stderr
        assert not (out / "spec.yaml").exists() and not (out / "checkpoints" / "last.pt").exists()
    finally:
        holder.kill()                               # dies holding the lock (SIGKILL)
        holder.wait()
    avi("train", tiny.spec, "--out", out, "--max-steps", 1, "--quiet", check=0)
    assert step_of(out / "checkpoints" / "last.pt") == 1
    assert json.loads((out / ".avi-train.lock").read_text())["pid"] != holder.pid


# --------------------------------------------------------------- item 9: non-finite weights

def test_non_finite_weights_are_never_checkpointed(tiny, tmp_path, monkeypatch):
    """An update that leaves inf in the weights (the loss and gradient were finite) stops the
    run at the next checkpoint: last.pt and last.prev.pt keep the last finite states."""
    import builders.train.training as training
    real = training.build_optimizer

    def poisoned(model, cfg):
        opt = real(model, cfg)
        step, calls = opt.step, []

        def bad_step(*a, **kw):
            out = step(*a, **kw)
            calls.append(1)
            if len(calls) == 3:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))
            return out
        opt.step = bad_step
        return opt
    monkeypatch.setattr(training, "build_optimizer", poisoned)
    out = tmp_path / "inf"
    resolved = load_spec(tiny.spec, ["train.checkpoint_every=1"])
    with pytest.raises(TrainingError, match=r"non-finite by step 3.*last.pt is intact \(step 2\)"):
        train(resolved, out, device="cpu", max_steps=4, progress_mode="quiet")
    for name, step in (("last.pt", 2), ("last.prev.pt", 1)):
        payload = load_checkpoint(out / "checkpoints" / name)
        assert payload["state"]["step"] == step
        assert all(torch.isfinite(t).all() for t in payload["model"].values() if t.is_floating_point())


def test_an_overflowing_learning_rate_is_a_clear_error(tiny, tmp_path):
    r = avi("train", tiny.spec, "--out", tmp_path / "big", "--max-steps", 2, "--set", "train.optimizer.lr=1e300",
            "--set", "train.schedule.warmup_epochs=0", check=2)
    assert "overflows float32" in r.stderr


# --------------------------------------------------------------- item 10: empty splits

@pytest.mark.parametrize("empty", ["train", "test"])
def test_an_empty_split_is_refused_before_training(tmp_path, empty):
    data = make_data(tmp_path / "data", **{f"n_{empty}": 0})
    spec = write_spec(tmp_path / "s.yaml", data)
    r = avi("train", spec, "--out", tmp_path / "out", check=2)
    assert f"the {empty} split" in r.stderr and "no images" in r.stderr
    assert not (tmp_path / "out").exists()


def test_devices_relaunch_checks_first(tmp_path):
    """Item 15: a user error under --devices 2 is one message and exit 2, before torchrun."""
    data = make_data(tmp_path / "data", n_test=0)
    spec = write_spec(tmp_path / "s.yaml", data)
    r = avi("train", spec, "--out", tmp_path / "out", "--devices", 2, "--device", "cpu", check=2)
    assert r.stderr.count("error:") == 1 and "the test split" in r.stderr
    assert "torch.distributed" not in r.stderr and "ChildFailedError" not in r.stderr


# --------------------------------------------------------------- item 13: clear errors

def test_unusable_out_paths_are_clear_errors(tiny, tmp_path):
    resolved = load_spec(tiny.spec)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = {a_file: "is a file", a_file / "run": "is a file",
             tmp_path / ("x" * 300): "at most 255",
             tmp_path.joinpath(*["d" * 200] * 25): "characters long"}
    for out, message in cases.items():
        with pytest.raises(TrainingError, match=message):
            train(resolved, out, device="cpu", max_steps=1, progress_mode="quiet")
    r = avi("train", tiny.spec, "--out", a_file, check=2)
    assert "is a file" in r.stderr


def test_unwritable_parent_is_a_clear_error(tiny, tmp_path):
    """The run directory cannot be made (EACCES injected: tests may run as root)."""
    r = avi("train", tiny.spec, "--out", tmp_path / "ro" / "run", env={"AVI_FAULT_RAISE_AT": "1:EACCES"},
            check=2)
    assert "cannot create the run directory" in r.stderr and "permission denied" in r.stderr


def _fsize_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_and_read_only_checkpoints_keep_last_intact(tiny, run, tmp_path):
    import shutil
    disk = tmp_path / "disk"
    shutil.copytree(run, disk)
    before = (disk / "checkpoints" / "last.pt").read_bytes()
    # Files may not grow past 100 kB: the next checkpoint cannot be written (a full disk).
    r = avi("train", tiny.spec, "--out", disk, "--resume", "--quiet", check=2, preexec_fn=_fsize_limit(100_000))
    assert "cannot write" in r.stderr and "last.pt is intact (step 2)" in r.stderr and "--resume" in r.stderr
    assert (disk / "checkpoints" / "last.pt").read_bytes() == before
    # The checkpoints folder turns read-only mid-run (at the rename of the next last.pt).
    ro = tmp_path / "ro"
    shutil.copytree(run, ro)
    log = tmp_path / "points.log"
    avi("train", tiny.spec, "--out", tmp_path / "count", "--max-steps", 4, "--quiet",
        env={"AVI_FAULT_LOG": str(log)}, check=0)
    renames = [int(line.split()[0]) for line in log.read_text().splitlines() if "-> last.pt" in line]
    r = avi("train", tiny.spec, "--out", ro, "--resume", "--quiet", env={"AVI_FAULT_RAISE_AT": f"{renames[0]}:EROFS"},
            check=2)
    assert "read-only" in r.stderr and "last.pt is intact" in r.stderr
    assert step_of(ro / "checkpoints" / "last.pt") == 2


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.pop("optimizer"), "'optimizer' entry is missing"),
    (lambda p: p["state"].update(step="12"), "state.step is '12'"),
    (lambda p: p["model"].update({k: torch.zeros(3) for k in list(p["model"])[:1]}), "do not fit"),
])
def test_resume_from_a_damaged_checkpoint_is_a_clear_error(tiny, run, tmp_path, damage, message):
    import shutil
    out = tmp_path / "damaged"
    shutil.copytree(run, out)
    last = out / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    damage(payload)
    payload = {k: v for k, v in payload.items() if k not in ("format", "format_version")}
    save_checkpoint(last, payload, keep_previous=False)
    before = last.read_bytes()
    with pytest.raises(TrainingError, match=message):
        train(load_spec(tiny.spec), out, resume=True, device="cpu", progress_mode="quiet")
    assert last.read_bytes() == before


# --------------------------------------------------------------- items 12, 14, 16, 17: evaluation

def test_eval_refuses_what_cannot_finish(run):
    t0 = time.monotonic()
    r = avi("eval", run, "-k", "100000000000000000000", "--device", "cpu", check=2)
    assert "would take about" in r.stderr and "years" in r.stderr
    assert time.monotonic() - t0 < 120


def test_eval_keeps_every_result_and_prints_before_saving(tiny, run, tmp_path):
    """Issue 11 item 3 and issue 10 item 14."""
    import shutil
    out = tmp_path / "evals"
    shutil.copytree(run, out)
    for args in (["-k", "3"], ["-k", "5", "--limit", "4"], ["-k", "2"]):
        avi("eval", out, *args, "--device", "cpu", "--json", check=0)
    results = json.loads((out / "eval.json").read_text())["results"]
    assert sorted((d["importance_samples"], d["examples"], d["full_split"]) for d in results) == \
        [(2, 16, True), (3, 16, True), (5, 4, False)]
    r = avi("diff", out, tiny.spec, "--no-params", "--layout", "fields")
    assert "test, K=3, 16 images" in r.stdout
    # A run directory where eval.json cannot be written: the result still comes, with a warning.
    (out / "eval.json").unlink()
    (out / "eval.json").mkdir()
    r = avi("eval", out, "-k", "2", "--device", "cpu", "--json", check=0)
    assert json.loads(r.stdout)["importance_samples"] == 2
    assert "warning: the result was not saved" in r.stderr


def test_relative_data_root_and_set_on_trained_run_commands(tmp_path, monkeypatch):
    """Item 16: trained from one folder with a relative data.root, evaluated from another."""
    here = tmp_path / "project"
    make_data(here / "data")
    spec = write_spec(here / "s.yaml", "data")
    monkeypatch.chdir(here)
    train(load_spec(spec), here / "run", device="cpu", max_steps=1, progress_mode="quiet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = avi("eval", here / "run", "-k", "2", "--device", "cpu", "--json", cwd=elsewhere, check=0)
    assert json.loads(r.stdout)["examples"] == 16
    for command in (["sample", "--n", "4", "--out", "s.png"], ["reconstruct", "--n", "2", "--out", "r.png"]):
        avi(command[0], here / "run", *command[1:], "--device", "cpu", "--set",
            f"data.root={here / 'data'}", cwd=elsewhere, check=0)
    r = avi("eval", here / "run", "--set", "data.root=nowhere", "--device", "cpu", cwd=elsewhere, check=2)
    assert "nowhere" in r.stderr


def test_bad_checkpoints_and_values_are_clear_errors(run, tmp_path):
    """Item 17: code in a checkpoint, NaN weights, --temperature inf, a corrupt best.pt."""
    import shutil
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"format": "avi-checkpoint", "model": Evil()}, tmp_path / "evil.pt")
    r = avi("eval", tmp_path / "evil.pt", "--device", "cpu", check=2)
    assert "could run code" in r.stderr and not marker.exists()

    nan = tmp_path / "nan.pt"
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    first = next(k for k, t in payload["model"].items() if t.is_floating_point())
    payload["model"][first] = payload["model"][first] * float("nan")
    save_checkpoint(nan, {k: v for k, v in payload.items() if k not in ("format", "format_version")})
    r = avi("sample", nan, "--out", tmp_path / "s.png", "--device", "cpu", check=2)
    assert "non-finite weights" in r.stderr and not (tmp_path / "s.png").exists()

    r = avi("sample", run, "--temperature", "inf", "--out", tmp_path / "t.png", "--device", "cpu", check=2)
    assert "--temperature" in r.stderr

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "best.pt").write_bytes(b"garbage")
    r = avi("eval", copy, "-k", "1", "--limit", "2", "--device", "cpu", "--json", check=0)
    assert "best.pt is corrupt" in r.stderr and "last.pt" in r.stderr
    assert json.loads(r.stdout)["checkpoint"].endswith("last.pt")


def test_interrupt_hint_suggests_resume_only_when_possible(tmp_path):
    """The hint names the run directory: `avi train SPEC --out RUN --resume` was refused
    whenever the run had been started with --set (issue 23 item 4)."""
    from cli.train import _interrupted_hint
    assert "--resume" not in _interrupted_hint("s.yaml", tmp_path / "new")
    (tmp_path / "spec.yaml").write_text("# x\n")
    assert _interrupted_hint("s.yaml", tmp_path).endswith(f"avi train {tmp_path} --resume\n")
    spaced = tmp_path / "my run"
    spaced.mkdir()
    (spaced / "spec.yaml").write_text("# x\n")
    assert f"avi train '{spaced}' --resume" in _interrupted_hint("s.yaml", spaced)


# --------------------------------------------------------------- issue 11 item 6: output

def test_output_conventions_of_a_run(tiny, tmp_path):
    """Without a terminal the first epoch shows progress; the last step is recorded though
    it is shorter than log_every; the summary counts epochs from 1."""
    out = tmp_path / "plain"
    r = avi("train", tiny.spec, "--out", out, "--max-steps", 2, "--set", "train.log_every=100", check=0)
    assert "epoch 1/2  step 1" in r.stderr
    assert r.stdout.strip().startswith("stopped at step 2 in epoch 1/2")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [2]


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_jsonl_is_strict_json(tiny, tmp_path):
    out = tmp_path / "nan"
    r = avi("train", tiny.spec, "--out", out, "--jsonl", "--max-steps", 3, "--set", "train.optimizer.lr=1e30",
            "--set", "train.schedule.warmup_epochs=0", "--set", "train.max_skipped=2", check=1)
    rows = [_strict(line) for line in r.stdout.splitlines()]
    assert rows and any(row.get("loss") is None for row in rows)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict(line)


def test_devices_relaunch_ignores_a_decoy_cli_package(tiny, tmp_path):
    """Issue 11 item 4: from a folder holding its own cli/, --devices 2 still trains with avi
    (the decoy would write a marker and exit 0), and torch's per-process FutureWarning is gone.
    avi starts as its console script does: the current folder is not on sys.path."""
    decoy = tmp_path / "cli"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("")
    (decoy / "main.py").write_text("import pathlib\npathlib.Path('DECOY_RAN').write_text('x')\n"
                                   "def main():\n    pathlib.Path('DECOY_RAN').write_text('x')\n")
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.pop(0); sys.argv[0] = 'avi'; "
                        "sys.path.insert(0, sys.argv.pop(1)); from cli.main import main; main()",
                        str(REPO), "train", str(tiny.spec), "--out", "run", "--devices", "2", "--device", "cpu",
                        "--max-steps", "2", "--quiet"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "DECOY_RAN").exists()
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert payload["state"]["step"] == 2 and payload["world_size"] == 2
    assert "FutureWarning" not in r.stderr


def test_an_unreadable_eval_json_is_kept_not_replaced(tmp_path):
    """A damaged eval.json may be the only copy of earlier results: recording a new result leaves
    it as it is (an OSError the CLI shows as a warning) instead of silently dropping it."""
    from builders.evaluation.eval_results import read_results, record_result
    path = tmp_path / "eval.json"
    path.write_text('{"format": "avi-evaluations", "results": [{"importance_samples": 500')
    with pytest.raises(OSError, match="left as it is"):
        record_result(path, {"split": "test", "importance_samples": 2, "examples": 4})
    assert path.read_text().endswith('"importance_samples": 500')
    path.unlink()
    os.mkfifo(path)                       # a FIFO would block the reader for ever
    with pytest.raises(OSError, match="not a regular file"):
        record_result(path, {"split": "test", "importance_samples": 2, "examples": 4})
    path.unlink()
    record_result(path, {"split": "test", "importance_samples": 2, "examples": 4})
    assert [d["importance_samples"] for d in read_results(path)] == [2]


def test_concurrent_evaluations_are_all_kept(tmp_path):
    """Two `avi eval` of one run at once: each read-modify-write of eval.json is exclusive."""
    import threading
    from builders.evaluation import eval_results
    path = tmp_path / "eval.json"
    slow = eval_results.read_results

    def read_slowly(p):                   # widen the window between reading and replacing
        got = slow(p)
        time.sleep(0.2)
        return got
    eval_results.read_results = read_slowly
    try:
        threads = [threading.Thread(target=eval_results.record_result,
                                    args=(path, {"split": "test", "importance_samples": k, "examples": 4}))
                   for k in (1, 2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        eval_results.read_results = slow
    assert sorted(d["importance_samples"] for d in eval_results.read_results(path)) == [1, 2, 3]


def test_plot_curves_refuses_a_metrics_file_that_is_not_a_file(tmp_path):
    """Like a spec's `extends:`, metrics.jsonl is read only as a regular file: /dev/zero or a
    FIFO in a run directory someone sent you is a clear error, not a hang."""
    for name, make in (("fifo", os.mkfifo), ("zero", lambda p: os.symlink("/dev/zero", p))):
        run = tmp_path / name
        run.mkdir()
        make(run / "metrics.jsonl")
        r = avi("plot", "curves", run, "--out", tmp_path / "c.png", check=2)
        assert "not a regular file" in r.stderr
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "metrics.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    r = avi("plot", "curves", tmp_path / "deep", "--out", tmp_path / "c.png", check=2)
    assert "line 1 is not a JSON record" in r.stderr


def test_figures_and_grids_on_a_full_disk_are_clear_errors(run, tmp_path):
    """matplotlib's PDF writer turned a full disk into AttributeError ('bug in avi'), and every
    failed figure or grid left FILE.tmp behind: encode first, then write; nothing is left."""
    full = tmp_path / "full"
    for out, args in ((full / "a.pdf", ["plot", "attention", run, "--device", "cpu"]),
                      (full / "c.svg", ["plot", "curves", run]),
                      (full / "s.png", ["sample", run, "--n", "16", "--device", "cpu"])):
        r = avi(*args, "--out", out, check=2, preexec_fn=_fsize_limit(2000))
        assert f"cannot write {out}" in r.stderr
    assert list(full.iterdir()) == []


def test_evaluations_of_other_weights_are_kept_apart(tmp_path):
    """A `--no-ema` or last.pt check at the same split and K is another result, not a
    replacement for the EMA best.pt one; a re-evaluation of the same weights replaces."""
    from builders.evaluation.eval_results import read_results, record_result
    path = tmp_path / "eval.json"
    base = {"split": "test", "importance_samples": 500, "examples": 10000}
    record_result(path, base | {"checkpoint": "runs/x/checkpoints/best.pt", "ema": True, "nll_nats": 1.0})
    record_result(path, base | {"checkpoint": "runs/x/checkpoints/best.pt", "ema": False, "nll_nats": 2.0})
    record_result(path, base | {"checkpoint": "/abs/runs/x/checkpoints/last.pt", "ema": True, "nll_nats": 3.0})
    record_result(path, base | {"checkpoint": "/elsewhere/x/checkpoints/best.pt", "ema": True, "nll_nats": 4.0})
    assert sorted(d["nll_nats"] for d in read_results(path)) == [2.0, 3.0, 4.0]
