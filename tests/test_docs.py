"""docs/spec.md and `avi schema` are generated from the schema and stay in sync with it."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from avi_spec.docs import render_markdown
from avi_spec.schema import Spec
from cli.main import app

REPO = Path(__file__).resolve().parents[1]


def test_docs_spec_md_is_in_sync_with_the_schema():
    on_disk = (REPO / "docs" / "spec.md").read_text()
    assert on_disk == render_markdown(), \
        "docs/spec.md is stale: run `python -m avi_spec.docs > docs/spec.md`"


def _paths(model, prefix=""):
    """Every field path of the schema, through nested models and unions."""
    from avi_spec.docs import _is_model, _split
    for name, field in model.model_fields.items():
        path = f"{prefix}.{field.alias or name}" if prefix else (field.alias or name)
        yield path
        for m in _split(field.annotation)[0]:
            if _is_model(m):
                yield from _paths(m, path)


def test_docs_cover_every_field_with_a_description():
    text = render_markdown()
    for path in _paths(Spec):
        assert f"| `{path}` |" in text or f"\n## {path}\n" in text, path
    for line in text.splitlines():
        if line.startswith("| `"):
            assert line.rstrip(" |").split("|")[-1].strip(), f"field without a description: {line}"


def test_avi_schema_prints_json_schema_with_every_top_level_field():
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert set(schema["properties"]) == {f.alias or n for n, f in Spec.model_fields.items()} | {"extends"}
    assert all("description" in p for p in schema["properties"].values())
    assert schema["additionalProperties"] is False


def _schema_errors(path: Path, validator) -> list[str]:
    import yaml
    return [f"{'.'.join(map(str, e.path))}: {e.message}"
            for e in validator.iter_errors(yaml.safe_load(path.read_text()))]


def test_every_shipped_spec_validates_against_avi_schema():
    """What an editor does with `avi schema > avi-spec.schema.json`: the shipped specs (most
    use `extends:`) are valid, and the mistakes the loader refuses are still marked."""
    import jsonschema
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    validator = jsonschema.Draft202012Validator(json.loads(result.stdout))
    shipped = sorted(REPO.glob("specs/*.yaml")) + sorted(REPO.glob("specs/ablations/*.yaml"))
    assert len(shipped) == 21
    assert sum("extends:" in p.read_text() for p in shipped) >= 16
    for path in shipped:
        assert _schema_errors(path, validator) == [], path.name
    broken = REPO / "tests" / "broken_specs"
    assert any("hierachy" in e
               for e in _schema_errors(broken / "04_unknown_top_level_key.yaml", validator))
    assert _schema_errors(broken / "06_wrong_type_string_for_int.yaml", validator)
