"""Problems found in a spec, and the exception that carries all of them at once.

A user fixing a spec wants every mistake in one pass, each pointing at a file, line and
column like a compiler message, so loaders and validators collect `Problem`s and raise one
`SpecError` at the end instead of stopping at the first.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass
from typing import Iterable

MAX_SHOWN = 50     # problems printed; a file that is not a spec can have thousands


@dataclass
class Problem:
    path: str                      # dotted field path, e.g. "cells.encoder.scales[1]"; "" = the whole spec
    message: str                   # what was expected and what was found
    file: str | None = None        # a file, or "--set a.b=c" for a command-line override
    line: int | None = None        # 1-based
    column: int | None = None      # 1-based
    hint: str | None = None        # e.g. "did you mean 'nonlocal'?"

    def format(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        # A key can be a whole multi-line block of some file: print a line's worth of it.
        path, message = _brief(self.path, 100), _brief(self.message, 400)
        text = f"{where}{path}: {message}" if path else f"{where}{message}"
        return literal(f"{text} ({self.hint})" if self.hint else text)

    def to_dict(self) -> dict:
        return asdict(self)

    def sort_key(self) -> tuple:
        return (self.file or "", self.line or 0, self.column or 0, self.path)


class SpecError(Exception):
    """One or more problems with a user's spec (or the files and flags that make it)."""

    def __init__(self, problems: Iterable[Problem] | Problem):
        self.problems: list[Problem] = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(format_problems(self.problems))


def _brief(text: str, limit: int) -> str:
    """The first line of `text`, at most `limit` characters (avi's own messages are one line;
    a second one can only come from a key or value of the user's file)."""
    first, newline, _ = text.partition("\n")
    return first[:limit - 3] + "..." if newline or len(first) > limit else first


def format_problems(problems: list[Problem], limit: int = MAX_SHOWN) -> list[str]:
    """One line per problem, the first `limit` of them, then how many more there are."""
    lines = [p.format() for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit:,} more problems (the first {limit} are shown)")
    return lines


def format_path(path: Iterable) -> str:
    """("cells", "encoder", "scales", 1) -> "cells.encoder.scales[1]"."""
    out = ""
    for seg in path:
        out += f"[{seg}]" if isinstance(seg, int) and not isinstance(seg, bool) else (f".{seg}" if out else str(seg))
    return out


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A "did you mean 'x'?" hint for a misspelt name, or None when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


# C0 (ESC starts every terminal sequence), DEL, C1 (\x9b and \x9d are 8-bit CSI and OSC), and the
# invisible and bidirectional characters that can make one text look like another
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def literal(text: str, keep_newlines: bool = False) -> str:
    """`text` with control characters written as escapes (\\x1b, \\n), so that a key or file
    name cannot colour the terminal, move its cursor or fake a line of output."""
    def esc(m: re.Match) -> str:
        c = m.group()
        return c if keep_newlines and c == "\n" else repr(c)[1:-1]
    return _CONTROL.sub(esc, text)
