"""Training loop of `avi train` (docs/model.md section 9; README.md "A run directory").

    loss = mean_b [ nll_b + beta(epoch) * sum_l KL_bl ]        (nats per image)
    + L2 as coupled weight decay in the optimizer (builders.train.optim)

Reproducibility: the data order comes from (seed, epoch) (EpochBatches), and every step
reseeds both the binarisation/flip generator and torch's global generator (posterior noise)
from (seed, step, rank). So the random numbers of a step depend only on its position, and a
run resumed from a checkpoint takes exactly the steps an uninterrupted run takes (bit for bit
on the CPU). The RNG states are still saved in checkpoints and restored on resume.

Run directory (only rank 0 writes, holding its lock; builders.train.run_dir): spec.yaml,
metrics.jsonl, samples/epoch_XXXX.png, checkpoints/last.pt (every checkpoint_every steps, each
epoch end and on Ctrl-C, atomic; the previous one kept as last.prev.pt), checkpoints/best.pt
(best test NELBO), TensorBoard events in tb/ when tensorboard is installed. A run killed at
any point resumes to the files of an uninterrupted run (builders.train.train_loop).

This module checks and prepares a run (spec, data, run directory, checkpoint to resume from:
train, setup_trainer, build_parts) and hands it to builders.train.train_loop.Trainer, whose loop reads
as the recipe.

A step whose loss or gradient is not finite (on any process) is skipped: no update, and the
batch-norm running statistics of its forward pass are put back.

Data parallel: launched under torchrun or srun, each process takes its rows of every global
batch (the step's random numbers are drawn for the whole batch); gradients are averaged by
DistributedDataParallel; batch-norm statistics stay per process (broadcast_buffers=False;
docs/model.md section 9: not synchronised, so checkpoints hold rank 0's) unless
train.sync_batch_norm makes them the global batch's (builders.train.sync_batch_norm). A run
resumes only with the number of processes it was trained with (the last, partial batch of an
epoch is kept by one process only, and per-process statistics depend on the split).
"""
from __future__ import annotations

import contextlib
import sys

import json
import os
from pathlib import Path

import torch

from avi_spec import ResolvedSpec, dump_yaml
from avi_spec.diff import changed_fields

from ..network.build import build_model
from ..checkpoint import CheckpointError, load_with_fallback, previous_path, set_rng_state
from ..devices import place, resolve_device
from ..launch.environment import launch_environment
from ..launch.process_group import agree
from .sync_batch_norm import use_global_batch_statistics
from .distributed import (Distributed, setup_distributed, step_across_processes,  # noqa: F401 (API)
                          teardown_distributed, wrap_data_parallel)
from .optim import build_optimizer
from ..data.preprocess import EpochBatches
from .reporting import Reporter, warn
from .run_dir import (TrainingError, check_out_dir, open_run_dir, trim_metrics, write_error,
                      write_text_atomic)
from .train_data import TrainData
from .train_loop import Trainer
from .train_state import EMA, State, batchnorm_buffers, restore, tensors_hash  # noqa: F401 (API)

__all__ = ["train", "preflight", "TrainingError", "CheckpointError", "tensors_hash", "trim_metrics",
           "Distributed", "step_across_processes", "batchnorm_buffers", "wrap_data_parallel"]


def document_differences(old: dict, new: dict) -> list[str]:
    """'path: old -> new' for every leaf field that differs between two resolved documents
    (the flattening of `avi diff`, name and description included)."""
    rows = changed_fields([old, new], every_field=True)
    return [f"{r['path']}: {json.dumps(r['values'][0])} -> {json.dumps(r['values'][1])}" for r in rows]


def _has_checkpoints(out_dir: Path) -> bool:
    ck = out_dir / "checkpoints"
    return ck.is_dir() and any(ck.glob("*.pt"))


def _spec_yaml_hash(out_dir: Path) -> str | None:
    """The hash in the first line spec.yaml of a run directory starts with."""
    from avi_spec.yaml_io import MAX_FILE_BYTES, read_text_file
    try:        # bounded: a spec.yaml linked to a 3 GB file or a device is not read whole
        first = read_text_file(out_dir / "spec.yaml", MAX_FILE_BYTES).splitlines()[0]
    except (OSError, IndexError, ValueError):      # ValueError: not UTF-8, not regular, too large
        return None
    return first.rsplit("hash ", 1)[-1].strip() if "hash " in first else None


def _refuse_other_spec(resolved: ResolvedSpec, out_dir: Path, old_doc: dict | None) -> None:
    diffs = document_differences(old_doc, resolved.document) if old_doc else []
    detail = "\n  ".join(diffs) if diffs else "(documents differ)"
    raise TrainingError(f"the spec differs from the one this run was trained with "
                        f"({out_dir}); refusing to resume:\n  {detail}\n"
                        f"Train it into another --out, or resume with the original spec "
                        f"({out_dir / 'spec.yaml'}).")


def resume_payload(resolved: ResolvedSpec, out_dir: Path, resume: bool, world_size: int,
                   report=None) -> dict | None:
    """The checkpoint a run continues from, or None to start at step 0. Refuses (TrainingError,
    CheckpointError) a run directory that holds checkpoints without --resume, and a resume
    with another spec or number of processes. A run killed before its first checkpoint
    (spec.yaml, no checkpoint) resumes from the start."""
    last = out_dir / "checkpoints" / "last.pt"
    if not resume:
        if _has_checkpoints(out_dir):
            raise TrainingError(f"{out_dir} already holds a run with checkpoints; use --resume to "
                                f"continue it or --out for a new run directory")
        return None
    if not last.exists() and not previous_path(last).exists():
        if not (out_dir / "spec.yaml").is_file():
            raise TrainingError(f"nothing to resume: {out_dir} holds no run yet (no spec.yaml, no "
                                f"checkpoint); start it without --resume")
        if _spec_yaml_hash(out_dir) != resolved.hash:
            _refuse_other_spec(resolved, out_dir, None)
        return None
    payload, _ = load_with_fallback(last, report)
    old_world = payload.get("world_size", 1)
    if old_world != world_size:
        raise TrainingError(f"{out_dir} was trained with {old_world} process(es) and would resume "
                            f"with {world_size}; the batches kept per epoch and the batch-norm "
                            f"statistics depend on the number of processes, so resume it with "
                            f"--devices {old_world}")
    if payload.get("spec_hash") != resolved.hash:
        _refuse_other_spec(resolved, out_dir, payload.get("spec", {}))
    return payload


def check_batch_size(batch_size: int, world_size: int, n_train: int | None = None,
                     accumulate: int = 1) -> None:
    """Every process takes an equal share of a global batch, runs it as ``accumulate`` equal
    micro-batches, and with several processes every one of them gets a batch each epoch (the
    last partial batch is dropped)."""
    if batch_size % world_size:
        raise TrainingError(f"train.batch_size {batch_size} is not divisible by the number "
                            f"of processes ({world_size})")
    if (batch_size // world_size) % accumulate:
        raise TrainingError(f"train.batch_size {batch_size} over {world_size} process(es) gives "
                            f"{batch_size // world_size} images each, which train.accumulate "
                            f"{accumulate} does not split into equal micro-batches; make "
                            f"batch_size a multiple of {world_size * accumulate}")
    if n_train is not None and world_size > 1 and n_train < batch_size:
        raise TrainingError(f"train.batch_size {batch_size} exceeds the {n_train} training images")


def check_model_fits(spec, dev) -> None:
    """TrainingError, with the estimate, for a model too large for the memory of ``dev``
    (counted on the meta device before anything is allocated)."""
    from ..network.size import ModelSizeError, check_fits
    try:
        check_fits(spec, dev, "train")
    except ModelSizeError as e:
        raise TrainingError(str(e)) from None


def preflight(resolved: ResolvedSpec, out_dir: str | Path, resume: bool, world_size: int) -> None:
    """Every check `avi train` makes before it builds anything, for a launcher to run before
    it starts its processes: --out, the checkpoint to resume from, the data (no empty split),
    the batch size, and that no other run holds the run directory."""
    out_dir = Path(out_dir)
    check_batch_size(resolved.spec.train.batch_size, world_size, accumulate=resolved.spec.train.accumulate)
    check_out_dir(out_dir)
    check_model_fits(resolved.spec, "cpu")
    resume_payload(resolved, out_dir, resume, world_size)
    data = TrainData(resolved.spec, torch.device("cpu"))
    check_batch_size(resolved.spec.train.batch_size, world_size, len(data.train), resolved.spec.train.accumulate)
    if out_dir.is_dir():
        open_run_dir(out_dir).release()         # is another run writing there?


def train(resolved: ResolvedSpec, out_dir: str | Path, resume: bool = False,
          device: str | torch.device | None = "auto", max_steps: int | None = None,
          progress_mode: str = "auto", devices: int | None = None) -> dict:
    """Train the model of ``resolved`` into ``out_dir``; returns a summary dict.

    progress_mode: auto (rich bar on a TTY, else lines on stderr), lines, quiet (nothing) or
    jsonl (every metrics line also on stdout). ``devices`` is informative here: the CLI
    relaunches itself under torchrun for ``--devices N``; inside this function the process
    group comes from the environment torchrun sets. Raises TrainingError, CheckpointError,
    DatasetError, SpecError for the user's problems.
    """
    out_dir = Path(out_dir)
    # Before the rendezvous: a batch the processes cannot share is refused by each of them at
    # once, not after every node has come up (or by a lone node that waits for the others).
    check_batch_size(resolved.spec.train.batch_size, launch_environment().world_size)
    ddp = setup_distributed(str(device) if device is not None else None)
    lock = None
    try:
        dev = resolve_device(device, ddp.local_rank)
        agree(ddp, spec=resolved.hash[:16], max_steps=max_steps, resume=resume, device=dev.type)
        check_batch_size(resolved.spec.train.batch_size, ddp.world_size, accumulate=resolved.spec.train.accumulate)
        check_out_dir(out_dir)
        check_model_fits(resolved.spec, dev)
        payload = resume_payload(resolved, out_dir, resume, ddp.world_size, warn if ddp.main else None)
        data = TrainData(resolved.spec, dev, _data_note if ddp.main and progress_mode != "quiet" else None)
        if ddp.main:
            lock = open_run_dir(out_dir)
        return _run(resolved, out_dir, ddp, dev, data, payload, resume, max_steps, progress_mode)
    finally:
        if lock is not None:
            lock.release()
        teardown_distributed(ddp)


def _data_note(text: str) -> None:
    """Where the training images came from (the folder dataset's decode cache), on stderr."""
    sys.stderr.write(f"data: {text}\n")


def _run(resolved, out_dir: Path, ddp: Distributed, dev: torch.device, data: TrainData,
         payload: dict | None, resume: bool, max_steps, progress_mode) -> dict:
    trainer = setup_trainer(resolved, out_dir, ddp, dev, data, payload, max_steps, progress_mode)
    if resume and ddp.main:
        _say_where_resuming(trainer, payload is None)
    try:
        result = trainer.run()
    finally:
        trainer.reporter.close()
    _report_weights_hash(trainer.model, ddp)
    return result


def setup_trainer(resolved: ResolvedSpec, out_dir: Path, ddp: Distributed, dev: torch.device,
                  data: TrainData, payload: dict | None, max_steps: int | None = None,
                  progress_mode: str = "quiet") -> Trainer:
    """A Trainer at step 0, or where ``payload`` (a checkpoint) left off; on rank 0 the run
    directory is made ready for it (spec.yaml, metrics.jsonl trimmed to the checkpoint)."""
    cfg = resolved.spec.train
    check_batch_size(cfg.batch_size, ddp.world_size, len(data.train), cfg.accumulate)
    batches_per_epoch = EpochBatches(data.train, cfg.batch_size, cfg.seed, 0, ddp.world_size > 1).num_batches
    model, optimizer, ema, state = build_parts(resolved.spec, dev, payload, out_dir / "checkpoints" / "last.pt",
                                               restore_rng=ddp.main)
    if ddp.world_size > 1 and cfg.sync_batch_norm:
        use_global_batch_statistics(model)
    net = wrap_data_parallel(model, dev) if ddp.world_size > 1 else model
    forward = torch.compile(net) if cfg.compile else net
    if ddp.main:
        _prepare_run_dir(resolved, out_dir, payload, state)
    try:
        reporter = Reporter(out_dir, progress_mode, ddp.main, batches_per_epoch, cfg.epochs, state.step)
    except OSError as e:
        raise write_error(e, out_dir / "metrics.jsonl", "Nothing was trained.") from None
    # With data parallelism, micro-batches before the last accumulate gradients locally: one
    # all-reduce per optimizer step, as without accumulation.
    no_sync = net.no_sync if ddp.world_size > 1 else contextlib.nullcontext
    return Trainer(resolved, out_dir, ddp, dev, data, model, optimizer, ema, state, forward,
                   reporter, max_steps, no_sync=no_sync)


def build_parts(spec, dev: torch.device, payload: dict | None, path: Path, restore_rng: bool = True):
    """Model, optimizer (Adamax with the two L2 strengths, builders.train.optim), EMA and the loop
    position State: fresh, or put back from the checkpoint ``payload`` read from ``path``."""
    model = place(build_model(spec, dev), dev)
    optimizer = build_optimizer(model, spec.train.optimizer)
    ema = EMA(model, spec.train.ema.decay) if spec.train.ema is not None else None
    state = State()
    if payload is not None:
        state = restore(payload, path, model, optimizer, ema)
        if restore_rng:
            set_rng_state(payload["rng"])
    return model, optimizer, ema, state


def _prepare_run_dir(resolved: ResolvedSpec, out_dir: Path, payload: dict | None, state: State) -> None:
    """spec.yaml for a new run; metrics.jsonl without the records written after the checkpoint."""
    try:
        if payload is None or not (out_dir / "spec.yaml").exists():
            write_text_atomic(out_dir / "spec.yaml", f"# resolved spec trained by avi; hash "
                              f"{resolved.hash}\n" + dump_yaml(resolved.document))
        trim_metrics(out_dir / "metrics.jsonl", state.step, state.epoch)
    except OSError as e:
        raise write_error(e, out_dir, "Nothing was trained.") from None


def _say_where_resuming(trainer: Trainer, from_start: bool) -> None:
    state, epochs, out_dir = trainer.state, trainer.cfg.epochs, trainer.out_dir
    if from_start:
        trainer.reporter.message(f"resuming {out_dir} from step 0 (it had no checkpoint yet)")
    elif state.epoch >= epochs:
        trainer.reporter.message(f"{out_dir} has finished its {epochs} epochs (step {state.step}); "
                                 f"nothing to train")
    else:
        trainer.reporter.message(f"resuming {out_dir} at step {state.step} (epoch {state.epoch + 1}/"
                                 f"{epochs}, batch {state.batch})")


def _report_weights_hash(model: torch.nn.Module, ddp: Distributed) -> None:
    test_dir = os.environ.get("AVI_TEST_WEIGHTS_HASH_DIR")
    if test_dir:   # test hook: every rank reports a hash of its parameters (BN statistics are per rank)
        Path(test_dir).mkdir(parents=True, exist_ok=True)
        params_now = {k: p.detach() for k, p in model.named_parameters()}
        (Path(test_dir) / f"rank{ddp.rank}.txt").write_text(tensors_hash(params_now))
