"""`--set FIELD=VALUE`: one field of a spec document replaced before validation. The path must
exist in the schema (whatever the document holds); the value is YAML; the positions of what it
replaces now point at the flag."""
from __future__ import annotations

import copy
import re
from typing import Any

from .errors import Problem, SpecError, did_you_mean, format_path
from .schema import Spec
from .schema_paths import child, field_names
from .yaml_io import Key, Pos, parse_yaml


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
    problem = _check_schema_path(segs, label) or _set_value(doc, segs, value, label)
    if problem is None:
        _positions_from_flag(positions, tuple(segs), label)
    return problem


def _check_schema_path(segs: list, label: str) -> Problem | None:
    """The path must exist in the schema, whatever the document happens to contain."""
    anns: list = [Spec]
    for i, seg in enumerate(segs):
        nxt = child(anns, seg)
        if not nxt:
            here = format_path(segs[:i]) or "the spec"
            names = field_names(anns)
            if names:
                return Problem(format_path(segs), f"unknown field '{seg}' in {here}", label,
                               hint=did_you_mean(str(seg), names) or f"fields: {', '.join(names)}")
            return Problem(format_path(segs), f"{here} has no field '{seg}'", label)
        anns = nxt
    return None


def _set_value(doc: dict, segs: list, value: Any, label: str) -> Problem | None:
    """doc[segs[0]][segs[1]]... = value, making the parents it needs."""
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
    return None


def _positions_from_flag(positions: dict[Key, Pos], target: Key, label: str) -> None:
    """Whatever this path held before came from a file; now it comes from the flag."""
    for p in [p for p in positions if p[:len(target)] == target]:
        del positions[p]
    for i in range(1, len(target) + 1):
        positions.setdefault(target[:i], (label, None, None))
