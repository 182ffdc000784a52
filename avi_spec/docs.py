"""The field reference (docs/spec.md), generated from the schema so it cannot go stale.

    python -m avi_spec.docs > docs/spec.md

tests/test_docs.py fails when docs/spec.md and the schema disagree.
"""
from __future__ import annotations

import json
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .schema import SPEC_VERSION, Spec
from .yaml_io import MAX_DEPTH, MAX_FILE_BYTES, MAX_VALUES

_SCALARS = {int: "int", float: "float", bool: "bool", str: "str"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"),
           ("min_length", "min length"), ("max_length", "max length"), ("pattern", "pattern"))


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _split(ann: Any) -> tuple[list, bool]:
    """(alternatives, nullable) of an annotation."""
    if get_origin(ann) in (Union, types.UnionType):
        args = get_args(ann)
        return [a for a in args if a is not type(None)], type(None) in args
    return [ann], False


def _form(model: type[BaseModel]) -> str:
    """How a mapping of this model is recognised in a union: its kind, or its one key."""
    kind = model.model_fields.get("kind")
    if kind is not None and kind.default is not PydanticUndefined:
        return f"kind: {kind.default}"
    return "{" + ", ".join(f"{f.alias or n}: ..." for n, f in model.model_fields.items()) + "}"


def _type(ann: Any) -> str:
    members, nullable = _split(ann)
    parts = []
    for m in members:
        origin, args = get_origin(m), get_args(m)
        if m in _SCALARS:
            parts.append(_SCALARS[m])
        elif origin is Literal:
            parts.append(" | ".join(json.dumps(a) for a in args))
        elif origin is list:
            parts.append(f"list of ({_type(args[0])})")
        elif origin is tuple:
            parts.append("[" + ", ".join(_type(a) for a in args) + "]")
        elif origin is dict:
            parts.append(f"mapping {_type(args[0])} -> {_type(args[1])}")
        elif _is_model(m):
            parts.append("{" + _form(m).strip("{}") + "}" if len(members) > 1 else "mapping")
        else:
            parts.append(getattr(m, "__name__", str(m)))
    return " | ".join(parts) + (" | null" if nullable else "")


def _constraints(field) -> str:
    out = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return ", ".join(out)


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(fields: dict, prefix: str, only: str = "") -> list[str]:
    """Table rows of `fields` (name -> FieldInfo) and, recursively, of the models they hold."""
    rows = []
    for name, field in fields.items():
        path = f"{prefix}.{field.alias or name}" if prefix else (field.alias or name)
        kind = _type(field.annotation)
        bounds = _constraints(field)
        desc = (f"*{only}:* " if only else "") + (field.description or "")
        rows.append(f"| `{path}` | {_cell(kind)}{_cell(' (' + bounds + ')') if bounds else ''} "
                    f"| {_cell(_default(field))} | {_cell(desc)} |")
        members, _ = _split(field.annotation)
        models = [m for m in members if _is_model(m)]
        for m in models:
            # Alternatives of a union are told apart by their kind (or key) in the docs too.
            rows += _rows(m.model_fields, path, _form(m) if len(models) > 1 or len(members) > 1 else only)
    return rows


_HEADER = "| field | type | default | description |\n| --- | --- | --- | --- |"


# Prose after a section's table: what a field's one line cannot say.
_NOTES = {
    "train": [
        "### Gradient accumulation (`train.accumulate`)",
        "",
        "`train.batch_size` is the number of images per optimizer step, whatever the hardware:",
        "it is split across the processes (`avi train --devices N`), and each process runs its share",
        "as `train.accumulate` equal micro-batches, summing their gradients before one update. So",
        "the paper's CIFAR-10 recipe, 40 images per step over 4 GPUs (10 per GPU), runs on one GPU",
        "as `batch_size: 40, accumulate: 4`, again 10 images per forward pass. `batch_size` must be",
        "divisible by processes x accumulate.",
        "",
        "- The same: the data order (global batch k holds the same images), the binarisation and",
        "  flips, the posterior and log-scale noise (drawn for the whole batch, then sliced), the loss (the mean over",
        "  the batch: each micro-batch's mean weighted 1/accumulate), gradient clipping (of the summed",
        "  gradient), the optimizer step, the EMA, and the learning-rate and KL schedules, which count",
        "  optimizer steps (images / batch_size per epoch), not micro-batches.",
        "- What differs: batch norm normalises each micro-batch by its own statistics (as each GPU",
        "  of a data-parallel run does by its share, so 4 micro-batches of 10 behave like the",
        "  paper's 4 GPUs of 10), and updates its running statistics once per micro-batch.",
        "  With batch norm on running statistics the update equals one big batch to float",
        "  tolerance (`tests/test_training.py::test_accumulated_step_equals_one_big_batch`).",
        "- Memory: activations are held for one micro-batch at a time (`avi build SPEC --batch B`",
        "  estimates the peak for B images per forward); time per step grows about linearly.",
        "- A spec without `accumulate` has the hash it had before the field existed, so runs",
        "  trained earlier resume.",
        "",
        "### Batch norm across processes (`train.sync_batch_norm`)",
        "",
        "Every random number of a step (binarisation, flips, posterior and log-scale noise) is",
        "drawn for the whole global batch and each process keeps its rows, so an image gets the",
        "same numbers on any number of processes. What still tells N processes from one is batch",
        "norm: by default (`false`, as the authors' 4-GPU runs) each process normalises its share",
        "by the share's own statistics. With `sync_batch_norm: true` every batch norm uses the",
        "statistics of the whole global batch (two small all-reduces per batch norm and pass),",
        "and N processes train what one process trains on the same batch, to float tolerance",
        "(`tests/test_multinode.py`, through torchrun and srun). It does not join micro-batches:",
        "with `accumulate` above 1 each micro-batch is still normalised on its own. A spec",
        "without the field has the hash it had before it existed.",
    ],
}


def render_markdown() -> str:
    """The reference of every spec field, grouped by top-level section."""
    out = [
        "# avi spec reference",
        "",
        "<!-- generated by `python -m avi_spec.docs > docs/spec.md` from avi_spec/schema.py; do not edit -->",
        "",
        f"Spec format version {SPEC_VERSION}. Every field is optional (the default is used when it is",
        "absent); unknown keys are errors. `null` turns an optional component off. A spec may start",
        "with `extends: <path>` (relative to the file) to inherit another spec: mappings merge key by",
        "key, anything else (lists, scalars, `null`) replaces. `--set a.b.c=value` overrides any field",
        "from the command line. `avi schema` prints the same information as JSON Schema.",
        "",
        f"A spec file is a regular file of at most {MAX_FILE_BYTES >> 10} KiB holding one non-empty YAML mapping; floats",
        f"must be finite (no `.inf`, `.nan`); one document may nest at most {MAX_DEPTH} levels and expand,",
        f"through YAML aliases, to at most {MAX_VALUES:,} values (these bounds keep a hostile file harmless).",
        "",
        "## Top level",
        "",
        _HEADER,
    ]
    sections = []
    for name, field in Spec.model_fields.items():
        key = field.alias or name
        members, _ = _split(field.annotation)
        if any(_is_model(m) for m in members):
            sections.append((key, field))
        else:
            out += _rows({name: field}, "")
    for key, field in sections:
        out += ["", f"## {key}", "", field.description or "", "", _HEADER]
        out += [r for m in _split(field.annotation)[0] if _is_model(m) for r in _rows(m.model_fields, key)]
        if key in _NOTES:
            out += [""] + _NOTES[key]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
