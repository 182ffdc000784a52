"""`avi train`: schedules, L2 groups, checkpoints, and real runs through the CLI (CPU).

The runs use a tiny model (2 layers, 8 filters) on a 96/32-image folder cut from mnist5k, so
an epoch is 6 steps of 16 images and every run takes a few seconds.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
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
from builders.network.build import build_model
from builders.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from builders.data.datasets import load_images
from builders.train.optim import KerasAdamax, attention_parameter_names, build_optimizer, parameter_groups
from builders.train.schedules import kl_beta, learning_rate
from builders.train.training import tensors_hash

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "specs" / "quickstart.yaml"


# ------------------------------------------------------------------------ schedules

def sched(**kw):
    base = dict(name="cosine", warmup_epochs=5.0, warmup_start_lr=1e-4, min_lr=1e-4,
                first_cycle_epochs=300.0, cycle_mult=2.0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_cosine_warmup_matches_architecture_values():
    s, spe = sched(), 10
    lr = lambda epoch: learning_rate(epoch * spe, spe, s, 1e-2, 400)  # noqa: E731
    assert lr(100) == pytest.approx(8.65e-3, abs=5e-6)
    assert lr(200) == pytest.approx(5.15e-3, abs=5e-6)
    assert lr(300) == pytest.approx(1.58e-3, abs=5e-6)
    assert lr(5) == pytest.approx(1e-2)
    assert lr(400) == pytest.approx(1e-4)
    # Linear per-step warm-up from 1e-4 to 1e-2 over 5 epochs (50 steps).
    assert learning_rate(0, spe, s, 1e-2, 400) == pytest.approx(1e-4)
    assert learning_rate(25, spe, s, 1e-2, 400) == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4))
    assert learning_rate(49, spe, s, 1e-2, 400) == pytest.approx(1e-4 + 49 / 50 * (1e-2 - 1e-4))
    # Constant within an epoch after warm-up.
    assert learning_rate(1000, spe, s, 1e-2, 400) == learning_rate(1009, spe, s, 1e-2, 400)


def _authors_cosine_warmup(n, P, W, E, peak, floor, previous):
    """The authors' CosineWarmup for step n, written from its definition: linear warm-up
    while n <= W * P, then cosine by epoch n // P; past the decay it keeps its last value."""
    if n <= W * P:
        return floor + n / (W * P) * (peak - floor)
    local = n // P - W
    if local > E - W:
        return previous
    a = floor / peak
    return peak * ((1 - a) * 0.5 * (1 + math.cos(math.pi * local / (E - W))) + a)


def test_schedule_follows_the_authors_step_count_and_epoch_length():
    """Issue 23 item 3: N = 100 images in batches of 32 run 4 steps per epoch while the
    schedule's epoch is int(100 / 32) = 3 steps, as the authors' lr_steps_per_epoch; their
    callback counts the step about to run from 1. Every step of a 6-epoch run matches."""
    s, P, W, E = sched(warmup_epochs=1.0), 100 // 32, 1, 6
    previous = None
    for taken in range(E * 4):                         # optimizer steps already taken
        want = _authors_cosine_warmup(taken + 1, P, W, E, 1e-2, 1e-4, previous)
        assert learning_rate(taken + 1, P, s, 1e-2, E) == pytest.approx(want, rel=1e-12), taken
        previous = want
    assert learning_rate(E * 4, P, s, 1e-2, E) == pytest.approx(1e-4)     # the run ends at min_lr


def test_trainer_sets_the_rate_of_the_step_about_to_run(tiny, reference):
    """The first step already takes one warm-up increment (the authors' first rate is not
    warmup_start_lr), and the epoch record names the schedule's epoch length."""
    spec = load_spec(tiny.spec).spec
    rows = metrics(reference)
    steps = [r for r in rows if "loss" in r]
    for r in steps:                                   # log_every 1: record s is step s's rate
        assert r["lr"] == pytest.approx(learning_rate(r["step"], 6, spec.train.schedule, 1e-2, 3))
    assert steps[0]["lr"] == pytest.approx(1e-4 + (1e-2 - 1e-4) / 6)
    assert {r["lr_steps_per_epoch"] for r in rows if "test_nelbo" in r} == {6}


def test_cosine_restart_cycles():
    s, spe = sched(name="cosine_restart"), 4
    lr = lambda epoch: learning_rate(epoch * spe, spe, s, 1e-2, 900)  # noqa: E731
    assert lr(5) == pytest.approx(1e-2)                     # cycle 1 starts at the peak
    assert lr(155) == pytest.approx(0.5 * (1e-2 + 1e-4))    # half-way through cycle 1
    assert lr(304) < 1.01e-4                                # end of cycle 1
    assert lr(305) == pytest.approx(1e-2)                   # restart, peak unchanged
    assert lr(605) == pytest.approx(0.5 * (1e-2 + 1e-4))    # half-way through the 600-epoch cycle 2
    assert lr(899) == pytest.approx(1.03e-4, abs=2e-6)
    assert lr(905) == pytest.approx(1e-2)                   # cycle 3


def test_constant_schedule_and_kl_beta():
    s = sched(name="constant", warmup_epochs=1.0)
    assert learning_rate(0, 10, s, 3e-3, 5) == pytest.approx(1e-4)
    assert learning_rate(10, 10, s, 3e-3, 5) == learning_rate(49, 10, s, 3e-3, 5) == 3e-3
    kw = SimpleNamespace(epochs=16.0, start=0.1)
    assert kl_beta(0, kw) == pytest.approx(0.1)
    assert kl_beta(8, kw) == pytest.approx(0.55)
    assert kl_beta(15, kw) == pytest.approx(0.1 + 0.9 * 15 / 16)
    assert kl_beta(16, kw) == kl_beta(100, kw) == 1.0
    assert kl_beta(3, SimpleNamespace(epochs=0.0, start=0.1)) == 1.0


# ------------------------------------------------------------------------ L2 groups

def test_parameter_groups_split_attention_parameters():
    resolved = load_spec(QUICKSTART)
    model = build_model(resolved.spec, "cpu")
    groups = parameter_groups(model, 1.5e-4, 0.01)
    default, attention = groups
    assert default["weight_decay"] == pytest.approx(3e-4) and attention["weight_decay"] == pytest.approx(0.02)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert not ids(default["params"]) & ids(attention["params"])
    assert len(default["params"]) + len(attention["params"]) == len(list(model.parameters()))
    names = attention_parameter_names(model)
    assert "constant" in names
    assert any(n.endswith("gen_attention.gamma") for n in names)
    assert any(n.endswith("inf_attention.gamma") for n in names)
    assert any("nonlocal" in n.lower() and n.endswith("gamma") or n.endswith(".gamma") and "merge" in n
               for n in names)
    assert any("renorm_old" in n for n in names)
    assert any("norm_output.norm" in n for n in names)
    named = dict(model.named_parameters())
    assert not any(n.endswith("temperature") for n in names)   # non-local t: default group
    assert all(named[n] is not None for n in names)
    opt = build_optimizer(model, resolved.spec.train.optimizer)
    assert isinstance(opt, KerasAdamax) and len(opt.param_groups) == 2     # eps_mode: keras


# ------------------------------------------------------------------------ checkpoint files

def test_checkpoint_atomic_and_corrupt(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(3)})
    save_checkpoint(path, {"step": 2, "w": torch.arange(3)})
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(tmp_path / "checkpoints" / "last.prev.pt")["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.prev.pt", "last.pt"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(path)


# ------------------------------------------------------------------------ runs via the CLI

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny spec on a 96-train / 32-test folder dataset (6 steps per epoch)."""
    root = tmp_path_factory.mktemp("tiny")
    for split, n in (("train", 96), ("test", 32)):
        (root / "data" / split).mkdir(parents=True)
        imgs = load_images("mnist5k", None, split)[:n, 0]          # [n, 28, 28] uint8
        np.save(root / "data" / split / "images.npy", imgs)
    spec = root / "tiny.yaml"
    spec.write_text(f"""extends: {QUICKSTART}
name: tiny
data: {{dataset: folder, root: {root / 'data'}}}
hierarchy: {{layers: 2, latent: {{channels: 4, size: 8}}}}
cells:
  preprocess: {{filters: 8}}
  decoder: {{filters: 8}}
train:
  batch_size: 16
  epochs: 3
  kl_warmup: {{epochs: 2, start: 0.1}}
  log_every: 1
  checkpoint_every: 2
""")
    return SimpleNamespace(root=root, spec=spec)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def avi(*args, env=None, check=None, **kw):
    r = subprocess.run([sys.executable, "-m", "cli.main", "train", *map(str, args)], cwd=REPO,
                       env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300, **kw)
    if check is not None:
        assert r.returncode == check, f"rc {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, name: str = "last.pt") -> str:
    return tensors_hash(load_checkpoint(run / "checkpoints" / name)["model"])


def by_step(rows: list[dict]) -> dict:
    """Last record per (step, kind), without the timing fields."""
    out = {}
    for r in rows:
        key = (r["step"], "test_nelbo" in r)
        out[key] = {k: v for k, v in r.items() if k not in ("it_per_s", "epoch_seconds")}
    return out


@pytest.fixture(scope="module")
def reference(tiny):
    run = tiny.root / "ref"
    avi(tiny.spec, "--out", run, check=0)
    return run


def test_run_writes_the_run_directory(tiny, reference):
    run = reference
    text = (run / "spec.yaml").read_text()
    assert text.startswith("# ") and "hash" in text.splitlines()[0]
    rows = metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 19))
    for r in steps:
        assert {"step", "epoch", "lr", "beta", "loss", "nll", "kl", "grad_norm", "skipped",
                "it_per_s"} <= set(r)
        assert math.isfinite(r["loss"])
    assert [r["beta"] for r in steps][::6] == pytest.approx([0.1, 0.55, 1.0])
    epochs = [r for r in rows if "test_nelbo" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2] and all(math.isfinite(r["test_nelbo"]) for r in epochs)
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.pt", "best.pt", "last.prev.pt"}
    assert sorted(p.name for p in (run / "samples").iterdir()) == \
        ["epoch_0001.png", "epoch_0002.png", "epoch_0003.png"]
    assert (run / "samples" / "epoch_0001.png").read_bytes()[:4] == b"\x89PNG"
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["state"]["step"] == 18 and payload["state"]["epoch"] == 3
    assert payload["spec"]["name"] == "tiny"
    # A second run into the same directory is refused.
    r = avi(tiny.spec, "--out", run, check=2)
    assert "--resume" in r.stderr and "Traceback" not in r.stderr


def test_same_seed_gives_identical_runs(tiny, reference):
    run = tiny.root / "again"
    avi(tiny.spec, "--out", run, "--quiet", check=0)
    assert weights(run) == weights(reference)
    assert by_step(metrics(run)) == by_step(metrics(reference))


def test_sigkill_then_resume_matches_uninterrupted(tiny, reference):
    run = tiny.root / "killed"
    last = run / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "train", str(tiny.spec), "--out", str(run),
                             "--quiet"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_checkpoint(last)["state"]["step"]
    assert killed_at < 18
    r = avi(tiny.spec, "--out", run, "--resume", check=0)
    assert "resuming" in r.stderr
    assert weights(run) == weights(reference)
    ref = by_step(metrics(reference))
    got = by_step(metrics(run))
    assert got == ref
    # records written after the last checkpoint were dropped on resume, not duplicated
    keys = [(r["step"], "test_nelbo" in r) for r in metrics(run)]
    assert len(keys) == len(set(keys)) == len(metrics(reference))


def test_max_steps_and_resume_continue_exactly(tiny, reference):
    run = tiny.root / "steps"
    avi(tiny.spec, "--out", run, "--max-steps", 7, "--quiet", check=0)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 7
    avi(tiny.spec, "--out", run, "--resume", "--quiet", check=0)
    assert weights(run) == weights(reference)


def test_corrupt_last_falls_back_to_previous(tiny, reference):
    import shutil
    run = tiny.root / "corrupt"
    shutil.copytree(reference, run)
    last, prev = run / "checkpoints" / "last.pt", run / "checkpoints" / "last.prev.pt"
    prev_bytes = prev.read_bytes()
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    r = avi(tiny.spec, "--out", run, "--resume", check=0)
    assert "last.pt is corrupt" in r.stderr and "last.prev.pt" in r.stderr
    assert prev.read_bytes() == prev_bytes or load_checkpoint(prev)
    # Both unreadable: a clear error, exit 2, no traceback.
    prev.write_bytes(b"not a checkpoint")
    last.write_bytes(data[: len(data) // 3])
    r = avi(tiny.spec, "--out", run, "--resume", check=2)
    assert "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_resume_with_a_different_spec_is_refused(tiny, reference):
    r = avi(tiny.spec, "--out", reference, "--resume", "--set", "train.seed=7", check=2)
    assert "train.seed: 0 -> 7" in r.stderr and "Traceback" not in r.stderr


def test_two_process_ddp_keeps_replicas_identical(tiny, tmp_path):
    run, hashes = tmp_path / "ddp", tmp_path / "hashes"
    r = avi(tiny.spec, "--out", run, "--devices", 2, "--device", "cpu", "--max-steps", 3, "--quiet",
            env={"AVI_TEST_WEIGHTS_HASH_DIR": str(hashes)})
    assert r.returncode == 0, r.stderr[-3000:]
    h0, h1 = (hashes / "rank0.txt").read_text(), (hashes / "rank1.txt").read_text()
    assert h0 == h1
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["state"]["step"] == 3 and payload["world_size"] == 2
    # Parameters are replicated exactly; batch-norm statistics are per process (ARCH 7).
    model = build_model(load_spec(tiny.spec).spec, "cpu")
    model.load_state_dict(payload["model"])
    assert tensors_hash({k: p.detach() for k, p in model.named_parameters()}) == h0
    # Sanity: the two-process run is not the single-process one (per-process batch-norm statistics).
    single = tmp_path / "single"
    avi(tiny.spec, "--out", single, "--device", "cpu", "--max-steps", 3, "--quiet", check=0)
    assert weights(single) != weights(run)


def test_non_finite_updates_are_skipped_then_abort(tiny, tmp_path):
    run = tmp_path / "diverge"
    r = avi(tiny.spec, "--out", run, "--max-steps", 12, "--set", "train.optimizer.lr=1e30",
            "--set", "train.schedule.warmup_epochs=0", "--set", "train.max_skipped=2", check=1)
    assert "non-finite" in r.stderr and "train.max_skipped" in r.stderr and "Traceback" not in r.stderr
    assert any(row["skipped"] > 0 for row in metrics(run) if "skipped" in row)


def test_epoch_test_nelbo_is_the_evaluation_estimator(tiny, reference):
    """The per-epoch test NELBO is builders.evaluation.evaluate's K = 1 estimate (one implementation).
    The last epoch's record is compared with last.pt: a run directory would load best.pt, which
    is the last epoch's weights only when the last epoch was the best."""
    from builders.evaluation.evaluate import batched, eval_images, importance_sampled_nll
    from builders.loading import load_trained
    model, resolved, _ = load_trained(reference / "checkpoints" / "last.pt", "cpu")
    x = eval_images(resolved.spec, "test")
    r = importance_sampled_nll(model, batched(x, resolved.spec.train.batch_size), 1, chunk=1, seed=0)
    last = [row for row in metrics(reference) if "test_nelbo" in row][-1]
    assert last["test_nelbo"] == pytest.approx(r["nelbo_nats"], rel=1e-9)
    assert "test_nelbo_bits_per_dim" not in last          # binary data: nats only


def test_unpadded_binary_data_trains_and_evaluates(tiny, tmp_path):
    """data.pad drives the preprocessing: 28x28 digits unpadded, 7x7 latents."""
    from builders.evaluation.evaluate import eval_images
    from builders.loading import load_trained
    from builders.train.training import train
    resolved = load_spec(tiny.spec, ["data.pad=0", "data.distribution.crop=0", "hierarchy.latent.size=7"])
    train(resolved, tmp_path / "run", device="cpu", max_steps=2, progress_mode="quiet")
    model, resolved, _ = load_trained(tmp_path / "run", "cpu")
    x = eval_images(resolved.spec, "test", limit=4)
    assert x.shape == (4, 1, 28, 28)
    assert torch.isfinite(model(x).nelbo).all()


def test_skipped_update_keeps_batch_norm_statistics(tiny, tmp_path, monkeypatch):
    import builders.train.training as training
    real_build = training.build_model

    def build_nan_loss(spec, device):
        model = real_build(spec, device)
        forward = model.forward

        def nan_forward(x, **kw):
            out = forward(x, **kw)             # updates the BN running statistics ...
            out.nll = out.nll * math.nan       # ... of a step that will be skipped
            return out
        model.forward = nan_forward
        return model

    monkeypatch.setattr(training, "build_model", build_nan_loss)
    resolved = load_spec(tiny.spec)
    training.train(resolved, tmp_path / "run", device="cpu", max_steps=1, progress_mode="quiet")
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert payload["state"]["skipped"] == 1
    fresh = real_build(resolved.spec, "cpu").state_dict()
    bn = [k for k in fresh if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bn and all(torch.equal(payload["model"][k], fresh[k]) for k in bn)


DDP_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from builders.train.training import Distributed, batchnorm_buffers, step_across_processes, wrap_data_parallel
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
ddp, cpu = Distributed(rank, 2, 0, True), torch.device("cpu")
# rank 1 saw a non-finite loss, rank 0 was asked to stop; the grad norm 2.0 is the same on both
values, stop = step_across_processes(torch.tensor([1.0 if rank == 0 else float("nan"), 2.0 + rank, 2.0]),
                                     rank == 0, ddp, cpu)
flags = [all(v == v for v in values), stop, values[1:]]
net = wrap_data_parallel(torch.nn.Sequential(torch.nn.BatchNorm1d(2)), cpu)
net(torch.full((4, 2), float(rank + 1)) + torch.arange(4.0)[:, None])
net(torch.zeros(4, 2))                                       # a buffer broadcast would happen here
mean = batchnorm_buffers(net.module)[0].tolist()
print(json.dumps({"flags": flags, "mean": mean}))
dist.destroy_process_group()
"""


def test_data_parallel_agreement_and_per_process_batch_norm(tmp_path):
    """All ranks see the same step values (the mean over processes: a NaN anywhere is a NaN
    everywhere, so they take the same skip decision) and the same stop; BN statistics are not
    broadcast from rank 0."""
    procs = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(r), str(tmp_path / "store")],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    r0, r1 = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    assert r0["flags"] == r1["flags"] == [False, True, [2.5, 2.0]]
    assert r0["mean"] != r1["mean"]


def test_resume_with_another_number_of_processes_is_refused(tiny, reference, tmp_path):
    import shutil
    run = tmp_path / "ddp_run"
    shutil.copytree(reference, run)
    last = run / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    save_checkpoint(last, {**payload, "world_size": 2})
    r = avi(tiny.spec, "--out", run, "--resume", check=2)
    assert "trained with 2 process(es) and would resume with 1" in r.stderr
    assert "--devices 2" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_writes_last_then_resume_matches_uninterrupted(tiny, reference):
    """SIGINT stops at the end of a step with last.pt written, so nothing is lost; the
    command the hint prints resumes the run as it was started (--set included)."""
    run = tiny.root / "interrupted"
    extra = ["--set", "train.checkpoint_every=1000"]         # no periodic checkpoint to fall back on
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "train", str(tiny.spec), "--out", str(run),
                             "--quiet", *extra], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (
            (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    hint = re.search(r"continue with: avi train (\S+) --resume$", err, re.M)
    assert hint and Path(hint.group(1)) == run, err
    step = load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"]
    assert step == max(r["step"] for r in metrics(run)) and step < 18
    avi(hint.group(1), "--resume", "--quiet", check=0)      # the hint's command, as printed
    assert weights(run) == weights(reference)


def test_progress_keeps_one_line_per_epoch_with_the_time_left(tiny, tmp_path):
    """Off a terminal (issue 23 item 5): a line per finished epoch with its test NELBO, its
    time and the time left for the whole run; step lines name the step out of the run's
    total. --help says so."""
    out = tmp_path / "progress"
    r = avi(tiny.spec, "--out", out, "--set", "train.epochs=2", check=0)
    lines = [line for line in r.stderr.splitlines() if " test NELBO " in line]
    assert len(lines) == 2, r.stderr
    pattern = r"epoch {e}/2  step {s}  train loss [\d.]+  test NELBO [\d.]+ nats  [\d.]+ it/s  \d+:\d\d  {left}$"
    assert re.match(pattern.format(e=1, s=6, left=r"run \d+:\d\d left"), lines[0]), lines[0]
    assert re.match(pattern.format(e=2, s=12, left="run done"), lines[1]), lines[1]
    assert re.search(r"^epoch 1/2  step 1/12  loss ", r.stderr, re.M), r.stderr
    help_text = " ".join(avi("--help", check=0).stdout.split())
    assert "one line per finished epoch" in help_text and "time left for the whole run" in help_text


def test_progress_bar_keeps_the_epoch_lines(tmp_path, capsys):
    """On a terminal the bar of an epoch is replaced by the next one; the epoch's line
    (printed above the bar) stays, and the bar shows the run's time left."""
    from builders.train.reporting import Reporter, format_duration
    reporter = Reporter(tmp_path, "bar", True, steps_per_epoch=3, epochs=2, start_step=0)
    try:
        for epoch in range(2):
            reporter.start_epoch(epoch, 3, 0)
            for step in range(3 * epoch + 1, 3 * epoch + 4):
                reporter.step("loss 1.00", epoch, step)
            assert reporter.progress.tasks[-1].fields["left"].startswith("run ")
            reporter.epoch_done(f"epoch {epoch + 1}/2  test NELBO {100 - epoch}.00 nats", 3 * epoch + 3, 61.0)
    finally:
        reporter.close()
    err = capsys.readouterr().err
    assert "epoch 1/2  test NELBO 100.00 nats  1:01  run " in err and " left" in err
    assert "epoch 2/2  test NELBO 99.00 nats  1:01  run done" in err
    assert format_duration(3725) == "1:02:05" and format_duration(59.6) == "1:00"


def test_resume_drops_metrics_written_after_the_last_checkpoint(tmp_path):
    from builders.train.training import trim_metrics
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 11)]
    deep = "[" * 100_000 + "]" * 100_000 + "\n"                 # a RecursionError, not a record
    path.write_text("".join(lines) + deep + '{"step": 11, "lo')  # killed mid-write
    trim_metrics(path, 5)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_one_step_follows_the_recipe_and_a_skipped_one_changes_nothing(tiny, tmp_path):
    """Trainer.step on its own: the loss is NLL + beta * KL at the given learning rate; a step
    whose loss is not finite leaves the weights, the Adamax moments and step counts and the
    batch-norm statistics as they were, and only counts the skip."""
    from builders.train.distributed import Distributed
    from builders.train.train_data import TrainData
    from builders.train.training import setup_trainer
    resolved = load_spec(tiny.spec)
    cpu = torch.device("cpu")
    trainer = setup_trainer(resolved, tmp_path / "run", Distributed(), cpu, TrainData(resolved.spec, cpu), None)
    try:
        raw = trainer.data.train[:16]
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        assert trainer.step(raw, lr=0.003, beta=0.25)
        c = trainer.state.counters
        assert c["window_loss"] == pytest.approx(c["window_nll"] + 0.25 * c["window_kl"], rel=1e-6)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.003] * len(trainer.optimizer.param_groups)
        params = dict(trainer.model.named_parameters())
        assert sum(not torch.equal(p, before[n]) for n, p in params.items()) > len(params) // 2

        model_state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        opt_state = copy.deepcopy(trainer.optimizer.state_dict()["state"])
        real_forward = trainer.forward

        def nan_forward(x, **kwargs):
            out = real_forward(x, **kwargs)    # updates the batch-norm statistics ...
            out.nll = out.nll * math.nan       # ... of a step that must be undone
            return out
        trainer.forward = nan_forward
        assert trainer.step(raw, lr=0.003, beta=1.0)
        s = trainer.state
        assert (s.step, s.batch, s.skipped, s.consecutive_skipped) == (2, 2, 1, 1)
        after = trainer.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in model_state.items())
        now = trainer.optimizer.state_dict()["state"]
        assert now.keys() == opt_state.keys() and all(
            torch.equal(torch.as_tensor(now[i][k]), torch.as_tensor(v)) for i in opt_state for k, v in opt_state[i].items())
    finally:
        trainer.reporter.close()


# ------------------------------------------------------------------ gradient accumulation

def _one_step(spec: Path, run: Path, accumulate: int, bn_eval: bool):
    """Trainer.step on the first 16 training images: (loss, grads, parameters) after it. The
    log-scales get training noise (hierarchy.*.noise), drawn like the posterior's."""
    from builders.train.distributed import Distributed
    from builders.train.train_data import TrainData
    from builders.train.training import setup_trainer
    resolved = load_spec(spec, [f"train.accumulate={accumulate}", "hierarchy.posterior.noise=0.01",
                                "hierarchy.prior.noise=0.01"])
    cpu = torch.device("cpu")
    trainer = setup_trainer(resolved, run, Distributed(), cpu, TrainData(resolved.spec, cpu), None)
    try:
        if bn_eval:                       # batch norm on its running statistics, the rest training
            for m in trainer.model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
        assert trainer.step(trainer.data.train[:16], lr=0.003, beta=0.25)
        named = dict(trainer.model.named_parameters())
        return (trainer.state.counters["window_loss"], {n: p.grad.clone() for n, p in named.items()},
                {n: p.detach().clone() for n, p in named.items()})
    finally:
        trainer.reporter.close()


def test_accumulated_step_equals_one_big_batch(tiny, tmp_path):
    """train.accumulate: 4 runs a batch of 16 as 4 micro-batches of 4. Where batch norm does
    not use the batch's statistics (eval mode), the micro-batches see the same images and the
    same posterior and log-scale noise as the big batch, so the loss, the gradients and the update equal one
    batch of 16 to float tolerance. In training mode batch norm normalises each micro-batch
    by its own statistics, and the gradients differ (docs/spec.md says so)."""
    loss1, grads1, params1 = _one_step(tiny.spec, tmp_path / "a", 1, bn_eval=True)
    loss4, grads4, params4 = _one_step(tiny.spec, tmp_path / "b", 4, bn_eval=True)
    assert loss4 == pytest.approx(loss1, rel=1e-5)
    for n, g in grads1.items():
        torch.testing.assert_close(grads4[n], g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-9, msg=n)
        torch.testing.assert_close(params4[n], params1[n], rtol=1e-5, atol=1e-6, msg=n)
    _, train1, _ = _one_step(tiny.spec, tmp_path / "c", 1, bn_eval=False)
    _, train4, _ = _one_step(tiny.spec, tmp_path / "d", 4, bn_eval=False)
    assert max((train4[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12)
               for n, g in train1.items()) > 1e-3


def test_accumulate_trains_through_the_cli_and_checks_the_split(tiny, tmp_path):
    run = tmp_path / "acc"
    avi(tiny.spec, "--out", run, "--max-steps", "2", "--set", "train.accumulate=2", check=0)
    steps = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    r = avi(tiny.spec, "--out", tmp_path / "bad", "--set", "train.accumulate=3", check=2)
    assert "train.accumulate" in r.stderr and "divisible" in r.stderr and "Traceback" not in r.stderr


def test_two_process_ddp_with_accumulation_keeps_replicas_identical(tiny, tmp_path):
    """Two processes, each running its 8 images as 2 micro-batches of 4 (the first without the
    all-reduce, DDP's no_sync): the replicas stay identical."""
    run, hashes = tmp_path / "ddp_acc", tmp_path / "hashes"
    r = avi(tiny.spec, "--out", run, "--devices", 2, "--device", "cpu", "--max-steps", 2, "--quiet",
            "--set", "train.accumulate=2", env={"AVI_TEST_WEIGHTS_HASH_DIR": str(hashes)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (hashes / "rank0.txt").read_text() == (hashes / "rank1.txt").read_text()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 2
