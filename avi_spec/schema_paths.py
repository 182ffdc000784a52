"""Paths in a spec document: which schema annotations a path such as
("cells", "encoder", "scales", 1) reaches (for --set, the merge of `extends` and pydantic's
error locations), and which file, line and column the user wrote it at."""
from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

from .yaml_io import Key, Pos


def members(ann) -> list:
    """Concrete alternatives of an annotation: Optional/Union/Annotated unwrapped, None dropped."""
    origin = get_origin(ann)
    if origin is Annotated:
        return members(get_args(ann)[0])
    if origin is Union or origin is types.UnionType:
        return [m for a in get_args(ann) for m in members(a)]
    return [] if ann is type(None) else [ann]


def is_model(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def fields_by_name(model: type[BaseModel]) -> dict[str, Any]:
    return {(f.alias or name): f for name, f in model.model_fields.items()}


def child(anns: list, seg) -> list:
    """Annotations reached from `anns` by one path segment (empty: not a valid segment)."""
    out = []
    for a in anns:
        if is_model(a):
            f = fields_by_name(a).get(seg) if isinstance(seg, str) else None
            if f is not None:
                out += members(f.annotation)
        elif get_origin(a) in (list, tuple) and isinstance(seg, int) and get_args(a):
            out += members(get_args(a)[0])
        elif get_origin(a) is dict:
            out += members(get_args(a)[1])
    return out


def field_names(anns: list) -> list[str]:
    return [n for a in anns if is_model(a) for n in fields_by_name(a)]


def tag_of(ann) -> str | None:
    return ann.__name__ if isinstance(ann, type) else None


def index_positions(positions: dict[Key, Pos]) -> dict[Key, Pos]:
    # pydantic reports dict keys as strings ("3") where YAML gave ints (3): compare as text.
    # Built once per batch of lookups: rebuilding it per problem made 10,000 problems take 50 s.
    return {tuple(map(str, k)): v for k, v in positions.items()}


def find_position(index: dict[Key, Pos], path: Key) -> Pos:
    for i in range(len(path), -1, -1):
        hit = index.get(tuple(map(str, path[:i])))
        if hit:
            return hit
    return ("<spec>", None, None)


def locate(positions: dict[Key, Pos], path: Key) -> Pos:
    return find_position(index_positions(positions), path)
