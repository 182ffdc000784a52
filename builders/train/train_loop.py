"""The loop of `avi train`: the paper's recipe (docs/model.md section 9), one step at a time.

    for epoch:   beta = kl_beta(epoch)            KL warm-up: linear from kl_warmup.start to 1
      for batch: lr = learning_rate(step)         cosine schedule after a linear warm-up
                 loss = NLL + beta * KL           nats per image (Trainer.step)
                 (train.accumulate micro-batches: their gradients summed, one update)
                 clip the gradient norm; Adamax update with the two L2 strengths as weight
                 decay (builders.train.optim); EMA of the weights
      epoch end: test NELBO, samples, best.pt, last.pt (Trainer.end_epoch)

Order at an epoch end: the test record, the sample grid, best.pt (when the test NELBO
improved), then last.pt. A run killed before last.pt is renamed resumes from the previous
checkpoint and does the epoch end again, rewriting the same best.pt; records of an epoch that
last.pt does not call finished are dropped on resume (run_dir.trim_metrics), so none is
written twice. A state with non-finite weights is never checkpointed.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from ..checkpoint import rng_state, save_checkpoint
from ..data.preprocess import EpochBatches, process_share
from ..evaluation.images import save_grid
from ..faults import fault_point
from ..launch.process_group import peer_failure
from ..network.distributions import BatchRows
from .distributed import Distributed, step_across_processes
from . import diagnostics
from .reporting import Reporter
from .run_dir import DivergedError, TrainingError, write_error
from .schedules import kl_beta, learning_rate
from .train_data import TrainData, mean_test_nelbo
from .train_state import EMA, State, batchnorm_buffers, derive_seed, non_finite_tensors

SAMPLES_PER_GRID = 64
WINDOW = ("loss", "nll", "kl", "grad_norm")      # averaged over the steps of a step record


class StopOnInterrupt:
    """Between start() and stop() (main thread only), Ctrl-C asks training to stop at the end
    of the current step, where last.pt is written before KeyboardInterrupt is raised, so
    --resume loses nothing. A second Ctrl-C interrupts at once (checkpoints are atomic)."""

    def __init__(self, speak: bool = True, alone: bool = True):
        self.requested = False
        self._previous = None
        self.speak = speak                    # one process of several says it, not each
        # Several processes: a launcher passes the first Ctrl-C on, not always the second
        self.again = " (Ctrl-C again to stop now)" if alone else ""

    def start(self) -> None:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.speak:
            sys.stderr.write(f"interrupt: stopping after this step to write checkpoints/last.pt{self.again}\n")

    def stop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def autocast_for(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Trainer:
    """One training run of a built model into a run directory (rank 0 writes); made by
    builders.train.training.setup_trainer. run() calls train_epoch() per epoch, which calls step()
    per batch, then end_epoch(); checkpoint() writes last.pt or best.pt. The loop position and
    the running sums a resumed run needs are in ``state`` (saved in every checkpoint); the
    rest is fixed for the run or rebuilt each step."""

    def __init__(self, resolved, out_dir: Path, ddp: Distributed, dev: torch.device, data: TrainData,
                 model: torch.nn.Module, optimizer, ema: EMA | None, state: State, forward,
                 reporter: Reporter, max_steps: int | None, no_sync=contextlib.nullcontext):
        self.resolved, self.cfg = resolved, resolved.spec.train
        self.out_dir, self.ddp, self.dev, self.data = out_dir, ddp, dev, data
        self.model, self.optimizer, self.ema, self.state = model, optimizer, ema, state
        self.forward, self.reporter, self.max_steps = forward, reporter, max_steps
        self.no_sync = no_sync                # DDP's: micro-batches before the last skip the all-reduce
        self.last_path = out_dir / "checkpoints" / "last.pt"
        self.best_path = out_dir / "checkpoints" / "best.pt"
        self.saved_step = state.step if state.step else None
        self.autocast = autocast_for(dev, self.cfg.precision)
        self.generator = torch.Generator()   # binarisation / flips (CPU draws: device-independent)
        self.drop_last = ddp.world_size > 1
        # The schedule's epoch is floor(N / B) steps, the authors' lr_steps_per_epoch, while an
        # epoch runs ceil(N / B) steps (docs/model.md section 9): kept, it is what they ran.
        self.steps_per_epoch = max(1, len(data.train) // self.cfg.batch_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bn_buffers = batchnorm_buffers(model)
        self.bn_snapshot = [b.clone() for b in self.bn_buffers]   # taken before every forward
        self.max_norm = float(self.cfg.grad_clip) if self.cfg.grad_clip is not None else math.inf
        self.bits = data.kind == "cifar"
        self.interrupt = StopOnInterrupt(speak=ddp.main, alone=ddp.world_size == 1)
        self.last_test = None
        self.window_t0 = time.perf_counter()
        self.it_per_s = 0.0                   # steps per second of this epoch so far

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        """Train to the last epoch (or --max-steps); the summary `avi train` prints."""
        state, cfg = self.state, self.cfg
        if self.max_steps is not None:
            self.reporter.total_steps = min(self.reporter.total_steps, self.max_steps)
        try:
            self.interrupt.start()
            while state.epoch < cfg.epochs:
                if not self.train_epoch(state.epoch):
                    break
            if self._max_steps_reached():
                self.checkpoint()
        except OSError as e:
            raise write_error(e, self.out_dir, self._saved_text()) from None
        except RuntimeError as e:                     # a dead node or process: say so, no traceback
            lost = peer_failure(e, self.ddp, f"{self._saved_text()} Once every node is back, "
                                             f"continue with --resume.")
            if lost is None:
                raise
            raise lost from None
        finally:
            self.interrupt.stop()
        return {"out_dir": str(self.out_dir), "step": state.step, "epoch": state.epoch,
                "finished": state.epoch >= cfg.epochs, "skipped": state.skipped,
                "test_nelbo": self.last_test, "best_test_nelbo": state.best_test_nelbo}

    def _saved_text(self) -> str:
        if not self.ddp.main:
            return "Process 0 writes the checkpoints: its message says which one is intact."
        if self.saved_step is None:
            return "No checkpoint was written yet."
        return f"{self.last_path} is intact (step {self.saved_step})."

    def train_epoch(self, epoch: int) -> bool:
        """Train the rest of one epoch; False when --max-steps stopped it first."""
        state, cfg = self.state, self.cfg
        beta = kl_beta(epoch, cfg.kl_warmup)
        # Every process reads the whole global batch: its random draws are made for all of it
        # (Trainer._inputs), then each keeps its own rows.
        batches = EpochBatches(self.data.train, cfg.batch_size, cfg.seed, epoch, self.drop_last,
                               start_batch=state.batch)
        self.reporter.start_epoch(epoch, batches.num_batches, state.batch)
        if state.batch == 0:            # running train means of the epoch (kept across resumes)
            state.counters.update(epoch_loss=0.0, epoch_n=0)
        epoch_t0 = time.perf_counter()
        self.model.train()
        for raw in batches:
            if self._max_steps_reached():
                return False
            # schedule step n = state.step + 1: the authors' callback counts the batch about to
            # run before it sets its rate, so their first step already takes one warm-up increment
            lr = learning_rate(state.step + 1, self.steps_per_epoch, cfg.schedule, cfg.optimizer.lr, cfg.epochs)
            go_on = self.step(raw, lr, beta)
            self._measure_speed(state.batch - batches.start_batch, epoch_t0)
            last = self._max_steps_reached() or (epoch + 1 == cfg.epochs and state.batch == batches.num_batches)
            self._record_and_checkpoint(epoch, lr, beta, stopping=not go_on, last=last)
            if not go_on:                            # Ctrl-C: last.pt is written, stop here
                raise KeyboardInterrupt
        self.end_epoch(epoch, beta, epoch_t0)
        return True

    def _max_steps_reached(self) -> bool:
        return self.max_steps is not None and self.state.step >= self.max_steps

    def _measure_speed(self, steps: int, since: float) -> None:
        elapsed = time.perf_counter() - since
        self.it_per_s = steps / elapsed if elapsed > 0 else 0.0

    def _record_and_checkpoint(self, epoch: int, lr: float, beta: float, stopping: bool, last: bool) -> None:
        """After a step: the step record every log_every steps, at the last step and when
        stopping; last.pt every checkpoint_every steps and when stopping."""
        if self.state.step % self.cfg.log_every == 0 or stopping or last:
            self._record_window(epoch, lr, beta)
        if self.state.step % self.cfg.checkpoint_every == 0 or stopping:
            self.checkpoint()

    # ------------------------------------------------------------------ one step

    def step(self, raw: torch.Tensor, lr: float, beta: float) -> bool:
        """One optimisation step on a raw global batch (this process trains on its rows): loss = NLL + beta * KL (its gradient summed
        over train.accumulate micro-batches), gradient clipped, an update at ``lr``, the EMA.
        Skipped (no update, the batch-norm statistics of its forwards put back) when the loss
        or the gradient is not finite on any process. Returns False when Ctrl-C asked to stop
        after it."""
        self._set_learning_rate(lr)
        x, rows = self._inputs(raw)
        torch._foreach_copy_(self.bn_snapshot, self.bn_buffers)    # to undo the forward's BN updates
        self.optimizer.zero_grad(set_to_none=True)
        loss, nll, kl, kl_layers = self._gradients(x, rows, beta)
        grad_norm = self._grad_norm()
        values, stop = step_across_processes(torch.stack([loss, nll, kl, grad_norm.float()]),
                                             self.interrupt.requested, self.ddp, self.dev)
        if all(math.isfinite(v) for v in values[::3]):          # the loss and the gradient norm
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_norm, grad_norm, foreach=True)
            self._update()
        else:
            self._skip(values, x, rows, kl_layers)
        self._count_step(values)
        return not stop

    def _set_learning_rate(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def _inputs(self, raw: torch.Tensor) -> tuple[torch.Tensor, BatchRows]:
        """This process's model input of a step and where its rows sit in the global batch.
        The random numbers of a step (binarisation and flips here, the forward's in _forward)
        are drawn for the whole global batch from (seed, step) alone, so an image gets the same
        numbers however many processes share the batch, and a resumed run draws what the
        uninterrupted one drew. (The 0 in the seed stood for the rank when each process drew
        for its own share; one-process runs draw what they drew then.)"""
        share = process_share(raw.shape[0], self.ddp.rank, self.ddp.world_size)
        self.generator.manual_seed(derive_seed(self.cfg.seed, 1, self.state.step, 0))
        x = self.data.prepare(raw, self.generator, share)
        rows = BatchRows(raw.shape[0], share.start)
        return x.contiguous(memory_format=torch.channels_last), rows   # the model's layout (devices.place)

    def _forward(self, x: torch.Tensor, rows: BatchRows, net=None, **kwargs):
        """``net`` (the training forward: DDP, compiled) on x, rows ``rows`` of the step's global
        batch. The generator is reset to the step's seed before every forward (each
        micro-batch's, the diagnosis's), which then draws the whole global batch's numbers and
        keeps its own rows (randn_as)."""
        torch.manual_seed(derive_seed(self.cfg.seed, 2, self.state.step, 0))
        return (net or self.forward)(x, rows=rows, **kwargs)

    def _gradients(self, x: torch.Tensor, rows: BatchRows, beta: float) -> tuple[torch.Tensor, ...]:
        """Gradients of the batch's loss in .grad, and (loss, nll, kl, KL per layer) of the
        batch, detached.
        With train.accumulate = k the batch runs as k equal micro-batches, each loss weighted
        1/k: their gradients sum to the batch mean's. Each micro-batch draws the noise the
        forward of the whole batch draws for its images (_forward), so only batch norm's
        statistics differ from one big batch."""
        k = self.cfg.accumulate
        total = torch.zeros(3, device=x.device)
        kl_layers = torch.zeros(self.model.derived.layers, device=x.device)
        start = rows.start
        for i, xi in enumerate(x.tensor_split(k)):
            with self.no_sync() if i < k - 1 else contextlib.nullcontext():
                loss, nll, kl, kl_i = self._loss(xi, BatchRows(rows.total, start), beta)
                (loss / k).backward()
            start += xi.shape[0]
            total += torch.stack([loss.detach(), nll.detach(), kl.detach()]) / k
            kl_layers += kl_i / k
        return total[0], total[1], total[2], kl_layers

    def _loss(self, x: torch.Tensor, rows: BatchRows, beta: float) -> tuple[torch.Tensor, ...]:
        """loss = mean over images of [NLL + beta * sum over layers of KL] (nats), with its terms."""
        with self.autocast():
            out = self._forward(x, rows)
        nll = out.nll.float().mean()
        kl_layers = out.kl.detach().float().mean(0)           # [L], read only when a step is skipped
        kl = out.kl.float().sum(1).mean()
        return nll + beta * kl, nll, kl, kl_layers

    def _grad_norm(self) -> torch.Tensor:
        """The global norm of the gradients. Clipping to train.grad_clip waits until the norm
        is known to be finite (step): scaling by a NaN norm would hide which module group's
        gradient went bad from the diagnosis of a skipped step."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    def _update(self) -> None:
        """The optimizer's update (L2 is its weight decay, builders.train.optim), then the EMA."""
        try:
            self.optimizer.step()
        except RuntimeError as e:          # e.g. lr = 1e300: the update is not a float32
            if "overflow" not in str(e):
                raise
            raise TrainingError(f"the update of step {self.state.step + 1} overflows float32 "
                                f"(train.optimizer.lr = {self.cfg.optimizer.lr:g}); use a smaller "
                                f"learning rate. {self._saved_text()}") from None
        if self.ema is not None:
            self.ema.update(self.model)
        self.state.consecutive_skipped = 0

    def _skip(self, values: list[float], x: torch.Tensor, rows: BatchRows, kl_layers: torch.Tensor) -> None:
        """No update: the gradients are dropped, the forward's batch-norm updates undone, and
        the step is explained (builders.train.diagnostics) on stderr and in metrics.jsonl.
        After train.max_skipped in a row the run stops (DivergedError) with last.pt as it was."""
        state, cfg = self.state, self.cfg
        account = self._diagnose(values, x, rows, kl_layers)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():                # the forward's BN updates (and the diagnosis's) undone
            torch._foreach_copy_(self.bn_buffers, self.bn_snapshot)
        state.skipped += 1
        state.consecutive_skipped += 1
        self.reporter.write({"step": state.step + 1, "epoch": state.epoch, "skipped": state.skipped,
                             "diagnosis": account})
        first = state.consecutive_skipped == 1
        self.reporter.message(f"step {state.step + 1}: non-finite loss or gradient (loss {values[0]}, "
                              f"grad norm {values[3]}); update skipped ({state.consecutive_skipped} in a "
                              f"row, train.max_skipped = {cfg.max_skipped}). {diagnostics.summary(account)}"
                              + (f"\n  {diagnostics.remedies(cfg)}" if first else ""))
        if state.consecutive_skipped >= cfg.max_skipped:
            # No checkpoint here: last.pt stays the last good state to resume from.
            raise DivergedError(
                f"{state.consecutive_skipped} consecutive non-finite steps (train.max_skipped = "
                f"{cfg.max_skipped}) at step {state.step + 1}: training diverged. Last skipped step: "
                f"{diagnostics.summary(account)}. {diagnostics.remedies(cfg)} {self._saved_text()}")

    def _diagnose(self, values: list[float], x: torch.Tensor, rows: BatchRows,
                  kl_layers: torch.Tensor) -> dict:
        """The account of this step: its terms, the gradient norm per module group, and the
        log-scales of a forward pass rerun with the step's noise (to see which sit at a bound)."""
        grad_norms = diagnostics.group_grad_norms(self.model)
        with torch.no_grad(), self.autocast():
            latents = self._forward(x, rows, self.model, record_latents=True).latents
        return diagnostics.diagnose(dict(zip(WINDOW, values)), kl_layers.tolist(), grad_norms, latents,
                                    self.model.post_bounds, self.model.prior_bounds,
                                    diagnostics.weight_max_abs(self.model))

    def _count_step(self, values: list[float]) -> None:
        self.state.step += 1
        self.state.batch += 1
        self._accumulate(dict(zip(WINDOW, values)))
        self._show_step(values)

    def _accumulate(self, values: dict[str, float]) -> None:
        """Running sums of the step record and the epoch's train loss, in State.counters so
        that a resumed run writes the same records."""
        c = self.state.counters
        if not math.isfinite(values["loss"]):
            return
        for k, v in values.items():
            c[f"window_{k}"] = c.get(f"window_{k}", 0.0) + v
        c["window_n"] = c.get("window_n", 0) + 1
        c["epoch_loss"] = c.get("epoch_loss", 0.0) + values["loss"]
        c["epoch_n"] = c.get("epoch_n", 0) + 1

    def _show_step(self, values: list[float]) -> None:
        if self.reporter.display not in ("bar", "lines"):
            return
        loss, nll, kl, _ = values
        unit = (f"NELBO {(nll + kl) / (self.data.dims * math.log(2)):.3f} bits/dim" if self.bits
                else f"NELBO {nll + kl:.2f} nats")
        speed = self.it_per_s                           # of the steps before this one
        self.reporter.step(f"loss {loss:.2f}  KL {kl:.2f}  {unit}" + (f"  {speed:.2f} it/s" if speed else ""),
                           self.state.epoch, self.state.step)

    def _record_window(self, epoch: int, lr: float, beta: float) -> None:
        """The step record: means over the steps since the previous one (skipped steps left
        out). Written every log_every steps and at the last step of a run."""
        state, c = self.state, self.state.counters
        n = c.get("window_n", 0)
        if state.step == c.get("window_last_step", 0):
            return                                      # this step is recorded already
        now = time.perf_counter()
        steps = state.step - c.get("window_last_step", 0)
        rec = {"step": state.step, "epoch": epoch, "lr": lr, "beta": beta}
        rec.update({k: c.get(f"window_{k}", 0.0) / n if n else math.nan for k in WINDOW})
        rec.update(skipped=state.skipped, it_per_s=steps / (now - self.window_t0) if now > self.window_t0 else 0.0)
        if self.bits:
            rec["bits_per_dim"] = (rec["nll"] + rec["kl"]) / (self.data.dims * math.log(2))
        self.reporter.write(rec)
        for k in WINDOW:
            c.pop(f"window_{k}", None)
        c["window_n"], c["window_last_step"] = 0, state.step
        self.window_t0 = now

    # ------------------------------------------------------------------ epoch end

    def end_epoch(self, epoch: int, beta: float, epoch_t0: float) -> None:
        """Test NELBO record, samples, then best.pt (if improved) and last.pt, in that order."""
        state, cfg, c = self.state, self.cfg, self.state.counters
        eval_model = self.ema.model if self.ema is not None else self.model
        test_nelbo = mean_test_nelbo(eval_model, self.data, cfg.batch_size // cfg.accumulate, self.dev,
                                     self.autocast, self.ddp)
        self.last_test = test_nelbo
        rec = {"step": state.step, "epoch": epoch, "test_nelbo": test_nelbo,
               "train_loss": c.get("epoch_loss", 0.0) / c["epoch_n"] if c.get("epoch_n") else math.nan,
               "beta": beta, "skipped": state.skipped, "epoch_seconds": time.perf_counter() - epoch_t0,
               "lr_steps_per_epoch": self.steps_per_epoch}
        if self.bits:
            rec["test_nelbo_bits_per_dim"] = test_nelbo / (self.data.dims * math.log(2))
        self.reporter.write(rec)
        unit = (f"{rec['test_nelbo_bits_per_dim']:.4f} bits/dim" if self.bits else f"{test_nelbo:.2f} nats")
        self.reporter.epoch_done(f"epoch {epoch + 1}/{cfg.epochs}  step {state.step}  "
                                 f"train loss {rec['train_loss']:.3f}  test NELBO {unit}  "
                                 f"{self.it_per_s:.2f} it/s", state.step, rec["epoch_seconds"])
        if self.ddp.main and ((epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs):
            self._samples(epoch, eval_model)
        state.epoch += 1
        state.batch = 0
        if test_nelbo < state.best_test_nelbo:
            state.best_test_nelbo = test_nelbo
            self.checkpoint(best=True)
        self.checkpoint()

    def _samples(self, epoch: int, eval_model: torch.nn.Module) -> None:
        was_training = eval_model.training
        eval_model.eval()           # batch norm with running statistics, none updated
        cuda = self.dev.type == "cuda"
        with torch.random.fork_rng(devices=[self.dev] if cuda else []):
            torch.manual_seed(derive_seed(self.cfg.seed, 3, epoch))
            with self.autocast():
                images = eval_model.sample(SAMPLES_PER_GRID).float().clamp(0, 1).cpu()
        eval_model.train(was_training)
        path = self.out_dir / "samples" / f"epoch_{epoch + 1:04d}.png"
        fault_point(f"write {path.name}")
        save_grid(path, images)

    # ------------------------------------------------------------------ checkpoints

    def payload(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "state": self.state.to_dict(),
            "rng": rng_state(),
            "spec": self.resolved.document,
            "spec_hash": self.resolved.hash,
            "world_size": self.ddp.world_size,
            "data_root": _absolute_root(self.resolved.spec.data.root),
            "torch_version": str(torch.__version__),
        }

    def checkpoint(self, best: bool = False) -> None:
        """Write last.pt (the previous one kept as last.prev.pt) or best.pt, on rank 0. Weights
        that are not finite are never written: the run stops and last.pt keeps the last good
        state."""
        if not self.ddp.main:
            return
        payload = self.payload()
        bad = non_finite_tensors(payload["model"], payload["ema"])
        if bad:
            raise TrainingError(
                f"the weights became non-finite by step {self.state.step} ({len(bad)} tensors, e.g. "
                f"{bad[0]}): training diverged and nothing was written. {self._saved_text()} Try a "
                f"lower train.optimizer.lr, set train.grad_clip, or a longer warm-up.")
        if best:
            save_checkpoint(self.best_path, payload, keep_previous=False)
        else:
            save_checkpoint(self.last_path, payload)
            self.saved_step = self.state.step


def _absolute_root(root) -> str | None:
    """data.root as an absolute path (a relative one is relative to where training ran), so
    that `avi eval RUN` from another folder finds the data."""
    return None if root is None else os.path.abspath(os.path.expanduser(str(root)))
