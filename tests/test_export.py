"""`avi export` (safetensors with the resolved spec in its metadata), reading it back, and the
two-line Python API of the README (`import avi`; `from builders import load_run` too)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from avi_spec import load_spec
from builders.loading import RunError, load_exported, load_trained
from cli.main import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two training steps of the quickstart spec, with EMA weights that differ from the trained."""
    from builders.train.training import train
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(load_spec(ROOT / "specs" / "quickstart.yaml", ["train.batch_size=8", "train.ema={decay: 0.5}"]),
          out, device="cpu", max_steps=2, progress_mode="quiet")
    return out


def test_export_round_trip(run, tmp_path):
    from safetensors import safe_open

    r = runner.invoke(app, ["export", str(run), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    path = Path(info["file"])
    assert path == run / "quickstart.safetensors" and info["ema"] is True and info["step"] == 2
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model, resolved, _ = load_trained(run, "cpu")               # EMA weights, as exported
    assert json.loads(meta["avi.spec"]) == resolved.document
    assert meta["avi.spec_hash"] == resolved.hash
    loaded, again, _ = load_exported(path)
    assert again.hash == resolved.hash
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    trained = tmp_path / "trained.safetensors"                  # --no-ema: the other weights
    assert runner.invoke(app, ["export", str(run), "--no-ema", "--out", str(trained)]).exit_code == 0
    plain = load_exported(trained)[0].state_dict()
    assert any(not torch.equal(plain[k], got[k]) for k in got if got[k].is_floating_point())
    # --set applies to an export's spec as to a checkpoint's (it was silently ignored).
    _, changed, _ = load_trained(path, "cpu", overrides=["eval.importance_samples=7"])
    assert changed.spec.eval.importance_samples == 7 and changed.hash != resolved.hash


def test_export_bad_input_exits_2(run, tmp_path):
    from safetensors.torch import save_file

    r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "w.pt")])
    assert r.exit_code == 2 and ".safetensors" in r.stderr
    r = runner.invoke(app, ["export", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such run" in r.stderr
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(RunError, match="holds no avi spec"):
        load_exported(foreign)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(RunError, match="not a readable safetensors"):
        load_exported(broken)


def test_two_line_python_api(run):
    """The README's two lines, on a run directory and on its export."""
    from builders import load_run
    images = load_run(run).sample(16)
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0

    runner.invoke(app, ["export", str(run)])
    exported = load_run(run / "quickstart.safetensors", device="cpu")
    state = torch.random.get_rng_state()
    a, b = exported.sample(4, seed=1), load_run(run, device="cpu").sample(4, seed=1)
    assert torch.equal(a, b)                                    # same weights, same draw
    assert not torch.equal(a, exported.sample(4, seed=2))
    assert torch.equal(torch.random.get_rng_state(), state)    # a seeded draw leaves torch's RNG alone
    assert exported.spec.name == "quickstart" and exported.document["hierarchy"]["layers"] == 4
    grid = run / "from_export.png"                               # the commands read it too
    r = runner.invoke(app, ["sample", str(run / "quickstart.safetensors"), "--n", "4",
                            "--device", "cpu", "--out", str(grid)])
    assert r.exit_code == 0 and grid.is_file(), r.output
    readme = (ROOT / "README.md").read_text()
    assert "import avi" in readme and 'avi.load_run("runs/quickstart").sample(16)' in readme


def test_import_avi_is_the_front_door(tmp_path):
    """`import avi` failed: the first thing a Python user types. It works from any folder,
    imports no torch until a model is asked for, and every name it lists resolves."""
    import subprocess
    import sys
    code = ("import sys, avi; assert 'torch' not in sys.modules; avi.load_spec; "
            "assert avi.__version__ != 'unknown'; print(avi.__version__); "
            "avi.load_run; assert 'torch' in sys.modules; "
            "missing = [n for n in avi.__all__ if not hasattr(avi, n)]; assert not missing, missing; "
            "assert set(avi.__all__) <= set(dir(avi))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    from importlib.metadata import version
    assert r.stdout.strip() == version("avi")
    import avi
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        avi.nope


def test_avi_train_load_run_evaluate(tmp_path):
    """The docstring of the avi package, end to end on two steps: train from a spec with
    --set strings, load the run, evaluate it as `avi eval` would."""
    import avi
    spec = avi.load_spec(ROOT / "specs" / "quickstart.yaml", ["train.batch_size=8"])
    result = avi.train(spec, tmp_path / "r", ["train.epochs=1"], device="cpu", max_steps=2,
                       progress="quiet")
    assert result["step"] == 2 and (tmp_path / "r" / "checkpoints" / "last.pt").is_file()
    run = avi.load_run(tmp_path / "r", device="cpu")
    assert run.spec.train.epochs == 1 and run.spec.train.batch_size == 8
    scores = run.evaluate(k=2, limit=6, seed=0)
    assert scores["examples"] == 6 and scores["importance_samples"] == 2
    again = run.evaluate(k=2, limit=6, seed=0)
    assert scores["nll_nats"] == again["nll_nats"] and 0 < scores["nll_nats"] <= scores["nelbo_nats"]
    with pytest.raises(avi.SpecError):
        avi.train(ROOT / "specs" / "quickstart.yaml", tmp_path / "bad", ["train.epochs=-1"])


def test_python_api_reconstruct_names_the_input_it_takes(run):
    """reconstruct() of what sample() returns (unpadded [0, 1] images) was a RuntimeError deep
    in the attention; it is a ValueError naming the shape reconstruct takes."""
    from builders import load_run
    from builders.evaluation.evaluate import eval_images
    trained = load_run(run, device="cpu")
    with pytest.raises(ValueError, match=r"model input \[N, 1, 32, 32\] in \[-1, 1\].*got \[2, 1, 28, 28\]"):
        trained.reconstruct(trained.sample(2))
    out = trained.reconstruct(eval_images(trained.spec, limit=2), seed=0)
    assert out.shape == (2, 1, 28, 28) and 0.0 <= out.min() and out.max() <= 1.0


def test_export_gets_the_umask_permissions_and_leaves_no_temporary(run, tmp_path):
    """safetensors writes 0600: an export made to be shared was unreadable to the user's group
    and others, unlike every other file avi writes."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "shared.safetensors"
        assert runner.invoke(app, ["export", str(run), "--out", str(out)]).exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["shared.safetensors"]


def test_export_to_a_full_disk_is_a_clear_error(run, tmp_path):
    """safetensors' own writer raised SafetensorError on an I/O error: 'bug in avi' and a
    traceback. A full disk (a file-size limit here) is exit 2 naming the file, nothing left."""
    import resource
    import signal
    import subprocess
    import sys

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    out = tmp_path / "full" / "x.safetensors"
    r = subprocess.run([sys.executable, "-m", "cli.main", "export", str(run), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=small_disk,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "bug in avi" not in r.stderr
    assert f"cannot write {out}" in r.stderr
    assert list(out.parent.iterdir()) == []


def test_a_hostile_export_is_a_short_clear_error(tmp_path):
    """A .safetensors someone sent you: a spec nested too deep was a RecursionError traceback,
    bad avi.* metadata a ValueError, and weights of another model a message of every key."""
    from safetensors.torch import save_file

    spec = json.dumps(load_spec(ROOT / "specs" / "quickstart.yaml").document)
    cases = {"deep": ({"avi.spec": "[" * 100_000 + "]" * 100_000}, "not valid"),
             "meta": ({"avi.spec": spec, "avi.step": "{nope"}, "not valid"),
             "weights": ({"avi.spec": spec}, "1 unexpected")}
    for name, (metadata, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt", **metadata})
        with pytest.raises(RunError, match=message) as e:
            load_exported(path)
        assert len(str(e.value)) < 1000
