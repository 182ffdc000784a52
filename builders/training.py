"""Training loop of `avi train` (ARCHITECTURE.md section 7, PRODUCT.md "A run directory").

    loss = mean_b [ nll_b + beta(epoch) * sum_l KL_bl ]        (nats per image)
    + L2 as coupled weight decay in the optimizer (builders.optim)

Reproducibility: the data order comes from (seed, epoch) (EpochBatches), and every step
reseeds both the binarisation/flip generator and torch's global generator (posterior noise)
from (seed, step, rank). So the random numbers of a step depend only on its position, and a
run resumed from a checkpoint takes exactly the steps an uninterrupted run takes (bit for bit
on the CPU). The RNG states are still saved in checkpoints and restored on resume.

Run directory (only rank 0 writes): spec.yaml, metrics.jsonl, samples/epoch_XXXX.png,
checkpoints/last.pt (every checkpoint_every steps, each epoch end and on Ctrl-C, atomic; the
previous one kept as last.prev.pt), checkpoints/best.pt (best test NELBO), TensorBoard events
in tb/ when tensorboard is installed.

A step whose loss or gradient is not finite (on any process) is skipped: no update, and the
batch-norm running statistics of its forward pass are put back.

Data parallel: launched under torchrun (RANK / WORLD_SIZE set), each process takes its
share of every global batch; gradients are averaged by DistributedDataParallel; batch-norm
statistics stay per process (broadcast_buffers=False; ARCHITECTURE.md section 7: not
synchronised), so checkpoints hold rank 0's. A run resumes only with the number of processes
it was trained with (the data order depends on it).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from avi_spec import ResolvedSpec, dump_yaml
from avi_spec.diff import changed_fields

from .build import build_model
from .checkpoint import (CheckpointError, load_with_fallback, rng_state, save_checkpoint,
                         set_rng_state)
from .datasets import load_spec_images
from .devices import place, resolve_device
from .evaluate import importance_sampled_nll
from .images import save_grid
from .optim import build_optimizer
from .preprocess import BinarizedTestSet, EpochBatches, data_kind, likelihood_dims, prepare_batch
from .schedules import kl_beta, learning_rate

TEST_BINARIZATION_SEED = 0
TEST_NOISE_SEED = 0                 # posterior noise of the per-epoch test NELBO
SAMPLES_PER_GRID = 64


class TrainingError(Exception):
    """A refusal or a failed run caused by the user's input or data (exit 2 in the CLI)."""


# ------------------------------------------------------------------------- helpers

def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, step, rank ...), stable across runs."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def document_differences(old: dict, new: dict) -> list[str]:
    """'path: old -> new' for every leaf field that differs between two resolved documents
    (the flattening of `avi diff`, name and description included)."""
    rows = changed_fields([old, new], every_field=True)
    return [f"{r['path']}: {json.dumps(r['values'][0])} -> {json.dumps(r['values'][1])}" for r in rows]


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records a killed run wrote after its last checkpoint (step > `step`): the
    resumed run writes them again, and metrics.jsonl must read as one uninterrupted run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and _record_step(line) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return math.inf                   # a half-written last line of a killed run


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def all_processes_agree(flags: list[bool], ddp: Distributed, device: torch.device) -> list[bool]:
    """Each flag stays true only if it is true in every process (all_reduce MIN), so that
    decisions such as skipping a non-finite update are the same on all ranks."""
    if ddp.world_size == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def wrap_data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel with per-process batch-norm statistics (no buffer broadcast)."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def setup_distributed(device_name: str | None) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device_name in (None, "auto") and torch.cuda.is_available()) or device_name == "cuda"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world, local, True)


# ------------------------------------------------------------------------- output

class Reporter:
    """metrics.jsonl, TensorBoard, and what the user sees (progress bar / lines / JSON)."""

    def __init__(self, out_dir: Path, mode: str, active: bool, steps_per_epoch: int, epochs: int,
                 start_step: int):
        self.active, self.mode = active, mode
        self.metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if active else None
        self.tb = None
        if active:
            try:
                from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package
                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step or None)
            except Exception:
                self.tb = None
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.display = mode if active else "quiet"
        self.progress = self.task = None
        self.epochs, self.spe = epochs, steps_per_epoch
        if self.display == "bar":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
            self.progress = Progress(TextColumn("epoch {task.fields[epoch]}/" + str(epochs)),
                                     BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"),
                                     console=Console(stderr=True, emoji=False), transient=False)
            self.progress.start()

    def start_epoch(self, epoch: int, total: int, done: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("train", total=total, completed=done,
                                               epoch=epoch + 1, info="")

    def step(self, info: str) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, info=info)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        line = json.dumps(record, allow_nan=True)
        self.metrics.write(line + "\n")
        self.metrics.flush()
        if self.display == "jsonl":
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{'test' if k.startswith('test') else 'train'}/{k}", v, record["step"])

    def message(self, text: str) -> None:
        """A line on stderr (above the bar if one is shown); nothing in quiet/jsonl modes."""
        if not self.active or self.display in ("quiet", "jsonl"):
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()


def warn(text: str) -> None:
    sys.stderr.write(f"warning: {text}\n")
    sys.stderr.flush()


# ------------------------------------------------------------------------- data

class TrainData:
    """Training images and the test set of a spec, with the per-step preprocessing."""

    def __init__(self, spec, device: torch.device):
        d = spec.data
        self.kind, self.flips, self.pad = data_kind(spec), d.flips, d.pad
        self.device = device
        self.train = torch.as_tensor(load_spec_images(d, "train"))
        test = load_spec_images(d, "test")
        if self.kind == "binary":
            self.test = BinarizedTestSet(test, seed=TEST_BINARIZATION_SEED, pad=self.pad)
            self.test_input = lambda idx: self.test[idx]
            self.n_test = len(self.test)
        else:
            self.test_raw = torch.as_tensor(test)
            self.test_input = lambda idx: prepare_batch(self.test_raw[idx], "cifar", None,
                                                        train=False, pad=self.pad)
            self.n_test = len(self.test_raw)
        self.dims = likelihood_dims(spec)          # D of bits/dim

    def prepare(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Raw batch -> model input on the training device. Random draws are made on the CPU
        generator first, so the stream does not depend on the device."""
        x = prepare_batch(raw, self.kind, generator, train=True, flips=self.flips, pad=self.pad)
        return x.to(self.device, non_blocking=True)


# ------------------------------------------------------------------------- the loop

@dataclass
class State:
    step: int = 0                  # batches processed (optimizer steps, skipped ones included)
    epoch: int = 0                 # current epoch (0-based)
    batch: int = 0                 # next batch index within the epoch
    skipped: int = 0               # non-finite updates skipped in total
    consecutive_skipped: int = 0
    best_test_nelbo: float = math.inf
    counters: dict = field(default_factory=dict)


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_p = list(self.model.parameters())
        new_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, new_p, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def batchnorm_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """running_mean, running_var and num_batches_tracked of every batch norm of ``model``."""
    return [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in m.buffers(recurse=False)]


class StopOnInterrupt:
    """Between start() and stop() (main thread only), Ctrl-C asks training to stop at the end
    of the current step, where last.pt is written before KeyboardInterrupt is raised, so
    --resume loses nothing. A second Ctrl-C interrupts at once (checkpoints are atomic)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def start(self) -> None:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("interrupt: stopping after this step to write checkpoints/last.pt "
                         "(Ctrl-C again to stop now)\n")

    def stop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _run_dir_has_checkpoints(out_dir: Path) -> bool:
    ck = out_dir / "checkpoints"
    return ck.is_dir() and any(ck.glob("*.pt"))


def train(resolved: ResolvedSpec, out_dir: str | Path, resume: bool = False,
          device: str | torch.device | None = "auto", max_steps: int | None = None,
          progress_mode: str = "auto", devices: int | None = None) -> dict:
    """Train the model of ``resolved`` into ``out_dir``; returns a summary dict.

    progress_mode: auto (rich bar on a TTY, else one line per epoch on stderr), lines,
    quiet (nothing) or jsonl (every metrics line also on stdout). ``devices`` is informative
    here: the CLI relaunches itself under torchrun for ``--devices N``; inside this function
    the process group comes from the environment torchrun sets. Raises TrainingError,
    CheckpointError, DatasetError, SpecError for the user's problems.
    """
    spec, cfg = resolved.spec, resolved.spec.train
    out_dir = Path(out_dir)
    ddp = setup_distributed(str(device) if device is not None else None)
    try:
        return _train(resolved, spec, cfg, out_dir, resume, device, max_steps, progress_mode, ddp)
    finally:
        if ddp.initialised and dist.is_initialized():
            dist.destroy_process_group()


def _train(resolved, spec, cfg, out_dir: Path, resume: bool, device, max_steps, progress_mode,
           ddp: Distributed) -> dict:
    dev = resolve_device(device, ddp.local_rank)
    if cfg.batch_size % ddp.world_size:
        raise TrainingError(f"train.batch_size {cfg.batch_size} must be divisible by the "
                            f"number of processes ({ddp.world_size})")
    ckpt_dir = out_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"

    # ----- refuse before doing any work
    payload = None
    if resume:
        if not last_path.exists() and not (ckpt_dir / "last.prev.pt").exists():
            raise TrainingError(f"nothing to resume: {last_path} does not exist")
        payload, _ = load_with_fallback(last_path, warn if ddp.main else None)
        old_world = payload.get("world_size", 1)
        if old_world != ddp.world_size:
            raise TrainingError(f"{out_dir} was trained with {old_world} process(es) and would resume "
                                f"with {ddp.world_size}; the data order and the batches kept per epoch "
                                f"depend on the number of processes, so resume it with --devices "
                                f"{old_world}")
        old_doc = payload.get("spec", {})
        if payload.get("spec_hash") != resolved.hash:
            diffs = document_differences(old_doc, resolved.document)
            detail = "\n  ".join(diffs) if diffs else "(documents differ)"
            raise TrainingError(f"the spec differs from the one this run was trained with "
                                f"({out_dir}); refusing to resume:\n  {detail}\n"
                                f"Train it into another --out, or resume with the original spec "
                                f"({out_dir / 'spec.yaml'}).")
    elif _run_dir_has_checkpoints(out_dir):
        raise TrainingError(f"{out_dir} already holds a run with checkpoints; use --resume to "
                            f"continue it or --out for a new run directory")

    # ----- data, model, optimizer
    data = TrainData(spec, dev)
    n_train = len(data.train)
    drop_last = ddp.world_size > 1
    if n_train < cfg.batch_size and drop_last:
        raise TrainingError(f"train.batch_size {cfg.batch_size} exceeds the {n_train} training images")
    batches_per_epoch = EpochBatches(data.train, cfg.batch_size, cfg.seed, 0, drop_last,
                                     ddp.rank, ddp.world_size).num_batches
    steps_per_epoch = max(1, n_train // cfg.batch_size)   # schedule bookkeeping (ARCH 7)

    model = place(build_model(spec, dev), dev)
    cuda = dev.type == "cuda"
    optimizer = build_optimizer(model, cfg.optimizer)
    ema = EMA(model, cfg.ema.decay) if cfg.ema is not None else None
    state = State()
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if ema is not None and payload.get("ema") is not None:
            ema.model.load_state_dict(payload["ema"])
        s = payload["state"]
        state = State(step=s["step"], epoch=s["epoch"], batch=s["batch"], skipped=s["skipped"],
                      consecutive_skipped=s["consecutive_skipped"],
                      best_test_nelbo=s["best_test_nelbo"], counters=dict(s.get("counters", {})))
        if ddp.main:
            set_rng_state(payload["rng"])
    elif ddp.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    net = wrap_data_parallel(model, dev) if ddp.world_size > 1 else model
    forward = torch.compile(net) if cfg.compile else net
    autocast = _autocast(dev, cfg.precision)
    generator = torch.Generator()       # binarisation / flips (draws on the CPU: device-independent)

    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "samples").mkdir(exist_ok=True)
        if not resume or not (out_dir / "spec.yaml").exists():
            (out_dir / "spec.yaml").write_text(
                f"# resolved spec trained by avi; hash {resolved.hash}\n" + dump_yaml(resolved.document),
                encoding="utf-8")
    if payload is not None and ddp.main:
        trim_metrics(out_dir / "metrics.jsonl", state.step)
    reporter = Reporter(out_dir, progress_mode, ddp.main, batches_per_epoch, cfg.epochs, state.step)
    if resume and ddp.main:
        reporter.message(f"resuming {out_dir} at step {state.step} (epoch {state.epoch + 1}, "
                         f"batch {state.batch})")

    def payload_now() -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.model.state_dict() if ema is not None else None,
            "state": {"step": state.step, "epoch": state.epoch, "batch": state.batch,
                      "skipped": state.skipped, "consecutive_skipped": state.consecutive_skipped,
                      "best_test_nelbo": state.best_test_nelbo, "counters": dict(state.counters)},
            "rng": rng_state(),
            "spec": resolved.document,
            "spec_hash": resolved.hash,
            "world_size": ddp.world_size,
            "torch_version": str(torch.__version__),
        }

    def checkpoint() -> None:
        if ddp.main:
            save_checkpoint(last_path, payload_now())

    params = [p for p in model.parameters() if p.requires_grad]
    bn_buffers = batchnorm_buffers(model)
    bn_snapshot = [b.clone() for b in bn_buffers]      # taken before every forward pass
    max_norm = float(cfg.grad_clip) if cfg.grad_clip is not None else math.inf
    bits = data.kind == "cifar"
    stopped_early = False
    window: dict[str, float] = {}
    window_n, window_t0 = 0, time.perf_counter()
    it_per_s = 0.0
    last_test = None

    interrupt = StopOnInterrupt()
    try:
        interrupt.start()
        while state.epoch < cfg.epochs:
            epoch = state.epoch
            beta = kl_beta(epoch, cfg.kl_warmup)
            batches = EpochBatches(data.train, cfg.batch_size, cfg.seed, epoch, drop_last,
                                   ddp.rank, ddp.world_size, start_batch=state.batch)
            reporter.start_epoch(epoch, batches.num_batches, state.batch)
            if state.batch == 0:            # running train means of the epoch (kept across resumes)
                state.counters.update(epoch_loss=0.0, epoch_n=0)
            epoch_t0 = time.perf_counter()
            model.train()
            for raw in batches:
                if max_steps is not None and state.step >= max_steps:
                    stopped_early = True
                    break
                lr = learning_rate(state.step, steps_per_epoch, cfg.schedule, cfg.optimizer.lr, cfg.epochs)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                generator.manual_seed(derive_seed(cfg.seed, 1, state.step, ddp.rank))
                torch.manual_seed(derive_seed(cfg.seed, 2, state.step, ddp.rank))
                x = data.prepare(raw, generator)
                x = x.contiguous(memory_format=torch.channels_last)
                torch._foreach_copy_(bn_snapshot, bn_buffers)
                with autocast():
                    out = forward(x)
                nll = out.nll.float().mean()
                kl = out.kl.float().sum(1).mean()
                loss = nll + beta * kl
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
                loss_v, nll_v, kl_v, gn_v = torch.stack([loss.detach(), nll.detach(), kl.detach(),
                                                         grad_norm.float()]).tolist()
                finite, go_on = all_processes_agree(
                    [math.isfinite(loss_v) and math.isfinite(gn_v), not interrupt.requested], ddp, dev)
                if finite:
                    optimizer.step()
                    if ema is not None:
                        ema.update(model)
                    state.consecutive_skipped = 0
                else:
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():                # the forward's BN updates are undone too
                        torch._foreach_copy_(bn_buffers, bn_snapshot)
                    state.skipped += 1
                    state.consecutive_skipped += 1
                    reporter.message(f"step {state.step}: non-finite loss or gradient "
                                     f"(loss {loss_v}, grad norm {gn_v}); update skipped "
                                     f"({state.consecutive_skipped} in a row)")
                    if state.consecutive_skipped >= cfg.max_skipped:
                        # No checkpoint here: last.pt stays the last good state to resume from.
                        raise TrainingError(
                            f"{state.consecutive_skipped} consecutive non-finite updates (train.max_skipped "
                            f"= {cfg.max_skipped}) at step {state.step}: training diverged. Try a lower "
                            f"train.optimizer.lr, set train.grad_clip, or a longer warm-up.")
                state.step += 1
                state.batch += 1
                vals = {"loss": loss_v, "nll": nll_v, "kl": kl_v}
                if math.isfinite(loss_v):
                    for k, v in vals.items():
                        window[k] = window.get(k, 0.0) + v
                    window["grad_norm"] = window.get("grad_norm", 0.0) + gn_v
                    window_n += 1
                    state.counters["epoch_loss"] = state.counters.get("epoch_loss", 0.0) + loss_v
                    state.counters["epoch_n"] = state.counters.get("epoch_n", 0) + 1
                elapsed = time.perf_counter() - epoch_t0
                it_per_s = (state.batch - batches.start_batch) / elapsed if elapsed > 0 else 0.0
                if reporter.progress is not None:
                    unit = (f"NELBO {(nll_v + kl_v) / (data.dims * math.log(2)):.3f} bits/dim" if bits
                            else f"NELBO {nll_v + kl_v:.2f} nats")
                    reporter.step(f"loss {loss_v:.2f}  KL {kl_v:.2f}  {unit}  {it_per_s:.2f} it/s")
                if state.step % cfg.log_every == 0:
                    n = max(window_n, 1)
                    now = time.perf_counter()
                    rec = {"step": state.step, "epoch": epoch, "lr": lr, "beta": beta,
                           "loss": window.get("loss", math.nan) / n if window_n else math.nan,
                           "nll": window.get("nll", math.nan) / n if window_n else math.nan,
                           "kl": window.get("kl", math.nan) / n if window_n else math.nan,
                           "grad_norm": window.get("grad_norm", math.nan) / n if window_n else math.nan,
                           "skipped": state.skipped,
                           "it_per_s": cfg.log_every / (now - window_t0) if now > window_t0 else 0.0}
                    if bits:
                        rec["bits_per_dim"] = (rec["nll"] + rec["kl"]) / (data.dims * math.log(2))
                    reporter.write(rec)
                    window, window_n, window_t0 = {}, 0, now
                if state.step % cfg.checkpoint_every == 0 or not go_on:
                    checkpoint()
                if not go_on:                            # Ctrl-C: stop at this step boundary
                    raise KeyboardInterrupt
            if stopped_early:
                break

            # ----- epoch end: test NELBO, samples, checkpoints
            eval_model = ema.model if ema is not None else model
            test_nelbo = mean_test_nelbo(eval_model, data, cfg.batch_size, dev, autocast, ddp)
            last_test = test_nelbo
            rec = {"step": state.step, "epoch": epoch, "test_nelbo": test_nelbo,
                   "train_loss": (state.counters.get("epoch_loss", 0.0) / state.counters["epoch_n"]
                                  if state.counters.get("epoch_n") else math.nan),
                   "beta": beta, "skipped": state.skipped,
                   "epoch_seconds": time.perf_counter() - epoch_t0}
            if bits:
                rec["test_nelbo_bits_per_dim"] = test_nelbo / (data.dims * math.log(2))
            reporter.write(rec)
            unit = (f"{rec['test_nelbo_bits_per_dim']:.4f} bits/dim" if bits else f"{test_nelbo:.2f} nats")
            if reporter.progress is None:
                reporter.message(f"epoch {epoch + 1}/{cfg.epochs}  step {state.step}  "
                                 f"train loss {rec['train_loss']:.3f}  test NELBO {unit}  "
                                 f"{it_per_s:.2f} it/s")
            if ddp.main and ((epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs):
                was_training = eval_model.training
                eval_model.eval()           # batch norm with running statistics, none updated
                with torch.random.fork_rng(devices=[dev] if cuda else []):
                    torch.manual_seed(derive_seed(cfg.seed, 3, epoch))
                    with autocast():
                        images = eval_model.sample(SAMPLES_PER_GRID).float().clamp(0, 1).cpu()
                eval_model.train(was_training)
                save_grid(out_dir / "samples" / f"epoch_{epoch + 1:04d}.png", images)
            state.epoch += 1
            state.batch = 0
            improved = test_nelbo < state.best_test_nelbo
            if improved:
                state.best_test_nelbo = test_nelbo
            checkpoint()
            if improved and ddp.main:
                save_checkpoint(best_path, payload_now(), keep_previous=False)
        if stopped_early or (max_steps is not None and state.step >= max_steps):
            checkpoint()
    finally:
        interrupt.stop()
        reporter.close()

    test_dir = os.environ.get("AVI_TEST_WEIGHTS_HASH_DIR")
    if test_dir:   # test hook: every rank reports a hash of its parameters (BN statistics are per rank)
        Path(test_dir).mkdir(parents=True, exist_ok=True)
        params_now = {k: p.detach() for k, p in model.named_parameters()}
        (Path(test_dir) / f"rank{ddp.rank}.txt").write_text(tensors_hash(params_now))
    return {"out_dir": str(out_dir), "step": state.step, "epoch": state.epoch,
            "finished": state.epoch >= cfg.epochs, "skipped": state.skipped,
            "test_nelbo": last_test, "best_test_nelbo": state.best_test_nelbo}


def mean_test_nelbo(model: torch.nn.Module, data: TrainData, batch_size: int, dev: torch.device,
                    autocast: Callable, ddp: Distributed) -> float:
    """Mean single-sample NELBO (nats, beta = 1) over the test set: builders.evaluate's
    estimator with K = 1 (model in eval mode, fixed noise seed). Under data parallelism every
    process scores its share and the sums are reduced."""
    idx = torch.arange(ddp.rank, data.n_test, ddp.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=dev)
    if len(idx):
        batches = (data.test_input(idx[s:s + batch_size]) for s in range(0, len(idx), batch_size))
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), autocast():
            r = importance_sampled_nll(model, batches, 1, chunk=1, dims=0, seed=TEST_NOISE_SEED)
        total += torch.tensor([r["nelbo_nats"] * r["examples"], r["examples"]],
                              dtype=torch.float64, device=dev)
    if ddp.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp_min(1)).item()
