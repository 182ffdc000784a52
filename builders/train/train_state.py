"""What a training checkpoint holds and how a run is put back from one: the loop position
(State), the EMA weights, and the checks that a checkpoint is whole before resuming from it
or writing it (a state with non-finite weights is never written)."""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .run_dir import TrainingError

_INT_FIELDS = ("step", "epoch", "batch", "skipped", "consecutive_skipped")


@dataclass
class State:
    step: int = 0                  # batches processed (optimizer steps, skipped ones included)
    epoch: int = 0                 # current epoch (0-based)
    batch: int = 0                 # next batch index within the epoch
    skipped: int = 0               # non-finite updates skipped in total
    consecutive_skipped: int = 0
    best_test_nelbo: float = math.inf
    counters: dict = field(default_factory=dict)   # running sums kept across resumes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counters"] = dict(self.counters)
        return d


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


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, step, rank ...), stable across runs."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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


def non_finite_tensors(*state_dicts: dict | None) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [name for sd in state_dicts if sd for name, t in sd.items()
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]


def restore(payload: dict, path: Path, model: torch.nn.Module, optimizer, ema: EMA | None) -> State:
    """Put model, optimizer and EMA back from a checkpoint and return its loop position.
    A checkpoint that is not whole (a missing part, a wrong type, weights of another shape)
    is a TrainingError that names the file and the part; the file is left as it is."""
    def bad(what: str) -> TrainingError:
        return TrainingError(f"cannot resume from {path}: {what}. The file was not written by "
                             f"`avi train` of this spec or was changed since; it is left as it is. "
                             f"Resume from a checkpoint avi wrote, or train into a new --out.")
    for key in ("model", "optimizer", "state"):
        if not isinstance(payload.get(key), dict):
            raise bad(f"its '{key}' entry is missing or not a mapping")
    s = payload["state"]
    for key in _INT_FIELDS:
        if isinstance(s.get(key), bool) or not isinstance(s.get(key), int) or s[key] < 0:
            raise bad(f"state.{key} is {s.get(key)!r}, not a count")
    if not isinstance(s.get("best_test_nelbo"), (int, float)):
        raise bad(f"state.best_test_nelbo is {s.get('best_test_nelbo')!r}, not a number")
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if ema is not None and payload.get("ema") is not None:
            ema.model.load_state_dict(payload["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()
        raise bad(f"its weights or optimizer state do not fit the model of the spec "
                  f"({' '.join(first[:3])[:300]})") from None
    return State(**{k: s[k] for k in _INT_FIELDS}, best_test_nelbo=float(s["best_test_nelbo"]),
                 counters=dict(s.get("counters") or {}))
