"""The broken-spec corpus: every file in tests/broken_specs/ is a spec a user could write by
mistake. Through the real entry point (`python -m cli.main validate`), each must exit 2, name
the file and the line to edit (`file:LINE:`), say what is wrong (the expected fragment) and
never print a traceback.

Each case file starts with one or more header lines

    # expect: line 7: "did you mean 'layers'"
    # expect: parts/cycle_b.yaml line 3: "extends cycle"

(the second form when the line to edit is in a file the case extends, relative to
tests/broken_specs/). Several `expect` lines mean several problems, all of which must be
reported in one run. Files under tests/broken_specs/parts/ are helpers, not cases.

All cases are validated in one subprocess (`avi validate` reports every file), once as text and
once as --json (to tie each problem to the case that caused it); a few cases also run alone.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "broken_specs"
CASES = sorted(CORPUS.glob("*.yaml"))

_EXPECT = re.compile(r'^#\s*expect:\s*(?:(?P<file>\S+\.ya?ml)\s+)?line\s+(?P<line>\d+):\s*"(?P<fragment>.*)"\s*$')


@dataclass(frozen=True)
class Expect:
    file: str          # path as avi prints it (relative to the repository root)
    line: int
    fragment: str


def _rel(path: Path) -> str:
    return path.resolve().relative_to(REPO).as_posix()


def expectations(case: Path) -> list[Expect]:
    out = []
    # The header is ASCII; a case may hold bytes that are not UTF-8 further down on purpose.
    for raw in case.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not raw.startswith("#"):
            break
        m = _EXPECT.match(raw)
        if m:
            file = _rel(CORPUS / m["file"]) if m["file"] else _rel(case)
            out.append(Expect(file, int(m["line"]), m["fragment"].replace('\\"', '"')))
    return out


def run_avi(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _matches(text: str, e: Expect) -> bool:
    """One output line that points at `file:LINE:` (any column) and says the fragment."""
    head = f"{e.file}:{e.line}:"
    return any(line.startswith(head) and e.fragment in line for line in text.splitlines())


# ---------------------------------------------------------------------------- the corpus

def test_corpus_is_large_and_every_case_says_what_it_expects():
    assert len(CASES) >= 25
    names = [c.name for c in CASES]
    assert all(re.fullmatch(r"\d\d_[a-z0-9_]+\.yaml", n) for n in names), names
    for case in CASES:
        exp = expectations(case)
        assert exp, f"{case.name}: no '# expect: line N: \"...\"' header"
        for e in exp:
            target = REPO / e.file
            assert target.is_file(), f"{case.name}: expects a problem in missing file {e.file}"
            n_lines = len(target.read_bytes().splitlines())
            assert 1 <= e.line <= n_lines, f"{case.name}: line {e.line} is outside {e.file} ({n_lines} lines)"


@pytest.fixture(scope="module")
def batch_text() -> subprocess.CompletedProcess:
    return run_avi("validate", *[_rel(c) for c in CASES])


@pytest.fixture(scope="module")
def batch_json() -> dict[str, list[dict]]:
    proc = run_avi("validate", "--json", *[_rel(c) for c in CASES])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return {r["path"]: r["problems"] for r in json.loads(proc.stdout)}


def test_batch_exits_2_without_a_traceback(batch_text):
    both = batch_text.stdout + batch_text.stderr
    assert batch_text.returncode == 2, both
    assert "Traceback" not in both
    assert "this is a bug in avi" not in both


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_broken_spec(case: Path, batch_text, batch_json):
    rel = _rel(case)
    both = batch_text.stdout + batch_text.stderr
    # The summary line names the case as failed ...
    assert re.search(rf"^FAIL\s+{re.escape(rel)}\s", batch_text.stdout, re.M), batch_text.stdout
    # ... every expected problem is printed at its file and line with an actionable message ...
    for e in expectations(case):
        assert _matches(both, e), f"{rel}: no line '{e.file}:{e.line}: ...{e.fragment}...' in:\n" + \
            "\n".join(line for line in both.splitlines() if rel in line or e.file in line)
    # ... and belongs to this case (not to another file of the same run).
    problems = batch_json[rel]
    assert problems, f"{rel} was reported valid"
    for e in expectations(case):
        assert any(p["file"] == e.file and p["line"] == e.line and e.fragment in _format(p) for p in problems), \
            f"{rel}: {e} not among its problems {problems}"
    for p in problems:      # every problem says where it is
        assert p["file"], p


def _format(p: dict) -> str:
    text = f"{p['path']}: {p['message']}" if p["path"] else p["message"]
    return f"{text} ({p['hint']})" if p.get("hint") else text


# A few cases through their own process, exactly as a user would run them.
SINGLE = ["01_yaml_syntax_error", "05_misspelt_nested_key", "14_extends_cycle", "17_generative_source_later_layer",
          "34_several_problems", "47_not_utf8"]


@pytest.mark.parametrize("stem", SINGLE)
def test_single_file_validate(stem: str):
    case = CORPUS / f"{stem}.yaml"
    proc = run_avi("validate", _rel(case))
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2, both
    assert "Traceback" not in both
    for e in expectations(case):
        assert _matches(proc.stderr, e), both
    assert f"FAIL  {_rel(case)}" in proc.stdout


# --------------------------------------------------------------------- other entry points

@pytest.mark.parametrize("stem", ["05_misspelt_nested_key", "35_several_graph_problems"])
def test_build_rejects_a_broken_spec(stem: str):
    case = CORPUS / f"{stem}.yaml"
    proc = run_avi("build", _rel(case))
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2, both
    assert "Traceback" not in both
    for e in expectations(case):
        assert _matches(proc.stderr, e), both


def test_build_missing_file_exits_2():
    proc = run_avi("build", "tests/broken_specs/no_such_spec.yaml")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "file not found" in proc.stderr


def test_shipped_specs_are_valid():
    shipped = sorted(_rel(p) for p in [*REPO.glob("specs/*.yaml"), *REPO.glob("specs/ablations/*.yaml")])
    assert len(shipped) >= 20
    proc = run_avi("validate", *shipped)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK  ") == len(shipped)
    assert "Traceback" not in proc.stdout + proc.stderr


# --------------------------------------------------------- fixes the corpus led to (loader)

def test_extends_switching_a_union_alternative_replaces_it(tmp_path):
    """A child that picks another distribution `kind` or another `sources` form must not
    inherit the parent's fields of the old alternative (`crop`, `last`)."""
    from avi_spec import load_spec

    quick = (REPO / "specs" / "quickstart.yaml").as_posix()
    (tmp_path / "parent.yaml").write_text(f"extends: {quick}\nattention:\n  generative: {{sources: {{last: 2}}}}\n")
    (tmp_path / "child.yaml").write_text(
        "extends: parent.yaml\n"
        "data:\n  binarize: none\n  distribution: {kind: discretized_logistic_mixture, mixtures: 3}\n"
        "attention:\n  generative: {sources: {explicit: {3: [0, 2]}}}\n")
    parent = load_spec(tmp_path / "parent.yaml").document
    assert parent["attention"]["generative"]["sources"] == {"last": 2}
    doc = load_spec(tmp_path / "child.yaml").document
    assert doc["data"]["distribution"]["kind"] == "discretized_logistic_mixture"
    assert doc["data"]["distribution"]["mixtures"] == 3 and "crop" not in doc["data"]["distribution"]
    assert doc["attention"]["generative"]["sources"] == {"explicit": {"3": [0, 2]}}
    # the same alternative still merges field by field
    (tmp_path / "same.yaml").write_text("extends: parent.yaml\nattention:\n  generative: {sources: {last: 3}}\n")
    assert load_spec(tmp_path / "same.yaml").document["attention"]["generative"]["sources"] == {"last": 3}


def test_a_parent_that_is_not_a_mapping_is_reported_at_the_extends_line():
    from avi_spec import SpecError, load_text

    with pytest.raises(SpecError) as e:
        load_text("name: x\nextends: parts/a_list.yaml\n", "child.yaml", base_dir=CORPUS)
    p = e.value.problems[0]
    assert (p.file, p.line, p.path) == ("child.yaml", 2, "extends") and "is not a spec" in p.message
