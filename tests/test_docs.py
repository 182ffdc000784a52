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
    assert set(schema["properties"]) == {f.alias or n for n, f in Spec.model_fields.items()}
    assert all("description" in p for p in schema["properties"].values())
    assert schema["additionalProperties"] is False
