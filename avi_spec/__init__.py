"""avi_spec: the avi spec language (schema, YAML loading, composition, graph, validation, diff).

Pure Python on purpose: importing it must never import torch, so that `avi validate`,
`avi diff` and `avi schema` are instant and work where torch is absent.
"""
from .errors import Problem, SpecError, did_you_mean
from .loader import ResolvedSpec, dump_yaml, format_path, load_document, load_spec, load_text
from .schema import SPEC_VERSION, Spec

__all__ = ["Problem", "SpecError", "did_you_mean", "ResolvedSpec", "dump_yaml", "format_path",
           "load_document", "load_spec", "load_text", "SPEC_VERSION", "Spec"]
