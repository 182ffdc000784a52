"""`avi export`: a trained run's weights as one safetensors file with its resolved spec."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOption, UserError, print_path
from .eval import NoEmaOption, RunArgument, print_json


def export_command(
    run: RunArgument,
    output: Annotated[Optional[Path], typer.Option(
        "--out", "-o", metavar="FILE.safetensors",
        help="Where to write (default: RUN/<name>.safetensors; ./<name>.safetensors for a checkpoint outside a run).")] = None,
    no_ema: NoEmaOption = False,
    as_json: JsonOption = False,
) -> None:
    """Write a trained model as safetensors, its resolved spec in the file's metadata.

    The file is all a model needs: `avi eval/sample/plot FILE.safetensors` and
    `builders.load_run("FILE.safetensors")` read it back, and it loads without running
    code (unlike a pickled .pt). Prints the path of the file.

    Example:

        avi export runs/quickstart --out quickstart.safetensors
    """
    from builders.loading import RunError
    from builders.export import SUFFIX, export_run

    if output is not None and output.suffix != SUFFIX:
        raise UserError(f"--out must end in {SUFFIX}, not {output.name!r}")
    try:
        output, metadata = export_run(run, output, use_ema=not no_ema)
    except RunError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    if as_json:
        print_json({"file": str(output), "bytes": output.stat().st_size,
                    "spec_hash": metadata["avi.spec_hash"], "source": metadata["avi.source"],
                    **{k: json.loads(metadata[f"avi.{k}"]) for k in ("ema", "step", "epoch")}})
    else:
        print_path(output)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
