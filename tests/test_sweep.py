"""`avi sweep` against the real one-node SLURM of tools/slurm/start.sh (no mocks): a grid of
two seeds trained, evaluated and compared paired; a bad grid value that submits nothing; the
scheduler's warning signal on a running job, which is requeued and resumes to the weights and
metrics of an uninterrupted run; a re-issued sweep that skips its finished runs.

The runs are the quick start's model made tiny by --set (2 layers, 8 filters, a 96/32-image
folder cut from mnist5k), one thread each, so a job trains in seconds on two shared cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from builders.checkpoint import load_checkpoint
from builders.data.datasets import load_images
from builders.launch import manifest
from builders.train.training import tensors_hash

from slurm_cluster import require_slurm

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "specs" / "quickstart.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TIMEOUT = 240          # seconds a sweep may take here before a test gives up


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """--set overrides that shrink the quick start to a tiny model on a 96/32-image folder."""
    root = tmp_path_factory.mktemp("sweep")
    for split, n in (("train", 96), ("test", 32)):
        (root / "data" / split).mkdir(parents=True)
        np.save(root / "data" / split / "images.npy", load_images("mnist5k", None, split)[:n, 0])
    sets = ["data.dataset=folder", f"data.root={root / 'data'}", "hierarchy.layers=2",
            "hierarchy.latent.channels=4", "cells.preprocess.filters=8", "cells.decoder.filters=8",
            "train.batch_size=16", "train.log_every=1", "train.checkpoint_every=1000"]
    return root, [a for s in sets for a in ("--set", s)]


def avi(*args, check=None, timeout=TIMEOUT):
    r = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert r.returncode == check, f"rc {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def avi_here(*args):
    """The command in this process (typer's CliRunner): for the commands that start no job,
    where a new interpreter per call would cost seconds on a busy machine."""
    from typer.testing import CliRunner

    from cli.main import app
    return CliRunner().invoke(app, [str(a) for a in args])


def status(sweep: Path) -> dict:
    return json.loads(avi("sweep", "status", sweep, "--json").stdout)


def wait_for(sweep: Path, states=("done", "failed"), timeout=TIMEOUT) -> dict:
    """Poll the states as `avi sweep status` derives them (in this process: an avi start per
    poll would cost seconds on a busy machine), then read them once through the command."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = manifest.refresh(sweep, manifest.read(sweep))
        if all(r["state"] in states for r in s["runs"]):
            return status(sweep)
        time.sleep(0.5)
    raise AssertionError(f"the sweep did not end in {timeout} s: {json.dumps(s, indent=1)}\n"
                         + "\n".join(Path(r["log"]).read_text() for r in s["runs"] if r.get("log")
                                     and Path(r["log"]).exists()))


def queued_in(sweep: Path) -> list[str]:
    """squeue's jobs whose batch script lives in this sweep directory."""
    r = subprocess.run(["squeue", "-h", "-o", "%i %o"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in r.stdout.splitlines() if str(sweep) in line]


def weights(run: Path) -> str:
    return tensors_hash(load_checkpoint(run / "checkpoints" / "last.pt")["model"])


def by_step(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], "test_nelbo" in r): {k: v for k, v in r.items() if k not in ("it_per_s", "epoch_seconds")}
            for r in rows}


@pytest.fixture(scope="module")
def seeds(tiny):
    """The issue's command, made tiny: two seeds, 20 steps, evaluated with K = 4."""
    require_slurm()
    root, sets = tiny
    sweep = root / "seeds"
    t0 = time.time()
    r = avi("sweep", QUICKSTART, "--grid", "train.seed=0,1", "--max-steps", 20, "--eval-k", 4,
            "--launcher", "slurm", "--out", sweep, *sets, "--wait", check=0)
    return sweep, r, time.time() - t0


def test_grid_of_seeds_runs_on_slurm_and_diffs_paired(seeds):
    sweep, r, _ = seeds
    s = status(sweep)
    assert [(x["name"], x["grid"], x["state"], x["attempts"]) for x in s["runs"]] == [
        ("quickstart_seed0", {"train.seed": "0"}, "done", 1), ("quickstart_seed1", {"train.seed": "1"}, "done", 1)]
    assert s["launcher"] == "slurm" and all("_" in x["job_id"] for x in s["runs"])     # one job array
    for x in s["runs"]:
        run = Path(x["run_dir"])
        assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 20
        assert json.loads((run / "eval.json").read_text())
        assert Path(x["log"]).is_file()
    d = avi_here("diff", sweep, "--json")
    assert d.exit_code == 1, d.output
    result = json.loads(d.stdout)
    assert result["names"] == ["quickstart_seed0", "quickstart_seed1"]
    assert [f["path"] for f in result["fields"]] == ["train.seed"] or "train.seed" in d.stdout
    paired = result["paired"]["comparisons"][1]
    assert paired["paired"] and paired["importance_samples"] == 4 and paired["examples"] == 32
    table = avi_here("diff", sweep).stdout
    assert "seed" in table and "Δ" in table


def test_reissued_sweep_skips_done_runs(seeds, tiny):
    sweep, _, _ = seeds
    root, sets = tiny
    before = status(sweep)
    r = avi_here("sweep", QUICKSTART, "--grid", "train.seed=0,1", "--max-steps", 20, "--eval-k", 4,
                 "--launcher", "slurm", "--out", sweep, *sets)
    assert r.exit_code == 0, r.output
    assert "skip quickstart_seed0: done" in r.stderr and "skip quickstart_seed1: done" in r.stderr
    assert "submitted 0 of 2" in r.stderr and queued_in(sweep) == []
    after = manifest.read(sweep)
    assert [x["job_id"] for x in after["runs"]] == [x["job_id"] for x in before["runs"]]


def test_bad_grid_value_submits_nothing(tiny):
    require_slurm()
    root, sets = tiny
    sweep = root / "bad"
    r = avi("sweep", QUICKSTART, "--grid", "train.seed=0,zero", "--launcher", "slurm", "--out", sweep, *sets)
    assert r.returncode == 2, r.stderr
    assert "--grid train.seed=0,zero" in r.stderr and "train.seed" in r.stderr and "zero" in r.stderr
    assert "Traceback" not in r.stderr
    assert not sweep.exists() and queued_in(sweep) == []
    r = avi_here("sweep", QUICKSTART, "--grid", "train.sede=0,1", "--launcher", "slurm", "--out", sweep, *sets)
    assert r.exit_code == 2 and "did you mean 'seed'" in r.stderr and not sweep.exists()
    r = avi_here("sweep", QUICKSTART, "--partition", "no_such_partition", "--launcher", "slurm", "--out", sweep, *sets)
    assert r.exit_code == 2 and "sbatch refused the jobs" in r.stderr and "Traceback" not in r.stderr
    assert not sweep.exists() and queued_in(sweep) == []


def test_warning_signal_requeues_and_resumes_bit_identical(tiny):
    """scancel --signal=USR2 (the signal submitit asks SLURM for, 90 s before a time limit): the
    job stops after its step with last.pt, is requeued, resumes, and ends as an uninterrupted run."""
    require_slurm()
    root, sets = tiny
    steps = 18
    reference = root / "reference"        # trained meanwhile: the job waits for SLURM at times
    uninterrupted = subprocess.Popen([sys.executable, "-m", "cli.main", "train", QUICKSTART, "--out", reference,
                                      "--max-steps", str(steps), "--quiet", *sets], cwd=REPO, env=ENV)
    sweep = root / "requeue"
    avi("sweep", QUICKSTART, "--max-steps", steps, "--launcher", "slurm", "--out", sweep, *sets, check=0)
    job = manifest.read(sweep)["runs"][0]["job_id"]
    run = sweep / "quickstart"
    deadline = time.time() + TIMEOUT
    while not _trained_steps(run) and time.time() < deadline:      # a step done: it is training
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    s = wait_for(sweep, states=("requeued", "done", "failed"))
    assert s["runs"][0]["state"] == "requeued", s
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"]
    assert 0 < stopped < steps                    # the signal's checkpoint, not the end of the run
    # Issued again meanwhile: the queued run gets no second job (and so no second writer).
    again = avi("sweep", QUICKSTART, "--max-steps", steps, "--launcher", "slurm", "--out", sweep, *sets, check=0)
    assert f"skip quickstart: queued or running as job {job}" in again.stderr
    assert queued_in(sweep) == [job]
    # SLURM holds a requeued job for two minutes (BeginTime); let it start now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    s = wait_for(sweep)
    assert (s["runs"][0]["state"], s["runs"][0]["attempts"]) == ("done", 2), s
    log = Path(s["runs"][0]["log"]).read_text()
    assert f"resuming {run} at step {stopped}" in log
    assert uninterrupted.wait(timeout=TIMEOUT) == 0
    assert weights(run) == weights(reference)
    assert by_step(run) == by_step(reference)


def _trained_steps(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def test_local_launcher_runs_jobs_and_shows_a_failed_log(tiny):
    """--launcher local (a workstation, no SLURM needed): two runs at a time through submitit's
    local executor; a run whose data is missing fails, and status shows its log's last lines."""
    root, sets = tiny
    sweep = root / "local"
    missing = root / "no_such_data"
    r = avi("sweep", QUICKSTART, "--grid", f"data.root={root / 'data'},{missing}", "--max-steps", 2,
            "--launcher", "local", "--jobs", 2, "--out", sweep, *sets)
    assert r.returncode == 1, r.stderr                  # a run failed
    s = manifest.read(sweep)
    assert s["launcher"] == "local"
    assert sorted(x["state"] for x in s["runs"]) == ["done", "failed"]
    good = next(x for x in s["runs"] if x["state"] == "done")
    assert load_checkpoint(Path(good["run_dir"]) / "checkpoints" / "last.pt")["state"]["step"] == 2
    shown = avi_here("sweep", "status", sweep)
    assert shown.exit_code == 1 and "failed; last lines of" in shown.stdout
    assert "image folder not found" in shown.stdout and "Traceback" not in shown.stdout


def test_name_clash_and_bad_flags_are_refused_before_anything_is_written(tmp_path):
    """No SLURM needed: these are refused (exit 2, file:line, nothing written) before submitit."""
    out = tmp_path / "sweep"
    r = avi_here("sweep", QUICKSTART, QUICKSTART, "--grid", "train.seed=0,1", "--launcher", "local", "--out", out)
    assert r.exit_code == 2 and "quickstart.yaml:6:7: name: run name 'quickstart_seed0' is taken twice" in r.stderr
    r = avi_here("sweep", QUICKSTART, "--grid", "train.seed", "--out", out)
    assert r.exit_code == 2 and "expected --grid FIELD=V1,V2" in r.stderr
    r = avi_here("sweep", QUICKSTART, "--slurm", "exclusive", "--out", out)
    assert r.exit_code == 2 and "--slurm exclusive: expected KEY=VALUE" in r.stderr
    assert not out.exists()
    r = avi_here("sweep", "status", out)
    assert r.exit_code == 2 and "not a sweep directory" in r.stderr


def test_two_task_job_requeued_trains_what_devices_2_trains(tiny):
    """--nodes 1 --tasks-per-node 2: one SLURM job whose two srun tasks each run `avi train`
    in one process group. The warning signal reaches both tasks: they stop after the step,
    rank 0 alone requeues, and the resumed run ends with the weights of an uninterrupted
    `avi train --devices 2` of the same spec and steps. Rank 0 alone keeps the books."""
    require_slurm()
    root, sets = tiny
    steps = 12
    reference = root / "two_processes"
    local = subprocess.Popen([sys.executable, "-m", "cli.main", "train", QUICKSTART, "--out", reference,
                              "--devices", "2", "--device", "cpu", "--max-steps", str(steps), "--quiet",
                              *sets], cwd=REPO, env=ENV)
    sweep = root / "tasks"
    avi("sweep", QUICKSTART, "--nodes", 1, "--tasks-per-node", 2, "--max-steps", steps,
        "--launcher", "slurm", "--out", sweep, *sets, check=0)
    job = manifest.read(sweep)["runs"][0]["job_id"]
    run = sweep / "quickstart"
    deadline = time.time() + TIMEOUT
    while not _trained_steps(run) and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    s = wait_for(sweep, states=("requeued", "done", "failed"))
    assert s["runs"][0]["state"] == "requeued", s
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"]
    assert 0 < stopped < steps
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    s = wait_for(sweep)
    assert (s["runs"][0]["state"], s["runs"][0]["attempts"]) == ("done", 2), s
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (last["world_size"], last["state"]["step"]) == (2, steps)
    assert local.wait(timeout=TIMEOUT) == 0
    assert weights(run) == weights(reference)
    log = Path(s["runs"][0]["log"])                                      # rank 0's log
    assert f"resuming {run} at step {stopped}" in log.read_text()
    assert log.read_text().count(f"stopped at step {steps}") == 1
    task1 = (log.parent / log.name.replace("_0_log", "_1_log")).read_text()
    assert "task 1 stopped; rank 0 requeues the job" in task1 and "stopped at step" not in task1


def test_processes_that_do_not_divide_the_batch_are_refused(tiny):
    """Checked before submitting: exit 2 naming the flags, nothing submitted or written;
    --nodes on the local launcher is refused too."""
    require_slurm()
    root, sets = tiny
    sweep = root / "indivisible"
    r = avi_here("sweep", QUICKSTART, "--tasks-per-node", 3, "--launcher", "slurm", "--out", sweep, *sets)
    assert r.exit_code == 2, r.output
    assert "--nodes 1 --tasks-per-node 3" in r.stderr and "train.batch_size 16 is not divisible" in r.stderr
    assert "Traceback" not in r.stderr and not sweep.exists() and queued_in(sweep) == []
    r = avi_here("sweep", QUICKSTART, "--nodes", 2, "--launcher", "local", "--out", sweep, *sets)
    assert r.exit_code == 2 and "--nodes and --tasks-per-node need --launcher slurm" in r.stderr
    assert not sweep.exists()
