"""What every `avi` command shares: consoles, common options, spec loading, failing politely.

Conventions (README.md "What you can do"): results go to stdout (`out`), progress and diagnostics to stderr
(`err`); exit 0 on success, 2 on a user's bad input, 1 on anything else. Raise SpecError or
UserError for a user's mistake: cli.main turns them into messages and exit 2, never a traceback.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Iterable, NoReturn, Optional

import typer
from rich.console import Console

from avi_spec import Problem, ResolvedSpec, load_spec
from avi_spec.errors import format_problems, literal

# emoji=False: rich would turn ":x:" in a file name or value into an emoji even with markup
# off. User text in markup strings goes through _escape; elsewhere print with markup=False.
out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


class UserError(Exception):
    """A user's mistake that is not about a spec (a missing run directory, a bad flag value):
    printed as `error: <message>` on stderr, exit 2."""


# Reusable option declarations: `def cmd(..., overrides: SetOption = None, as_json: JsonOption = False)`.
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", metavar="FIELD=VALUE",
    help="Override a spec field after `extends`, e.g. --set train.epochs=5 --set attention.inference=null "
         "(the value is YAML: 5, 1e-3, null, [0, 0]). Repeatable.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit (2: the user's input was wrong)."""
    err.print(f"[bold red]error:[/] {_escape(message, keep_newlines=True)}")
    raise typer.Exit(code)


def spec_file(path: str | Path) -> Path:
    """A spec file, or the spec.yaml a run directory keeps (so commands take SPEC_OR_RUN)."""
    p = Path(path)
    # os.path, not pathlib: Path.is_dir() raises on a name too long or a folder we may not
    # read (Python < 3.12); the loader then says what is wrong with the path.
    if os.path.isdir(p) and os.path.isfile(p / "spec.yaml"):
        return p / "spec.yaml"
    return p


def load(path: str | Path, overrides: Iterable[str] | None = None) -> ResolvedSpec:
    """load_spec for a spec file or a run directory; raises SpecError on any problem."""
    return load_spec(spec_file(path), list(overrides or ()))


def load_valid(path: str | Path, overrides: Iterable[str] | None = None) -> ResolvedSpec:
    """load() plus the graph-level validation; raises SpecError before anything is built."""
    from avi_spec import SpecError
    from avi_spec.validate import validate
    resolved = load(path, overrides)
    problems = validate(resolved)
    if problems:
        raise SpecError(problems)
    return resolved


def print_problems(problems: Iterable[Problem], console: Console | None = None) -> None:
    """One line per problem (at most errors.MAX_SHOWN, then how many more); Problem.format
    already writes control characters as escapes (errors.literal)."""
    for line in format_problems(list(problems)):
        (console or err).print(line, markup=False)


def _escape(text, keep_newlines: bool = False, markup: bool = True) -> str:
    """The one way user-controlled text (paths, names, flag values, fields of eval.json or of an
    imported file) reaches the terminal: control characters (ESC and OSC sequences, C1 codes,
    bidirectional overrides) written as escapes, and with ``markup`` rich markup escaped too,
    for a markup string; markup=False for plain text (print(..., markup=False), a write)."""
    from rich.markup import escape
    text = literal(str(text), keep_newlines)
    return escape(text) if markup else text


_JSON_UNSAFE = re.compile("[\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def json_text(value, **kwargs) -> str:
    """json.dumps, with the characters it leaves raw under ensure_ascii=False that a terminal
    acts on (C1 codes such as the 8-bit CSI \x9b, bidirectional overrides) written as \\u
    escapes: the same JSON to a parser, inert on a terminal."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, **kwargs))


def warn(text: str) -> None:
    """`warning: text` on stderr (text is escaped)."""
    err.print(f"[yellow]warning:[/] {_escape(text, keep_newlines=True)}")


def print_path(path) -> None:
    """A written file's path on stdout, the result of a command (escaped)."""
    out.print(_escape(path, markup=False), markup=False)
