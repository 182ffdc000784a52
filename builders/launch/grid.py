"""The runs of a sweep: every spec times every point of the grid (`--grid FIELD=V1,V2`,
repeatable: the product), with the `--set` overrides of all runs, each resolved and validated
before anything is submitted.

A grid point is a list of `--set FIELD=VALUE` overrides, so a bad field or value is the spec
error `avi validate --set` gives (file, line, field), here naming the `--grid` flag. Each run
gets a name that tells it apart (the spec's name, then the last part of each grid field and
its value: quickstart_seed0); the run's spec carries that name, so `avi diff` shows it. Two
runs with the same name are a clash: an error, not a silently shared run directory.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from avi_spec import Problem, ResolvedSpec, SpecError, load_spec
from avi_spec.validate import validate


@dataclass
class Run:
    """One run of a sweep: its name (and run directory DIR/<name>), the spec file it comes
    from, its grid point {field: value text} and the resolved, validated spec."""
    name: str
    source: str
    grid: dict[str, str]
    resolved: ResolvedSpec = field(repr=False)


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`FIELD=V1,V2,...` -> (FIELD, [V1, V2, ...]). Values are YAML like --set's; a comma
    inside brackets belongs to the value (`--grid cells.encoder.scales=[0,0],[1,1]`)."""
    grid, problems = [], []
    for item in items:
        key, eq, raw = item.partition("=")
        values = _split_values(raw)
        if not eq or not key.strip() or not values or any(not v.strip() for v in values):
            problems.append(Problem("", "expected --grid FIELD=V1,V2,... e.g. --grid train.seed=0,1",
                                    f"--grid {item}"))
            continue
        if key.strip() in (k for k, _ in grid):
            problems.append(Problem(key.strip(), "given twice; put all its values in one --grid",
                                    f"--grid {item}"))
            continue
        grid.append((key.strip(), [v.strip() for v in values]))
    if problems:
        raise SpecError(problems)
    return grid


def _split_values(raw: str) -> list[str]:
    values, depth, cur = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(cur)
            cur = ""
        else:
            cur += ch
    return values + [cur] if raw else []


def expand(specs: list[str], grid_items: list[str], overrides: list[str]) -> list[Run]:
    """Every (spec, grid point) resolved with its overrides and validated; raises SpecError
    with the problems of all of them (nothing is half-expanded)."""
    grid = parse_grid(grid_items)
    points = [dict(zip([k for k, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]
    runs, problems = [], []
    for spec in specs:
        for point in points:
            try:
                runs.append(_resolve(spec, point, overrides, grid_items))
            except SpecError as e:
                problems += [p for p in e.problems if p not in problems]
    problems += _clashes(runs)
    if problems:
        raise SpecError(problems)
    return runs


def _resolve(spec: str, point: dict[str, str], overrides: list[str], grid_items: list[str]) -> Run:
    sets = list(overrides) + [f"{k}={v}" for k, v in point.items()]
    try:
        base = load_spec(spec, sets)
    except SpecError as e:
        raise SpecError([_name_grid_flag(p, point, grid_items) for p in e.problems]) from None
    name = run_name(base.document["name"], point)
    resolved = load_spec(spec, sets + [f"name={name}"]) if name != base.document["name"] else base
    problems = validate(resolved)
    if problems:
        raise SpecError(problems)
    return Run(name, spec, dict(point), resolved)


def _name_grid_flag(p: Problem, point: dict[str, str], grid_items: list[str]) -> Problem:
    """A problem of a grid value names the --grid flag it came from, not a --set."""
    for key, value in point.items():
        if p.file == f"--set {key}={value}"[:80] or (p.file or "").startswith(f"--set {key}={value}"):
            flag = next((g for g in grid_items if g.partition("=")[0].strip() == key), key)
            about_value = p.path == key and not p.message.startswith("unknown field")
            message = p.message + (f" (value {value!r})" if about_value else "")
            return Problem(p.path, message, f"--grid {flag}", p.line, p.column, p.hint)
    return p


def run_name(name: str, point: dict[str, str]) -> str:
    """quickstart + {train.seed: 1} -> quickstart_seed1: a folder name (no '/', spaces); a
    path value gives its last part (data.root=/data/mnist -> quickstart_rootmnist)."""
    parts = [name] + [f"{k.split('.')[-1]}{v.rstrip('/').rsplit('/', 1)[-1]}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", "_".join(parts)).strip("-")


def _clashes(runs: list[Run]) -> list[Problem]:
    seen: dict[str, Run] = {}
    problems = []
    for r in runs:
        first = seen.setdefault(r.name, r)
        if first is not r:         # located at the spec's own name: field, not a --set of it
            where = load_spec(r.source).problem(("name",), f"run name {r.name!r} is taken twice (by "
                                                f"{first.source} {first.grid or ''} and {r.source} "
                                                f"{r.grid or ''})", "give the specs different names")
            problems.append(where)
    return problems
