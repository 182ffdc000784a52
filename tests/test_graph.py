"""The spec graph, its validation and spec diffs (avi_spec.graph / validate / diff)."""
from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import networkx as nx
import pytest

from avi_spec.derived import derive
from avi_spec.diff import diff_specs, render
from avi_spec.graph import attention_edges, attention_sources, build_graph, export
from avi_spec.schema import Spec
from avi_spec.validate import check_graph, validate

SPECS = Path(__file__).resolve().parent.parent / "specs"


def spec(**overrides) -> Spec:
    """A small valid spec (mnist5k defaults) with nested overrides."""
    doc: dict = {"hierarchy": {"layers": 4}}
    for key, value in overrides.items():
        cur = doc
        parts = key.split("__")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    return Spec.model_validate(doc)


def both(sources_g="all", sources_i="all", L=4) -> Spec:
    return Spec.model_validate({
        "hierarchy": {"layers": L},
        "attention": {"generative": {"sources": sources_g}, "inference": {"sources": sources_i}},
    })


def load(text: str):
    from avi_spec.loader import load_text
    return load_text(textwrap.dedent(text), "t.yaml")


def by_path(problems, path):
    return [p for p in problems if p.path == path]


# --------------------------------------------------------------------------- graph

def test_nodes_and_edges_all_attention():
    L = 4
    G = build_graph(both(L=L))
    assert isinstance(G, nx.DiGraph)
    assert G.number_of_nodes() == 6 * L + 4
    names = set(G.nodes)
    for l in range(L):
        assert {f"enc/{l}", f"prior/{l}", f"posterior/{l}", f"z/{l}", f"ctx/{l}"} <= names
    assert {f"merge/{l}" for l in range(1, L)} | {"x", "pre", "merge/final", "post", "px"} <= names
    assert len(attention_edges(G, "generative")) == L * (L - 1) // 2
    assert len(attention_edges(G, "inference")) == sum(L - l + 1 for l in range(L))
    flow = [(u, v) for u, v, a in G.edges(data=True) if a["kind"] == "flow"]
    assert len(flow) == 10 * L
    assert nx.is_directed_acyclic_graph(G)
    # The bottom-up chain and the top-down wiring of docs/model.md sections 6-7.
    for u, v in [("x", "pre"), ("pre", "enc/3"), ("enc/3", "enc/2"), ("enc/1", "enc/0"),
                 ("enc/2", "posterior/2"), ("prior/2", "posterior/2"), ("posterior/2", "z/2"),
                 ("ctx/1", "merge/2"), ("z/1", "merge/2"), ("merge/2", "ctx/2"), ("ctx/2", "prior/2"),
                 ("ctx/3", "merge/final"), ("z/3", "merge/final"), ("merge/final", "post"), ("post", "px")]:
        assert G.has_edge(u, v, "flow"), (u, v)
    assert not G.has_edge("ctx/0", "prior/0")          # layer 0's prior is N(0, I)
    assert G.nodes["ctx/0"]["constant"]
    # Attributes from derive(): the paper's CIFAR widths appear with the default filters.
    d = derive(both(L=L))
    assert G.nodes["pre"]["channels"] == d.bottom_up_width
    assert G.nodes["ctx/1"]["channels"] == d.decoder_width(1)
    assert G.nodes["ctx/3"]["channels"] == d.context_width + d.q_d  # last layer: [ctx | qD], no key
    assert G.nodes["z/0"]["size"] == 16 and G.nodes["x"]["size"] == 32 and G.nodes["px"]["size"] == 32
    # The same two nodes may carry a flow and an attention edge (e_l is input and candidate).
    assert G.has_edge("enc/2", "posterior/2", "flow") and G.has_edge("enc/2", "posterior/2", "inference")


def test_no_attention_has_no_attention_edges():
    G = build_graph(spec())
    assert attention_edges(G) == []
    assert attention_sources(G) == {"generative": {}, "inference": {}}
    assert G.number_of_edges() == 9 * 4


def test_window_wiring():
    G = build_graph(both({"last": 2}, {"last": 2}))
    assert set(attention_edges(G, "generative")) == {
        ("ctx/0", "prior/1", "generative"), ("ctx/0", "prior/2", "generative"),
        ("ctx/1", "prior/2", "generative"), ("ctx/1", "prior/3", "generative"),
        ("ctx/2", "prior/3", "generative")}
    assert attention_sources(G)["inference"] == {0: [0, 1], 1: [1, 2], 2: [2, 3], 3: [3, 4]}
    assert ("pre", "posterior/3", "inference") in attention_edges(G, "inference")
    assert len(attention_edges(G, "inference")) == 8


def test_explicit_wiring():
    G = build_graph(both({"explicit": {3: [1], 2: []}}, {"explicit": {0: [0, 4], 2: [3]}}))
    assert attention_edges(G, "generative") == [("ctx/0", "prior/1", "generative"),
                                                ("ctx/1", "prior/3", "generative")]
    src = attention_sources(G)
    assert src["generative"] == {1: [0], 2: [], 3: [1]}
    assert src["inference"] == {0: [0, 4], 1: [1, 2, 3, 4], 2: [3], 3: [3, 4]}
    # Layer 2 attends to nothing: it has no generative query.
    assert G.nodes["ctx/2"]["channels"] == derive(both({"explicit": {3: [1], 2: []}})).decoder_width(2)


@pytest.mark.parametrize("g,i", [("all", "all"), ({"last": 3}, {"last": 2}),
                                 ({"explicit": {2: [0], 3: [0, 2]}}, {"explicit": {1: [1, 4]}})])
def test_attention_sources_round_trip(g, i):
    s = both(g, i)
    d = derive(s)
    assert attention_sources(build_graph(s)) == {"generative": d.gen_sources, "inference": d.inf_sources}


def test_bad_wiring_builds_without_crashing():
    s = both({"explicit": {1: [3], 2: [9]}}, {"explicit": {2: [0, 17]}})
    G = build_graph(s)
    assert not nx.is_directed_acyclic_graph(G)          # ctx/3 -> prior/1 closes a cycle
    assert attention_sources(G)["generative"][2] == []  # layer 9 has no node: not drawn
    assert attention_sources(G)["inference"][2] == [0]


def test_export_formats():
    G = build_graph(both())
    data = json.loads(export(G, "json"))
    assert len(data["nodes"]) == G.number_of_nodes()
    assert export(G, "json") == export(build_graph(both()), "json")        # stable
    mer = export(G, "mermaid")
    assert mer.startswith("flowchart")
    assert "ctx_0 -.->|G| prior_1" in mer and "pre -.->|I| posterior_3" in mer
    dot = export(G, "dot")
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert '"ctx/0" -> "prior/1"' in dot
    assert dot.count("->") == G.number_of_edges()
    with pytest.raises(ValueError, match="mermaid"):
        export(G, "png")


# ----------------------------------------------------------------------- validation

def test_shipped_specs_validate():
    from avi_spec.loader import load_spec
    files = sorted(SPECS.rglob("*.yaml"))
    assert files
    for f in files:
        assert validate(load_spec(f)) == [], f


def test_valid_specs_have_no_problems():
    assert validate(spec()) == []
    assert validate(both()) == []
    assert validate(both({"last": 2}, {"explicit": {1: [1, 4]}})) == []


def test_generative_order_and_cycle_with_line():
    r = load("""\
        hierarchy: {layers: 6}
        attention:
          generative:
            sources:
              explicit:
                3: [0, 5, 2]
                4: [1, 3, 1]
                0: [1]
                9: [1]
                2: [-1]
        """)
    problems = validate(r)
    (p,) = by_path(problems, "attention.generative.sources.explicit.3[1]")
    assert "the prior of layer 3 may only attend to layers above it (0..2), found 5" in p.message
    assert "cycle" in p.message
    assert (p.file, p.line, p.column) == ("t.yaml", 6, 16)
    (dup,) = by_path(problems, "attention.generative.sources.explicit.4[2]")
    assert "twice" in dup.message and dup.line == 7
    (zero,) = by_path(problems, "attention.generative.sources.explicit.0")
    assert "N(0, I)" in zero.message and zero.line == 8
    (nine,) = by_path(problems, "attention.generative.sources.explicit.9")
    assert "does not exist" in nine.message and nine.line == 9
    (neg,) = by_path(problems, "attention.generative.sources.explicit.2[0]")
    assert "does not exist" in neg.message
    # Cycles already explained per entry are not reported again as a bare cycle.
    assert not by_path(problems, "attention")


def test_generative_self_attention_is_an_order_violation():
    problems = validate(both({"explicit": {2: [2]}}))
    (p,) = problems
    assert p.path == "attention.generative.sources.explicit.2[0]" and "found 2" in p.message


def test_inference_order_and_range():
    r = load("""\
        hierarchy: {layers: 4}
        attention:
          inference:
            sources: {explicit: {2: [2, 1, 5], 7: [1]}}
        """)
    problems = validate(r)
    (p,) = by_path(problems, "attention.inference.sources.explicit.2[1]")
    assert "the posterior of layer 2 may only attend to bottom-up features at or below it (2..4" in p.message
    assert "found 1" in p.message and p.line == 4
    assert "does not exist" in by_path(problems, "attention.inference.sources.explicit.2[2]")[0].message
    assert "does not exist" in by_path(problems, "attention.inference.sources.explicit.7")[0].message
    assert len(problems) == 3


@pytest.mark.parametrize("last,ok", [(1, False), (2, True), (3, True), (4, False)])
def test_generative_window(last, ok):
    problems = validate(both({"last": last}))
    assert (problems == []) == ok
    if not ok:
        assert problems[0].path == "attention.generative.sources.last"


def test_inference_window_may_reach_the_preprocessing_output():
    assert validate(both("all", {"last": 5})) == []     # layer 0 has e_0..e_4: 5 candidates
    (p,) = validate(both("all", {"last": 6}))
    assert p.path == "attention.inference.sources.last" and "sources: all" in p.message


def test_generative_attention_needs_two_layers():
    (p,) = validate(Spec.model_validate({"hierarchy": {"layers": 1}, "attention": {"generative": {}}}))
    assert p.path == "attention.generative"


def test_encoder_scales_change_sizes():
    r = load("""\
        hierarchy: {layers: 4}
        cells:
          encoder: {scales: [0, -2]}
        attention: {inference: {}}
        """)
    problems = validate(r)
    (enc,) = by_path(problems, "cells.encoder.scales")
    assert "16x16 to 8x8" in enc.message and enc.line == 3
    (att,) = by_path(problems, "attention.inference")
    assert "spatial size" in att.message and att.line == 4


def test_decoder_scales_must_keep_size():
    problems = validate(both(L=3) .model_copy(update={"cells": spec(cells__decoder__scales=[0, -2]).cells}))
    assert by_path(problems, "cells.decoder.scales")
    assert "spatial size" in by_path(problems, "attention.generative")[0].message


def test_latent_size_must_match_features():
    r = load("""\
        hierarchy:
          latent: {size: 8}
        """)
    (p,) = validate(r)
    assert p.path == "hierarchy.latent.size" and "32 / 2^1 = 16, found size: 8" in p.message
    assert p.line == 2


def test_postprocess_must_return_to_image_size():
    r = load("""\
        cells:
          postprocess: {scales: [2, 2]}
        """)
    (p,) = validate(r)
    assert p.path == "cells.postprocess.scales" and "32" in p.message and p.line == 2


def test_odd_side_cannot_be_halved():
    problems = validate(spec(data__pad=1, cells__preprocess__scales=[-2, -2], hierarchy__latent__size=7,
                             cells__postprocess__scales=[2, 2]))
    assert by_path(problems, "cells.preprocess.scales[1]")


def test_key_query_sizes():
    r = load("""\
        cells:
          encoder: {nonlocal: {key_dim: 16, query_dim: 8}}
          bottomup_merge: {nonlocal: {key_dim: 4, query_dim: 5}}
        attention:
          generative: {key_dim: 20, query_dim: 10}
          inference: {key_dim: 20, query_dim: 16}
        """)
    problems = validate(r)
    assert {p.path for p in problems} == {
        "cells.encoder.nonlocal.query_dim", "cells.bottomup_merge.nonlocal.query_dim",
        "attention.generative.query_dim", "attention.inference.query_dim"}
    gen = by_path(problems, "attention.generative.query_dim")[0]
    assert "key_dim = 20, found query_dim: 10" in gen.message and gen.line == 5


def test_inference_key_dim_divisible_by_stem_factor():
    r = load("""\
        cells: {preprocess: {scales: [-2, -2]}, postprocess: {scales: [2, 2]}}
        hierarchy: {latent: {size: 8}}
        attention:
          inference: {key_dim: 10, query_dim: 10}
        """)
    (p,) = validate(r)
    assert p.path == "attention.inference.key_dim" and "divisible by 2^2 = 4, found 10" in p.message
    assert p.line == 4


def test_data_distribution_fits_data():
    r = load("""\
        data:
          dataset: cifar10
          binarize: none
          distribution: {kind: bernoulli, crop: 3}
        """)
    problems = validate(r)
    paths = {p.path for p in problems}
    # No data.root problem: building a model needs no data; avi train / eval ask for it.
    assert {"data.distribution.kind", "data.distribution.crop", "data.image.channels", "data.image.size"} == paths
    kind = by_path(problems, "data.distribution.kind")[0]
    assert "binarize" in kind.message and kind.line == 4
    assert "3 channel" in by_path(problems, "data.image.channels")[0].message


def test_problem_of_an_unwritten_field_points_at_the_line_that_causes_it():
    r = load("""\
        name: t
        data: {binarize: none}
        cells:
          preprocess: {scales: [-2, -2]}
        """)
    problems = validate(r)
    kind = by_path(problems, "data.distribution.kind")[0]
    assert kind.line == 2 and kind.column == 18                 # at `none` of `binarize: none`
    latent = by_path(problems, "hierarchy.latent.size")[0]
    assert latent.line == 4 and "found size: 16" in latent.message
    assert by_path(problems, "cells.postprocess.scales")[0].line == 4


def test_logistic_mixture_needs_8bit_images():
    s = spec(data__dataset="omniglot", data__root="data/omniglot",
             data__distribution={"kind": "discretized_logistic_mixture"})
    messages = [p.message for p in validate(s)]
    assert any("omniglot" in m and "floats" in m for m in messages)
    assert any("binarize: dynamic" in m for m in messages)
    ok = spec(data__dataset="cifar10", data__root="x", data__image={"channels": 3, "size": 32}, data__pad=0,
              data__binarize="none", data__distribution={"kind": "discretized_logistic_mixture"},
              cells__preprocess__scales=[0, -2], hierarchy__latent__size=16)
    assert validate(ok) == []


def test_reachability_on_a_damaged_graph():
    G = build_graph(both())
    assert check_graph(G) == []
    G.remove_edge("pre", "enc/3", "flow")
    G.remove_edge("pre", "posterior/0", "inference")
    G.remove_edge("pre", "posterior/1", "inference")
    G.remove_edge("pre", "posterior/2", "inference")
    G.remove_edge("pre", "posterior/3", "inference")
    messages = [p["message"] for p in check_graph(G)]
    assert any("reachable from the data x" in m and "enc/3" in m for m in messages)
    assert any("reach the data distribution px" in m and "pre" in m for m in messages)


def test_every_problem_is_reported_at_once():
    s = Spec.model_validate({
        "data": {"binarize": "none"},
        "hierarchy": {"layers": 4, "latent": {"size": 8}},
        "cells": {"encoder": {"scales": [-2]}},
        "attention": {"generative": {"query_dim": 3, "sources": {"explicit": {1: [2]}}}},
    })
    paths = {p.path for p in validate(s)}
    assert {"data.distribution.kind", "hierarchy.latent.size", "cells.encoder.scales",
            "attention.generative.query_dim", "attention.generative.sources.explicit.1[0]"} <= paths


# ----------------------------------------------------------------------------- diff

def test_diff_identical_specs_are_same():
    r = diff_specs([both(), both()])
    assert r["same"] and r["fields"] == [] and r["edges"]["added"] == r["edges"]["removed"] == []


def test_diff_finds_fields_and_edges():
    a = spec(name="base")
    b = both({"last": 2}, "all")
    b = b.model_copy(update={"name": "attn", "description": "ignored"})
    b = Spec.model_validate({**b.model_dump(by_alias=True), "train": {"epochs": 10}})
    r = diff_specs([a, b])
    assert r["names"] == ["base", "attn"] and not r["same"]
    fields = {f["path"]: f["values"] for f in r["fields"]}
    assert fields["train.epochs"] == [400, 10]
    assert fields["attention.generative"][0] is None and fields["attention.generative"][1]["sources"] == {"last": 2}
    assert "name" not in fields and "description" not in fields
    added = r["edges"]["added"]
    assert ["ctx/0", "prior/1", "generative"] in added and ["pre", "posterior/0", "inference"] in added
    assert len(added) == 5 + 14 and r["edges"]["removed"] == []
    back = diff_specs([b, a])
    assert len(back["edges"]["removed"]) == 19 and back["edges"]["added"] == []


def test_diff_three_specs_and_render():
    from rich.console import Console
    a, b, c = both(), both({"last": 2}), both("all", {"last": 1})
    r = diff_specs([a, b, c], extra_rows={"parameters": [1, 2, 3]})
    assert r["edges"]["per_spec"][0] == {"added": [], "removed": []}
    assert ["ctx/0", "prior/3", "generative"] in r["edges"]["per_spec"][1]["removed"]
    assert r["edges"]["per_spec"][2]["removed"] and not r["edges"]["per_spec"][2]["added"]
    buf = io.StringIO()
    render(r, Console(file=buf, width=140), extra_rows={"bits/dim": [2.82, None, 2.9]})
    out = buf.getvalue()
    assert "attention.generative.sources" in out and "parameters" in out and "bits/dim" in out
    assert "ctx/0 → prior/3 (generative)" in out
    json.dumps(r)                                            # plain data for --json


def test_diff_of_loaded_specs():
    from avi_spec.loader import load_spec
    r = diff_specs([load_spec(SPECS / "cifar10_l16_nvae.yaml"), load_spec(SPECS / "ablations" / "case13.yaml")])
    assert r["names"] == ["cifar10_l16_nvae", "case13"]
    assert [f["path"] for f in r["fields"]] == ["attention.generative"]
    assert len(r["edges"]["added"]) == 16 * 15 // 2


def test_logistic_mixture_cannot_be_padded():
    r = load("""\
        data:
          dataset: cifar10
          root: data/cifar10
          image: {channels: 3, size: 32}
          pad: 2
          binarize: none
          distribution: {kind: discretized_logistic_mixture}
        cells: {preprocess: {scales: [-2]}, postprocess: {scales: [2]}}
        hierarchy: {latent: {size: 18}}
        """)
    (p,) = validate(r)
    assert p.path == "data.pad" and p.line == 5 and "padding included" in p.message
    assert p.hint == "set data.pad: 0"


def test_padded_size_must_fit_the_latent_grid():
    # Unpadded 28x28 digits: two halvings give 7x7 latents, not the 8x8 of the padded 32.
    assert {p.path for p in validate(spec(data__pad=0, data__distribution={"kind": "bernoulli", "crop": 0},
                                         hierarchy__latent={"size": 8},
                                         cells__preprocess={"scales": [-2, -2]},
                                         cells__postprocess={"scales": [2, 2]}))} \
        == {"hierarchy.latent.size"}
    assert validate(spec(data__pad=0, data__distribution={"kind": "bernoulli", "crop": 0}, hierarchy__latent={"size": 7},
                         cells__preprocess={"scales": [-2, -2]},
                         cells__postprocess={"scales": [2, 2]})) == []


def test_flips_are_for_8bit_images():
    (p,) = validate(spec(data__flips={"horizontal": True}))
    assert p.path == "data.flips" and "8-bit" in p.message and p.hint == "set data.flips: null"


def test_min_lr_may_not_exceed_lr():
    (p,) = validate(spec(train__optimizer={"lr": 1e-5}))
    assert p.path == "train.schedule.min_lr" and "found min_lr: 0.0001" in p.message
    # A constant schedule never reaches min_lr.
    assert validate(spec(train__optimizer={"lr": 1e-5}, train__schedule={"name": "constant"})) == []


def test_query_dim_defaults_to_key_dim():
    from avi_spec.loader import load_spec
    s = spec(attention__inference={"key_dim": 8}, cells__decoder={"nonlocal": {"key_dim": 4}})
    assert s.attention.inference.query_dim == 8 and s.cells.decoder.nonlocal_.query_dim == 4
    assert spec(attention__generative={"key_dim": 8, "query_dim": 4}).attention.generative.query_dim == 4
    # Switching a null block on with its key size alone gives a valid spec that shows both.
    r = load_spec(SPECS / "quickstart.yaml", ["cells.decoder.nonlocal.key_dim=8"])
    assert r.document["cells"]["decoder"]["nonlocal"] == {"key_dim": 8, "query_dim": 8}
    assert validate(r) == []
