"""Problems found in a spec, and the exception that carries all of them at once.

A user fixing a spec wants every mistake in one pass, each pointing at a file, line and
column like a compiler message, so loaders and validators collect `Problem`s and raise one
`SpecError` at the end instead of stopping at the first.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Iterable


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
        text = f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"
        return f"{text} ({self.hint})" if self.hint else text

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
        return "\n".join(p.format() for p in self.problems)


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A "did you mean 'x'?" hint for a misspelt name, or None when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
