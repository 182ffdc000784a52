"""Training on several "nodes" through existing launchers (builders.launch): two torchrun agents
with --nnodes 2 on 127.0.0.1 (gloo, one process each), and a two-task srun step on the local
SLURM cluster (tools/slurm/start.sh). Both must train exactly what `avi train --devices 2` trains
on one machine (the same code path: process group, DDP, agreed skipping, rank-0 checkpoints),
and, with train.sync_batch_norm, what one process trains on the same global batch, to float
tolerance (every random draw is made for the global batch and sliced; batch norm uses the
global batch's statistics). An unreachable rendezvous, a node that dies and a world size that
does not divide the batch end with a clear message in bounded time, leaving no half-written
checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from builders.checkpoint import load_checkpoint
from builders.data.datasets import load_images
from builders.train.train_state import tensors_hash

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "specs" / "quickstart.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
SPEC = """extends: {base}
name: multinode
data: {{dataset: folder, root: {root}}}
hierarchy: {{layers: 2, latent: {{channels: 4, size: 8}}}}
cells:
  preprocess: {{filters: 8}}
  decoder: {{filters: 8}}
train: {{batch_size: 16, epochs: 2, log_every: 1, checkpoint_every: 2, sync_batch_norm: true}}
"""
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
AVI = [sys.executable, "-m", "cli.main"]


def tool_or_skip(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed, and CI must run this test")
        pytest.skip(f"{name} is not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    for split, n in (("train", 48), ("test", 16)):
        (root / "data" / split).mkdir(parents=True)
        np.save(root / "data" / split / "images.npy", load_images("mnist5k", None, split)[:n, 0])
    spec = root / "tiny.yaml"
    spec.write_text(SPEC.format(base=QUICKSTART, root=root / "data"))
    return SimpleNamespace(root=root, spec=spec)


def train_args(tiny, out: Path, *extra) -> list[str]:
    return ["train", str(tiny.spec), "--out", str(out), "--device", "cpu", "--max-steps", "3",
            "--quiet", *map(str, extra)]


def hashes(folder: Path) -> list[str]:
    return [(folder / f"rank{r}.txt").read_text() for r in range(2)]


def weights(run: Path) -> str:
    return tensors_hash(load_checkpoint(run / "checkpoints" / "last.pt")["model"])


def assert_trains_like_one_process(run: Path, one: Path) -> None:
    """The same loss at every step and the same weights and batch-norm statistics after the
    run, to float tolerance: the sums are added in another order. Measured on this spec: the
    losses within 1e-7 (relative), the weights within 4e-5, but for the bias of a conv that
    feeds a batch norm (nodes.0.conv.bias), whose exact gradient is 0: Adamax turns the sign
    of its float noise into steps of +-lr, 1.6e-4 after 3 steps. With per-process batch norm
    instead the losses differ by 1e-4 and the weights by 1e-2."""
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for d in (run, one)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=2e-6)
    mine, theirs = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (run, one))
    assert mine.keys() == theirs.keys()
    for name, t in theirs.items():
        atol = 1e-3 if name.endswith("nodes.0.conv.bias") else 1e-4
        diff = (mine[name].double() - t.double()).abs().max().item()
        assert diff <= atol, f"{name}: max |difference| {diff:.2e} > {atol:g}"


@pytest.fixture(scope="module")
def one_process(tiny):
    """One process on the same global batch of 16: what the two-process runs must equal."""
    out = tiny.root / "one_process"
    r = subprocess.run([*AVI, *train_args(tiny, out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_node(tiny):
    """`avi train --devices 2` on this machine: what the multi-node runs must reproduce."""
    out, h = tiny.root / "one_node", tiny.root / "one_node_hashes"
    r = subprocess.run([*AVI, *train_args(tiny, out, "--devices", 2)], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**ENV, "AVI_TEST_WEIGHTS_HASH_DIR": str(h)})
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(out=out, hashes=hashes(h), weights=weights(out))


def torchrun_nodes(tiny, out: Path, port: int, hash_dir: Path, *extra, nodes=(0, 1),
                   rdzv_timeout: int = 30, node_extra: dict | None = None) -> list[subprocess.Popen]:
    """One torchrun agent per node rank, as on two machines (static rendezvous at 127.0.0.1);
    node_extra: more arguments for one node's command."""
    env = {**ENV, "AVI_TEST_WEIGHTS_HASH_DIR": str(hash_dir), "AVI_DIST_TIMEOUT": "30"}
    return [subprocess.Popen([*TORCHRUN, "--node-rank", str(r), "--nnodes", "2", "--nproc-per-node", "1",
                              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", f"timeout={rdzv_timeout}",
                              "-m", "cli.main", *train_args(tiny, out, *extra, *(node_extra or {}).get(r, []))],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for r in nodes]


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    deadline, results = time.monotonic() + timeout, []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            pytest.fail("a launch did not end in bounded time (hang)")
        results.append((p.returncode, out, err))
    return results


def descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running_with(text: str) -> list[int]:
    """The processes whose command line holds ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def assert_checkpoints_whole(run: Path) -> None:
    folder = run / "checkpoints"
    for path in (folder.iterdir() if folder.is_dir() else []):
        assert path.suffix == ".pt", f"left behind: {path.name}"
        load_checkpoint(path)                 # raises on a truncated or half-written file


def test_two_torchrun_nodes_train_what_one_node_trains(tiny, one_node, one_process, tmp_path):
    tool_or_skip("torchrun")
    out, h = tmp_path / "two_nodes", tmp_path / "hashes"
    results = finish(torchrun_nodes(tiny, out, free_port(), h))
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    h0, h1 = hashes(h)
    assert h0 == h1 == one_node.hashes[0]                 # replicas identical, and = one node's
    assert weights(out) == one_node.weights
    assert load_checkpoint(out / "checkpoints" / "last.pt")["world_size"] == 2
    assert_trains_like_one_process(out, one_process)


def test_srun_two_tasks_train_what_one_node_trains(tiny, one_node, one_process, tmp_path):
    srun = tool_or_skip("srun")
    subprocess.run(["bash", str(REPO / "tools" / "slurm" / "start.sh")], capture_output=True, timeout=120)
    out, h = tmp_path / "srun", tmp_path / "hashes"
    r = subprocess.run([srun, "--partition", "debug", "--ntasks", "2", "--cpus-per-task", "1",
                        "--time", "5", "--kill-on-bad-exit=1", *AVI,
                        *[a for a in train_args(tiny, out) if a != "--quiet"]],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**ENV, "AVI_TEST_WEIGHTS_HASH_DIR": str(h), "AVI_DIST_TIMEOUT": "60"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("stopped at step 3") == 1          # rank 0 alone reports
    h0, h1 = hashes(h)
    assert h0 == h1 == one_node.hashes[0]
    assert weights(out) == one_node.weights
    assert_trains_like_one_process(out, one_process)


def test_unreachable_torchrun_rendezvous_fails_in_bounded_time(tiny, tmp_path):
    tool_or_skip("torchrun")
    t0 = time.monotonic()
    (rc, _, err), = finish(torchrun_nodes(tiny, tmp_path / "run", free_port(), tmp_path / "h",
                                          nodes=(1,), rdzv_timeout=10), timeout=60)
    assert rc != 0 and time.monotonic() - t0 < 60
    assert "timed out" in err and "127.0.0.1" in err
    assert not (tmp_path / "run").exists()


def srun_task_env(rank: int, port: int, **extra) -> dict:
    """The environment srun gives task ``rank`` of a two-task step on this host."""
    env = {k: v for k, v in ENV.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1",
               MASTER_PORT=str(port), **extra)
    return env


def test_unreachable_srun_rendezvous_is_a_clear_error(tiny, tmp_path):
    """Task 1 of an srun step whose task 0 never comes: avi's own bounded wait (AVI_DIST_TIMEOUT)."""
    env = srun_task_env(1, free_port(), AVI_DIST_TIMEOUT="5")
    t0 = time.monotonic()
    r = subprocess.run([*AVI, *train_args(tiny, tmp_path / "run")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.monotonic() - t0 < 60, r.stderr[-2000:]
    assert "could not join the process group at 127.0.0.1" in r.stderr and "process 1 of 2 (srun)" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_world_size_not_dividing_the_batch_is_refused_before_the_rendezvous(tiny, tmp_path):
    """Task 1 of 2 of an srun step, alone: a batch of 15 is refused at once (exit 2), without
    waiting for task 0, and nothing is written."""
    env = srun_task_env(1, free_port(), AVI_DIST_TIMEOUT="600")
    t0 = time.monotonic()
    r = subprocess.run([*AVI, *train_args(tiny, tmp_path / "run", "--set", "train.batch_size=15")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.monotonic() - t0 < 60, r.stderr[-2000:]
    assert "train.batch_size 15 is not divisible by the number of processes (2)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_a_dead_node_ends_the_run_with_whole_checkpoints(tiny, tmp_path):
    """Node 1 is killed (SIGKILL, agent and worker) in the middle of training: node 0 stops
    within the bounded wait and every checkpoint left is a complete one."""
    tool_or_skip("torchrun")
    out = tmp_path / "run"
    procs = torchrun_nodes(tiny, out, free_port(), tmp_path / "h", "--max-steps", "100000",
                           "--set", "train.epochs=1000")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.5)
    for pid in [procs[1].pid, *descendants(procs[1].pid)]:   # the whole "machine": agent and worker
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    (rc, _, err), = finish(procs[:1], timeout=90)
    procs[1].wait()
    assert rc != 0 and time.monotonic() - t0 < 90
    assert "process 0 of 2 lost contact with the others" in err and "--resume" in err, err[-3000:]
    assert "bug in avi" not in err
    assert_checkpoints_whole(out)


def test_launch_environment_reads_torchrun_and_srun():
    from builders.launch.environment import launch_environment
    assert launch_environment({}).world_size == 1
    tr = launch_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                             "MASTER_PORT": "29500"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.launcher) == \
        (3, 4, 1, "h", 29500, "torchrun")
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4",
             "SLURM_JOB_NODELIST": "nodeA,nodeB"}
    batch_script = launch_environment(slurm)                 # sbatch's script: not a task of a step
    assert batch_script.world_size == 1
    step = launch_environment({**slurm, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"})
    assert (step.rank, step.world_size, step.local_rank, step.launcher) == (2, 4, 0, "srun")
    assert step.master_addr == "nodeA" and 20000 <= step.master_port <= 60000
    again = launch_environment({**slurm, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"})
    assert again.master_port == step.master_port              # every task derives the same port


def test_ctrl_c_and_divergence_of_devices_2_say_it_once_without_traceback(tiny, tmp_path):
    """`avi train --devices 2`: Ctrl-C (SIGINT to the terminal's process group, twice) writes
    last.pt and returns only when every process of the run has ended, with one hint, which
    names --devices 2 (a run resumes only on as many processes) and works as printed; a
    diverged run exits 1 with rank 0's message alone, not torchrun's traceback."""
    out = tmp_path / "run"
    p = subprocess.Popen([*AVI, *train_args(tiny, out, "--devices", 2, "--max-steps", 100000,
                                            "--set", "train.epochs=1000", "--set", "train.checkpoint_every=100000")],
                         cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)              # Ctrl-C, twice: the terminal's process group
    time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    p.wait(timeout=120)
    left = [pid for pid in running_with(str(out)) if pid != p.pid]
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert not left, f"avi returned with processes of the run still going: {left}"
    assert err.count("interrupt: stopping after this step") == 1 and "Traceback" not in err
    hint = [line for line in err.splitlines() if line.startswith("interrupted; continue with: ")]
    assert len(hint) == 1 and f"avi train {out} --resume --devices 2 " in hint[0]
    step = load_checkpoint(out / "checkpoints" / "last.pt")["state"]["step"]
    resume = hint[0].split("continue with: avi ")[1].split(" (")[0].split()
    r = subprocess.run([*AVI, *resume, "--device", "cpu", "--max-steps", str(step + 1), "--quiet"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["state"]["step"] == step + 1

    r = subprocess.run([*AVI, *train_args(tiny, tmp_path / "diverge", "--devices", 2, "--max-steps", 12,
                                          "--set", "train.optimizer.lr=1e30", "--set", "train.schedule.warmup_epochs=0",
                                          "--set", "train.max_skipped=2")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("training diverged") == 1 and "Traceback" not in r.stderr


def test_nodes_started_with_different_settings_are_refused(tiny, tmp_path):
    """Node 1 with another seed (a spec edited on one machine): every process stops at once
    with exit 2 (in torchrun's report of its worker), saying what differs, instead of training
    two models under one name."""
    tool_or_skip("torchrun")
    results = finish(torchrun_nodes(tiny, tmp_path / "run", free_port(), tmp_path / "h",
                                    node_extra={1: ["--set", "train.seed=7"]}), timeout=120)
    for rc, _, err in results:
        assert rc != 0 and "exitcode  : 2" in err, err[-2000:]
        assert "not started with the same settings (spec): process 0 has spec = " in err
    assert not (tmp_path / "run" / "checkpoints").exists()
