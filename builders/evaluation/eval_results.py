"""Every evaluation of a run, kept in RUN/eval.json keyed by split, K, number of images, the
weights evaluated (checkpoint file, EMA or not), the binarisation seed and the images scored
(data_sha256), so that a quick `avi eval --limit 50 -k 2`, a `--no-ema` check or a score on
other images (--set data.root=...) never replaces a full K = 500 result of the EMA weights on
the run's own data; and the result a run is compared by (`avi diff`): the full test split
at the largest K, of the run's own spec.

eval.json: {"format": "avi-evaluations", "results": [document, ...]}, each document as
`avi eval --json` prints it, with "per_example": {"file", "sha256"} naming the file of its
per-example estimates (builders.evaluation.per_example; absent in evaluations of older avi versions).
An older eval.json holding one document reads as one result.
"""
from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

from avi_spec.yaml_io import read_text_file

from ..files import (any_temporary, linked_entries, remove_dead_temporaries, temporary_of,
                     write_atomically)
from . import per_example as per_example_file

FORMAT = "avi-evaluations"
MAX_EVAL_BYTES = 64 << 20          # about 60,000 kept evaluations


def result_key(doc: dict) -> tuple:
    checkpoint = doc.get("checkpoint")
    weights = (Path(checkpoint).name if isinstance(checkpoint, str) else None, doc.get("ema"))
    # data_sha256: the pixels scored; `avi eval RUN --set data.root=OTHER` scores other images
    # and must never replace the run's result on its own (older results have none: None)
    return (doc.get("split"), doc.get("importance_samples"), doc.get("examples"), weights,
            doc.get("binarization_seed"), _text_or_none(doc.get("data_sha256")))


def _text_or_none(value):
    return value if isinstance(value, str) else None


def read_results(path: Path) -> list[dict]:
    """The evaluations in an eval.json (OSError / ValueError when it cannot be read)."""
    data = json.loads(read_text_file(path, MAX_EVAL_BYTES))
    if isinstance(data, dict) and data.get("format") == FORMAT:
        results = data.get("results", [])
        if not isinstance(results, list):
            raise ValueError(f'"results" is {type(results).__name__}, not a list of evaluations')
        return [d for d in results if isinstance(d, dict)]
    return [data] if isinstance(data, dict) else []


def record_result(path: Path, document: dict, per_example: dict | None = None) -> dict:
    """Add ``document`` to eval.json, replacing an earlier one with the same key (atomic
    writes; OSError when it cannot be written). ``per_example`` (the arrays of
    builders.evaluation.evaluate.importance_sampled_nll) goes to its own file beside eval.json, written
    first, and the document recorded names it. Returns the document recorded."""
    path = Path(path)
    with _locked(path.parent):
        return _record_unlocked(path, document, per_example)


class UnreadableResults(OSError):
    """eval.json holds something avi cannot read: it is left as it is (it may be the only copy
    of earlier results), so the new result is not saved."""


def _record_unlocked(path: Path, document: dict, per_example: dict | None) -> dict:
    links = linked_entries(path.parent, (per_example_file.FOLDER,))
    if links:
        raise OSError(errno.ELOOP, f"{links[0]} is a symbolic link: the per-example estimates "
                                   f"would be written where it points; remove it",
                      str(path.parent / per_example_file.FOLDER))
    # an interrupted `avi eval` left these (the lock is ours: no live writer owns them)
    remove_dead_temporaries(path.parent, temporary_of(path.name))
    remove_dead_temporaries(path.parent / per_example_file.FOLDER, any_temporary(".npz"))
    try:
        results = read_results(path) if os.path.lexists(path) else []
    except (OSError, ValueError, RecursionError) as e:
        raise UnreadableResults(0, f"{path} exists but cannot be read as avi's eval.json ({e}); it "
                                   f"was left as it is: move it aside and evaluate again") from None
    kept = [d for d in results if result_key(d) != result_key(document)]
    if per_example is not None:
        name, data = _per_example_name(document, kept), per_example_file.encode(document, per_example)
        write_atomically(path.parent / name, data)
        document = {**document, "per_example": {"file": name, "sha256": per_example_file.sha256(data)}}
    write_atomically(path, (json.dumps({"format": FORMAT, "results": kept + [document]}, indent=2,
                                       allow_nan=False) + "\n").encode("utf-8"))
    return document


def _per_example_name(document: dict, kept: list[dict]) -> str:
    """eval/<key>.npz; where a kept result of other images has that name already (the same
    split, K and weights on other data), the name gets the images' fingerprint too."""
    name = per_example_file.file_name(document)
    taken = {d["per_example"].get("file") for d in kept if isinstance(d.get("per_example"), dict)
             and isinstance(d["per_example"].get("file"), str)}      # an edited eval.json: anything
    if name in taken and isinstance(document.get("data_sha256"), str):
        name = name.removesuffix(".npz") + f"_d{document['data_sha256'][:12]}.npz"
    return name


@contextmanager
def _locked(folder: Path):
    """One writer of eval.json at a time (two `avi eval` of one run at once would each drop the
    other's result): an exclusive flock on the run directory itself, released by the OS when the
    process dies. No lock where directories cannot be locked (Windows)."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rank(doc: dict) -> tuple:
    """How good a result is to compare runs by: the test split before train, the run's own
    spec before one changed by --set (other data), the full split before a --limit, then the
    largest K, then the most images (higher is better)."""
    k, n, full = doc.get("importance_samples"), doc.get("examples"), doc.get("full_split")
    if not isinstance(full, bool):          # older results have none; an edited one any type
        full = doc.get("limit") is None
    return (doc.get("split", "test") == "test", not doc.get("overrides"), full,
            k if isinstance(k, int) else 0, n if isinstance(n, int) else 0)


def best_result(results: list[dict]) -> dict | None:
    """The result a run is compared by: the best rank, then the latest."""
    return max(enumerate(results), key=lambda item: (rank(item[1]), item[0]))[1] if results else None


def describe(doc: dict) -> str:
    """"test, K=500, 10000 images" (" (--limit)" when --limit cut the split; the binarisation
    seed when it is not the one training tested on)."""
    text = f"{doc.get('split', '?')}, K={doc.get('importance_samples', '?')}, {doc.get('examples', '?')} images"
    if doc.get("binarization_seed") not in (None, 0):
        text += f", binarisation seed {doc['binarization_seed']}"
    return text if doc.get("full_split", True) else text + " (--limit)"
