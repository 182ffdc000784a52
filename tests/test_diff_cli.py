"""`avi diff` as the paper's Table 5, through the real entry point (`python -m cli.main diff`):
fields and attention edges that differ, parameter counts (models built on the meta device),
results of runs, exit codes 0 (same) / 1 (differ) / 2 (bad input)."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from avi_spec import dump_yaml, load_spec

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
ABLATIONS = sorted((SPECS / "ablations").glob("case*.yaml"))
CASE09, CASE16 = SPECS / "ablations" / "case09.yaml", SPECS / "ablations" / "case16.yaml"
NONLOCAL = {"cells.preprocess.nonlocal", "cells.encoder.nonlocal", "cells.decoder.nonlocal"}


def avi(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def make_run(root: Path, name: str, spec: Path, results: dict) -> Path:
    """A run directory as `avi train` + `avi eval` leave it: spec.yaml (resolved) and eval.json."""
    run = root / name
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(dump_yaml(load_spec(spec).document), encoding="utf-8")
    (run / "eval.json").write_text(json.dumps(results), encoding="utf-8")
    return run


def evaluation(nll: float, bpd: float | None = None) -> dict:
    out = {"nll_nats": nll, "nll_stderr_nats": 0.5, "nelbo_nats": nll + 20.0, "importance_samples": 100}
    if bpd is not None:
        out["bits_per_dim"] = bpd
    return out


# --------------------------------------------------------------- the paper's ablation pair

@pytest.fixture(scope="module")
def case09_vs_case16(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    # An empty working directory: no runs/<name>/eval.json can leak in.
    proc = avi("diff", CASE09, CASE16, "--json", cwd=tmp_path_factory.mktemp("cwd"))
    return proc, json.loads(proc.stdout)


def test_ablation_pair_names_exactly_the_switches(case09_vs_case16):
    proc, r = case09_vs_case16
    no_traceback(proc)
    assert proc.returncode == 1
    assert r["names"] == ["case09", "case16"] and r["same"] is False
    assert {f["path"] for f in r["fields"]} == {"attention.generative", "attention.inference"} | NONLOCAL
    by_path = {f["path"]: f["values"] for f in r["fields"]}
    assert by_path["attention.generative"][0] is None and by_path["attention.generative"][1]["key_dim"] == 20
    assert by_path["cells.encoder.nonlocal"] == [None, {"key_dim": 32, "query_dim": 32}]
    columns = {s["column"]: s["paths"] for s in r["switches"]}
    assert columns["attention.generative"] == ["attention.generative"]
    assert sorted(next(p for c, p in columns.items() if c.endswith("nonlocal"))) == sorted(NONLOCAL)


def test_piped_table_fits_80_columns_without_splitting_words(tmp_path):
    """Issue 23 item 10: piped (80 columns), the value column was squeezed below its longest
    word and printed "layer_norm=ye" / "s,". Every word of every cell stays whole."""
    env_columns = os.environ.pop("COLUMNS", None)
    try:
        proc = avi("diff", CASE09, CASE16, "--layout", "fields", cwd=tmp_path)
    finally:
        if env_columns is not None:
            os.environ["COLUMNS"] = env_columns
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    words = " ".join(cell.strip() for line in lines for cell in line.split("│")).split()
    assert words.count("layer_norm=yes,") == 2 and words.count("sources=all") == 2
    assert "(--json lists all)" in proc.stdout or "more attention edges" in " ".join(words)


def test_ablation_pair_lists_the_attention_edges(case09_vs_case16):
    _, r = case09_vs_case16
    added, removed = r["edges"]["added"], r["edges"]["removed"]
    assert removed == []
    gen = [e for e in added if e[2] == "generative"]
    inf = [e for e in added if e[2] == "inference"]
    L = 16
    assert len(gen) == L * (L - 1) // 2 == 120
    assert len(inf) == sum(L - l + 1 for l in range(L)) == 152
    assert ["ctx/0", "prior/1", "generative"] in gen and ["ctx/14", "prior/15", "generative"] in gen
    assert ["pre", "posterior/0", "inference"] in inf and ["pre", "posterior/15", "inference"] in inf
    # every generative edge goes up the hierarchy (m < l), every inference edge down (m >= l)
    layer = lambda n: int(n.split("/")[1])  # noqa: E731
    assert all(layer(s) < layer(d) for s, d, _ in gen)
    assert all(s == "pre" or layer(s) >= layer(d) for s, d, _ in inf)
    assert r["edges"]["counts"] == [{"generative": 0, "inference": 0}, {"generative": 120, "inference": 152}]


def test_ablation_pair_parameters(case09_vs_case16):
    _, r = case09_vs_case16
    assert r["parameters"] == [79_206_420, 118_974_679]
    assert r["results"] == [None, None]


def test_two_specs_default_to_the_field_table_with_parameters(tmp_path):
    proc = avi("diff", CASE09, CASE16, cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 1
    out = proc.stdout
    assert "attention.generative" in out and "cells.encoder.nonlocal" in out
    assert "ctx/0 → prior/1 (generative)" in out
    params = next(line for line in out.splitlines() if "parameters" in line)
    assert "79,206,420" in params and "118,974,679" in params


# ---------------------------------------------------------------- the whole of Table 5

def test_sixteen_ablations_print_one_row_per_spec():
    proc = avi("diff", *[p.relative_to(REPO) for p in ABLATIONS])
    no_traceback(proc)
    assert proc.returncode == 1
    out = proc.stdout
    rows = [line for line in out.splitlines() if re.match(r"^│ case\d\d ", line)]
    assert [re.match(r"^│ (case\d\d)", r)[1] for r in rows] == [f"case{i:02d}" for i in range(1, 17)]
    header = "\n".join(out.splitlines()[:8])
    for word in ("generative", "inference", "nonlocal", "layers", "parameters"):
        assert word in header, header
    assert "{" not in out and '"key_dim"' not in out          # no JSON dumps in the table
    assert max(len(line) for line in out.splitlines() if line.startswith(("│", "┃"))) <= 120
    row = {re.match(r"^│ (case\d\d)", r)[1]: [c.strip() for c in r.strip("│").split("│")] for r in rows}
    assert row["case09"][1:5] == ["off", "off", "off", "16"]
    assert row["case16"][1:5] == ["on k=20", "on k=20", "on k=32", "16"]
    assert row["case01"][4] == "8"
    assert row["case09"][-1] == "79,206,420" and row["case16"][-1] == "118,974,679"


def test_layout_switches_for_two_and_fields_for_many(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    two = runner.invoke(app, ["diff", str(CASE09), str(CASE16), "--layout", "switches", "--no-params"])
    assert two.exit_code == 1, two.output
    assert re.search(r"│ case16 +│ on k=20 ", two.stdout)
    many = runner.invoke(app, ["diff", *map(str, ABLATIONS[:3]), "--layout", "fields", "--no-params"])
    assert many.exit_code == 1, many.output
    assert "hierarchy.layers" not in many.stdout and "cells.decoder.nonlocal" in many.stdout


# ------------------------------------------------------------------------- exit codes

def test_identical_specs_exit_0(tmp_path):
    proc = avi("diff", SPECS / "quickstart.yaml", SPECS / "quickstart.yaml", "--json", cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 0
    r = json.loads(proc.stdout)
    assert r["same"] is True and r["fields"] == [] and r["switches"] == []
    assert r["parameters"][0] == r["parameters"][1] and isinstance(r["parameters"][0], int)


def test_missing_file_exits_2(tmp_path):
    proc = avi("diff", CASE09, tmp_path / "nope.yaml")
    no_traceback(proc)
    assert proc.returncode == 2
    assert "file not found" in proc.stderr and "nope.yaml" in proc.stderr


def test_broken_spec_exits_2_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(CASE09) + "\nhierarchy: {layrs: 4}\n", encoding="utf-8")
    proc = avi("diff", CASE09, bad)
    no_traceback(proc)
    assert proc.returncode == 2
    assert re.search(r"bad\.yaml:2:\d+: hierarchy\.layrs: unknown field 'layrs' \(did you mean 'layers'\?\)", proc.stderr)


# ---------------------------------------------------------------------------- results

def test_run_directories_contribute_their_results(tmp_path):
    a = make_run(tmp_path / "runs", "case09", CASE09, evaluation(6300.0, 2.95))
    b = make_run(tmp_path / "runs", "case16", CASE16, evaluation(6000.0, 2.91))
    proc = avi("diff", a, b, "--json", cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 1
    r = json.loads(proc.stdout)
    assert r["names"] == ["case09", "case16"]
    assert [x["bits_per_dim"] for x in r["results"]] == [2.95, 2.91]
    assert all(x["metric"] == "bits_per_dim" for x in r["results"])
    assert r["results"][1]["nll_nats"] == 6000.0 and r["results"][1]["importance_samples"] == 100
    assert r["parameters"] == [79_206_420, 118_974_679]
    assert {f["path"] for f in r["fields"]} == {"attention.generative", "attention.inference"} | NONLOCAL

    text = avi("diff", a, b, "--layout", "switches", cwd=tmp_path)
    assert text.returncode == 1
    assert "bits/dim" in text.stdout and "2.9100" in text.stdout and "2.9500" in text.stdout


def test_spec_file_results_come_from_runs_name(tmp_path):
    # A spec file whose run exists at runs/<name>/eval.json (relative to the working directory).
    run = tmp_path / "runs" / "case16"
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps(evaluation(6000.0, 2.91)), encoding="utf-8")
    proc = avi("diff", CASE09, CASE16, "--json", "--no-params", cwd=tmp_path)
    assert proc.returncode == 1
    r = json.loads(proc.stdout)
    assert r["results"][0] is None and r["results"][1]["bits_per_dim"] == 2.91
    assert r["parameters"] == [None, None]


def test_a_spec_does_not_repeat_the_result_of_its_run_given_too(tmp_path):
    """`avi diff SPEC runs/<name>`: the run's result is in the run's column only (it used to
    show under the spec as well, as if the spec had a result of its own)."""
    run = make_run(tmp_path / "runs", "case16", CASE16, evaluation(6000.0, 2.91))
    for other in (run, Path("runs") / "case16", Path("runs") / "case16" / ""):
        proc = avi("diff", CASE16, other, "--json", "--no-params", cwd=tmp_path)
        r = json.loads(proc.stdout)
        assert r["results"][0] is None and r["results"][1]["bits_per_dim"] == 2.91, other
        assert r["paired"]["comparisons"][1] == {"paired": False,
                                                 "reasons": ["the reference has no evaluation: run avi eval "
                                                             "(or pick an evaluated one with --baseline)"]}


def test_binary_data_is_compared_in_nats(tmp_path):
    omni = SPECS / "omniglot_l15.yaml"
    a = make_run(tmp_path, "with_attention", omni, evaluation(89.5))
    b = make_run(tmp_path, "without", omni, evaluation(91.2))
    proc = avi("diff", a, b, "--json", "--no-params", cwd=tmp_path)
    assert proc.returncode == 0                     # same spec, different runs
    r = json.loads(proc.stdout)
    assert [x["metric"] for x in r["results"]] == ["nll_nats", "nll_nats"]
    assert [x["value"] for x in r["results"]] == [89.5, 91.2]


def test_best_result_is_bold_green_and_missing_parameters_show_a_dash():
    from rich.console import Console

    from avi_spec.diff import diff_specs, render, render_switches

    a, b, c = (load_spec(p) for p in (CASE09, CASE16, SPECS / "cifar10_l16.yaml"))
    res = [{"bits_per_dim": 2.95, "nll_nats": 6300.0, "metric": "bits_per_dim"}, None,
           {"bits_per_dim": 2.82, "nll_nats": 6000.0, "metric": "bits_per_dim"}]
    r = diff_specs([a, b, c], parameters=[79_206_420, None, 5], results=res)
    for draw in (render_switches, render):
        buf = io.StringIO()
        draw(r, Console(file=buf, width=200, force_terminal=True, color_system="standard"))
        out = buf.getvalue()
        assert re.search(r"\x1b\[1;32m\s*2\.8200", out), out             # bold green: the lowest
        assert not re.search(r"\x1b\[1;32m\s*2\.9500", out)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
        assert re.search(r"│\s+-\s+│", plain), plain                        # case16's count failed
    json.dumps(r)


def test_a_closed_pipe_is_not_a_bug():
    """`avi ... | head` closes our stdout early: no traceback, no bug-report hint. (`avi graph
    --format json` writes ~90 kB in one call, more than a pipe holds, so the write must fail.)"""
    env = dict(os.environ, NO_COLOR="1")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "graph", str(SPECS / "cifar10_l16.yaml"),
                             "--format", "json"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                 # the reader is gone before anything is written
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in stderr and "bug in avi" not in stderr, stderr
    assert proc.returncode == 1
