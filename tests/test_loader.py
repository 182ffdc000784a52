"""Spec loading: YAML positions, extends, overrides, validation messages, hashing."""
from __future__ import annotations

import copy

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from avi_spec import Problem, SpecError, dump_yaml, load_document, load_spec, load_text
from avi_spec.errors import did_you_mean
from avi_spec.loader import UPGRADES, parse_yaml, upgrade
from avi_spec.schema import SPEC_VERSION

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text).lstrip())
    return p


def problems(excinfo) -> list[Problem]:
    return excinfo.value.problems


BASE = """
    name: base
    data: {dataset: mnist5k}
    hierarchy:
      layers: 4
      latent: {channels: 8, size: 16}
    attention:
      generative: {key_dim: 8, query_dim: 8, sources: all}
      inference: {key_dim: 8, query_dim: 8, sources: {last: 2}}
    cells:
      encoder: {scales: [0, 0], nonlocal: {key_dim: 16}}
    train: {epochs: 10, optimizer: {lr: 1e-3}}
"""


# ------------------------------------------------------------------ extends

def test_extends_chain_merges_child_over_parent(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "mid/mid.yaml", """
        extends: ../base.yaml
        description: mid
        train: {epochs: 20}
    """)
    leaf = write(tmp_path, "mid/deep/leaf.yaml", """
        extends: ../mid.yaml
        train: {batch_size: 4}
        cells: {encoder: {scales: [0]}}
    """)
    r = load_spec(leaf)
    t = r.document["train"]
    assert (t["epochs"], t["batch_size"], t["optimizer"]["lr"]) == (20, 4, 0.001)
    assert r.document["description"] == "mid"
    assert r.document["cells"]["encoder"]["scales"] == [0]              # lists replace
    assert r.document["cells"]["encoder"]["nonlocal"]["key_dim"] == 16   # mappings merge
    assert r.document["hierarchy"]["layers"] == 4
    assert r.document["name"] == "leaf"         # the file's stem, not inherited from base
    assert "extends" not in r.document
    # Every leaf remembers the file it came from.
    assert r.locate(("train", "epochs"))[0].endswith("mid.yaml")
    assert r.locate(("train", "batch_size"))[0].endswith("leaf.yaml")
    assert r.locate(("hierarchy", "layers"))[0].endswith("base.yaml")
    assert r.locate(("cells", "encoder", "scales", 0))[0].endswith("leaf.yaml")


def test_null_in_child_turns_a_component_off(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "case.yaml", """
        extends: base.yaml
        attention: {inference: null}
        cells: {encoder: {nonlocal: null}}
    """)
    r = load_spec(child)
    assert r.document["attention"]["inference"] is None
    assert r.document["attention"]["generative"]["key_dim"] == 8
    assert r.document["cells"]["encoder"]["nonlocal"] is None
    assert r.spec.attention.inference is None
    # The removed component's old positions do not linger.
    assert r.locate(("attention", "inference", "key_dim"))[0].endswith("case.yaml")


def test_extends_cycle_is_reported_with_the_chain(tmp_path):
    a = write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "name: b\nextends: c.yaml\n")
    write(tmp_path, "c.yaml", "extends: a.yaml\n")
    with pytest.raises(SpecError) as e:
        load_spec(a)
    [p] = problems(e)
    assert "cycle" in p.message and "a.yaml -> b.yaml -> c.yaml -> a.yaml" in p.message
    assert p.file.endswith("c.yaml") and p.line == 1


def test_self_extends_is_a_cycle(tmp_path):
    a = write(tmp_path, "a.yaml", "extends: a.yaml\n")
    with pytest.raises(SpecError, match="cycle"):
        load_spec(a)


def test_missing_extends_points_at_the_extends_line(tmp_path):
    a = write(tmp_path, "a.yaml", "# a comment\nname: a\nextends: nowhere.yaml\n")
    with pytest.raises(SpecError) as e:
        load_spec(a)
    [p] = problems(e)
    assert "not found" in p.message and "nowhere.yaml" in p.message
    assert (Path(p.file).name, p.line, p.column, p.path) == ("a.yaml", 3, 10, "extends")


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- overrides

def test_overrides_are_parsed_as_yaml_and_typed(tmp_path):
    base = write(tmp_path, "base.yaml", BASE)
    r = load_spec(base, [
        "train.epochs=5",
        "train.optimizer.lr=2e-4",
        "train.compile=true",
        "attention.inference=null",
        "cells.encoder.scales=[0, -2, 0]",
        "cells.decoder.scales[1]=2",
        "description=an ablation",
        "attention.generative.sources={last: 3}",
        "train.ema.decay=0.99",             # a null/absent section is created from defaults
    ])
    d = r.document
    assert d["train"]["epochs"] == 5 and isinstance(d["train"]["epochs"], int)
    assert d["train"]["optimizer"]["lr"] == 2e-4
    assert d["train"]["compile"] is True
    assert d["attention"]["inference"] is None
    assert d["cells"]["encoder"]["scales"] == [0, -2, 0]
    assert d["cells"]["decoder"]["scales"] == [0, 2]
    assert d["description"] == "an ablation"
    assert d["attention"]["generative"]["sources"] == {"last": 3}
    assert d["train"]["ema"] == {"decay": 0.99}
    assert r.locate(("train", "epochs")) == ("--set train.epochs=5", None, None)


def test_override_errors_name_the_flag(tmp_path):
    base = write(tmp_path, "base.yaml", BASE)
    with pytest.raises(SpecError) as e:
        load_spec(base, ["train.epochz=5", "train.epochs=five", "trian.seed=1", "novalue",
                         "cells.encoder.scales[7]=0", "train.epochs.x=1"])
    by_flag = {p.file: p for p in problems(e)}
    assert by_flag["--set train.epochz=5"].hint == "did you mean 'epochs'?"
    assert "integer" in by_flag["--set train.epochs=five"].message
    assert "five" in by_flag["--set train.epochs=five"].message
    assert by_flag["--set trian.seed=1"].hint == "did you mean 'train'?"
    assert "FIELD=VALUE" in by_flag["--set novalue"].message
    assert "out of range" in by_flag["--set cells.encoder.scales[7]=0"].message
    assert "train.epochs.x" in by_flag["--set train.epochs.x=1"].path
    assert all(p.line is None for p in problems(e))
    assert len(problems(e)) == 6


# ----------------------------------------------------------------- YAML layer

def test_duplicate_keys_are_errors_with_both_lines(tmp_path):
    p = write(tmp_path, "dup.yaml", """
        train:
          epochs: 3
          seed: 1
          epochs: 4
        name: x
        name: y
    """)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    ps = problems(e)
    assert [(x.path, x.line) for x in ps] == [("train.epochs", 4), ("name", 6)]
    assert "line 4" in ps[0].message and "first at line 2" in ps[0].message


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = write(tmp_path, "bad.yaml", "name: x\ntrain: {epochs: 3\nseed: 1\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    [x] = problems(e)
    assert x.line == 3 and x.column is not None and "YAML" in x.message


def test_unsafe_tags_are_refused(tmp_path):
    p = write(tmp_path, "evil.yaml", "name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(SpecError):
        load_spec(p)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(SpecError, match="mapping"):
        load_spec(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_an_explicit_empty_mapping_is_all_defaults(tmp_path):
    # (an empty file is an error: tests/test_hostile_specs.py)
    r = load_spec(write(tmp_path, "empty.yaml", "{}  # every field at its default\n"))
    assert r.document["name"] == "empty" and r.document["version"] == SPEC_VERSION


def test_positions_are_one_based_and_point_at_values(tmp_path):
    data, pos = parse_yaml("a:\n  b: 3\n  c: [x, y]\n  d:\n    - 1\n    - 2\n", "f.yaml")
    assert data == {"a": {"b": 3, "c": ["x", "y"], "d": [1, 2]}}
    assert pos[("a",)] == ("f.yaml", 1, 1)
    assert pos[("a", "b")] == ("f.yaml", 2, 6)
    assert pos[("a", "c", 1)] == ("f.yaml", 3, 10)
    assert pos[("a", "d")] == ("f.yaml", 4, 3)
    assert pos[("a", "d", 1)] == ("f.yaml", 6, 7)


def test_exponent_floats_are_floats():
    assert parse_yaml("lr: 1e-3\nx: 3E4\n", "s")[0] == {"lr": 0.001, "x": 30000.0}


# -------------------------------------------------------------- validation

BAD = """
    train:
      epochs: abc
      optimiser: {lr: 1}
      compile: 1
    cells:
      encoder: {scales: [0, 1], nonlocall: 3}
    attention:
      generative: {sources: {last: 0}}
      inference: {sources: foo}
    data:
      distribution: {kind: bernoulli, mixtures: 3}
    hierarchy:
      prior: {log_scale: [5, -5]}
"""


def test_all_problems_are_reported_with_locations(tmp_path):
    p = write(tmp_path, "bad.yaml", BAD)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    got = {x.path: x for x in problems(e)}
    assert set(got) == {
        "train.epochs", "train.optimiser", "train.compile", "cells.encoder.scales[1]",
        "cells.encoder.nonlocall", "attention.generative.sources.last", "attention.inference.sources",
        "data.distribution.mixtures", "hierarchy.prior.log_scale"}
    assert (got["train.epochs"].line, got["train.epochs"].column) == (2, 11)
    assert "integer" in got["train.epochs"].message and '"abc"' in got["train.epochs"].message
    assert got["train.optimiser"].hint == "did you mean 'optimizer'?"
    assert got["cells.encoder.nonlocall"].hint == "did you mean 'nonlocal'?"
    assert got["cells.encoder.scales[1]"].line == 6
    assert "'all'" in got["attention.inference.sources"].message
    assert "last" in got["attention.inference.sources"].message
    assert "kind, crop" in got["data.distribution.mixtures"].hint   # fields of the bernoulli kind only
    assert "lo < hi" in got["hierarchy.prior.log_scale"].message
    assert all(Path(x.file).name == "bad.yaml" for x in problems(e))
    text = str(e.value)
    assert "bad.yaml:2:11: train.epochs:" in text and len(text.splitlines()) == 9


def test_missing_required_field_points_at_the_parent(tmp_path):
    p = write(tmp_path, "m.yaml", "name: m\nattention:\n  generative:\n    sources: {}\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    [x] = problems(e)
    assert x.path == "attention.generative.sources.last" and "missing" in x.message
    assert (x.line, x.column) == (4, 14)


def test_paths_into_mappings_and_lists(tmp_path):
    p = write(tmp_path, "m.yaml", "attention:\n  generative:\n    sources: {explicit: {2: [0, x]}}\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    [x] = problems(e)
    assert x.path == "attention.generative.sources.explicit.2[1]" and x.line == 3


def test_newer_version_is_refused_at_its_line(tmp_path):
    p = write(tmp_path, "v.yaml", f"name: v\nversion: {SPEC_VERSION + 1}\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    [x] = problems(e)
    assert x.path == "version" and x.line == 2


def test_upgrade_chain_runs_in_order(monkeypatch):
    assert upgrade({})["version"] == SPEC_VERSION
    calls = []
    monkeypatch.setattr("avi_spec.loader.SPEC_VERSION", 3)
    monkeypatch.setitem(UPGRADES, 1, lambda d: calls.append(1) or {**d, "a": 1})
    monkeypatch.setitem(UPGRADES, 2, lambda d: calls.append(2) or {**d, "b": 2})
    assert upgrade({"version": 1}) == {"version": 3, "a": 1, "b": 2} and calls == [1, 2]


def test_did_you_mean():
    assert did_you_mean("epochz", ["epochs", "seed"]) == "did you mean 'epochs'?"
    assert did_you_mean("zzz", ["epochs", "seed"]) is None


# --------------------------------------------------------- hash / round trip

def test_hash_is_stable_under_key_order_and_formatting(tmp_path):
    a = write(tmp_path, "a/spec.yaml", "name: s\ntrain: {epochs: 3, seed: 1}\nhierarchy: {layers: 4}\n")
    b = write(tmp_path, "b/spec.yaml", "hierarchy:\n  layers: 4\ntrain:\n  seed: 1\n  epochs: 3\nname: s\n")
    ra, rb = load_spec(a), load_spec(b)
    assert ra.hash == rb.hash and len(ra.hash) == 64 and ra.short_hash == ra.hash[:16]
    assert load_spec(a, ["train.seed=2"]).hash != ra.hash
    # defaults written out explicitly do not change the hash
    assert load_text("name: s\ntrain: {epochs: 3, seed: 1, batch_size: 32}\nhierarchy: {layers: 4}\n").hash == ra.hash


def test_fields_added_later_keep_the_hash_of_older_runs_at_their_default():
    """A run trained before train.accumulate existed saved a document without it; its hash
    (what --resume compares) must not change: the hash below is what avi computed for this
    spec before the field was added. Set to another value, the field changes the hash."""
    before = "431554a8854d580936fd9379a9c8c7312ec469ff1ed94f1f5fb7c5b0e58e2cb7"
    r = load_text("name: s\ntrain: {batch_size: 8}\n")
    assert r.document["train"]["accumulate"] == 1 and r.hash == before
    old_document = copy.deepcopy(r.document)
    del old_document["train"]["accumulate"]               # as an older avi saved it
    assert load_document(old_document).hash == before
    assert load_text("name: s\ntrain: {batch_size: 8, accumulate: 1}\n").hash == before
    assert load_text("name: s\ntrain: {batch_size: 8, accumulate: 2}\n").hash != before


def test_dump_yaml_round_trips(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    r = load_spec(write(tmp_path, "c.yaml", "extends: base.yaml\nattention: {generative: {sources: {explicit: {2: [0], 3: [1, 2]}}}}\n"))
    text = dump_yaml(r.document)
    assert load_text(text).document == r.document
    assert load_text(text).hash == r.hash
    assert load_document(r.document).hash == r.hash


def test_load_document_validates_and_rejects_extends():
    with pytest.raises(SpecError) as e:
        load_document({"train": {"epochs": -1}, "extends": "x.yaml"})
    assert {p.path for p in problems(e)} == {"train.epochs", "extends"}


@pytest.mark.parametrize("path", sorted((REPO / "specs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_load_and_round_trip(path):
    r = load_spec(path)
    assert load_text(dump_yaml(r.document)).hash == r.hash


# ------------------------------------------------------------------ purity

def test_import_avi_spec_does_not_import_torch():
    code = ("import sys, avi_spec, avi_spec.loader, avi_spec.docs, avi_spec.errors; "
            "import importlib.util as u\n"
            "for m in ('avi_spec.graph', 'avi_spec.validate', 'avi_spec.diff'):\n"
            "    if u.find_spec(m): __import__(m)\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
