"""Spec files and YAML, read safely: a bounded file in, plain data with positions out.

A spec may come from someone else (a run directory sent to you, an `extends:` in it), so
reading one must not hang, exhaust memory or echo a file that is not a spec:

- only regular files of at most MAX_FILE_BYTES are read (not /dev/zero, a FIFO or a folder);
- one YAML document may nest at most MAX_DEPTH levels and expand, through its aliases, to at
  most MAX_VALUES values and MAX_CHARS characters. Both are measured on the composed node
  graph (where an alias is a shared node) before any data is built, so an alias bomb is
  refused in the time it takes to read its text;
- a syntax error names the line and column but quotes no text of the file that did not parse.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, SpecError, format_path

Key = tuple                                   # a path into the document: ("cells", "encoder", "scales", 1)
Pos = tuple[str, "int | None", "int | None"]  # (file or "--set a.b=c", line, column), 1-based

# A shipped spec is 2 KB and 60 values, 4 levels deep; the largest sensible one (explicit
# sources of every layer pair for 100 layers) is 20 KB and 5,200 values. PyYAML composes a few
# tens of thousands of values a second, about 1 KB each, so MAX_VALUES also bounds the time
# (a second or two) and memory (50 MB) one document can cost.
MAX_FILE_BYTES = 512 << 10
MAX_DEPTH = 64
MAX_VALUES = 50_000
MAX_CHARS = 4 << 20


def display_path(path: Path) -> str:
    try:
        shown = str(path.relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    return clip_path(shown)


def clip_path(shown: str, limit: int = 240) -> str:
    """A path as a message shows it: whole up to `limit` characters, else its start and end
    (a 5,000-character path is a message of its own)."""
    return shown if len(shown) <= limit else f"{shown[:limit // 2]}...{shown[-limit // 4:]} ({len(shown):,} characters)"


# ------------------------------------------------------------------------ files

def _read_regular(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Opened without blocking (a FIFO
    would wait for a writer for ever) and checked on the open descriptor, so the file cannot
    be swapped between the check and the read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):
            raise _NotRegular
        if st.st_size > limit:
            raise _TooLarge(st.st_size)
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(limit + 1)
        if len(raw) > limit:                   # it grew after the check
            raise _TooLarge(len(raw))
        return raw
    finally:
        os.close(fd)


class _NotRegular(Exception):
    pass


class _TooLarge(Exception):
    pass


def read_text_file(path: str | Path, limit: int) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes, for the files avi reads from
    a run directory (metrics.jsonl, eval.json): OSError when it cannot be read, ValueError when
    it is a device, FIFO or socket (/dev/zero, a pipe that would block) or larger than `limit`."""
    return read_bytes_file(path, limit).decode("utf-8")


def read_bytes_file(path: str | Path, limit: int) -> bytes:
    """read_text_file's bytes, for binary files of a run directory (RUN/eval/*.npz)."""
    try:
        return _read_regular(Path(path), limit)
    except _NotRegular:
        raise ValueError("not a regular file (a device, FIFO or socket)") from None
    except _TooLarge as e:
        raise ValueError(f"{e.args[0]:,} bytes, more than the {limit:,} such a file may hold") from None


def read_spec_text(path: Path, via: Problem | None) -> str:
    """A spec file's text, or a SpecError located at the `extends:` that named it (`via`)."""
    where = (via.file, via.line, via.column) if via else (display_path(path), None, None)
    key = "extends" if via else ""
    shown = display_path(path)
    try:
        raw = _read_regular(path)
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if not via:       # point at the line and column of the bad byte
            line = raw.count(b"\n", 0, e.start) + 1
            column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
            where = (where[0], line, column)
        raise SpecError(Problem(key, f"not UTF-8 text ({e.reason} at byte {e.start}): {shown}", *where,
                                hint="save the file as UTF-8")) from None
    except FileNotFoundError:
        raise SpecError(Problem(key, f"file not found: {shown}", *where)) from None
    except IsADirectoryError:
        raise SpecError(Problem(key, f"is a directory, not a spec file: {shown}", *where)) from None
    except _NotRegular:
        raise SpecError(Problem(key, f"not a regular file (a device, FIFO or socket), not a spec file: {shown}",
                                *where)) from None
    except _TooLarge as e:
        raise SpecError(Problem(key, f"{shown} is {e.args[0]:,} bytes; a spec file is at most "
                                     f"{MAX_FILE_BYTES >> 10} KiB", *where)) from None
    except OSError as e:
        raise SpecError(Problem(key, f"cannot read {shown}: {e.strerror}", *where)) from None
    except ValueError:                          # a NUL in the name
        raise SpecError(Problem(key, f"cannot read {shown}: not a valid file name", *where)) from None


# ------------------------------------------------------------------------ YAML

class _Limit(yaml.MarkedYAMLError):
    """A document beyond MAX_DEPTH, MAX_VALUES or MAX_CHARS."""


class _Loader(yaml.SafeLoader):
    """SafeLoader subclass (nothing we do touches the global SafeLoader) whose composer stops
    at MAX_DEPTH (PyYAML composes recursively: deeper brackets end in a RecursionError) and at
    MAX_VALUES nodes (each costs about 1 KB before it is built into data)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Limit(None, None, f"values nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            if self._nodes > MAX_VALUES:
                raise _Limit(None, None, f"this YAML holds more than {MAX_VALUES:,} values", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# PyYAML follows YAML 1.1, where `1e-3` and `3e4` are strings (a float needs a dot). Every
# researcher writes learning rates that way, so also read YAML 1.2 exponent floats as floats.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _measure(root) -> None:
    """Raise _Limit if the node graph under `root` expands, with every alias followed, beyond
    MAX_VALUES values, MAX_CHARS characters or MAX_DEPTH levels. Linear in the graph: anchors
    come before their aliases, so every alias finds its target measured already."""
    done: dict[int, tuple[int, int, int]] = {}       # id(node) -> (values, characters, height)
    open_: set[int] = set()

    def visit(node, depth: int) -> tuple[int, int, int]:
        key = id(node)
        if key in open_:
            return (1, 0, 1)                 # an alias inside itself: _Builder reports it
        if key not in done:
            open_.add(key)
            if isinstance(node, yaml.ScalarNode):
                done[key] = (1, len(node.value), 1)
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
                values, chars, height = 1, 0, 0
                for child in children:
                    v, c, h = visit(child, depth + 1)
                    values, chars, height = values + v, chars + c, max(height, h)
                    if values > MAX_VALUES or chars > MAX_CHARS:
                        what = f"{MAX_VALUES:,} values" if values > MAX_VALUES else f"{MAX_CHARS:,} characters"
                        raise _Limit(None, None, f"this YAML holds more than {what} (an alias counts as what it repeats)",
                                     node.start_mark)
                done[key] = (values, chars, height + 1)
            open_.discard(key)
        if depth + done[key][2] > MAX_DEPTH:
            raise _Limit(None, None, f"values nested deeper than {MAX_DEPTH} levels (through aliases)",
                         node.start_mark)
        return done[key]

    visit(root, 0)


_MAP, _SEQ, _MERGE = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:merge"


class _Builder:
    """Turns a composed YAML node tree into Python data, recording positions and
    reporting every duplicate key (PyYAML silently keeps the last one)."""

    def __init__(self, loader: _Loader, source: str):
        self.loader, self.source = loader, source
        self.positions: dict[Key, Pos] = {}
        self.problems: list[Problem] = []
        self._stack: set[int] = set()

    def pos(self, mark) -> Pos:
        return (self.source, mark.line + 1, mark.column + 1)

    def build(self, node, path: Key) -> Any:
        if id(node) in self._stack:        # an alias that contains itself
            self.problems.append(Problem(format_path(path), "recursive YAML alias", *self.pos(node.start_mark)))
            return None
        self._stack.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode) and node.tag == _MAP:
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
                return [self._item(child, path + (i,)) for i, child in enumerate(node.value)]
            return self.loader.construct_object(node, deep=True)   # scalars, !!set, !!binary, ...
        finally:
            self._stack.discard(id(node))

    def _item(self, node, path: Key) -> Any:
        self.positions[path] = self.pos(node.start_mark)
        return self.build(node, path)

    def _mapping(self, node, path: Key) -> dict:
        out: dict = {}
        first: dict = {}
        merges = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merges.append(value_node)
                continue
            key = self.loader.construct_object(key_node, deep=True)
            kpos = self.pos(key_node.start_mark)
            try:
                hash(key)
            except TypeError:
                self.problems.append(Problem(format_path(path), "mapping keys must be plain scalars", *kpos))
                continue
            if key in first:
                self.problems.append(Problem(format_path(path + (key,)),
                                             f"duplicate key '{key}' (line {kpos[1]}; first at line {first[key]})", *kpos))
                continue
            first[key] = kpos[1]
            # Point at the value when it sits on the key's line (`epochs: abc`), else at the key.
            same_line = value_node.start_mark.line == key_node.start_mark.line and \
                value_node.start_mark.index != value_node.end_mark.index
            self.positions[path + (key,)] = self.pos(value_node.start_mark) if same_line else kpos
            out[key] = self.build(value_node, path + (key,))
        # YAML merge keys (`<<: *base`): the mapping's own keys win.
        for value_node in merges:
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for src in sources:
                merged = self.build(src, path) if isinstance(src, yaml.MappingNode) else None
                if not isinstance(merged, dict):
                    self.problems.append(Problem(format_path(path), "'<<' must merge mappings", *self.pos(src.start_mark)))
                    continue
                for k, v in merged.items():
                    out.setdefault(k, v)
        return out


# A message about text that did not parse may quote it ("found undefined alias 'hunter2'"):
# drop what follows those words when it is longer than a character. PyYAML's token names
# ("expected ',' or '}', but got '<scalar>'") are not the file's text and stay.
_QUOTED = re.compile(r"""(?<=alias|nchor|andle|acter|found) (?:'(?!<)[^']{2,}'|"[^"]{2,}")""")


def _syntax_error(e: yaml.MarkedYAMLError, source: str) -> SpecError:
    mark = e.problem_mark or e.context_mark
    parsed = isinstance(e, yaml.constructor.ConstructorError)     # it parsed; a tag was unknown
    context, problem = ((x if parsed or not x else _QUOTED.sub("", x)) for x in (e.context, e.problem))
    message = " ".join(x for x in (context, problem) if x) or "invalid YAML"
    ctx = e.context_mark
    if context and ctx is not None and mark is not None and ctx.line != mark.line:
        # The parser notices an unclosed bracket or quote lines later: say where it opened.
        message = f"{problem or 'invalid YAML'} ({context} that starts at line {ctx.line + 1}, column {ctx.column + 1})"
    hint = None
    if "'\\t'" in (e.problem or ""):
        hint = "YAML does not allow tabs for indentation; indent with spaces"
    return SpecError(Problem("", f"YAML syntax error: {message}", source,
                             mark.line + 1 if mark else None, mark.column + 1 if mark else None, hint=hint))


def parse_yaml(text: str, source: str) -> tuple[Any, dict[Key, Pos]]:
    """Safe-load one YAML document, returning (data, positions); SpecError on bad YAML or on
    a document beyond the limits above. Data None: the document is empty."""
    loader = None
    try:
        loader = _Loader(text)        # the reader already rejects control characters
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _measure(node)
        builder = _Builder(loader, source)
        data = builder.build(node, ())
    except _Limit as e:
        mark = e.problem_mark
        raise SpecError(Problem("", e.problem, source, mark.line + 1, mark.column + 1,
                                hint="a spec is a small document; is this file a spec?")) from None
    except yaml.MarkedYAMLError as e:
        raise _syntax_error(e, source) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise SpecError(Problem("", f"YAML error: character #x{e.character:04x} is not allowed", source,
                                line, column, hint="write it escaped in a double-quoted string")) from None
    except yaml.YAMLError as e:
        raise SpecError(Problem("", f"YAML error: {str(e)[:200]}", source)) from None
    finally:
        if loader is not None:
            loader.dispose()
    if builder.problems:
        raise SpecError(builder.problems)
    builder.positions[()] = builder.pos(node.start_mark)     # where the document starts (after comments)
    return data, builder.positions


# Characters a terminal acts on rather than shows, which PyYAML counts as printable and writes
# raw: C1 controls (U+0080-U+009F, NEL among them), the bidirectional overrides, embeddings,
# isolates and marks (a U+202E in a description reverses what follows it on screen), the
# invisible zero-width ones, and the unicode line and paragraph separators (a reader folds them
# into spaces in plain scalars). The same set as cli.common's json_text escapes in --json.
TERMINAL_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


class _Dumper(yaml.SafeDumper):
    """SafeDumper that keeps unicode readable yet round-trips every string, and never writes
    a character of TERMINAL_UNSAFE raw: a string holding one is double-quoted with escapes."""

    def write_double_quoted(self, text, split=True):
        if not TERMINAL_UNSAFE.search(text):
            return super().write_double_quoted(text, split)
        # With allow_unicode off PyYAML escapes every non-ASCII character (\xNN, \uNNNN): for
        # this one scalar only, so the rest of the document keeps its readable unicode.
        keep, self.allow_unicode = self.allow_unicode, False
        try:
            return super().write_double_quoted(text, split)
        finally:
            self.allow_unicode = keep


# The dumper quotes a string only if its resolvers would read it back as something else, so it
# must know the loader's extra float form: else the string "0E0" is written plain, read as 0.0.
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = '"' if TERMINAL_UNSAFE.search(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(document: dict) -> str:
    """Block YAML of a resolved document; parse_yaml/load_document read it back unchanged."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=None,
                     allow_unicode=True, width=100)
