"""`avi`: the command-line interface. Commands are thin; the work lives in the libraries.

The spec commands (validate, schema, graph, diff) live here. Other commands live in their own
module `cli/<command>.py` that defines `register(app: typer.Typer) -> None`; list it in
COMMAND_MODULES (modules not written yet are skipped). Keep torch imports inside the command
functions so that `avi --help` and the spec commands stay fast.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import traceback
from enum import Enum
from typing import Annotated

import typer
from typer.core import TyperGroup

from avi_spec import SpecError

from .common import JsonOption, SetOption, UserError, err, fail, load, out, print_problems

COMMAND_MODULES = ["cli.build", "cli.train", "cli.eval", "cli.sample", "cli.plot"]

BUG_HINT = "this is a bug in avi; please report it with the command and spec"


# Typer >= 0.20 vendors click, older ones use click itself: find its base exception either way.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class AviGroup(TyperGroup):
    """Maps exceptions to exit codes in one place, for every command (also under CliRunner)."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, _ClickException):
            raise                                   # typer.Exit, usage errors: click handles them
        except SpecError as e:
            print_problems(e.problems)
            raise typer.Exit(2) from None
        except UserError as e:
            fail(str(e))
        except BrokenPipeError:
            _closed_stdout()
        except Exception:
            traceback.print_exc()
            err.print(f"[bold red]{BUG_HINT}[/]")
            raise typer.Exit(1) from None


def _closed_stdout() -> None:
    """The reader of our stdout went away (`avi diff ... | head`): not a bug, no traceback.
    Point stdout at devnull so that the interpreter's final flush does not fail again."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    raise typer.Exit(1)


app = typer.Typer(cls=AviGroup, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def _root() -> None:
    """avi: declarative deep attentive VAEs. A model is a YAML spec; these commands check,
    compare, build, train and evaluate it.

    Example:

        avi validate specs/*.yaml
    """


# ------------------------------------------------------------------- validate

@app.command()
def validate(
    specs: Annotated[list[str], typer.Argument(metavar="SPEC...", help="Spec files (or run directories).")],
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Load, resolve and graph-check specs; print OK per valid spec, every problem otherwise.

    Exits 2 if any spec is invalid.

    Example:

        avi validate specs/cifar10_l16.yaml --set train.epochs=5
    """
    from avi_spec.validate import validate as check_graph

    results = []
    for path in specs:
        resolved, problems = None, []
        try:
            resolved = load(path, overrides)
            problems = check_graph(resolved)
        except SpecError as e:
            problems = e.problems
        results.append((path, resolved, problems))

    if as_json:
        sys.stdout.write(json.dumps([{
            "path": path, "valid": not problems,
            "name": r.document["name"] if r else None, "hash": r.hash if r else None,
            "problems": [p.to_dict() for p in problems],
        } for path, r, problems in results], indent=2) + "\n")
    else:
        for path, r, problems in results:
            if problems:
                print_problems(problems)
                n = len(problems)
                out.print(f"[bold red]FAIL[/]  {_esc(path)}  ({n} problem{'s' * (n != 1)})")
            else:
                out.print(f"[bold green]OK[/]  {_esc(path)}  ({_esc(r.document['name'])}, {r.short_hash})")
    if any(problems for _, _, problems in results):
        raise typer.Exit(2)


# --------------------------------------------------------------------- schema

@app.command()
def schema() -> None:
    """Print the JSON Schema of a spec (every field with its type, default and description).

    Example:

        avi schema > avi-spec.schema.json
    """
    from avi_spec import Spec
    sys.stdout.write(json.dumps(Spec.model_json_schema(by_alias=True), indent=2) + "\n")


# ---------------------------------------------------------------------- graph

class GraphFormat(str, Enum):
    mermaid = "mermaid"
    dot = "dot"
    json = "json"


@app.command()
def graph(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="Spec file (or run directory).")],
    fmt: Annotated[GraphFormat, typer.Option("--format", "-f", help="Output format.")] = GraphFormat.mermaid,
    overrides: SetOption = None,
) -> None:
    """Export the model graph (cells, stochastic layers, attention edges) of a spec.

    Example:

        avi graph specs/cifar10_l16.yaml --format dot | dot -Tsvg > model.svg
    """
    from avi_spec.graph import build_graph, export

    resolved = load(spec, overrides)
    text = export(build_graph(resolved.spec), fmt.value)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


# ----------------------------------------------------------------------- diff

class DiffLayout(str, Enum):
    auto = "auto"
    fields = "fields"
    switches = "switches"


RESULT_KEYS = ("nll_nats", "nll_stderr_nats", "nelbo_nats", "bits_per_dim", "importance_samples")


def _parameter_counts(resolved: list) -> list[int | None]:
    """Trainable parameters of each spec's model, built on torch's meta device (shapes only);
    None where torch is missing or the spec does not build."""
    try:
        from builders.build import build_model, summary
    except Exception:  # noqa: BLE001 - no torch here: the diff still works without counts
        return [None] * len(resolved)
    counts: list[int | None] = []
    for r in resolved:
        try:
            counts.append(int(summary(build_model(r.spec, "meta"))["parameters"]))
        except Exception:  # noqa: BLE001 - an unbuildable spec shows "-", it is not an error of diff
            counts.append(None)
    return counts


def _run_results(arg: str, resolved) -> dict | None:
    """The result `avi eval` kept for this spec or run (the full test split at the largest K;
    builders.eval_results): ARG/eval.json for a run directory, runs/<name>/eval.json
    (relative to the working directory) for a spec file."""
    from pathlib import Path

    from builders.eval_results import best_result, describe, read_results

    p = Path(arg)
    path = p / "eval.json" if p.is_dir() else Path("runs") / resolved.document["name"] / "eval.json"
    if not path.is_file():
        return None
    try:
        data = best_result(read_results(path))
    except (OSError, ValueError) as e:
        err.print(f"[yellow]warning:[/] {_esc(str(path))} is not readable JSON ({_esc(str(e))}); its results are left out")
        return None
    if not isinstance(data, dict):
        return None
    res = {k: data[k] for k in RESULT_KEYS if k in data}
    eight_bit = resolved.spec.data.binarize == "none"
    metric = "bits_per_dim" if eight_bit and isinstance(res.get("bits_per_dim"), (int, float)) else "nll_nats"
    if not isinstance(res.get(metric), (int, float)) or isinstance(res.get(metric), bool):
        return None
    res.update(metric=metric, value=float(res[metric]), file=str(path), evaluated=describe(data))
    return res


@app.command()
def diff(
    specs: Annotated[list[str], typer.Argument(metavar="SPEC_OR_RUN...", help="Two or more specs or run directories.")],
    overrides: SetOption = None,
    as_json: JsonOption = False,
    layout: Annotated[DiffLayout, typer.Option(
        help="fields: one row per differing field, one column per spec; switches: one row per spec "
             "(the paper's Table 5); auto: fields for two specs, switches for more.")] = DiffLayout.auto,
    params: Annotated[bool, typer.Option(
        "--params/--no-params", help="Count each model's parameters (builds it on torch's meta device).")] = True,
) -> None:
    """Compare specs and runs: fields that differ, attention edges added or removed (relative to
    the first), parameter counts and, for runs, their results (bits/dim for 8-bit data, else
    NLL in nats; the best in bold green). A spec file's results are read from
    runs/<name>/eval.json when that exists.

    Exits 0 when all specs are the same, 1 when they differ, 2 on bad input.

    Example:

        avi diff specs/ablations/*.yaml
    """
    from avi_spec.diff import diff_specs, render, render_switches

    if len(specs) < 2:
        raise UserError("avi diff needs at least two specs to compare")
    problems, resolved = [], []
    for path in specs:      # report the problems of every spec, not only the first bad one
        try:
            resolved.append(load(path, overrides))
        except SpecError as e:
            problems += e.problems
    if problems:
        raise SpecError(problems)
    counts = _parameter_counts(resolved) if params else None
    results = [_run_results(path, r) for path, r in zip(specs, resolved)]
    result = diff_specs(resolved, parameters=counts, results=results)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        chosen = layout
        if chosen is DiffLayout.auto:
            chosen = DiffLayout.fields if len(specs) <= 2 else DiffLayout.switches
        (render if chosen is DiffLayout.fields else render_switches)(result, out)
    same = result.get("same", not result["fields"] and not result["edges"]["added"] and not result["edges"]["removed"])
    raise typer.Exit(0 if same else 1)


# ------------------------------------------------------------ other commands

def _esc(text: str) -> str:
    from rich.markup import escape
    return escape(str(text))


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:     # not written yet
            continue
        importlib.import_module(name).register(app)


_register_commands()


def main() -> None:
    try:
        app(prog_name="avi")
    except BrokenPipeError:
        # `avi ... | head` closed stdout early: not an error of ours or the user's.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
