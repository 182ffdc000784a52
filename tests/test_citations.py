"""Every document a file of the repository cites is in the repository (issue 23 item 8: about
30 docstrings and spec comments cited a design document that was never part of it), and
every "docs/model.md section N" names a section that exists."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg", ".json"}
URL = re.compile(r"\w+://\S+")
MD_REFERENCE = re.compile(r"(?<![\w./-])(/?(?:[\w.-]+/)*[\w-]+\.md)\b")
MODEL_SECTION = re.compile(r"docs/model\.md,? sections? (\d+(?:\.\d+)?)(?:(?:-| and |, )(\d+(?:\.\d+)?))?")


def tracked_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                               check=True, timeout=60).stdout.split("\n")
        files = [REPO / n for n in names if n]
    except (OSError, subprocess.CalledProcessError):          # a copy without .git
        files = [p for p in REPO.rglob("*") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    return [p for p in files if p.suffix in TEXT_SUFFIXES and p.is_file()]


def missing_documents(path: Path, text: str, documents: list[str]) -> list[str]:
    """The .md files `text` (of `path`) names that are not in `documents` (the repository's
    .md files, relative paths): a name is found from the repository root, beside `path`, or
    as the end of a path (code joins "docs" / "spec.md"). Absolute paths are never found."""
    missing = []
    for name in MD_REFERENCE.findall(URL.sub("", text)):
        if name.startswith("/"):
            missing.append(name)
        elif not ((REPO / name).is_file() or (path.parent / name).is_file()
                  or any(d == name or d.endswith("/" + name) for d in documents)):
            missing.append(name)
    return missing


def model_sections() -> set[str]:
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (REPO / "docs" / "model.md").read_text(), re.M)
    return set(heads)


def test_no_file_cites_a_document_the_repository_does_not_contain():
    files, problems = tracked_files(), []
    documents = [str(p.relative_to(REPO)) for p in files if p.suffix == ".md"]
    for path in files:
        if path == Path(__file__).resolve():             # its examples below are deliberate
            continue
        text = path.read_text(errors="replace")
        problems += [f"{path.relative_to(REPO)}: {name}" for name in missing_documents(path, text, documents)]
        if "ARCHITECTURE" + ".md" in text or "PRODUCT" + ".md" in text:
            problems.append(f"{path.relative_to(REPO)}: a design document outside the repository")
    assert not problems, "\n".join(problems)


def test_model_md_sections_cited_exist():
    sections, problems = model_sections(), []
    assert {"3", "6", "7", "9", "14", "4.3"} <= sections
    for path in tracked_files():
        for first, last in MODEL_SECTION.findall(path.read_text(errors="replace")):
            for number in filter(None, (first, last)):
                if number not in sections:
                    problems.append(f"{path.relative_to(REPO)}: docs/model.md section {number}")
    assert not problems, "\n".join(problems)


def test_the_scan_finds_a_missing_document(tmp_path):
    """The scanner itself: a cited file that is not there is found, one that is, and URLs,
    are not."""
    text = ("see DESIGN.md section 3, docs/model.md and README.md; "
            "https://example.org/x/NOTES.md; /elsewhere/README.md")
    documents = ["README.md", "docs/model.md"]
    assert missing_documents(REPO / "builders" / "x.py", text, documents) == ["DESIGN.md", "/elsewhere/README.md"]
