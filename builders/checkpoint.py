"""Checkpoints: atomic writes, safe loads, RNG state as plain tensors.

A checkpoint is a plain dict readable with ``torch.load(..., weights_only=True)``: tensors,
numbers, strings, lists, dicts and None only (no pickled classes), so loading one never runs
code from the file. ``save_checkpoint`` writes a temporary file next to the target, fsyncs it
and renames it over the target, so a crash (even SIGKILL) never leaves a half-written file;
before replacing ``last.pt`` the previous one is kept as ``last.prev.pt``.
"""
from __future__ import annotations

import io
import os
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .faults import fault_point
from .files import TEMPORARY, create_temporary, remove_dead_temporaries, temporary_name

FORMAT = "avi-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read (missing, truncated, corrupt, or not an avi checkpoint)."""


def previous_path(path: str | Path) -> Path:
    """Where the previous good copy of ``path`` is kept: last.pt -> last.prev.pt."""
    p = Path(path)
    return p.with_name(p.stem + ".prev" + p.suffix)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return                                  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


LEGACY_TEMPORARY = re.compile(r"^epoch_\d+\.png\.tmp$")     # samples/ of avi before builders.files


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files killed writers left in ``folder``: avi's own names only
    (builders.files.TEMPORARY, and the sample grids' temporaries of older avi), never a
    user's `notes.tmp`, never through a folder that is a symbolic link. Call it while holding
    the run directory's lock (a live writer's file is kept anyway: it holds a lock on it)."""
    return remove_dead_temporaries(
        folder, lambda name: bool(TEMPORARY.match(name) or LEGACY_TEMPORARY.match(name)))


def save_checkpoint(path: str | Path, payload: dict, keep_previous: bool = True) -> Path:
    """Write ``payload`` to ``path`` atomically. With ``keep_previous`` an existing file at
    ``path`` is first preserved as ``<stem>.prev<suffix>`` (``path`` itself never disappears)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    tmp, fd = temporary_name(path), None
    try:
        fault_point(f"write {tmp.name}")
        buffer = io.BytesIO()          # serialised first: a failed write is a plain OSError
        torch.save(payload, buffer)    # (ENOSPC, EROFS ...), not torch's RuntimeError
        tmp, fd = create_temporary(path)       # never through a link planted under its name
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists() and _looks_complete(path):
            _keep_previous(path)
        fault_point(f"rename {tmp.name} -> {path.name}")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        e.filename = e.filename or str(path)       # name the file the message is about
        raise
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.lexists(tmp):
            tmp.unlink()
    return path


def _keep_previous(path: Path) -> None:
    """last.pt -> last.prev.pt without a moment where either name is missing or partial."""
    prev, prev_tmp = previous_path(path), temporary_name(path, "prev.tmp")
    if prev.exists() and os.path.samefile(prev, path):
        return        # a killed writer linked it already (rename() would leave prev_tmp behind)
    if os.path.lexists(prev_tmp):          # a link under its name is removed, not followed
        prev_tmp.unlink()
    fault_point(f"link {path.name} -> {prev_tmp.name}")
    try:
        os.link(path, prev_tmp)          # a second name for the current file: no copy
    except OSError:
        shutil.copy2(path, prev_tmp)
    fault_point(f"rename {prev_tmp.name} -> {prev.name}")
    os.replace(prev_tmp, prev)


def _looks_complete(path: Path) -> bool:
    """A cheap check (the zip end record, no full read) that a torch.save file is not truncated:
    a corrupt last.pt must never be rotated over the previous good one."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint (on the CPU) with ``weights_only=True``; CheckpointError if it cannot."""
    path = Path(path)
    if not os.path.isfile(path):          # os.path: pathlib raises on a name too long
        what = ("is not a regular file (a FIFO, device or folder)" if os.path.exists(path) else
                "is a dangling symbolic link" if os.path.islink(path) else "does not exist")
        raise CheckpointError(f"{_display(path)} {what}")
    why = _not_torch_save(path)
    if why:
        raise CheckpointError(f"{_display(path)} is not an avi checkpoint: {why}")
    too_large = _too_large(path)
    if too_large:
        raise CheckpointError(too_large)
    try:
        with warnings.catch_warnings():          # torch's own notes (pickle protocol ...): ours say it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                       # truncated zip, bad pickle, unsafe content ...
        raise CheckpointError(_load_failure(path, e)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{_display(path)} is not an avi checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{_display(path)} was written by a newer avi (format "
                              f"{payload['format_version']}); upgrade avi")
    return payload


def _not_torch_save(path: Path) -> str | None:
    """Why the file cannot be one torch.save wrote (a zip archive), from its first bytes, when
    they show it is a raw pickle; None otherwise (a damaged zip is for torch.load to report)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return None
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:      # pickle's PROTO opcode
        return RAW_PICKLE
    return None


def _too_large(path: Path) -> str | None:
    """Why the file cannot be loaded into this machine's free memory, when it cannot: torch.load
    holds every tensor in memory at once, so what the file's entries unpack to (the zip's
    central directory declares it: a small deflated archive may unpack to terabytes) or its
    size, whichever is larger, must fit. None when it fits or free memory cannot be told."""
    from .network.size import available_memory, human
    free = available_memory(torch.device("cpu"))
    if free is None:
        return None
    try:
        need = os.path.getsize(path)
        if need <= free:                              # else its directory is not even parsed
            with zipfile.ZipFile(path) as z:          # reads the directory only, not the data
                need = max(need, sum(i.file_size for i in z.infolist()))
    except Exception:                                 # noqa: BLE001 damage: torch.load names it
        return None
    if need <= free:
        return None
    return (f"{_display(path)} was not loaded: its tensors take {human(need)} and this machine has "
            f"{human(free)} of memory free (an avi checkpoint holds one model, its optimizer "
            f"state and its EMA copy); load it on a machine with more memory")


RAW_PICKLE = ("it is a raw Python pickle (or a torch.save file from before PyTorch 1.6), not the "
              "zip archive torch.save writes. It was not loaded: unpickling can run any code the "
              "file holds, and avi loads checkpoints as tensors and plain values only")


def _load_failure(path: Path, e: Exception) -> str:
    """Why torch.load refused a file: code it would have run, or damage."""
    text = str(e)
    if "GLOBAL" in text or "Unsupported global" in text:      # the unpickler met a class/function
        what = [ln.strip() for ln in text.splitlines()
                if "GLOBAL" in ln or "Unsupported global" in ln or "WeightsUnpickler error" in ln]
        detail = f" ({what[0][:160]})" if what else ""
        return (f"refused to load {_display(path)}: it holds Python objects whose loading could run "
                f"code{detail}. avi checkpoints hold tensors and plain values only; do not load this "
                f"file unless you know where it came from")
    # Not a zip, yet torch's legacy reader read a whole pickle, of something other than the
    # magic number a legacy torch.save file starts with: a pickle of protocol 0 or 1 (no PROTO
    # opcode to tell it by). Junk that merely starts like a pickle stays "corrupt".
    if "magic number" in text and not _looks_complete(path):
        return f"{_display(path)} is not an avi checkpoint: {RAW_PICKLE}"
    # torch's message advises loading with weights_only=False (unsafely): never repeat that.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln
             and "file an issue" not in ln and "Check the documentation" not in ln]
    return f"{_display(path)} is corrupt ({(lines or [type(e).__name__])[0][:200]})"


def load_with_fallback(path: str | Path, warn: Callable[[str], None] | None = None) -> tuple[dict, Path]:
    """Load ``path``; if it is corrupt, load its previous good copy (``last.prev.pt``) and
    report it through ``warn``. Returns (payload, the file actually read)."""
    path = Path(path)
    try:
        return load_checkpoint(path), path
    except CheckpointError as first:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        try:
            payload = load_checkpoint(prev)
        except CheckpointError as second:
            raise CheckpointError(f"{first}; the previous checkpoint is unreadable too: {second}") from None
        if warn is not None:
            step = (payload.get("state") or {}).get("step", payload.get("step"))
            warn(f"{first}; the previous good checkpoint is kept at {_display(prev)}: "
                 f"resuming from it (step {step})")
        return payload, prev


# ------------------------------------------------------------------------- RNG state

def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random number generator's state as plain tensors and numbers."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what ``rng_state`` captured (CUDA states only where devices are present)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) <= torch.cuda.device_count():
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s.cpu(), i)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k].cpu())
