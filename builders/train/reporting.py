"""What a training run reports: metrics.jsonl, TensorBoard, and what the user sees (a rich
bar on a terminal; otherwise lines on stderr; or every record as JSON on stdout).

What the user sees on stderr, on a terminal and off one alike: one line per finished epoch,
kept (train loss, test NELBO, the epoch's time and the time left for the whole run). Between
them, on a terminal, a bar of the current epoch with the run's time left; off a terminal, a
line at the first step and then at least every LINE_SECONDS, with the step out of the run's
total and the time left. The time left is the run's remaining steps at the pace of this
session so far (test evaluations included), so it settles after the first epoch.

Records are strict JSON (a non-finite number is written as null), one per line. Epochs are
counted from 1 in every message ("epoch 2/3"); the "epoch" field of a record is the 0-based
index of the epoch it belongs to.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from avi_spec.errors import literal

from ..faults import fault_point
from ..files import open_for_append

LINE_SECONDS = 30.0          # without a terminal: a progress line at least this often


def strict(record):
    """NaN and inf -> None (at any depth), so the line is JSON every parser reads."""
    if isinstance(record, dict):
        return {k: strict(v) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [strict(v) for v in record]
    return None if isinstance(record, float) and not math.isfinite(record) else record


def warn(text: str) -> None:
    sys.stderr.write(f"warning: {literal(text, keep_newlines=True)}\n")
    sys.stderr.flush()


class Reporter:
    def __init__(self, out_dir: Path, mode: str, active: bool, steps_per_epoch: int, epochs: int,
                 start_step: int):
        self.active, self.mode = active, mode
        self.metrics_path = out_dir / "metrics.jsonl"
        self.metrics = open_for_append(self.metrics_path) if active else None
        self.tb = _tensorboard(out_dir, start_step) if active else None
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.display = mode if active else "quiet"
        self.progress = self.task = None
        self.epochs, self.spe = epochs, steps_per_epoch
        self.last_line = -math.inf
        self.start_step, self.t0 = start_step, time.monotonic()
        self.total_steps = epochs * steps_per_epoch        # Trainer.run narrows it (--max-steps)
        if self.display == "bar":
            self.progress = _progress_bar(epochs)
            self.progress.start()

    def start_epoch(self, epoch: int, total: int, done: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("train", total=total, completed=done,
                                               epoch=epoch + 1, info="", left="")

    def time_left(self, step: int) -> float | None:
        """Seconds until the run's last step at this session's pace (None before a step)."""
        done = step - self.start_step
        if done <= 0:
            return None
        return max(0, self.total_steps - step) * (time.monotonic() - self.t0) / done

    def _left(self, step: int) -> str:
        left = self.time_left(step)
        return f"run {format_duration(left)} left" if left is not None else ""

    def step(self, info: str, epoch: int, step: int) -> None:
        """After every step: the bar advances; without a terminal, a line at the first step
        and then at least every LINE_SECONDS (epoch lines can be hours apart)."""
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, info=info, left=self._left(step))
        elif self.display == "lines":
            now = time.monotonic()
            if now - self.last_line >= LINE_SECONDS:
                self.last_line = now
                self.message(f"epoch {epoch + 1}/{self.epochs}  step {step}/{self.total_steps}  {info}"
                             + (f"  {self._left(step)}" if step > self.start_step else ""))

    def epoch_done(self, text: str, step: int, seconds: float) -> None:
        """The line of a finished epoch, kept on screen above the bar: `text`, the epoch's
        time and the time left for the run."""
        left = self._left(step) if step < self.total_steps else "run done"
        self.message(f"{text}  {format_duration(seconds)}" + (f"  {left}" if left else ""))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        line = json.dumps(strict(record), allow_nan=False)
        try:
            fault_point(f"append {self.metrics_path.name}")
            self.metrics.write(line + "\n")
            self.metrics.flush()
        except OSError as e:
            e.filename = e.filename or str(self.metrics_path)
            raise
        if self.display == "jsonl":
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{'test' if k.startswith('test') else 'train'}/{k}", v, record["step"])

    def message(self, text: str) -> None:
        """A line on stderr (above the bar if one is shown); nothing in quiet/jsonl modes.
        Control characters of the paths in it are written as escapes."""
        if not self.active or self.display in ("quiet", "jsonl"):
            return
        text = literal(text, keep_newlines=True)
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.metrics is not None:
            try:
                self.metrics.close()
            except OSError:
                pass           # a failed write is reported already; nothing more to save
        if self.tb is not None:
            self.tb.close()


def format_duration(seconds: float) -> str:
    """h:mm:ss (or m:ss under an hour): what the time left and an epoch's time read as."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _tensorboard(out_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package
        return SummaryWriter(str(out_dir / "tb"), purge_step=start_step or None)
    except Exception:
        return None


def _progress_bar(epochs: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    # transient: the bar of an epoch goes when the epoch's own line replaces it
    return Progress(TextColumn("epoch {task.fields[epoch]}/" + str(epochs)), BarColumn(),
                    MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    TextColumn("{task.fields[left]}"),
                    console=Console(stderr=True, emoji=False), transient=True)
