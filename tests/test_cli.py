"""The spec commands of `avi`: output streams, exit codes, no tracebacks for user mistakes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def specs(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nhierarchy: {layers: 4}\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\ntrain: {epochs: 7}\n")
    (tmp_path / "bad.yaml").write_text("name: bad\ntrain:\n  epochz: 3\n")
    return tmp_path


def test_validate_ok_and_bad(specs):
    r = runner.invoke(app, ["validate", str(specs / "a.yaml"), str(specs / "bad.yaml")])
    assert r.exit_code == 2
    assert "OK" in r.stdout and "(a, " in r.stdout and "FAIL" in r.stdout
    assert "bad.yaml:3:11: train.epochz: unknown field 'epochz' (did you mean 'epochs'?)" in r.stderr
    assert "Traceback" not in r.output


def test_validate_json_and_overrides(specs):
    r = runner.invoke(app, ["validate", str(specs / "b.yaml"), "--set", "train.seed=3", "--json"])
    assert r.exit_code == 0, r.output
    [item] = json.loads(r.stdout)
    assert item["valid"] and item["name"] == "b" and len(item["hash"]) == 64


def test_validate_missing_file_is_a_user_error(specs):
    r = runner.invoke(app, ["validate", str(specs / "nope.yaml")])
    assert r.exit_code == 2 and "file not found" in r.stderr and "Traceback" not in r.output


def test_bad_flag_exits_2():
    assert runner.invoke(app, ["validate", "--no-such-flag", "x.yaml"]).exit_code == 2


def test_diff_exit_codes(specs):
    same = runner.invoke(app, ["diff", str(specs / "a.yaml"), str(specs / "a.yaml"), "--json"])
    assert same.exit_code == 0, same.output
    differ = runner.invoke(app, ["diff", str(specs / "a.yaml"), str(specs / "b.yaml"), "--json"])
    assert differ.exit_code == 1, differ.output
    paths = [f["path"] for f in json.loads(differ.stdout)["fields"]]
    assert "train.epochs" in paths
    assert runner.invoke(app, ["diff", str(specs / "a.yaml")]).exit_code == 2
    assert runner.invoke(app, ["diff", str(specs / "a.yaml"), str(specs / "bad.yaml")]).exit_code == 2


def test_graph_formats(specs):
    for fmt in ("mermaid", "dot", "json"):
        r = runner.invoke(app, ["graph", str(specs / "a.yaml"), "--format", fmt])
        assert r.exit_code == 0 and r.stdout.strip(), (fmt, r.output)
    assert runner.invoke(app, ["graph", str(specs / "a.yaml"), "--format", "png"]).exit_code == 2


def test_unexpected_errors_are_bugs(specs, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kaboom")
    monkeypatch.setattr("avi_spec.validate.validate", boom)
    r = runner.invoke(app, ["validate", str(specs / "a.yaml")])
    assert r.exit_code == 1 and "Traceback" in r.stderr and "this is a bug in avi" in r.stderr


def test_every_command_help_has_an_example():
    import typer.main
    names = list(typer.main.get_command(app).commands)
    assert {"validate", "schema", "graph", "diff"} <= set(names)
    for name in names:
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0 and "Example:" in r.stdout, name
