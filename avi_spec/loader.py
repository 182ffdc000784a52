"""Spec files -> one validated, hashed document.

    text --(safe YAML, positions, no duplicate keys)--> per-file dict
         --(upgrade to the current version)--> --(extends: deep merge, child wins)-->
         --(--set overrides)--> --(pydantic, strict)--> ResolvedSpec

Every key and value keeps the file, line and column it came from, so that any later
problem (pydantic's or the graph validator's) can point at the line a user must edit.
Reading files and YAML within bounds is `yaml_io`'s job.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .errors import Problem, SpecError, did_you_mean, format_path
from .schema import SPEC_VERSION, Spec
from .yaml_io import Key, Pos, display_path as _display, dump_yaml, parse_yaml, read_spec_text as _read

__all__ = ["ResolvedSpec", "load_spec", "load_text", "load_document", "format_path", "dump_yaml", "parse_yaml",
           "merge", "upgrade", "apply_override", "document_hash", "UPGRADES"]


def document_hash(document: dict) -> str:
    """sha256 of the canonical JSON of a resolved document: independent of key order."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------ result

@dataclass
class ResolvedSpec:
    spec: Spec
    document: dict                 # spec.model_dump(mode="json", by_alias=True): every field, defaults filled
    path: Path | None              # the spec file (None for a document loaded from memory)
    positions: dict[Key, Pos]      # where every key the user wrote came from
    hash: str                      # document_hash(document)
    _index: dict | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def short_hash(self) -> str:
        return self.hash[:16]

    def locate(self, path: Iterable) -> Pos:
        """(file, line, column) of `path`, or of its nearest ancestor the user wrote."""
        if self._index is None:
            self._index = _index(self.positions)
        return _find(self._index, tuple(path))

    def problem(self, path: Iterable, message: str, hint: str | None = None) -> Problem:
        """A Problem at `path`, located in the files (for graph-level validators)."""
        path = tuple(path)
        file, line, col = self.locate(path)
        return Problem(format_path(path), message, file, line, col, hint)


def _index(positions: dict[Key, Pos]) -> dict[Key, Pos]:
    # pydantic reports dict keys as strings ("3") where YAML gave ints (3): compare as text.
    # Built once per batch of lookups: rebuilding it per problem made 10,000 problems take 50 s.
    return {tuple(map(str, k)): v for k, v in positions.items()}


def _find(index: dict[Key, Pos], path: Key) -> Pos:
    for i in range(len(path), -1, -1):
        hit = index.get(tuple(map(str, path[:i])))
        if hit:
            return hit
    return ("<spec>", None, None)


def _locate(positions: dict[Key, Pos], path: Key) -> Pos:
    return _find(_index(positions), path)


# ----------------------------------------------------------------- versions

# UPGRADES[v] turns a version-v document into a version v+1 one. v1 is the only version so
# far; when v2 lands, add `UPGRADES[1] = _v1_to_v2` and bump schema.SPEC_VERSION.
UPGRADES: dict[int, Callable[[dict], dict]] = {}


def upgrade(doc: dict) -> dict:
    """Bring one file's document to SPEC_VERSION (a missing version means the current one).
    Versions that are not integers, or newer than this avi, are left for the caller to report."""
    v = doc.get("version", SPEC_VERSION)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= SPEC_VERSION:
        return doc
    while v < SPEC_VERSION:
        doc = UPGRADES[v](doc)
        v += 1
    doc["version"] = SPEC_VERSION
    return doc


def _check_version(doc: dict, positions: dict[Key, Pos]) -> None:
    v = doc.get("version")
    if isinstance(v, int) and not isinstance(v, bool) and v > SPEC_VERSION:
        raise SpecError(Problem("version", f"spec version {v} is newer than this avi supports ({SPEC_VERSION})",
                                *_locate(positions, ("version",)), hint="upgrade avi"))


# ------------------------------------------------------------- extends / merge

def merge(base: dict, over: dict, base_pos: dict[Key, Pos] | None = None,
          over_pos: dict[Key, Pos] | None = None) -> tuple[dict, dict[Key, Pos]]:
    """Deep-merge `over` onto `base`: mappings merge key by key, anything else (lists,
    scalars, an explicit null) replaces. A mapping that picks another alternative of a union
    (a new distribution `kind`, `sources: {explicit: ...}` over `{last: 4}`) replaces too: the
    fields of the parent's alternative mean nothing to the child's. Positions follow the value
    that won."""
    replaced: set[Key] = set()

    def go(b: dict, o: dict, path: Key, anns: list) -> dict:
        out = dict(b)
        for k, v in o.items():
            sub = _child(anns, k) if isinstance(k, str) else []
            if isinstance(v, dict) and isinstance(out.get(k), dict) and not _switches_variant(sub, out[k], v):
                out[k] = go(out[k], v, path + (k,), sub)
            else:
                out[k] = copy.deepcopy(v)
                replaced.add(path + (k,))
        return out

    doc = go(base, over, (), [Spec])
    pos = {p: q for p, q in (base_pos or {}).items() if not any(p[:i] in replaced for i in range(1, len(p)))}
    pos.update(over_pos or {})
    return doc, pos


def _variant(anns: list, value: dict) -> type | None:
    """The model of a union of models that the mapping `value` is written for (None: not a
    union of models, or it cannot tell). Tagged unions go by `kind`, others by field names."""
    models = [a for a in anns if _is_model(a)]
    if len(models) < 2:
        return None
    if any("kind" in m.model_fields for m in models):
        tagged = [m for m in models if "kind" in m.model_fields and m.model_fields["kind"].default == value.get("kind")]
        return tagged[0] if "kind" in value and len(tagged) == 1 else None
    fits = [m for m in models if value and set(map(str, value)) <= set(_fields(m))]
    return fits[0] if len(fits) == 1 else None


def _switches_variant(anns: list, base: dict, over: dict) -> bool:
    a, b = _variant(anns, base), _variant(anns, over)
    return a is not None and b is not None and a is not b


def _kind(v: Any) -> str:
    for types_, name in ((bool, "true/false"), ((int, float), "a number"), (str, "text"), (list, "a list")):
        if isinstance(v, types_):
            return name
    return type(v).__name__


def _check_is_spec(data: Any, positions: dict[Key, Pos], source: str, via: Problem | None) -> None:
    """A spec file holds a mapping with at least one spec field (or a near miss of one). Any
    other file may be anything, e.g. /etc/shadow named by a hostile `extends:`, so none of
    its text is quoted: only what kind of document it is."""
    if via is not None:     # the line to edit is the extends that names a non-spec
        key, where, subject = "extends", (via.file, via.line, via.column), f"{source} is "
    else:
        key, where, subject = "", positions.get((), (source, 1, 1)), "this file is "
    fields = _field_names([Spec]) + ["extends"]
    if data is None:
        raise SpecError(Problem(key, f"{subject}empty: a spec must set at least one field", *where,
                                hint=f"fields: {', '.join(fields)}"))
    if not isinstance(data, dict):
        lead = f"{subject}not a spec: " if via is not None else ""
        raise SpecError(Problem(key, f"{lead}a spec must be a mapping of fields, found {_kind(data)}", *where))
    keys = [str(k) for k in list(data)[:1000]]
    if keys and not any(k in fields or did_you_mean(k, fields) for k in keys):
        raise SpecError(Problem(key, f"{subject}not an avi spec: none of its {len(data):,} top-level keys is "
                                     f"a spec field", *where, hint=f"fields: {', '.join(fields)}"))


def _load_layers(text: str, source: str, base_dir: Path, chain: tuple[Path, ...],
                 via: Problem | None = None) -> tuple[dict, dict[Key, Pos], set]:
    """One file (already read) and everything it extends, merged; plus the keys the file itself
    sets. `via` is the `extends:` that named this file (None for the file the user gave)."""
    data, positions = parse_yaml(text, source)
    _check_is_spec(data, positions, source, via)
    data = upgrade(data)
    _check_version(data, positions)
    own = set(data)
    if "extends" not in data:
        return data, positions, own
    ext = data.pop("extends")
    here = _locate(positions, ("extends",))
    if not isinstance(ext, str) or not ext.strip() or "\0" in ext:
        raise SpecError(Problem("extends", f"expected a relative path to a spec file, found {_show(ext)}", *here))
    try:
        parent = (base_dir / Path(ext).expanduser()).resolve()
    except (OSError, RuntimeError) as e:       # a name too long, a symlink loop
        raise SpecError(Problem("extends", f"cannot follow {_show(ext)}: {getattr(e, 'strerror', None) or e}",
                                *here)) from None
    if parent in chain:
        loop = chain[chain.index(parent):] + (parent,)
        root = os.path.commonpath([str(p.parent) for p in loop])   # short names for the chain
        cycle = " -> ".join(os.path.relpath(p, root) for p in loop)
        raise SpecError(Problem("extends", f"extends cycle: {cycle}", *here))
    via = Problem("extends", "", *here)
    pdata, ppos, _ = _load_layers(_read(parent, via), _display(parent), parent.parent, chain + (parent,), via)
    positions.pop(("extends",), None)
    return (*merge(pdata, data, ppos, positions), own)


# ------------------------------------------------------------------ overrides

def _members(ann) -> list:
    """Concrete alternatives of an annotation: Optional/Union/Annotated unwrapped, None dropped."""
    origin = get_origin(ann)
    if origin is Annotated:
        return _members(get_args(ann)[0])
    if origin is Union or origin is types.UnionType:
        return [m for a in get_args(ann) for m in _members(a)]
    return [] if ann is type(None) else [ann]


def _is_model(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    return {(f.alias or name): f for name, f in model.model_fields.items()}


def _child(anns: list, seg) -> list:
    """Annotations reached from `anns` by one path segment (empty: not a valid segment)."""
    out = []
    for a in anns:
        if _is_model(a):
            f = _fields(a).get(seg) if isinstance(seg, str) else None
            if f is not None:
                out += _members(f.annotation)
        elif get_origin(a) in (list, tuple) and isinstance(seg, int) and get_args(a):
            out += _members(get_args(a)[0])
        elif get_origin(a) is dict:
            out += _members(get_args(a)[1])
    return out


def _field_names(anns: list) -> list[str]:
    return [n for a in anns if _is_model(a) for n in _fields(a)]


def _parse_key(key: str) -> list:
    """"cells.encoder.scales[1]" or "cells.encoder.scales.1" -> ["cells", "encoder", "scales", 1]."""
    segs: list = []
    for part in key.replace("[", ".").replace("]", "").split("."):
        if part == "":
            raise ValueError(f"malformed field path '{key}'")
        segs.append(int(part) if re.fullmatch(r"-?\d+", part) else part)
    return segs


_DEFAULTS: dict | None = None


def _default_at(path: list) -> Any:
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = Spec().model_dump(mode="json", by_alias=True)
    cur: Any = _DEFAULTS
    for seg in path:
        try:
            cur = cur[seg]
        except (KeyError, IndexError, TypeError):
            return None
    return copy.deepcopy(cur)


def apply_override(doc: dict, positions: dict[Key, Pos], item: str) -> Problem | None:
    """Apply one `a.b.c=value` to `doc` in place; a Problem (not raised) if it cannot be."""
    label = f"--set {item}" if len(item) <= 80 else f"--set {item[:77]}..."
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key:
        return Problem("", "expected --set FIELD=VALUE, e.g. --set train.epochs=5", label)
    try:
        segs = _parse_key(key)
    except ValueError as e:
        return Problem(key, str(e), label)
    try:
        value, _ = parse_yaml(raw, label)
    except SpecError as e:
        return Problem(key, f"cannot parse the value: {e.problems[0].message}", label)

    # The path must exist in the schema, whatever the document happens to contain.
    anns: list = [Spec]
    for i, seg in enumerate(segs):
        nxt = _child(anns, seg)
        if not nxt:
            here = format_path(segs[:i]) or "the spec"
            names = _field_names(anns)
            if names:
                return Problem(format_path(segs), f"unknown field '{seg}' in {here}", label,
                               hint=did_you_mean(str(seg), names) or f"fields: {', '.join(names)}")
            return Problem(format_path(segs), f"{here} has no field '{seg}'", label)
        anns = nxt

    cur: Any = doc
    for i, seg in enumerate(segs[:-1]):
        nxt_seg = segs[i + 1]
        if isinstance(cur, dict):
            if not isinstance(cur.get(seg), (dict, list)):
                # Absent or null parent (e.g. attention.inference: null): start from its
                # default list when indexing, or an empty mapping the schema fills in.
                cur[seg] = _default_at(segs[:i + 1]) if isinstance(nxt_seg, int) else {}
                if cur[seg] is None:
                    return Problem(format_path(segs), f"{format_path(segs[:i + 1])} is not set; set the whole list", label)
            cur = cur[seg]
        elif isinstance(cur, list) and isinstance(seg, int) and -len(cur) <= seg < len(cur):
            if not isinstance(cur[seg], (dict, list)):
                cur[seg] = {}
            cur = cur[seg]
        else:
            return Problem(format_path(segs), f"cannot set inside {format_path(segs[:i + 1])}", label)
    last = segs[-1]
    if isinstance(cur, list):
        if not (isinstance(last, int) and -len(cur) <= last < len(cur)):
            return Problem(format_path(segs), f"index {last} out of range (the list has {len(cur)} items)", label)
        cur[last] = value
    elif isinstance(cur, dict):
        cur[last] = value
    else:
        return Problem(format_path(segs), f"cannot set inside {format_path(segs[:-1])}", label)

    # Whatever this path held before came from a file; now it comes from the flag.
    target = tuple(segs)
    for p in [p for p in positions if p[:len(target)] == target]:
        del positions[p]
    for i in range(1, len(target) + 1):
        positions.setdefault(target[:i], (label, None, None))
    return None


# ----------------------------------------------------------------- validation

def _show(v: Any) -> str:
    """A value as the user wrote it in YAML, briefly."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return ".nan" if math.isnan(v) else ".inf" if v > 0 else "-.inf"      # as YAML spells them
    if isinstance(v, str):
        text = json.dumps(v, ensure_ascii=False)
    elif isinstance(v, dict):
        text = "a mapping " + json.dumps(v, ensure_ascii=False, default=str)
    else:
        text = json.dumps(v, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _tag_of(ann) -> str | None:
    return ann.__name__ if isinstance(ann, type) else None


def _clean_loc(loc: tuple) -> tuple[Key, tuple | None, list[str]]:
    """Split a pydantic error location into the document path, the first union alternative
    it went through (pydantic inserts tags like "LastK", "literal['all']" or a
    discriminator value) as (path, tag, model or None), and the field names valid at an
    unknown last key."""
    anns: list = [Spec]
    path: list = []
    union_at = None
    names: list[str] = []
    for seg in loc:
        if seg == "[key]":                    # the error is about a dict key, not its value
            continue
        nxt = _child(anns, seg)
        if nxt:
            path.append(seg)
            anns = nxt
            continue
        tagged = [a for a in anns if _tag_of(a) == seg or (
            _is_model(a) and "kind" in a.model_fields and a.model_fields["kind"].default == seg)]
        if tagged or (len(anns) > 1 and isinstance(seg, str)):
            if union_at is None:
                union_at = (tuple(path), str(seg), tagged[0] if tagged and _is_model(tagged[0]) else None)
            anns = tagged or [a for a in anns if not _is_model(a)]
            continue
        names = _field_names(anns)            # an unknown key: nothing below it
        path.append(seg)
        anns = []
    return tuple(path), union_at, names


def _expected(msg: str) -> str:
    msg = msg.replace("Input should be an object", "Input should be a mapping")
    return re.sub(r"^Input should be ", "expected ", msg)


def _problems(err: ValidationError, positions: dict[Key, Pos]) -> list[Problem]:
    entries = [(e, *_clean_loc(e["loc"])) for e in err.errors(include_url=False)]
    index = _index(positions)

    # A value that fits no alternative of a union produces one error per alternative. Keep
    # the alternative the user evidently meant (the one that got furthest with fewest
    # errors); if none got past the type check, say once what the alternatives are.
    keep: list = []
    unions: dict[Key, dict[str, list]] = {}
    for entry in entries:
        if entry[2] is None:
            keep.append(entry)
        else:
            unions.setdefault(entry[2][0], {}).setdefault(entry[2][1:], []).append(entry)
    combined: list[Problem] = []
    for prefix, by_tag in unions.items():
        deep = {t: es for t, es in by_tag.items() if any(e[1] != prefix for e in es)}
        if deep:
            keep += min(deep.values(), key=len)
            continue
        alts = []
        for (_, model), es in by_tag.items():
            alts.append("{" + ", ".join(f"{n}: ..." for n in _fields(model)) + "}" if model
                        else _expected(es[0][0]["msg"]).removeprefix("expected "))
        found = by_tag[next(iter(by_tag))][0][0].get("input")
        combined.append(Problem(format_path(prefix), f"expected {' or '.join(alts)}, found {_show(found)}",
                                *_find(index, prefix)))

    out: list[Problem] = []
    for e, path, _, names in keep:
        kind, where = e["type"], _find(index, path)
        if kind == "missing":
            out.append(Problem(format_path(path), "required field missing", *where))
        elif kind == "extra_forbidden":
            word = str(path[-1])
            guess = did_you_mean(word, names) if len(out) < 1000 else None   # difflib is slow; few are read
            out.append(Problem(format_path(path), f"unknown field '{word}'", *where,
                               hint=guess or (f"fields: {', '.join(names)}" if names else None)))
        elif kind == "union_tag_invalid":
            tags = " or ".join(str(e.get("ctx", {}).get("expected_tags", "")).rsplit(", ", 1))
            tag_path = path + (str(e.get("ctx", {}).get("discriminator", "kind")).strip("'"),)
            out.append(Problem(format_path(tag_path), f"expected {tags}, found {_show(e.get('ctx', {}).get('tag'))}",
                               *_find(index, tag_path)))
        elif kind == "union_tag_not_found":
            field = str(e.get("ctx", {}).get("discriminator", "kind")).strip("'")
            out.append(Problem(format_path(path), f"'{field}' is required here, found {_show(e.get('input'))}", *where,
                               hint=f"add {field}: ..."))
        elif kind == "string_pattern_mismatch" and path == ("name",):
            out.append(Problem("name", f"expected letters, digits, '_', '.' or '-' only (the name becomes a run "
                                       f"directory), found {_show(e.get('input'))}", *where,
                               hint="replace spaces with '_'"))
        elif kind == "value_error":
            out.append(Problem(format_path(path), e["msg"].removeprefix("Value error, "), *where))
        else:
            out.append(Problem(format_path(path), f"{_expected(e['msg'])}, found {_show(e.get('input'))}", *where))
    out += combined
    unique = {(p.path, p.message): p for p in out}     # union branches can repeat an error
    return sorted(unique.values(), key=Problem.sort_key)


def _jsonable(v: Any) -> Any:
    # YAML can produce dates, sets and bytes; the schema only has JSON types.
    if isinstance(v, (datetime.date, datetime.datetime)):
        return v.isoformat()
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=str)
    return str(v)


def _finish(doc: dict, positions: dict[Key, Pos], overrides: Iterable[str], path: Path | None) -> ResolvedSpec:
    problems = [p for item in overrides if (p := apply_override(doc, positions, item)) is not None]
    try:
        # Strict JSON-mode validation: "5" is not an integer and 1 is not true, but YAML
        # lists are accepted for tuples and integers for floats.
        text = json.dumps(doc, default=_jsonable, ensure_ascii=False)
        spec = Spec.model_validate_json(text, strict=True)
    except ValidationError as err:
        raise SpecError(problems + _problems(err, positions)) from None
    if problems:
        raise SpecError(problems)
    document = spec.model_dump(mode="json", by_alias=True)
    return ResolvedSpec(spec, document, path, positions, document_hash(document))


def _stem_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", path.stem)[:128]
    return "model" if name in ("", ".", "..") else name


# ------------------------------------------------------------------ public API

def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> ResolvedSpec:
    """Load a spec file: extends, upgrade, `--set` overrides, validation. Raises SpecError.
    `name` defaults to the file's stem (it is not inherited through extends)."""
    path = Path(path).expanduser()
    full = path.resolve()
    text = _read(full, None)
    return load_text(text, _display(full), overrides=overrides, base_dir=full.parent,
                     default_name=_stem_name(path), path=path, _chain=(full,))


def load_text(text: str, source: str = "<string>", overrides: Iterable[str] = (), base_dir: str | Path = ".",
              default_name: str | None = None, path: Path | None = None, _chain: tuple = ()) -> ResolvedSpec:
    """Load a spec from YAML text; `extends` paths are relative to `base_dir`."""
    doc, positions, own = _load_layers(text, source, Path(base_dir).resolve(), _chain)
    if default_name and "name" not in own:      # a derived spec is its own run, not its parent's
        doc["name"] = default_name
    return _finish(doc, positions, overrides, path)


def load_document(document: dict, overrides: Iterable[str] = (), source: str = "<document>",
                  path: Path | None = None) -> ResolvedSpec:
    """Validate an already-plain document (e.g. the spec saved in a checkpoint or run dir).
    `extends` is not followed: a saved document is already resolved."""
    if not isinstance(document, dict):
        raise SpecError(Problem("", f"a spec must be a mapping of fields, found {_show(document)}", source))
    doc = upgrade(copy.deepcopy(document))
    positions: dict[Key, Pos] = {(): (source, None, None)}
    _check_version(doc, positions)
    return _finish(doc, positions, overrides, path)
