"""Their run.py command line (`train.sh`, `eval_command.sh`) -> `--name=value` flags, and a
`*_hparams` value -> its `key=value` pairs, both in time linear in the text.

A flag file may come from anybody and be of any length: shlex builds each word one character
at a time by string concatenation (quadratic: a 1 MB word takes minutes) and a regular
expression with a look-ahead per comma was quadratic too. These scanners jump from one
special character to the next with compiled patterns.
"""
from __future__ import annotations

import re


class FlagError(ValueError):
    """A flag (or one of its hparams) that avi cannot express, or a malformed command."""


# One step of a POSIX shell's word splitting: plain text, a quoted string, an escape, blanks,
# a comment sign, or an opening quote that is never closed.
_STEP = re.compile(r"""
    (?P<text>[^\s'"\\#]+)
  | (?P<single>'[^']*')
  | (?P<double>"(?:[^"\\]|\\.)*")
  | (?P<escape>\\.)
  | (?P<blank>\s+)
  | (?P<hash>\#)
  | (?P<open>['"\\])
""", re.VERBOSE | re.DOTALL)
_DOUBLE_ESCAPE = re.compile(r'\\([\\"$`\n])')


def shell_words(text: str) -> list[str]:
    """The words of a shell command as sh would split it (quotes, escapes, `#` comments at
    the start of a word); FlagError naming the line of an unbalanced quote."""
    words: list[str] = []
    word: list[str] | None = None           # None: between words
    pos = 0
    while pos < len(text):
        m = _STEP.match(text, pos)
        kind, piece = m.lastgroup, m.group()
        if kind == "open":
            line = text.count("\n", 0, pos) + 1
            what = "a backslash at the end" if piece == "\\" else f"an unbalanced quote ({piece})"
            raise FlagError(f"line {line}: {what}; the command cannot be split into flags")
        if kind == "blank" or (kind == "hash" and word is None):
            if word is not None:
                words.append("".join(word))
                word = None
            pos = m.end() if kind == "blank" else _line_end(text, pos)
            continue
        word = [] if word is None else word
        if kind == "single":
            word.append(piece[1:-1])
        elif kind == "double":
            word.append(_DOUBLE_ESCAPE.sub(r"\1", piece[1:-1]))
        elif kind == "escape":
            word.append(piece[1])
        else:                                 # text, or a '#' inside a word
            word.append(piece)
        pos = m.end()
    if word is not None:
        words.append("".join(word))
    return words


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def parse_command(text: str) -> dict[str, str]:
    """The --name=value flags of a run.py command line (several lines, `\\` continuations and
    a leading `python3 run.py` allowed; the last value of a repeated flag wins, as absl does)."""
    flags: dict[str, str] = {}
    for tok in shell_words(text.replace("\\\n", " ")):
        if not tok.startswith("--"):
            continue
        name, eq, value = tok[2:].partition("=")
        if not eq:
            raise FlagError(f"flag --{name}: expected --{name}=VALUE")
        flags[name] = value
    if not flags:
        raise FlagError("no --name=value flags found")
    return flags


_BRACKETS = re.compile(r"[\[\],=]")


def split_hparams(text: str) -> dict[str, str]:
    """`a=1,b=[x=1,y=2],c=[0,0]` -> {"a": "1", "b": "[x=1,y=2]", "c": "[0,0]"} (their parser's
    rule: split on commas and the first '=' outside brackets)."""
    out: dict[str, str] = {}
    depth, start, eq = 0, 0, -1
    text = text.strip()
    for m in _BRACKETS.finditer(text):
        c, i = m.group(), m.start()
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise FlagError(f"'{_clip(text)}': a ']' without its '['")
        elif depth == 0 and c == "=" and eq < 0:
            eq = i
        elif depth == 0 and c == ",":
            _pair(text, start, eq, i, out)
            start, eq = i + 1, -1
    if depth:
        raise FlagError(f"'{_clip(text)}': a '[' without its ']'")
    _pair(text, start, eq, len(text), out)
    return out


def _pair(text: str, start: int, eq: int, end: int, out: dict[str, str]) -> None:
    if not text[start:end].strip():
        return
    if eq < 0:
        raise FlagError(f"cannot read '{_clip(text[start:end].strip())}': expected key=value")
    out[text[start:eq].strip()] = text[eq + 1:end].strip()


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text):,} characters)"
