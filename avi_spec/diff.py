"""How specs differ: the fields that change and the attention edges that appear or vanish.

`diff_specs` compares fully resolved specs (defaults included, so stating a default and
leaving it out are the same spec) and returns plain data (`avi diff --json` prints it as is);
`render` prints it as a table with one column per spec (fields as rows); `render_switches`
prints the compact view of Table 5 of the paper: one row per spec, one column per switch that
differs, then the parameter count and the results of runs. Parameter counts and results come
from the caller (building a model needs torch, which avi_spec never imports): `parameters` and
`results`, one entry per spec; other rows go in `extra_rows`; the paired comparisons of runs
(builders.evaluation.paired.compare_runs) in result["paired"].
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import literal
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


def changed_fields(documents: list[dict], every_field: bool = False) -> list[dict]:
    """{"path", "values"} for every leaf that differs across resolved documents; `avi diff`
    leaves out name and description (every_field=False), a resume check keeps them."""
    out: list[dict] = []
    _flatten_diff(documents, "", out, () if every_field else IGNORED)
    return out


def _flatten_diff(values: list[Any], prefix: str, out: list[dict], skip=IGNORED) -> None:
    """Append {"path", "values"} for every leaf below `prefix` that differs across `values`.
    Where some specs have a mapping and others do not (e.g. an attention switched off with
    null, or `sources: all` against `{last: 4}`), the whole field is one row."""
    if all(isinstance(v, dict) for v in values):
        keys: list[str] = []
        for v in values:
            keys.extend(k for k in v if k not in keys)
        for k in sorted(keys, key=lambda k: _natural(str(k))):
            if not prefix and k in skip:
                continue
            sub = [v.get(k, _MISSING) for v in values]
            path = f"{prefix}.{k}" if prefix else str(k)
            if any(s is _MISSING for s in sub):
                if len({json.dumps(s if s is not _MISSING else "<missing>", sort_keys=True, default=str) for s in sub}) > 1:
                    out.append({"path": path, "values": [None if s is _MISSING else s for s in sub]})
                continue
            _flatten_diff(sub, path, out, skip)
        return
    canon = {json.dumps(v, sort_keys=True, default=str) for v in values}
    if len(canon) > 1:
        out.append({"path": prefix, "values": list(values)})


def diff_specs(resolved_list: list[Any], extra_rows: dict[str, list] | None = None,
               parameters: list[int | None] | None = None, results: list[dict | None] | None = None) -> dict:
    """Compare resolved specs (loader.ResolvedSpec, Spec or plain dicts).

    Returns {"names": [...], "fields": [{"path", "values"}], "switches": [{"column", "paths",
    "values"}], "edges": {"added", "removed", "per_spec", "counts"}, "parameters": [...],
    "results": [...], "extra": {row: values}, "same": bool}. Attention edges are [src, dst,
    path] triples; `added`/`removed` are relative to the first spec (with more than two specs,
    the union over the others, and `per_spec[i]` says which spec i adds or removes); `counts[i]`
    is {"generative": n, "inference": m} for spec i. `switches` groups the differing fields
    into the short columns of the Table-5 view. `parameters` and `results` are passed through
    (one entry per spec, None where unknown); they do not make specs differ.
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
    fields = changed_fields(docs)

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
    counts = [{p: sum(1 for e in es if e[2] == p) for p in ("generative", "inference")} for es in edge_sets]
    extra = {k: list(v) for k, v in (extra_rows or {}).items()}
    n = len(specs)
    return {
        "names": names,
        "fields": fields,
        "switches": switches(fields),
        "edges": {"added": [list(e) for e in sorted(added, key=key)],
                  "removed": [list(e) for e in sorted(removed, key=key)],
                  "per_spec": per_spec,
                  "counts": counts},
        "parameters": _per_spec(parameters, n),
        "results": _per_spec(results, n),
        "extra": extra,
        "same": not fields and not added and not removed,
    }


def _per_spec(values: list | None, n: int) -> list:
    values = list(values or [])
    return (values + [None] * n)[:n]


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _short(path: str) -> str:
    """The last two segments of a field path: "cells.decoder.nonlocal" -> "decoder.nonlocal"."""
    return ".".join(path.split(".")[-2:])


def switches(fields: list[dict]) -> list[dict]:
    """The differing fields as the columns of the Table-5 view: fields that end in the same
    name and differ in the same way across every spec (the non-local blocks of the
    preprocessing, encoder and decoder cells switched together) share one column."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for f in fields:
        last = f["path"].split(".")[-1]
        groups.setdefault((last, _canon(f["values"])), []).append(f)
    out = []
    for (last, _), fs in groups.items():
        if len(fs) == 1:
            column = _short(fs[0]["path"])
        else:
            parents = [f["path"].split(".")[-2] if "." in f["path"] else f["path"] for f in fs]
            column = f"{'/'.join(parents)}.{last}"
        out.append({"column": column, "paths": [f["path"] for f in fs], "values": fs[0]["values"]})
    return out


def switch_cell(v: Any) -> str:
    """A switch value, briefly: an attention or non-local block as on/off and its key size."""
    if v is None:
        return "off"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, dict):
        if "key_dim" in v:
            return f"on k={v['key_dim']}"
        text = ", ".join(f"{k}={switch_cell(x) if isinstance(x, (dict, type(None))) else _cell(x)}" for k, x in v.items())
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]" if len(v) <= 8 else f"[{len(v)} items]"
    return str(v)


def result_value(res: dict | None) -> tuple[str, float] | None:
    """(metric, value) a run's results are compared by: bits/dim for 8-bit data, else the
    negative log-likelihood in nats (the caller sets `metric`; lowest is best)."""
    if not isinstance(res, dict):
        return None
    metric = res.get("metric")
    if metric not in ("bits_per_dim", "nll_nats"):
        metric = "bits_per_dim" if isinstance(res.get("bits_per_dim"), (int, float)) else "nll_nats"
    v = res.get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return metric, float(v)


METRIC_LABEL = {"bits_per_dim": "bits/dim", "nll_nats": "NLL (nats)"}


def _result_text(res: dict, metric: str, value: float) -> str:
    err = res.get("nll_stderr_nats")
    if not isinstance(err, (int, float)) or isinstance(err, bool) or err <= 0:
        return f"{value:.4f}" if metric == "bits_per_dim" else f"{value:.2f}"
    if metric == "bits_per_dim":
        nats = res.get("nll_nats")
        if isinstance(nats, (int, float)) and nats:
            return f"{value:.4f} ± {err * value / nats:.4f}"
        return f"{value:.4f}"
    return f"{value:.2f} ± {err:.2f}"


def _params_text(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else "-"


def _literal_text(text, *args, keep_newlines: bool = False, **kwargs):
    """rich's Text (never markup) of ``text`` with its control characters escaped: names,
    paths and every field of an eval.json reach the terminal as text, never as a sequence."""
    from rich.text import Text
    return Text(literal(str(text), keep_newlines), *args, **kwargs)


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict) and "key_dim" in v:     # an attention or non-local block
        extra = "".join(f", {k}={_cell(v[k])}" for k in ("layer_norm", "sources") if k in v)
        return f"on k={v['key_dim']} q={v.get('query_dim', v['key_dim'])}{extra}"
    if isinstance(v, (dict, list)):
        text = json.dumps(v, separators=(", ", ": "), default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return literal(str(v))


def render(result: dict, console: Any = None, extra_rows: dict[str, list] | None = None,
           max_edges: int = 24) -> None:
    """Print a diff as a rich table: one row per differing field, one per attention edge that
    not every spec has, then any extra rows (parameters, results), one column per spec."""
    from rich.console import Console
    from rich.table import Table
    Text = _literal_text

    console = console or Console()
    names = result["names"]
    table = Table(title="spec diff" if len(names) > 1 else Text(literal(names[0])), show_lines=False)
    table.add_column("field", style="bold", overflow="fold")
    for n in names:
        table.add_column(Text(literal(n)), overflow="fold")

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

    params = result.get("parameters") or []
    runs = result.get("results") or []
    extra = dict(result.get("extra") or {})
    extra.update(extra_rows or {})
    if any(p is not None for p in params) or any(r is not None for r in runs) or extra:
        table.add_section()
    if any(p is not None for p in params):
        table.add_row(Text("parameters"), *[Text(_params_text(v)) for v in _per_spec(params, len(names))])
    for metric, cells in _result_columns(runs, len(names)).items():
        table.add_row(Text(METRIC_LABEL[metric]), *cells)
    evaluated = _evaluated(runs, len(names))
    if evaluated:
        table.add_row(Text("evaluated"), *[Text(v, style="dim") for v in evaluated])
    for label, cells in _paired_columns(result.get("paired"), names).items():
        table.add_row(Text(label), *cells)
    for label, values in extra.items():
        vals = list(values) + [None] * (len(names) - len(values))
        table.add_row(Text(label), *[Text(_cell(v)) for v in vals[:len(names)]])

    # Columns wrap between words, never inside one (a piped table is 80 columns wide: a
    # value column squeezed below "layer_norm=yes," split it as "layer_norm=ye / s,").
    for column in table.columns:
        column.min_width = _longest_word([column.header, *column.cells])
    console.print(table)
    _print_paired_notes(result.get("paired"), names, console)
    _print_summary(result, console)


def _longest_word(texts: list) -> int:
    """The width of the longest word of some table cells (rich Texts or strings; at least 1)."""
    return max([len(w) for t in texts for w in getattr(t, "plain", str(t)).split()] + [1])


def _result_columns(runs: list, n: int) -> dict[str, list]:
    """{metric: one rich Text per spec}, the lowest value of each metric in bold green."""
    Text = _literal_text

    values = [result_value(r) for r in _per_spec(runs, n)]
    out: dict[str, list] = {}
    for metric in ("bits_per_dim", "nll_nats"):
        mine = [v[1] if v and v[0] == metric else None for v in values]
        present = [v for v in mine if v is not None]
        if not present:
            continue
        best = min(present)
        cells = []
        for r, v in zip(_per_spec(runs, n), mine):
            if v is None:
                cells.append(Text("-", style="dim"))
            else:
                cells.append(Text(_result_text(r, metric, v),
                                  style="bold green" if v == best and len(present) > 1 else ""))
        out[metric] = cells
    return out


def _evaluated(runs: list, n: int) -> list[str]:
    """What each run's result was computed on ("test, K=500, 10000 images"), [] if unknown."""
    cells = [r.get("evaluated") if isinstance(r, dict) else None for r in _per_spec(runs, n)]
    return [c or "-" for c in cells] if any(cells) else []


PAIRED_UNIT = {"bits_per_dim": "bits/dim", "nats": "nats"}


def _paired_columns(paired: dict | None, names: list[str]) -> dict[str, list]:
    """{"Δ NLL (unit)": cells, "Δ -ELBO (unit)": cells} of the paired comparisons: the mean
    difference from the reference ± its standard error [95% interval], * where the interval
    excludes 0; "reference" for the reference, "not paired" (why: below the table) elsewhere."""
    Text = _literal_text

    if not paired:
        return {}
    comparisons = _per_spec(paired.get("comparisons"), len(names))
    done = [c for c in comparisons if c and c.get("paired")]
    unit = PAIRED_UNIT.get(done[0]["unit"], done[0]["unit"]) if done else ""
    columns = {}
    for key, label in (("nll", "Δ NLL"), ("nelbo", "Δ -ELBO")):
        cells = []
        for i, c in enumerate(comparisons):
            if i == paired.get("baseline"):
                cells.append(Text("reference", style="dim"))
            elif c and c.get("paired"):
                cells.append(_paired_cell(c[key], c["unit"]))
            else:
                cells.append(Text("not paired", style="dim"))
        columns[f"{label} ({unit})" if unit else label] = cells
    return columns


def _paired_cell(stats: dict, unit: str) -> Any:
    Text = _literal_text

    digits = 4 if unit == "bits_per_dim" else 2
    text = f"{stats['mean']:+.{digits}f}"
    if stats.get("stderr") is not None:
        text += f" ± {stats['stderr']:.{digits}f} [{stats['low']:+.{digits}f}, {stats['high']:+.{digits}f}]"
    return Text(text + (" *" if stats.get("significant") else "  "), style="bold" if stats.get("significant") else "")


def _print_paired_notes(paired: dict | None, names: list[str], console: Any) -> None:
    """Under the table: what Δ means, and per run what it was paired on or why it was not."""
    Text = _literal_text

    if not paired:
        return
    ref = names[paired.get("baseline", 0)]
    comparisons = _per_spec(paired.get("comparisons"), len(names))
    if any(c and c.get("paired") for c in comparisons):
        console.print(Text(f"Δ: paired difference from {ref} (the reference) on the same images: mean ± "
                           f"standard error [{round(100 * paired.get('confidence', 0.95))}% interval, Student's t]; "
                           f"* the interval excludes 0; negative: lower than {ref}.", style="dim"))
    for name, c in zip(names, comparisons):
        if c is None:
            continue
        if c.get("paired"):
            seed = c.get("binarization_seed")
            on = f"{c.get('split')}, K={c.get('importance_samples')}, {c.get('examples')} images"
            on += f", binarisation seed {seed}" if seed is not None else ""
            console.print(Text(f"{name}: paired with {ref} on {on}", style="dim"))
        else:
            console.print(Text(f"{name}: not paired with {ref}: {'; '.join(c.get('reasons') or ['unknown'])}"))


def render_switches(result: dict, console: Any = None) -> None:
    """Print the Table-5 view: one row per spec; columns: the switches that differ (short
    names), attention edges (generative / inference) when they differ, parameters, results."""
    from rich.console import Console
    from rich.table import Table
    Text = _literal_text

    console = console or Console()
    names = result["names"]
    n = len(names)
    table = Table(title="spec diff: the switches that differ", title_justify="left")
    sw = result.get("switches")
    if sw is None:
        sw = switches(result["fields"])
    counts = result["edges"].get("counts")
    edges_differ = bool(result["edges"]["added"] or result["edges"]["removed"]) and counts
    params = _per_spec(result.get("parameters"), n)
    show_params = any(p is not None for p in params)
    res_cols = _result_columns(result.get("results") or [], n)
    extra = dict(result.get("extra") or {})

    # Columns (header, cells, justify); headers may wrap, cells never do (min_width).
    columns: list[tuple[str, list, str]] = [("spec", [Text(x, style="bold") for x in names], "left")]
    columns += [(_header(s), [Text(switch_cell(v)) for v in s["values"]], "left") for s in sw]
    if edges_differ:
        columns.append(("edges G/I", [Text(f"{c['generative']}/{c['inference']}") for c in counts], "right"))
    if show_params:
        columns.append(("parameters", [Text(_params_text(p)) for p in params], "right"))
    columns += [(METRIC_LABEL[m], cells, "right") for m, cells in res_cols.items()]
    evaluated = _evaluated(result.get("results") or [], n)
    if evaluated:
        columns.append(("evaluated", [Text(v, style="dim") for v in evaluated], "left"))
    columns += [(label, cells, "right") for label, cells in _paired_columns(result.get("paired"), names).items()]
    columns += [(label, [Text(_cell(v)) for v in _per_spec(vals, n)], "right") for label, vals in extra.items()]
    for header, cells, justify in columns:
        words = [len(w) for w in header.split()]
        table.add_column(Text(header, keep_newlines=True), justify=justify, overflow="fold",
                         min_width=max([c.cell_len for c in cells] + words + [1]))
    for i in range(n):
        table.add_row(*[cells[i] for _, cells, _ in columns])
    console.print(table)
    for s in sw:
        if len(s["paths"]) > 1:
            console.print(Text(f"{_header(s)}: {', '.join(s['paths'])} (switched together)", style="dim"))
    _print_paired_notes(result.get("paired"), names, console)
    _print_summary(result, console)


def _header(switch: dict) -> str:
    """A column header on short lines: "attention.generative" -> "attention\ngenerative"; a
    group of fields -> "nonlocal\n(decoder, encoder, preprocess)"."""
    paths = switch["paths"]
    if len(paths) == 1:
        return "\n".join(_short(paths[0]).split("."))
    return f"{paths[0].split('.')[-1]} ×{len(paths)}"


def _print_summary(result: dict, console: Any) -> None:
    Text = _literal_text

    names, edges = result["names"], result["edges"]
    if result["same"]:
        console.print(Text("The specs are the same (fields and attention edges)."
                           if len(names) > 1 else "Nothing to compare."))
    else:
        console.print(Text(f"{len(result['fields'])} field(s) differ; attention edges: "
                           f"{len(edges['added'])} added, {len(edges['removed'])} removed "
                           f"relative to {names[0]}."))
