"""pydantic's validation errors -> Problems a user can act on: the document path, the file and
line it was written at, what was expected and what was found, one problem per mistake (not
one per alternative of a union)."""
from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import ValidationError

from .errors import Problem, did_you_mean, format_path
from .schema import Spec
from .schema_paths import child, field_names, fields_by_name, find_position, index_positions, is_model, tag_of
from .yaml_io import Key, Pos


def show_value(v: Any) -> str:
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
        nxt = child(anns, seg)
        if nxt:
            path.append(seg)
            anns = nxt
            continue
        tagged = [a for a in anns if tag_of(a) == seg or (
            is_model(a) and "kind" in a.model_fields and a.model_fields["kind"].default == seg)]
        if tagged or (len(anns) > 1 and isinstance(seg, str)):
            if union_at is None:
                union_at = (tuple(path), str(seg), tagged[0] if tagged and is_model(tagged[0]) else None)
            anns = tagged or [a for a in anns if not is_model(a)]
            continue
        names = field_names(anns)            # an unknown key: nothing below it
        path.append(seg)
        anns = []
    return tuple(path), union_at, names


def _expected(msg: str) -> str:
    msg = msg.replace("Input should be an object", "Input should be a mapping")
    return re.sub(r"^Input should be ", "expected ", msg)


def problems_of(err: ValidationError, positions: dict[Key, Pos]) -> list[Problem]:
    """Every error of `err` as a Problem at the file and line of its path, sorted, repeats dropped."""
    entries = [(e, *_clean_loc(e["loc"])) for e in err.errors(include_url=False)]
    index = index_positions(positions)
    keep, combined = _one_alternative_per_union(entries, index)
    out: list[Problem] = []
    for e, path, _, names in keep:
        suggest = len(out) < 1000                # difflib is slow; few are read
        out.append(_problem(e, path, names, index, suggest))
    out += combined
    unique = {(p.path, p.message): p for p in out}     # union branches can repeat an error
    return sorted(unique.values(), key=Problem.sort_key)


def _one_alternative_per_union(entries: list, index: dict) -> tuple[list, list[Problem]]:
    """A value that fits no alternative of a union produces one error per alternative. Keep
    the alternative the user evidently meant (the one that got furthest with fewest errors);
    if none got past the type check, say once what the alternatives are. Returns the entries
    kept and the problems that replace the others."""
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
            alts.append("{" + ", ".join(f"{n}: ..." for n in fields_by_name(model)) + "}" if model
                        else _expected(es[0][0]["msg"]).removeprefix("expected "))
        found = by_tag[next(iter(by_tag))][0][0].get("input")
        combined.append(Problem(format_path(prefix), f"expected {' or '.join(alts)}, found {show_value(found)}",
                                *find_position(index, prefix)))
    return keep, combined


def _problem(e: dict, path: Key, names: list[str], index: dict, suggest: bool) -> Problem:
    """One pydantic error at `path` in words; `names` are the fields valid at an unknown key."""
    kind, where = e["type"], find_position(index, path)
    ctx = e.get("ctx", {})
    if kind == "missing":
        return Problem(format_path(path), "required field missing", *where)
    if kind == "extra_forbidden":
        word = str(path[-1])
        guess = did_you_mean(word, names) if suggest else None
        return Problem(format_path(path), f"unknown field '{word}'", *where,
                       hint=guess or (f"fields: {', '.join(names)}" if names else None))
    if kind == "union_tag_invalid":
        tags = " or ".join(str(ctx.get("expected_tags", "")).rsplit(", ", 1))
        tag_path = path + (str(ctx.get("discriminator", "kind")).strip("'"),)
        return Problem(format_path(tag_path), f"expected {tags}, found {show_value(ctx.get('tag'))}",
                       *find_position(index, tag_path))
    if kind == "union_tag_not_found":
        field = str(ctx.get("discriminator", "kind")).strip("'")
        return Problem(format_path(path), f"'{field}' is required here, found {show_value(e.get('input'))}", *where,
                       hint=f"add {field}: ...")
    if kind == "string_pattern_mismatch" and path == ("name",):
        return Problem("name", f"expected letters, digits, '_', '.' or '-' only (the name becomes a run "
                               f"directory), found {show_value(e.get('input'))}", *where,
                       hint="replace spaces with '_'")
    if kind == "value_error":
        return Problem(format_path(path), e["msg"].removeprefix("Value error, "), *where)
    return Problem(format_path(path), f"{_expected(e['msg'])}, found {show_value(e.get('input'))}", *where)
