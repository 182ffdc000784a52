"""Loading a trained model, from whatever file `avi` wrote it to: a run directory of `avi
train` (its best.pt, last.pt or last.prev.pt), a .pt checkpoint, or a .safetensors file of
`avi export`.

Every reader of a trained model (`avi eval/sample/plot/export`, builders.api.load_run, the
tools) comes through load_trained, so the checks a model file must pass before it is used are
made in one place, the same for every format: the file is found (a run directory's fallbacks
warned of), its spec is valid with the user's --set applied, its weights' shapes fit that spec
and the model fits in memory (both checked on the meta device before allocating), its weights
are finite (refuse_non_finite), and only then is the model built, given its weights (the EMA
ones by choice) and placed on the device. Kept apart from builders.evaluation.evaluate (which
estimates likelihoods of a model in hand) and builders.export (which writes an export), so that
neither needs the other. Bad input raises RunError, which the CLI turns into exit code 2.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch

CHECKPOINT_NAMES = ("best.pt", "last.pt")   # run directory: best.pt preferred, else last.pt
SUFFIX = ".safetensors"                # a file of `avi export`
SPEC_KEY = "avi.spec"                  # export metadata: the resolved spec document as JSON


class RunError(Exception):
    """A run directory or checkpoint is missing, unreadable or not an avi checkpoint."""


# ------------------------------------------------------------------ a run directory or .pt checkpoint

def find_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint file, run directory or None). A run directory resolves to
    checkpoints/best.pt when present (the best test ELBO seen in training), else
    checkpoints/last.pt; a file is taken as the checkpoint itself."""
    candidates, run = _checkpoint_candidates(path)
    return candidates[0], run


def _checkpoint_candidates(path: str | Path) -> tuple[list[Path], Path | None]:
    """The checkpoints to try in turn (best.pt, last.pt, last.prev.pt of a run) and the run."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = [c for name in CHECKPOINT_NAMES + ("last.prev.pt",)
                 for c in (p / "checkpoints" / name, p / name) if c.is_file()]
        if found:
            return found, p
        raise RunError(f"{p} holds no checkpoint: expected {p / 'checkpoints' / 'best.pt'} or "
                       f"{p / 'checkpoints' / 'last.pt'} (is it a run directory of `avi train`?)")
    if p.is_file() and p.suffix.lower() in (".yaml", ".yml"):      # not "is corrupt (torch.load ...)"
        raise RunError(f"{p} is a spec, not a trained run: train it first (avi train {p}), then "
                       f"give its run directory (runs/<name>, or the --out of avi train)")
    if p.is_file():
        run = p.parent.parent if p.parent.name == "checkpoints" else None
        return [p], run if run is not None and (run / "spec.yaml").is_file() else None
    raise RunError(f"no such run directory or checkpoint: {p}")


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint's payload (builders.checkpoint: weights_only=True, on the CPU)."""
    from .checkpoint import CheckpointError, load_checkpoint
    try:
        return load_checkpoint(path)          # refuses anything but an avi checkpoint
    except CheckpointError as e:
        raise RunError(str(e)) from None


def _read_first_good(candidates: list[Path], warn: Callable[[str], None] | None) -> tuple[Path, dict]:
    """The first readable checkpoint; an unreadable best.pt falls back to last.pt (warned)."""
    for i, ckpt in enumerate(candidates):
        try:
            return ckpt, _read_checkpoint(ckpt)
        except RunError as e:
            if i + 1 == len(candidates):
                raise
            if warn is not None:
                warn(f"{e}; using {candidates[i + 1]} instead")
    raise AssertionError("no candidates")          # _checkpoint_candidates never returns none


def _data_root_overrides(ck: dict, doc: dict, overrides: list[str]) -> list[str]:
    """A relative data.root is relative to where training ran; from elsewhere, use the
    absolute path the checkpoint recorded (unless the user set data.root)."""
    root = (doc.get("data") or {}).get("root") if isinstance(doc, dict) else None
    saved = ck.get("data_root")
    if (not isinstance(root, str) or Path(root).expanduser().is_absolute() or Path(root).exists()
            or not isinstance(saved, str) or any(o.split("=")[0].strip() == "data.root" for o in overrides)):
        return []
    return [f"data.root={json.dumps(saved)}"]


def refuse_non_finite(weights: dict, path: Path, hint: str) -> None:
    """RunError when a model file's weights hold NaN or inf: every model file avi loads (a
    checkpoint, an export) is checked here, so nothing is evaluated or sampled from them."""
    bad = [n for n, t in weights.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise RunError(f"{path} holds non-finite weights (NaN or inf in {len(bad)} tensors, e.g. "
                       f"{bad[0]}): the run diverged or the file was altered; {hint}")


def load_trained(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
                 overrides: Iterable[str] = (), warn: Callable[[str], None] | None = None):
    """Load a trained model for evaluation -> (model in eval mode, ResolvedSpec, run dir|None).

    ``path`` is a run directory (checkpoints/best.pt if present and readable, else
    checkpoints/last.pt, else last.prev.pt; ``warn`` hears of a fallback), a .pt checkpoint
    of `avi train` (builders.train.training's payload: "spec", "model", "ema", "state"), or a
    .safetensors file of `avi export`. The spec is the resolved document saved in the
    checkpoint (else the run directory's spec.yaml), with ``overrides`` (--set) applied. With
    ``use_ema`` and EMA weights in the checkpoint, those replace the trained weights (an export
    holds the one set of weights chosen by `avi export`, so use_ema does not apply). Raises
    RunError on bad input (non-finite weights included) and builders.devices.DeviceError for
    an unavailable device.
    """
    from avi_spec import SpecError, load_document, load_spec

    from .network.build import build_model
    from .network.size import ModelSizeError, check_fits, check_weights_fit
    from .devices import place, resolve_device

    if Path(path).suffix == SUFFIX:                   # a file of `avi export`: one set of weights
        return load_exported(path, device, overrides)
    dev = resolve_device(device)
    candidates, run = _checkpoint_candidates(path)
    ckpt, ck = _read_first_good(candidates, warn)
    doc = ck.get("spec")
    overrides = list(overrides)
    try:
        if isinstance(doc, dict):
            resolved = load_document(doc, overrides + _data_root_overrides(ck, doc, overrides),
                                     source=str(ckpt))
        elif run is not None and (run / "spec.yaml").is_file():
            resolved = load_spec(run / "spec.yaml", overrides)
        else:
            raise RunError(f"{ckpt} holds no spec (and there is no spec.yaml beside it)")
    except SpecError as e:
        raise RunError(f"the spec saved with {ckpt} is not valid: "
                       + "; ".join(f"{p.path or '(document)'}: {p.message}" for p in e.problems)) from None
    state = ck.get("model")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise RunError(f"{ckpt} holds no model weights (keys: {', '.join(map(str, ck))})")
    try:        # shapes compared, and memory checked, on the meta device before allocating
        check_weights_fit(resolved.spec, {k: tuple(t.shape) for k, t in state.items()}, str(ckpt))
        check_fits(resolved.spec, "cpu", "load")
    except ModelSizeError as e:
        raise RunError(str(e)) from None
    model = build_model(resolved.spec, device="cpu")
    try:
        model.load_state_dict(state)
        ema = ck.get("ema") if use_ema else None
        if ema is not None:
            unknown = set(ema) - set(model.state_dict())
            if unknown:
                raise RunError(f"{ckpt}: EMA weights do not fit the model ({sorted(unknown)[:3]}...)")
            model.load_state_dict(ema, strict=False)
    except RuntimeError as e:
        raise RunError(f"{ckpt}: the weights do not fit the model of its spec: {e}") from None
    refuse_non_finite(model.state_dict(), ckpt, f"use an earlier checkpoint (e.g. "
                                               f"{ckpt.parent / 'last.prev.pt'})")
    place(model, dev).eval()
    state_info = ck.get("state") if isinstance(ck.get("state"), dict) else {}
    model.avi_checkpoint = {"path": str(ckpt), "ema": bool(use_ema and ema is not None),
                            "step": state_info.get("step"), "epoch": state_info.get("epoch")}
    return model, resolved, run


# ------------------------------------------------------------------ a .safetensors export

def load_exported(path: str | Path, device: str | torch.device = "cpu", overrides=()):
    """A model exported by builders.export.export_run -> (model in eval mode, ResolvedSpec, None), like
    load_trained, with ``overrides`` (--set) applied to its spec.
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
