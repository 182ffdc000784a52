"""Writing a file so that a reader, or a run resumed after a kill, never sees half of it."""
from __future__ import annotations

import os
from pathlib import Path

from .faults import fault_point


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """The temporary file a write of ``path`` goes through: .<name>.<kind>.<pid>, hidden and
    unique per process (checkpoint.remove_stale_temporaries finds those of killed writers)."""
    return path.with_name(f".{path.name}.{kind}.{os.getpid()}")


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write encoded bytes to ``path`` through a temporary renamed into place, removed when the
    write fails. Callers encode first, so a full disk or a read-only folder is a plain OSError
    (matplotlib's PDF writer and safetensors' writer turn it into their own exceptions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        fault_point(f"write {tmp.name}")
        tmp.write_bytes(data)
        fault_point(f"rename {tmp.name} -> {path.name}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
