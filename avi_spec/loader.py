"""Spec files -> one validated, hashed document.

    text --(safe YAML, positions, no duplicate keys)--> per-file dict
         --(upgrade to the current version)--> --(extends: deep merge, child wins)-->
         --(--set overrides)--> --(pydantic, strict)--> ResolvedSpec

Every key and value keeps the file, line and column it came from, so that any later
problem (pydantic's or the graph validator's) can point at the line a user must edit.
Reading files and YAML within bounds is `yaml_io`'s job, a `--set` is `overrides`', and
pydantic's errors become problems at a line in `schema_errors`.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import ValidationError

from .errors import Problem, SpecError, did_you_mean, format_path
from .overrides import apply_override
from .schema import SPEC_VERSION, Folder, Spec
from .schema_errors import problems_of, show_value
from .schema_paths import child, field_names, fields_by_name, find_position, index_positions, is_model, locate
from .yaml_io import Key, Pos, display_path as _display, dump_yaml, parse_yaml, read_spec_text as _read

__all__ = ["ResolvedSpec", "load_spec", "load_text", "load_document", "format_path", "dump_yaml", "parse_yaml",
           "merge", "upgrade", "apply_override", "document_hash", "UPGRADES"]


# Fields added after runs were trained and hashed, with the value that reproduces the model
# those runs had: a document holding that value hashes as if the field did not exist, so
# existing checkpoints keep their hash (resume, `avi diff`, exported weights).
HASH_NEUTRAL_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("hierarchy", "scale"): "exp",
    ("train", "accumulate"): 1,
    ("train", "sync_batch_norm"): False,
    ("data", "folder"): Folder().model_dump(mode="json", by_alias=True),
}


def document_hash(document: dict) -> str:
    """sha256 of the canonical JSON of a resolved document: independent of key order, and of
    the fields of HASH_NEUTRAL_DEFAULTS where they hold the value older specs implied."""
    text = json.dumps(_without_neutral_defaults(document), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _without_neutral_defaults(document: dict) -> dict:
    out = copy.deepcopy(document)
    for path, default in HASH_NEUTRAL_DEFAULTS.items():
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node and node[path[-1]] == default \
                and type(node[path[-1]]) is type(default):
            del node[path[-1]]
    return out


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
            self._index = index_positions(self.positions)
        return find_position(self._index, tuple(path))

    def problem(self, path: Iterable, message: str, hint: str | None = None) -> Problem:
        """A Problem at `path`, located in the files (for graph-level validators)."""
        path = tuple(path)
        file, line, col = self.locate(path)
        return Problem(format_path(path), message, file, line, col, hint)


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
                                *locate(positions, ("version",)), hint="upgrade avi"))


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
            sub = child(anns, k) if isinstance(k, str) else []
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
    models = [a for a in anns if is_model(a)]
    if len(models) < 2:
        return None
    if any("kind" in m.model_fields for m in models):
        tagged = [m for m in models if "kind" in m.model_fields and m.model_fields["kind"].default == value.get("kind")]
        return tagged[0] if "kind" in value and len(tagged) == 1 else None
    fits = [m for m in models if value and set(map(str, value)) <= set(fields_by_name(m))]
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
    fields = field_names([Spec]) + ["extends"]
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
    here = locate(positions, ("extends",))
    if not isinstance(ext, str) or not ext.strip() or "\0" in ext:
        raise SpecError(Problem("extends", f"expected a relative path to a spec file, found {show_value(ext)}", *here))
    try:
        parent = (base_dir / Path(ext).expanduser()).resolve()
    except (OSError, RuntimeError) as e:       # a name too long, a symlink loop
        raise SpecError(Problem("extends", f"cannot follow {show_value(ext)}: {getattr(e, 'strerror', None) or e}",
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


def _jsonable(v: Any) -> Any:
    # YAML can produce dates, sets and bytes; the schema only has JSON types.
    if isinstance(v, (datetime.date, datetime.datetime)):
        return v.isoformat()
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=str)
    return str(v)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _not_unicode(node: Any, path: Key = ()) -> Iterable[Key]:
    """Paths of the keys and strings that hold lone surrogates: bytes that were not UTF-8,
    smuggled in as Python does with file names and arguments. JSON, YAML and the schema
    cannot carry them, so they are named here rather than failing the whole document."""
    if isinstance(node, str):
        if _SURROGATE.search(node):
            yield path
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from ([path + (k,)] if isinstance(k, str) and _SURROGATE.search(k)
                        else _not_unicode(v, path + (k,)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _not_unicode(v, path + (i,))


def _escaped(part: Any) -> Any:
    return part.encode("utf-8", "backslashreplace").decode() if isinstance(part, str) else part


def _finish(doc: dict, positions: dict[Key, Pos], overrides: Iterable[str], path: Path | None) -> ResolvedSpec:
    problems = [p for item in overrides if (p := apply_override(doc, positions, item)) is not None]
    undecodable = list(_not_unicode(doc))
    if undecodable:
        index = index_positions(positions)      # once: locate() per key rebuilds it per key
        raise SpecError(problems + [Problem(format_path(tuple(map(_escaped, k))), "expected text (Unicode), "
                                            "found bytes that are not UTF-8", *find_position(index, k))
                                    for k in undecodable])
    try:
        # Strict JSON-mode validation: "5" is not an integer and 1 is not true, but YAML
        # lists are accepted for tuples and integers for floats.
        text = json.dumps(doc, default=_jsonable, ensure_ascii=False)
        spec = Spec.model_validate_json(text, strict=True)
    except ValidationError as err:
        raise SpecError(problems + problems_of(err, positions)) from None
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
        raise SpecError(Problem("", f"a spec must be a mapping of fields, found {show_value(document)}", source))
    doc = upgrade(copy.deepcopy(document))
    positions: dict[Key, Pos] = {(): (source, None, None)}
    _check_version(doc, positions)
    return _finish(doc, positions, overrides, path)
