"""`avi`: the command-line interface. Commands are thin; the work lives in the libraries.

The spec commands (validate, schema, graph, diff) live here. Other commands live in their own
module `cli/<command>.py` that defines `register(app: typer.Typer) -> None`; list it in
COMMAND_MODULES (modules not written yet are skipped). Keep torch imports inside the command
functions so that `avi --help` and the spec commands stay fast.
"""
from __future__ import annotations

import errno
import importlib
import importlib.util
import inspect
import json
import sys
import traceback
from enum import Enum
from typing import Annotated, NoReturn, Optional

import typer
from typer.core import TyperGroup

from avi_spec import SpecError

from .common import JsonOption, SetOption, UserError, _escape, err, fail, json_text, load, out, print_problems

COMMAND_MODULES = ["cli.build", "cli.train", "cli.eval", "cli.sample", "cli.plot", "cli.export",
                   "cli.import_davi", "cli.encode", "cli.sweep", "cli.data"]

BUG_HINT = "this is a bug in avi; please report it with the command and spec"


# Typer >= 0.20 vendors click, older ones use click itself: find its base exception either way.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class AviGroup(TyperGroup):
    """Maps exceptions to exit codes in one place, for every command (also under CliRunner),
    and tidies every command's help once it is built (see _tidy_help)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _tidy_help(self)

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
        except OSError as e:
            if e.errno not in _USER_PATH_ERRNOS:
                _bug()
            fail(_path_error(e))
        except Exception:
            _bug()


# Errors of a path the user typed, which any command can meet wherever it first touches the
# path (pathlib's is_dir/exists raise them on Python 3.11): the user's input, not avi's bug.
_USER_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP}


def _path_error(e: OSError) -> str:
    name = str(e.filename or "")
    shown = name if len(name) <= 120 else f"{name[:60]}...{name[-40:]} ({len(name)} characters)"
    hint = "give a shorter path" if e.errno == errno.ENAMETOOLONG else "a symbolic link there points in a circle"
    return f"{shown}: {e.strerror or e} ({hint})"


def _bug() -> "NoReturn":
    traceback.print_exc()
    err.print(f"[bold red]{BUG_HINT}[/]")
    raise typer.Exit(1) from None


def _tidy_help(command) -> None:
    """Typer's rich help keeps a docstring's hard line breaks, so a summary wrapped in the
    source reads as cut mid-sentence in `avi --help`: join each prose paragraph into one line
    (rich wraps it to the terminal) and keep indented example lines as they are. And show
    flags as flags: rich help would print `--resume <bool>`, as if the flag took a value."""
    if command.help:
        paragraphs = inspect.cleandoc(command.help).split("\n\n")
        command.help = "\n\n".join(p if p.startswith((" ", "\b")) else " ".join(p.split())
                                    for p in paragraphs)
    params = command.get_params          # also --help and the completion flags, added later
    command.get_params = lambda ctx: _flags_without_type(params(ctx))
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub)


def _flags_without_type(params: list) -> list:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


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


app = typer.Typer(cls=AviGroup, no_args_is_help=True, add_completion=True,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        try:
            out.print(f"avi {version('avi')}", markup=False)
        except PackageNotFoundError:        # a source tree that was never pip-installed
            out.print("avi (not installed: version unknown)", markup=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="Print avi's version and exit.")] = False,
) -> None:
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
                out.print(f"[bold red]FAIL[/]  {_escape(path)}  ({n} problem{'s' * (n != 1)})")
            else:
                out.print(f"[bold green]OK[/]  {_escape(path)}  ({_escape(r.document['name'])}, {r.short_hash})")
    if any(problems for _, _, problems in results):
        raise typer.Exit(2)


# --------------------------------------------------------------------- schema

@app.command()
def schema() -> None:
    """Print the JSON Schema of a spec (every field with its type, default and description).

    Example:

        avi schema > avi-spec.schema.json
    """
    from avi_spec.schema import json_schema
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


# -------------------------------------------------------------------- resolve

@app.command()
def resolve(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="Spec file (or run directory).")],
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the resolved spec: every field after `extends:` and `--set`, defaults filled in.

    This is the document a run trains from (its spec.yaml) and the one `avi diff` compares;
    save it to pin a configuration. Exits 2 on an invalid spec.

    Example:

        avi resolve specs/ablations/case09.yaml --set train.epochs=5 > case09_full.yaml
    """
    from avi_spec import dump_yaml

    resolved = load(spec, overrides)
    if as_json:
        sys.stdout.write(json_text(resolved.document, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(dump_yaml(resolved.document))


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


def _parameter_counts(resolved: list) -> list[int | None]:
    """Trainable parameters of each spec's model, built on torch's meta device (shapes only);
    None where torch is missing or the spec does not build."""
    try:
        from builders.network.build import build_model, summary
    except Exception:  # noqa: BLE001 - no torch here: the diff still works without counts
        return [None] * len(resolved)
    counts: list[int | None] = []
    for r in resolved:
        try:
            counts.append(int(summary(build_model(r.spec, "meta"))["parameters"]))
        except Exception:  # noqa: BLE001 - an unbuildable spec shows "-", it is not an error of diff
            counts.append(None)
    return counts


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
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", metavar="SPEC_OR_RUN",
        help="The reference of the paired differences: one of the arguments, or its name in "
             "the table (default: the first).")] = None,
) -> None:
    """Compare specs and runs: differing fields, attention edges, parameters and results.

    Attention edges are added or removed relative to the first spec. Results are bits/dim
    for 8-bit data, else NLL in nats; the best in bold green. A spec file's results are read
    from runs/<name>/eval.json when that exists (unless that run is an argument too).

    Runs evaluated on the same images (same data, split, K, binarisation seed and images)
    are also compared image by image: Δ is the mean paired difference from the reference
    (the first argument, or --baseline) of -log p(x) and of -ELBO, ± its standard error,
    with a 95% interval (Student's t); * marks an interval that excludes 0. Runs that cannot
    be paired say why.

    Given one sweep directory of `avi sweep`, compares its evaluated runs: one row per run,
    the grid fields as the columns that tell them apart.

    Exits 0 when all specs are the same, 1 when they differ, 2 on bad input.

    Example:

        avi diff specs/ablations/*.yaml

        avi diff sweeps/seeds

        avi diff runs/quickstart_1ep runs/quickstart_1ep_no_attention --baseline runs/quickstart_1ep_no_attention
    """
    from avi_spec.diff import diff_specs, render, render_switches

    from .diff_runs import baseline_index, paired_comparisons, run_evaluations, shown_result, sweep_runs

    if len(specs) == 1 and (runs := sweep_runs(specs[0])) is not None:
        specs = runs                # a sweep directory: its evaluated runs, one row each
        layout = DiffLayout.switches if layout is DiffLayout.auto else layout
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
    evaluations = run_evaluations(specs, resolved)
    results = [shown_result(run, docs, r) for (run, docs), r in zip(evaluations, resolved)]
    result = diff_specs(resolved, parameters=counts, results=results)
    result["paired"] = paired_comparisons(evaluations, baseline_index(baseline, specs, result["names"]))
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
