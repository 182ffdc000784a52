"""The runs behind `avi diff`: the evaluations each argument brings (RUN/eval.json), the result
shown per column, and the paired comparisons with the reference run (builders.evaluation.paired)."""
from __future__ import annotations

import math
from pathlib import Path

from .common import UserError, _escape, err

RESULT_KEYS = ("nll_nats", "nll_stderr_nats", "nelbo_nats", "bits_per_dim", "importance_samples")


def run_evaluations(args: list[str], resolved: list) -> list[tuple]:
    """(run directory, the evaluations `avi eval` kept in its eval.json; builders.evaluation.eval_results)
    per argument: ARG itself for a run directory, runs/<name> (relative to the working
    directory) for a spec file unless that run directory is an argument too (its results
    belong to its own column); (None, []) where there are none."""
    from builders.evaluation.eval_results import read_results

    given = {Path(a).resolve() for a in args if Path(a).is_dir()}
    found = []
    for arg, r in zip(args, resolved):
        p = Path(arg)
        run = p if p.is_dir() else Path("runs") / r.document["name"]
        path = run / "eval.json"
        if (not p.is_dir() and run.resolve() in given) or not path.is_file():
            found.append((None, []))
            continue
        try:
            found.append((run, read_results(path)))
        except (OSError, ValueError, RecursionError) as e:       # RecursionError: brackets nested too deep
            err.print(f"[yellow]warning:[/] {_escape(str(path))} is not readable JSON ({_escape(str(e))}); "
                      f"its results are left out")
            found.append((None, []))
    return found


def sweep_runs(arg: str) -> list[str] | None:
    """The run directories of a sweep directory (DIR/sweep.json of `avi sweep`) that hold an
    evaluation, in the sweep's order; None where ARG is no sweep directory."""
    import json
    path = Path(arg) / "sweep.json"
    if not path.is_file():
        return None
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
        dirs = [Path(arg) / r["name"] for r in runs]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable sweep record ({e})") from None
    evaluated = [str(d) for d in dirs if (d / "eval.json").is_file()]
    err.print(f"sweep {_escape(arg)}: {len(evaluated)} of {len(dirs)} runs evaluated", markup=False)
    if len(evaluated) < 2:
        raise UserError(f"{arg}: a sweep needs two evaluated runs to compare, it has {len(evaluated)} "
                        f"(see avi sweep status {arg}; evaluate with avi sweep ... --eval-k K)")
    return evaluated


def shown_result(run: Path | None, documents: list[dict], resolved) -> dict | None:
    """The result a run is compared by (the full test split at the largest K) as diff shows it:
    bits/dim for 8-bit data, else NLL in nats."""
    from builders.evaluation.eval_results import best_result, describe

    data = best_result(documents)
    if not isinstance(data, dict):
        return None
    res = {k: data[k] for k in RESULT_KEYS if k in data and (data[k] is None or _finite_number(data[k]))}
    eight_bit = resolved.spec.data.binarize == "none"
    metric = "bits_per_dim" if eight_bit and isinstance(res.get("bits_per_dim"), (int, float)) else "nll_nats"
    if not _finite_number(res.get(metric)):
        return None
    res.update(metric=metric, value=float(res[metric]), file=str(run / "eval.json"), evaluated=describe(data))
    return res


def _finite_number(value) -> bool:
    """A result worth showing: not NaN or infinite (json reads both, and --json would print
    them as invalid JSON), nor an integer too large for a float (an edited eval.json)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def baseline_index(baseline: str | None, args: list[str], names: list[str]) -> int:
    """--baseline as one of the arguments (the same path) or a column name of the diff; None:
    the first argument."""
    if baseline is None:
        return 0
    for i, arg in enumerate(args):
        if arg == baseline or Path(arg).resolve() == Path(baseline).resolve():
            return i
    if baseline in names:
        return names.index(baseline)
    raise UserError(f"--baseline {baseline} is none of the compared specs or runs (expected one of "
                    f"{', '.join(args)}, or a name in the table: {', '.join(names)})")


def paired_comparisons(evaluations: list[tuple], baseline: int) -> dict | None:
    """builders.evaluation.paired.compare_runs; None where no argument has evaluations (a diff of specs
    alone) or numpy/scipy are missing."""
    if not any(docs for _, docs in evaluations):
        return None
    from builders.evaluation.paired import compare_runs
    return compare_runs(evaluations, baseline)
