"""How specs differ: the fields that change and the attention edges that appear or vanish.

`diff_specs` compares fully resolved specs (defaults included, so stating a default and
leaving it out are the same spec) and returns plain data (`avi diff --json` prints it as is);
`render` prints it as a table with one column per spec, like Table 5 of the paper. Callers
with more to compare (parameter counts, results of runs) pass `extra_rows`, one value per spec.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .graph import _natural, attention_edges, build_graph
from .schema import Spec

IGNORED = ("name", "description")
_MISSING = object()


def _spec_of(item: Any) -> Spec:
    if isinstance(item, Spec):
        return item
    if isinstance(item, dict):
        return Spec.model_validate(item)
    return item.spec


def _name_of(item: Any, spec: Spec, i: int) -> str:
    path = getattr(item, "path", None)
    if spec.name and spec.name != "model":
        return spec.name
    if path:
        return Path(str(path)).stem
    return spec.name or f"spec{i}"


def _document_of(item: Any, spec: Spec) -> dict:
    """The resolved document with every default filled in (the validated spec, dumped)."""
    return spec.model_dump(mode="json", by_alias=True)


def _flatten_diff(values: list[Any], prefix: str, out: list[dict]) -> None:
    """Append {"path", "values"} for every leaf below `prefix` that differs across `values`.
    Where some specs have a mapping and others do not (e.g. an attention switched off with
    null, or `sources: all` against `{last: 4}`), the whole field is one row."""
    if all(isinstance(v, dict) for v in values):
        keys: list[str] = []
        for v in values:
            keys.extend(k for k in v if k not in keys)
        for k in sorted(keys, key=lambda k: _natural(str(k))):
            if not prefix and k in IGNORED:
                continue
            sub = [v.get(k, _MISSING) for v in values]
            path = f"{prefix}.{k}" if prefix else str(k)
            if any(s is _MISSING for s in sub):
                if len({json.dumps(s if s is not _MISSING else "<missing>", sort_keys=True, default=str) for s in sub}) > 1:
                    out.append({"path": path, "values": [None if s is _MISSING else s for s in sub]})
                continue
            _flatten_diff(sub, path, out)
        return
    canon = {json.dumps(v, sort_keys=True, default=str) for v in values}
    if len(canon) > 1:
        out.append({"path": prefix, "values": list(values)})


def diff_specs(resolved_list: list[Any], extra_rows: dict[str, list] | None = None) -> dict:
    """Compare resolved specs (loader.ResolvedSpec, Spec or plain dicts).

    Returns {"names": [...], "fields": [{"path", "values"}], "edges": {"added", "removed",
    "per_spec"}, "extra": {row: values}, "same": bool}. Attention edges are [src, dst, path]
    triples; `added`/`removed` are relative to the first spec (with more than two specs, the
    union over the others, and `per_spec[i]` says which spec i adds or removes).
    """
    if not resolved_list:
        raise ValueError("diff_specs needs at least one spec")
    specs = [_spec_of(r) for r in resolved_list]
    names = [_name_of(r, s, i) for i, (r, s) in enumerate(zip(resolved_list, specs))]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # columns need distinct headers
        if n in seen:
            names[i] = f"{n} ({i + 1})"
        seen.setdefault(n, i)
    docs = [_document_of(r, s) for r, s in zip(resolved_list, specs)]
    fields: list[dict] = []
    _flatten_diff(docs, "", fields)

    edge_sets = [set(attention_edges(build_graph(s))) for s in specs]
    key = lambda e: (e[2], _natural(e[1]), _natural(e[0]))  # noqa: E731
    first = edge_sets[0]
    per_spec = []
    added: set = set()
    removed: set = set()
    for es in edge_sets:
        a, r = es - first, first - es
        added |= a
        removed |= r
        per_spec.append({"added": [list(e) for e in sorted(a, key=key)],
                         "removed": [list(e) for e in sorted(r, key=key)]})
    extra = {k: list(v) for k, v in (extra_rows or {}).items()}
    return {
        "names": names,
        "fields": fields,
        "edges": {"added": [list(e) for e in sorted(added, key=key)],
                  "removed": [list(e) for e in sorted(removed, key=key)],
                  "per_spec": per_spec},
        "extra": extra,
        "same": not fields and not added and not removed,
    }


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (dict, list)):
        text = json.dumps(v, separators=(", ", ": "), default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(v)


def render(result: dict, console: Any = None, extra_rows: dict[str, list] | None = None,
           max_edges: int = 24) -> None:
    """Print a diff as a rich table: one row per differing field, one per attention edge that
    not every spec has, then any extra rows (parameters, results), one column per spec."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    names = result["names"]
    table = Table(title="spec diff" if len(names) > 1 else names[0], show_lines=False)
    table.add_column("field", style="bold", no_wrap=True)
    for n in names:
        table.add_column(Text(n), overflow="fold")

    for row in result["fields"]:
        table.add_row(Text(row["path"]), *[Text(_cell(v)) for v in row["values"]])

    edges = result["edges"]
    changed = edges["added"] + edges["removed"]
    if changed:
        table.add_section()
        first_has = {tuple(e) for e in edges["removed"]}  # edges of the first spec others lack
        ordered = sorted(changed, key=lambda e: (e[2], _natural(e[1]), _natural(e[0])))
        for e in ordered[:max_edges]:
            t = tuple(e)
            marks = []
            for i, ps in enumerate(edges["per_spec"]):
                if i == 0:
                    has = t in first_has
                elif t in first_has:
                    has = t not in {tuple(x) for x in ps["removed"]}
                else:
                    has = t in {tuple(x) for x in ps["added"]}
                marks.append(Text("✓" if has else "·", style="green" if has else "dim"))
            table.add_row(Text(f"{e[0]} → {e[1]} ({e[2]})"), *marks)
        if len(ordered) > max_edges:
            table.add_row(Text(f"... {len(ordered) - max_edges} more attention edges (--json lists all)"),
                          *[Text("") for _ in names])

    extra = dict(result.get("extra") or {})
    extra.update(extra_rows or {})
    if extra:
        table.add_section()
        for label, values in extra.items():
            vals = list(values) + [None] * (len(names) - len(values))
            table.add_row(Text(label), *[Text(_cell(v)) for v in vals[:len(names)]])

    console.print(table)
    if result["same"]:
        console.print(Text("The specs are the same (fields and attention edges)."
                           if len(names) > 1 else "Nothing to compare."))
    else:
        console.print(Text(f"{len(result['fields'])} field(s) differ; attention edges: "
                           f"{len(edges['added'])} added, {len(edges['removed'])} removed "
                           f"relative to {names[0]}."))
