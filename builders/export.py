"""A trained model as one safetensors file: its weights (the EMA weights when the run kept
them) and, in the file's metadata, the resolved spec that builds the model they fit.

safetensors, not a pickle: loading it runs no code, and other tools (the Hugging Face hub,
other frameworks) read it without avi. `avi export` writes it; builders.loading.load_exported
(and through it `avi eval/sample/plot` and builders.api.load_run) reads it back.
"""
from __future__ import annotations

import json
from pathlib import Path

from .files import write_atomically
from .loading import SPEC_KEY, SUFFIX, load_trained   # the format's names live with its reader


def avi_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("avi")
    except PackageNotFoundError:       # run from a source tree that was never installed
        return "unknown"


def export_run(path: str | Path, out: str | Path | None = None,
               use_ema: bool = True) -> tuple[Path, dict]:
    """Write the weights of a run directory or .pt checkpoint as safetensors with the resolved
    spec in its metadata -> (the file, its metadata). `out` defaults to RUN/<name>.safetensors
    (./<name>.safetensors for a checkpoint outside a run). Raises RunError on bad input."""
    from safetensors.torch import save

    model, resolved, run_dir = load_trained(path, "cpu", use_ema)
    info = model.avi_checkpoint
    # clone: safetensors refuses tensors that share storage, and the state dict may hold views
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "pt",
        SPEC_KEY: json.dumps(resolved.document, ensure_ascii=False),
        "avi.spec_hash": resolved.hash,
        "avi.version": avi_version(),
        "avi.source": info["path"],
        "avi.ema": json.dumps(info["ema"]),
        "avi.step": json.dumps(info.get("step")),
        "avi.epoch": json.dumps(info.get("epoch")),
    }
    if out is None:
        out = (run_dir or Path(".")) / (resolved.spec.name + SUFFIX)
    out = Path(out).expanduser()
    # Serialised first and written by Python: a full disk or an unwritable folder is an OSError
    # (safetensors' own writer raises its SafetensorError), and the file gets the user's umask
    # permissions (safetensors writes 0600; an export is made to be shared).
    write_atomically(out, save(weights, metadata=metadata))
    return out, metadata
