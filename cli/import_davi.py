"""`avi import-davi`: a run of the authors' TensorFlow code -> an avi run directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOption, UserError, _escape, out


def import_davi(
    source: Annotated[Path, typer.Argument(metavar="RUN_DIR_OR_H5", help=(
        "Their run directory (train.sh or eval_command.sh, final_model.h5), a .h5 (or "
        "*_by_path.npz) weights file, or with --flags-only a file holding their command."))],
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Run directory to create (its name names the spec).")],
    flags: Annotated[Optional[Path], typer.Option("--flags", metavar="FILE", help="Their run.py command (default: train.sh / eval_command.sh beside the weights).")] = None,
    flags_only: Annotated[bool, typer.Option("--flags-only", help="Write only DIR/spec.yaml from the flags; no weights.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Import a model trained with the authors' TensorFlow code as an avi run directory.

    Maps every flag of their run.py (ifiaposto/Deep_Attentive_VI) to a spec field, converts
    their Keras weights, and writes DIR/spec.yaml and DIR/checkpoints/last.pt, so that
    `avi eval / sample / reconstruct / plot DIR` work.
    A flag avi cannot express, or a tensor missing or of the wrong shape, is an error (exit 2)
    and nothing is written. Reading .h5 files needs h5py (pip install -e '.\\[import]').

    Example:

        avi import-davi ../omniglot/0_15layer_400_epochs --out runs/omniglot_davi
    """
    from builders.davi.flags import FlagError
    from builders.davi.weights import ConversionError

    targets = [out_dir / "spec.yaml"] + ([] if flags_only else [out_dir / "checkpoints" / "last.pt"])
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise UserError(f"{existing[0]} exists; choose another --out (nothing was overwritten)")
    try:
        result = _import(source, out_dir, flags, flags_only)
    except (FlagError, ConversionError) as e:
        raise UserError(str(e)) from None
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print_table(result)


def _import(source: Path, out_dir: Path, flags_file: Path | None, flags_only: bool) -> dict:
    from avi_spec.loader import dump_yaml, load_document
    from builders.davi.importer import build_imported, spec_mapping
    from builders.davi.source import find_flags, find_weights, read_flags

    flags_path = find_flags(source, flags_file)
    flags = read_flags(flags_path)
    name = out_dir.name
    if flags_only:
        mapping = spec_mapping(flags, name)
        resolved = load_document(mapping.document, source=str(flags_path))
        written = [_write(out_dir / "spec.yaml", dump_yaml(resolved.document))]
        return _result(mapping, flags_path, None, written, resolved)
    weights = find_weights(source)
    tensors = _read_weights(weights, flags, name)
    model, resolved, mapping = build_imported(flags, name, tensors)
    written = _save(out_dir, resolved, model, {"flags": str(flags_path), "weights": str(weights)})
    return _result(mapping, flags_path, weights, written, resolved)


def _read_weights(weights: Path, flags: dict, name: str) -> dict:
    from avi_spec.loader import load_document
    from builders.network.build import build_model
    from builders.davi.h5 import read_h5
    from builders.davi.importer import spec_mapping
    from builders.davi.source import read_npz
    # Every tensor's declared shape is checked against the model of the flags before it is
    # read (temperatures fixed: the scales are optional entries of the file either way); an
    # .h5 is read by position against it. A meta-device model allocates nothing.
    shape_model = build_model(load_document(spec_mapping(flags, name).document).spec, "meta")
    return (read_npz if weights.suffix == ".npz" else read_h5)(weights, shape_model)


def _save(out_dir: Path, resolved, model, origin: dict) -> list[str]:
    from avi_spec.loader import dump_yaml
    from builders.checkpoint import save_checkpoint
    ckpt = out_dir / "checkpoints" / "last.pt"
    save_checkpoint(ckpt, {"spec": resolved.document, "spec_hash": resolved.hash,
                           "model": model.state_dict(), "imported_from": origin,
                           "state": {"step": 0, "epoch": 0}}, keep_previous=False)
    return [_write(out_dir / "spec.yaml", dump_yaml(resolved.document)), str(ckpt)]


def _write(path: Path, text: str) -> str:
    from builders.train.run_dir import write_text_atomic
    write_text_atomic(path, text)          # as `avi train` writes spec.yaml: UTF-8, never partial
    return str(path)


def _result(mapping, flags_path: Path, weights: Path | None, written: list[str], resolved) -> dict:
    return {"name": resolved.spec.name, "flags": str(flags_path),
            "weights": str(weights) if weights else None, "written": written,
            "mapped": [{"flag": f, "value": v, "to": t} for f, v, t in mapping.rows]}


MAX_TABLE_ROWS = 500      # a real run maps about 60 flags and hparams


def _print_table(result: dict) -> None:
    from rich.table import Table
    # Every cell is the user's text (their flags, values, paths): escaped, never markup.
    t = Table(title=_escape(f"{result['name']}: their flags ({result['flags']}) -> avi spec"),
              title_justify="left")
    for col in ("flag", "value", "spec field / note"):
        t.add_column(col, overflow="fold")
    rows = result["mapped"]
    for row in rows[:MAX_TABLE_ROWS]:
        t.add_row(_escape(row["flag"]), _escape(row["value"]), _escape(row["to"]))
    if len(rows) > MAX_TABLE_ROWS:        # rendering 80,000 rows takes rich half a minute
        t.add_row("...", "", f"{len(rows) - MAX_TABLE_ROWS:,} more rows: --json lists every one")
    out.print(t)
    if result["weights"]:
        out.print(f"weights: {result['weights']} converted", markup=False)
    for w in result["written"]:
        out.print(f"wrote {w}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("import-davi")(import_davi)
