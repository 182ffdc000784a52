"""`avi import-davi`: a run of the authors' TensorFlow code -> an avi run directory."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOption, UserError, _escape, err, out


def import_davi(
    source: Annotated[Path, typer.Argument(metavar="RUN_DIR_OR_H5", help=(
        "Their run directory (train.sh or eval_command.sh, final_model.h5), a .h5 (or "
        "*_by_path.npz) weights file, or with --flags-only a file holding their command."))],
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Run directory to create (its name names the spec).")],
    flags: Annotated[Optional[Path], typer.Option("--flags", metavar="FILE", help="Their run.py command (default: train.sh / eval_command.sh beside the weights).")] = None,
    flags_only: Annotated[bool, typer.Option("--flags-only", help="Write only DIR/spec.yaml from the flags (after building its model on the meta device, as avi build does); no weights.")] = False,
    data_root: Annotated[Optional[str], typer.Option("--data-root", metavar="DIR", help="Set data.root: where the dataset is on this machine (their runs on tfds data name none; it wins over their --dataset_path).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Import a model trained with the authors' TensorFlow code as an avi run directory.

    Maps every flag of their run.py (ifiaposto/Deep_Attentive_VI) to a spec field, converts
    their Keras weights, and writes DIR/spec.yaml and DIR/checkpoints/last.pt, so that
    `avi eval / sample / reconstruct / plot DIR` work.
    DIR must be new (or an empty folder); it is written whole, through a temporary folder
    renamed into place. A flag avi cannot express, a tensor missing or of the wrong shape, a
    weights file that reaches outside itself, or a full disk is an error (exit 2) and nothing
    is written. Reading .h5 files needs h5py (pip install -e '.\\[import]').

    Example:

        avi import-davi ../omniglot/0_15layer_400_epochs --out runs/omniglot_davi

        avi import-davi ../cifar10/train.sh --flags-only --data-root data/cifar10 --out runs/c10
    """
    from builders.davi.flags import FlagError
    from builders.davi.weights import ConversionError
    from builders.network.size import ModelSizeError

    _check_out(out_dir)
    try:
        result = _import(source, out_dir, flags, flags_only, data_root)
    except (FlagError, ConversionError) as e:
        raise UserError(_clip(str(e))) from None
    except ModelSizeError as e:
        raise UserError(f"{_clip(str(e))}; nothing was written") from None
    except OSError as e:              # a read the readers above do not name (a folder we may not list)
        raise UserError(f"cannot read {e.filename or source}: {e.strerror or e}; nothing was written") from None
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print_table(result)


def _import(source: Path, out_dir: Path, flags_file: Path | None, flags_only: bool,
            data_root: str | None) -> dict:
    from avi_spec.loader import dump_yaml
    from builders.davi.importer import build_imported, checked_spec, spec_mapping
    from builders.davi.source import find_flags, find_weights, read_flags
    from builders.network.build import build_model

    flags_path = find_flags(source, flags_file)
    flags = read_flags(flags_path)
    name = out_dir.name
    if data_root is not None and not Path(data_root).exists():
        err.print(f"warning: --data-root {_escape(data_root)} does not exist here; data.root is set "
                  f"to it all the same (avi train/eval read it)")
    # Everything is read, mapped and checked first; then DIR is written whole or not at all.
    if flags_only:
        mapping = spec_mapping(flags, name, data_root=data_root)
        resolved = checked_spec(mapping.document, str(flags_path))
        build_model(resolved.spec, "meta")       # what avi build checks, before anything is written
        _publish(out_dir, lambda d: _write(d / "spec.yaml", dump_yaml(resolved.document)))
        return _result(mapping, flags_path, None, [str(out_dir / "spec.yaml")], resolved)
    weights = find_weights(source)
    tensors = _read_weights(weights, flags, name)
    model, resolved, mapping = build_imported(flags, name, tensors, data_root)
    origin = {"flags": str(flags_path), "weights": str(weights)}
    _publish(out_dir, lambda d: _save(d, resolved, model, origin))
    written = [str(out_dir / "spec.yaml"), str(out_dir / "checkpoints" / "last.pt")]
    return _result(mapping, flags_path, weights, written, resolved)


def _publish(out_dir: Path, fill) -> None:
    """DIR written whole or not at all (builders.folder); a failed write is the user's message."""
    from builders.folder import create_folder
    try:
        create_folder(out_dir, fill)
    except OSError as e:              # a full disk, a read-only folder ...
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}; nothing was written") from None


NAME_MAX = 255             # bytes of one file name on Linux's file systems


def _clip(message: str, limit: int = 2000) -> str:
    """A message quoting a 1 MB flag value stays a message: its start and end."""
    if len(message) <= limit:
        return message
    return f"{message[:limit - 400]} ... ({len(message) - limit + 200:,} characters left out) ... {message[-200:]}"


def _check_out(out_dir: Path) -> None:
    """DIR must be new (or an empty folder) and nameable, before anything is read."""
    name = out_dir.name
    if name in ("", ".", ".."):
        raise UserError(f"--out {out_dir}: name a new folder to create")
    if len(os.fsencode(name)) > NAME_MAX:
        raise UserError(f"--out: the folder name ({name[:40]}...) is {len(os.fsencode(name))} bytes; "
                        f"a file name is at most {NAME_MAX} bytes")
    try:
        st = os.lstat(out_dir)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise UserError(f"--out {out_dir}: a parent of it is a file, not a folder") from None
    except OSError as e:
        raise UserError(f"--out {out_dir}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            with os.scandir(out_dir) as entries:
                if next(entries, None) is None:
                    return                                     # an empty folder is replaced
        except OSError as e:
            raise UserError(f"--out {out_dir}: {e.strerror}") from None
    what = "exists and is not empty" if stat.S_ISDIR(st.st_mode) else "exists and is not a folder"
    raise UserError(f"--out {out_dir} {what}; choose another --out (nothing was overwritten)")


def _read_weights(weights: Path, flags: dict, name: str) -> dict:
    from avi_spec.loader import load_document
    from builders.network.build import build_model
    from builders.davi.h5 import read_h5
    from builders.davi.importer import spec_mapping
    from builders.davi.source import read_npz
    from builders.network.size import check_fits
    # Every tensor's declared shape is checked against the model of the flags before it is
    # read (temperatures fixed: the scales are optional entries of the file either way); an
    # .h5 is read by position against it. A meta-device model allocates nothing. A model too
    # big for this machine is refused first: a small file of compressed zeros matching its
    # shapes would otherwise be read into that much memory.
    spec = load_document(spec_mapping(flags, name).document).spec
    check_fits(spec, "cpu", "import")
    shape_model = build_model(spec, "meta")
    return (read_npz if weights.suffix == ".npz" else read_h5)(weights, shape_model)


def _save(out_dir: Path, resolved, model, origin: dict) -> None:
    from avi_spec.loader import dump_yaml
    from builders.checkpoint import save_checkpoint
    save_checkpoint(out_dir / "checkpoints" / "last.pt",
                    {"spec": resolved.document, "spec_hash": resolved.hash,
                     "model": model.state_dict(), "imported_from": origin,
                     "state": {"step": 0, "epoch": 0}}, keep_previous=False)
    _write(out_dir / "spec.yaml", dump_yaml(resolved.document))


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
