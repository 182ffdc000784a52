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


def test_help_summaries_are_whole_sentences_and_flags_take_no_value():
    """`avi --help` lists each command with its whole one-line summary (never a sentence cut at
    a line break of the docstring), and flags show without a `<bool>` value."""
    import re

    import typer.main
    group = typer.main.get_command(app)
    r = runner.invoke(app, ["--help"], env={"COLUMNS": "220"})
    assert r.exit_code == 0
    rows = [" ".join(re.sub(r"[│╭╮╰╯─]", " ", line).split()) for line in r.stdout.splitlines()]
    for name, command in group.commands.items():
        summary = command.help.split("\n\n")[0]
        assert "\n" not in summary and summary.endswith("."), name
        assert f"{name} {summary}" in rows, name
    for args in (["--help"], ["train", "--help"], ["plot", "kl", "--help"]):
        text = runner.invoke(app, args, env={"COLUMNS": "220"}).stdout
        assert "<bool>" not in text, args
    assert re.search(r"--resume\s+Continue the run", runner.invoke(
        app, ["train", "--help"], env={"COLUMNS": "220"}).stdout)


def test_version_prints_the_installed_version():
    from importlib.metadata import version
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"avi {version('avi')}"


def _avi_script() -> str:
    """The `avi` console script of this environment (pip install -e . puts it beside python)."""
    import shutil
    import sys
    script = Path(sys.executable).with_name("avi")
    return str(script) if script.exists() else shutil.which("avi")


def test_shell_completion_shows_installs_and_completes(tmp_path):
    import os
    import subprocess
    avi = _avi_script()
    assert avi, "the avi console script is not installed (pip install -e .)"
    env = {**os.environ, "HOME": str(tmp_path), "SHELL": "/bin/bash"}
    shown = subprocess.run([avi, "--show-completion", "bash"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "_AVI_COMPLETE=complete_bash" in shown.stdout
    completed = subprocess.run([avi], env={**env, "_AVI_COMPLETE": "complete_bash",
                                           "COMP_WORDS": "avi plot cu", "COMP_CWORD": "2"},
                               capture_output=True, text=True, timeout=120)
    assert completed.stdout.split() == ["curves"], completed.stderr
    installed = subprocess.run([avi, "--install-completion", "bash"], env=env,
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    assert "avi" in (tmp_path / ".bashrc").read_text()


def test_resolve_prints_the_spec_after_extends_and_set(specs):
    import yaml

    from avi_spec import load_spec, load_text
    r = runner.invoke(app, ["resolve", str(specs / "b.yaml"), "--set", "train.seed=3"])
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(r.stdout)
    assert doc["name"] == "b" and "extends" not in doc
    assert doc["hierarchy"]["layers"] == 4 and doc["train"]["epochs"] == 7 and doc["train"]["seed"] == 3
    expected = load_spec(specs / "b.yaml", ["train.seed=3"])
    assert doc == expected.document
    assert load_text(r.stdout).hash == expected.hash           # saved, it is the same spec
    as_json = runner.invoke(app, ["resolve", str(specs / "b.yaml"), "--set", "train.seed=3", "--json"])
    assert json.loads(as_json.stdout) == expected.document
    bad = runner.invoke(app, ["resolve", str(specs / "bad.yaml")])
    assert bad.exit_code == 2 and "epochz" in bad.stderr and not bad.stdout
