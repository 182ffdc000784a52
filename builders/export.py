"""A trained model as one safetensors file: its weights (the EMA weights when the run kept
them) and, in the file's metadata, the resolved spec that builds the model they fit.

safetensors, not a pickle: loading it runs no code, and other tools (the Hugging Face hub,
other frameworks) read it without avi. `avi export` writes it; load_exported (and through
it `avi eval/sample/plot` and builders.api.load_run) reads it back.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .evaluation.evaluate import RunError, load_trained, refuse_non_finite
from .files import write_atomically

SUFFIX = ".safetensors"
SPEC_KEY = "avi.spec"                  # metadata: the resolved spec document as JSON


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


def load_exported(path: str | Path, device: str | torch.device = "cpu", overrides=()):
    """A model exported by export_run -> (model in eval mode, ResolvedSpec, None), like
    builders.evaluation.evaluate.load_trained, with ``overrides`` (--set) applied to its spec.
    Raises RunError when the file is not an avi export."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from avi_spec import SpecError, load_document

    from .network.build import build_model
    from .network.size import ModelSizeError, check_fits, check_weights_fit
    from .devices import place, resolve_device

    dev = resolve_device(device)
    path = Path(path).expanduser()
    if not path.is_file():
        raise RunError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:       # the header only: no weights yet
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{path} is not a readable safetensors file: {e}") from None
    if SPEC_KEY not in metadata:
        raise RunError(f"{path} holds no avi spec in its metadata (was it written by `avi export`?)")
    try:
        resolved = load_document(json.loads(metadata[SPEC_KEY]), list(overrides), source=str(path))
        info = {k: json.loads(metadata.get(f"avi.{k}", default))
                for k, default in (("ema", "false"), ("step", "null"), ("epoch", "null"))}
    except (SpecError, ValueError, RecursionError) as e:    # RecursionError: nested too deep
        raise RunError(f"the avi metadata (spec, ema, step, epoch) in {path} is not valid: {e}") from None
    try:        # shapes compared, and memory checked, on the meta device before allocating
        check_weights_fit(resolved.spec, shapes, str(path))
    except ModelSizeError as e:
        raise RunError(f"{e}; was it written by `avi export`?") from None
    try:
        check_fits(resolved.spec, "cpu", "load")
    except ModelSizeError as e:
        raise RunError(f"{path}: {e}") from None
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{path} is not a readable safetensors file: {e}") from None
    refuse_non_finite(weights, path, "export it again from a checkpoint of the run before it diverged")
    model = build_model(resolved.spec, device="cpu")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise RunError(f"{path}: the weights do not fit the model of its spec: {e}") from None
    place(model, dev).eval()
    model.avi_checkpoint = {"path": str(path), **info}
    return model, resolved, None
