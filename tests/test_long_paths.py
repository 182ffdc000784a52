"""A path too long for the file system, or a symbolic-link loop, typed into any command that
takes a path: one message and exit 2, never a traceback (pathlib's exists/is_dir raise these
on Python 3.11 wherever a command first touches the path)."""
from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from cli.main import app

LONG = "x" * 5000


@pytest.mark.parametrize("argv", [
    ["eval", LONG],
    ["sample", LONG],
    ["plot", "curves", LONG],
    ["export", LONG],
    ["validate", LONG + ".yaml"],
])
def test_a_path_too_long_is_exit_2_without_traceback(argv):
    r = CliRunner().invoke(app, argv)
    text = r.stdout + r.stderr
    assert r.exit_code == 2, text
    assert "Traceback" not in text and "bug in avi" not in text
    assert "long" in text.lower()


def test_a_symlink_loop_is_exit_2_without_traceback(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    r = CliRunner().invoke(app, ["eval", str(loop / "run")])
    text = r.stdout + r.stderr
    assert r.exit_code == 2, text
    assert "Traceback" not in text and "bug in avi" not in text
