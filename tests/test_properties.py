"""Property tests of the loader: valid specs round-trip; garbage only ever raises SpecError."""
from __future__ import annotations

import copy
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avi_spec import SpecError, dump_yaml, load_document, load_text
from avi_spec.schema import Spec

# The profile (tests/conftest.py) decides whether examples are random (a developer's run) or
# derandomized (CI); AVI_HYPOTHESIS_EXAMPLES widens a run, as the closing-note seed sweeps did.
SETTINGS = settings(max_examples=int(os.environ.get("AVI_HYPOTHESIS_EXAMPLES", 80)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

ints = lambda lo, hi: st.integers(min_value=lo, max_value=hi)  # noqa: E731


def finite(lo: float | None = None, hi: float | None = None, **kw):
    """A float the schema accepts: every float field refuses .inf and .nan (allow_inf_nan=False),
    so a *valid* document never draws them, whatever the bounds."""
    return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False, **kw)


pos_floats = finite(1e-8, 10.0)

nonlocal_ = st.none() | st.fixed_dictionaries({}, optional={"key_dim": ints(1, 64), "query_dim": ints(1, 64)})
sources = st.one_of(
    st.just("all"),
    st.builds(lambda k: {"last": k}, ints(1, 256)),
    st.builds(lambda m: {"explicit": m}, st.dictionaries(ints(0, 20), st.lists(ints(0, 20), max_size=4), max_size=4)),
)
attention = st.none() | st.fixed_dictionaries({}, optional={
    "key_dim": ints(1, 64), "query_dim": ints(1, 64), "layer_norm": st.booleans(),
    "learn_temperature": st.booleans(), "sources": sources})
cell = lambda: st.fixed_dictionaries({}, optional={  # noqa: E731
    "scales": st.lists(st.sampled_from([-2, 0, 2]), min_size=1, max_size=6),
    "nodes": ints(1, 16), "nonlocal": nonlocal_})
log_scale = st.tuples(finite(-10, 0), finite(0.001, 10)).map(list)
distribution = st.one_of(
    st.fixed_dictionaries({"kind": st.just("bernoulli")}, optional={"crop": ints(0, 8)}),
    st.fixed_dictionaries({"kind": st.just("discretized_logistic_mixture")}, optional={
        "mixtures": ints(1, 64), "upper_edge": finite(0.5, 0.999),
        "min_log_scale": finite()}),   # any finite float, the extremes included
)

valid_documents = st.fixed_dictionaries({}, optional={
    # "." and ".." match the name pattern but would name the runs folder or its parent
    "name": st.from_regex(r"[A-Za-z0-9_.\-]{1,20}", fullmatch=True).filter(lambda n: n not in (".", "..")),
    "description": st.text(max_size=40),
    "data": st.fixed_dictionaries({}, optional={
        "dataset": st.sampled_from(["mnist5k", "mnist", "omniglot", "cifar10", "folder"]),
        "root": st.none() | st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20),
        "pad": ints(0, 8), "binarize": st.sampled_from(["dynamic", "none"]),
        "flips": st.none() | st.fixed_dictionaries({"horizontal": st.booleans(), "vertical": st.booleans()}),
        "distribution": distribution}),
    "hierarchy": st.fixed_dictionaries({}, optional={
        "layers": ints(1, 256),
        "latent": st.fixed_dictionaries({"channels": ints(1, 64), "size": ints(1, 64)}),
        "posterior": st.fixed_dictionaries({"log_scale": log_scale, "noise": finite(0, 1), "residual": st.booleans()}),
        "prior": st.fixed_dictionaries({"log_scale": log_scale})}),
    "cells": st.fixed_dictionaries({}, optional={
        "encoder": cell(), "decoder": cell(), "postprocess": cell(),
        "preprocess": cell().map(lambda d: {**d, "filters": 64}),
        "topdown_merge": st.fixed_dictionaries({"nonlocal": nonlocal_})}),
    "attention": st.fixed_dictionaries({}, optional={"generative": attention, "inference": attention}),
    "train": st.fixed_dictionaries({}, optional={
        "batch_size": ints(1, 1024), "epochs": ints(1, 1000), "seed": st.integers(-2**63, 2**63 - 1),
        "grad_clip": st.none() | pos_floats, "ema": st.none() | st.fixed_dictionaries({"decay": finite(0.5, 0.9999)}),
        "optimizer": st.fixed_dictionaries({}, optional={
            "name": st.sampled_from(["adamax", "adam", "adamw"]), "lr": pos_floats,
            "betas": st.tuples(finite(0, 1), finite(0, 1)).map(list)}),
        "schedule": st.fixed_dictionaries({}, optional={
            "name": st.sampled_from(["cosine", "cosine_restart", "constant"]), "warmup_epochs": finite(0, 100)}),
        "precision": st.sampled_from(["auto", "fp32", "bf16"])}),
    "eval": st.fixed_dictionaries({}, optional={"importance_samples": ints(1, 5000)}),
})


@SETTINGS
@given(valid_documents)
def test_valid_specs_round_trip_through_yaml(doc):
    r = load_document(doc)
    again = load_text(dump_yaml(r.document))
    assert again.document == r.document
    assert again.hash == r.hash
    assert load_document(again.document).hash == r.hash


# ------------------------------------------------------------------ garbage in

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)

FULL = Spec().model_dump(mode="json", by_alias=True)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_documents(draw):
    doc = copy.deepcopy(FULL)
    for _ in range(draw(ints(1, 4))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for seg in path[:-1]:
            parent = parent[seg]
        key = path[-1]
        op = draw(st.sampled_from(["delete", "junk", "misspell", "extra"]))
        if op == "delete" and isinstance(parent, dict):
            del parent[key]
        elif op == "misspell" and isinstance(parent, dict):
            i = draw(ints(0, len(key)))
            parent[key[:i] + draw(st.sampled_from("aez_")) + key[i + 1:]] = parent.pop(key)
        elif op == "extra" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(junk)
        else:
            parent[key] = draw(junk)
    return doc


@SETTINGS
@given(mutated_documents())
def test_mutated_documents_raise_only_spec_error(doc):
    try:
        text = dump_yaml(doc)
    except Exception:      # junk PyYAML cannot write is not what this test is about
        return
    try:
        load_text(text)
    except SpecError as e:
        assert e.problems and all(p.message for p in e.problems)


@SETTINGS
@given(st.data())
def test_mutated_yaml_text_raises_only_spec_error(data):
    text = dump_yaml(FULL)
    for _ in range(data.draw(ints(1, 3))):
        i = data.draw(ints(0, len(text)))
        j = data.draw(ints(i, min(len(text), i + 8)))
        text = text[:i] + data.draw(st.text(alphabet=" :-[]{},'\"\n#&*!|>?%@`\tax0", max_size=4)) + text[j:]
    try:
        load_text(text)
    except SpecError as e:
        assert e.problems


@SETTINGS
@given(st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}",
                st.sampled_from(["train.epochs", "cells.encoder.scales[0]", "attention.inference",
                                 "attention.generative.sources.explicit.3", "data.flips.vertical", "x.y"]),
                st.text(max_size=10)), max_size=3))
def test_random_overrides_raise_only_spec_error(overrides):
    try:
        load_text("name: s\n", overrides=overrides)
    except SpecError as e:
        assert e.problems


def test_strings_that_read_as_exponent_floats_round_trip():
    """Found by the round-trip property: the loader reads YAML 1.2 exponent floats (1e-3), so
    the dumper must quote strings of that form, or `description: '0E0'` comes back as 0.0."""
    doc = {"name": "x", "description": "0E0"}
    text = dump_yaml(doc)
    assert "'0E0'" in text
    assert load_text(text).document["description"] == "0E0"
