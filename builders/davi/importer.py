"""A run of the authors' code -> an avi model: spec from their flags, weights converted."""
from __future__ import annotations

from typing import Mapping as TMapping

import numpy as np

from avi_spec.loader import ResolvedSpec, load_document

from ..network.build import build_model
from ..network.model import DeepAttentiveVAE
from .flags import Mapping, to_spec
from .weights import convert, learned_scales


def spec_mapping(flags: dict[str, str], name: str,
                 tensors: TMapping[str, np.ndarray] | None = None, data_root: str | None = None) -> Mapping:
    """The spec document of their flags. With their weights: attention temperatures are
    learned when their attention-score scales were trained away from 1 (their TF tracked
    and trained them; older TF versions left them at 1, where a fixed temperature is equal)."""
    m = to_spec(flags, name, data_root)
    if tensors is not None and learned_scales(tensors):
        for part in ("generative", "inference"):
            if m.document.get("attention", {}).get(part):
                m.put(f"attention.{part}.learn_temperature", True, "(their weights)",
                      "attention-score scales != 1")
    return m


def checked_spec(document: dict, source: str) -> ResolvedSpec:
    """The spec of their flags, loaded and validated as `avi build` does (SpecError)."""
    from avi_spec import SpecError
    from avi_spec.validate import validate
    resolved = load_document(document, source=source)
    problems = validate(resolved)
    if problems:
        raise SpecError(problems)
    return resolved


def build_imported(flags: dict[str, str], name: str, tensors: TMapping[str, np.ndarray],
                   data_root: str | None = None) -> tuple[DeepAttentiveVAE, ResolvedSpec, Mapping]:
    """The avi model of their run, holding their weights (ConversionError if they do not fit;
    ModelSizeError, before anything is allocated, if this machine cannot hold the model)."""
    from ..network.size import check_fits
    mapping = spec_mapping(flags, name, tensors, data_root)
    resolved = checked_spec(mapping.document, f"{name} (imported flags)")
    check_fits(resolved.spec, "cpu", "import")        # a meta-device build: shapes only
    model = build_model(resolved.spec)
    model.load_state_dict(convert(tensors, model))
    return model, resolved, mapping
