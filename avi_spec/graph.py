"""The computation graph a spec describes, as a networkx multigraph.

Nodes (attributes: kind, layer, channels, size, label; `constant` on nodes with no input):

    x              the (padded) image                                    kind "data"
    pre            preprocessing group, output e_L                       kind "preprocess"
    enc/l          bottom-up cell of layer l, output e_l                 kind "encoder"
    ctx/l          top-down context of layer l (decoder output;
                   ctx/0 is the learned constant)                        kind "context"
    merge/l        top-down merge [ctx_{l-1} | z_{l-1}], l >= 1          kind "merge"
    prior/l        p(z_l | z_<l) (head and, with attention, the
                   prior condition p_l); prior/0 is N(0, I)              kind "prior"
    posterior/l    q(z_l | x, z_<l) (bottom-up merge included)           kind "posterior"
    z/l            the latent sample of layer l                          kind "latent"
    merge/final    [ctx_{L-1} | z_{L-1}] -> context width                kind "merge"
    post           postprocessing group                                  kind "postprocess"
    px             the data distribution p(x | z)                        kind "distribution"

Edges carry `kind` ("flow" or "attention"); flow edges a `role`; attention edges `path`
("generative" or "inference"), the attending `layer` and the candidate `src_layer`. A flow edge
and an attention edge may join the same two nodes (the posterior of layer l reads e_l both as
its input and as one of its attention candidates), so the graph is an `nx.MultiDiGraph` (a subclass of `nx.DiGraph`) with
the edge key equal to "flow", "generative" or "inference".

The graph is built without judging the spec: attention that breaks the factorisation order
(which can close a cycle) is drawn as asked, so that `avi_spec.validate` can report it.
Attention sources naming layers that do not exist are left out of the graph (there is no node
to draw them from) and reported by the validator from the spec itself.
"""
from __future__ import annotations

import json
import re
from typing import Any

import networkx as nx

from .derived import Derived, _walk, derive
from .schema import Spec

PATHS = ("generative", "inference")


# ------------------------------------------------------------------------ names

def enc_name(m: int, layers: int) -> str:
    """The bottom-up map e_m: enc/m for m < L, the preprocessing output `pre` for m = L."""
    return "pre" if m == layers else f"enc/{m}"


def _natural(name: str) -> tuple:
    """Sort key that puts ctx/2 before ctx/10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


# ------------------------------------------------------------------------ build

def build_graph(spec: Spec, derived: Derived | None = None) -> nx.MultiDiGraph:
    """The data-flow and attention graph of a validated `Spec` (docs/model.md sections 3, 6 and 7)."""
    d = derived or derive(spec)
    G = nx.MultiDiGraph(name=spec.name, layers=spec.hierarchy.layers,
                        generative_layers=sorted(d.gen_sources), inference_layers=sorted(d.inf_sources))
    _bottom_up(G, spec, d)
    ctx_size = _top_down(G, spec, d)
    _output(G, spec, d, ctx_size)
    _attention(G, spec, d)
    return G


def _node(G: nx.MultiDiGraph, name: str, kind: str, layer: int | None, channels: int, size: int,
          label: str, **extra: Any) -> None:
    G.add_node(name, kind=kind, layer=layer, channels=int(channels), size=int(size),
               label=label, constant=bool(extra.pop("constant", False)), **extra)


def _flow(G: nx.MultiDiGraph, u: str, v: str, role: str) -> None:
    G.add_edge(u, v, key="flow", kind="flow", role=role)


def _bottom_up(G: nx.MultiDiGraph, spec: Spec, d: Derived) -> None:
    """The data and the bottom-up pass (docs/model.md section 7, Eq. 10): x -> pre (e_L) -> enc/L-1 .. enc/0."""
    L = spec.hierarchy.layers
    _node(G, "x", "data", None, spec.data.image.channels, d.input_size, "x")
    _node(G, "pre", "preprocess", L, d.bottom_up_width, d.feature_size, "preprocess (e_L)")
    _flow(G, "x", "pre", "input")
    width, size = d.bottom_up_width, d.feature_size
    for l in range(L - 1, -1, -1):
        width, size = _walk(width, size, spec.cells.encoder.scales)
        _node(G, f"enc/{l}", "encoder", l, width, size, f"encoder {l} (e_{l})")
        _flow(G, enc_name(l + 1, L), f"enc/{l}", "input")


def _top_down(G: nx.MultiDiGraph, spec: Spec, d: Derived) -> int:
    """The top-down pass (docs/model.md section 6) and the posteriors (section 7); the size of the last context."""
    Z, S = spec.hierarchy.latent.channels, spec.hierarchy.latent.size
    ctx_size = S
    for l in range(spec.hierarchy.layers):
        if l == 0:
            _node(G, "ctx/0", "context", 0, d.decoder_width(0), S, "constant context 0", constant=True)
            _node(G, "prior/0", "prior", 0, 2 * Z, S, "prior 0 = N(0, I)", constant=True)
        else:
            _node(G, f"merge/{l}", "merge", l, d.decoder_width(l), ctx_size, f"top-down merge {l}")
            _flow(G, f"ctx/{l - 1}", f"merge/{l}", "context")
            _flow(G, f"z/{l - 1}", f"merge/{l}", "latent")
            w, ctx_size = _walk(d.decoder_width(l), ctx_size, spec.cells.decoder.scales)
            _node(G, f"ctx/{l}", "context", l, w, ctx_size, f"decoder {l}")
            _flow(G, f"merge/{l}", f"ctx/{l}", "input")
            _node(G, f"prior/{l}", "prior", l, 2 * Z, ctx_size, f"prior {l}")
            _flow(G, f"ctx/{l}", f"prior/{l}", "condition")
        _posterior(G, d, l, Z)
        _node(G, f"z/{l}", "latent", l, Z, S, f"z_{l}")
        _flow(G, f"posterior/{l}", f"z/{l}", "sample")
        _flow(G, f"prior/{l}", f"z/{l}", "prior")
    return ctx_size


def _posterior(G: nx.MultiDiGraph, d: Derived, l: int, Z: int) -> None:
    _node(G, f"posterior/{l}", "posterior", l, 2 * Z, G.nodes[f"enc/{l}"]["size"], f"posterior {l}")
    _flow(G, f"enc/{l}", f"posterior/{l}", "input")
    if l >= 1:
        # Bottom-up merge with the prior condition; the posterior is residual to the prior.
        _flow(G, f"prior/{l}", f"posterior/{l}", "condition")
    if d.has_inf_attention(l):
        # The inference query qE_l: the first q_E channels of the raw context.
        _flow(G, f"ctx/{l}", f"posterior/{l}", "query")


def _output(G: nx.MultiDiGraph, spec: Spec, d: Derived, ctx_size: int) -> None:
    """Final merge, postprocessing and the data distribution."""
    L = spec.hierarchy.layers
    _node(G, "merge/final", "merge", L, d.context_width, ctx_size, "final merge")
    _flow(G, f"ctx/{L - 1}", "merge/final", "context")
    _flow(G, f"z/{L - 1}", "merge/final", "latent")
    post_width, post_size = _walk(d.context_width, ctx_size, spec.cells.postprocess.scales)
    _node(G, "post", "postprocess", None, post_width, post_size, "postprocess")
    _flow(G, "merge/final", "post", "input")
    _node(G, "px", "distribution", None, spec.data.image.channels, post_size,
          f"p(x|z): {spec.data.distribution.kind}", distribution=spec.data.distribution.kind)
    _flow(G, "post", "px", "input")


def _attention(G: nx.MultiDiGraph, spec: Spec, d: Derived) -> None:
    """Attention edges: the candidates each layer asks for (derive() reads the spec's sources)."""
    L = spec.hierarchy.layers
    for l, sources in sorted(d.gen_sources.items()):
        dst = f"prior/{l}"
        if dst not in G:
            continue
        for m in sources:
            src = f"ctx/{m}"
            if src in G and G.nodes[src]["kind"] == "context":
                G.add_edge(src, dst, key="generative", kind="attention", path="generative",
                           src_layer=m, layer=l)
    for l, sources in sorted(d.inf_sources.items()):
        dst = f"posterior/{l}"
        if dst not in G:
            continue
        for m in sources:
            if 0 <= m <= L:
                G.add_edge(enc_name(m, L), dst, key="inference", kind="attention",
                           path="inference", src_layer=m, layer=l)


# ------------------------------------------------------------------------ reading back

def attention_edges(G: nx.MultiDiGraph, path: str | None = None) -> list[tuple[str, str, str]]:
    """Attention edges as sorted (src, dst, path) triples, optionally of one path only."""
    out = [(u, v, a["path"]) for u, v, a in G.edges(data=True)
           if a.get("kind") == "attention" and (path is None or a["path"] == path)]
    return sorted(out, key=lambda e: (e[2], _natural(e[1]), _natural(e[0])))


def attention_sources(G: nx.MultiDiGraph) -> dict[str, dict[int, list[int]]]:
    """{"generative": {l: [m, ...]}, "inference": {l: [m, ...]}} read from the attention edges.

    Every layer that has the attention path appears, with an empty list where it attends to
    nothing; a path that is off is an empty dict. For inference, m = L is the preprocessing
    output e_L. This is the wiring the PyTorch builder uses.
    """
    out: dict[str, dict[int, list[int]]] = {p: {} for p in PATHS}
    for p in PATHS:
        if G.graph.get(f"{p}_layers"):
            for l in G.graph[f"{p}_layers"]:
                out[p][l] = []
    for _, _, a in G.edges(data=True):
        if a.get("kind") == "attention":
            out[a["path"]].setdefault(int(a["layer"]), []).append(int(a["src_layer"]))
    return {p: {l: sorted(ms) for l, ms in sorted(out[p].items())} for p in PATHS}


# ------------------------------------------------------------------------ export

def _sorted_nodes(G: nx.MultiDiGraph) -> list[str]:
    order = {"data": 0, "preprocess": 1, "encoder": 2}
    def key(n: str) -> tuple:
        a = G.nodes[n]
        kind = a.get("kind", "")
        layer = a.get("layer")
        if kind in order:
            # bottom-up: x, pre, enc/L-1 .. enc/0
            return (0, order[kind], -(layer if layer is not None else 0))
        if kind == "postprocess":
            return (2, 0, 0)
        if kind == "distribution":
            return (2, 1, 0)
        rank = {"merge": 0, "context": 1, "prior": 2, "posterior": 3, "latent": 4}.get(kind, 5)
        return (1, layer if layer is not None else 0, rank)
    return sorted(G.nodes, key=lambda n: (key(n), _natural(n)))


def _sorted_edges(G: nx.MultiDiGraph) -> list[tuple[str, str, str, dict]]:
    rank = {n: i for i, n in enumerate(_sorted_nodes(G))}
    edges = list(G.edges(keys=True, data=True))
    return sorted(edges, key=lambda e: (e[3].get("kind") != "flow", e[2], rank[e[1]], rank[e[0]]))


def _mermaid_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _dot_quote(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_json(G: nx.MultiDiGraph) -> str:
    """node_link_data with nodes and edges in a stable order (same spec, same text)."""
    H = nx.MultiDiGraph()
    H.graph.update(G.graph)
    for n in _sorted_nodes(G):
        H.add_node(n, **G.nodes[n])
    for u, v, k, a in _sorted_edges(G):
        H.add_edge(u, v, key=k, **a)
    try:
        data = nx.node_link_data(H, edges="edges")
    except TypeError:  # networkx < 3.4 has no `edges=` keyword
        data = nx.node_link_data(H)
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def to_mermaid(G: nx.MultiDiGraph) -> str:
    lines = ["flowchart BT"]
    shapes = {"data": ("[/", "/]"), "distribution": ("[/", "/]"), "latent": ("((", "))"),
              "prior": ("{{", "}}"), "posterior": ("{{", "}}")}
    for n in _sorted_nodes(G):
        a = G.nodes[n]
        open_, close = shapes.get(a.get("kind"), ("[", "]"))
        text = f"{a.get('label', n)}<br/>{a.get('channels')}@{a.get('size')}x{a.get('size')}"
        lines.append(f'    {_mermaid_id(n)}{open_}"{text}"{close}')
    for u, v, _k, a in _sorted_edges(G):
        if a.get("kind") == "attention":
            arrow = "-.->|G|" if a["path"] == "generative" else "-.->|I|"
        else:
            arrow = "-->"
        lines.append(f"    {_mermaid_id(u)} {arrow} {_mermaid_id(v)}")
    return "\n".join(lines) + "\n"


def to_dot(G: nx.MultiDiGraph) -> str:
    name = G.graph.get("name", "avi")
    lines = [f"digraph {_dot_quote(name)} {{", "  rankdir=BT;", "  node [shape=box, fontsize=10];"]
    shapes = {"latent": "ellipse", "data": "parallelogram", "distribution": "parallelogram",
              "prior": "hexagon", "posterior": "hexagon"}
    for n in _sorted_nodes(G):
        a = G.nodes[n]
        label = f"{a.get('label', n)}\\n{a.get('channels')}@{a.get('size')}x{a.get('size')}"
        label_q = '"' + label.replace('"', '\\"') + '"'
        lines.append(f"  {_dot_quote(n)} [label={label_q}, shape={shapes.get(a.get('kind'), 'box')}];")
    for u, v, _k, a in _sorted_edges(G):
        if a.get("kind") == "attention":
            colour = "blue" if a["path"] == "generative" else "red"
            attrs = f'style=dashed, color={colour}, label={_dot_quote(a["path"][0].upper())}'
        else:
            attrs = f"label={_dot_quote(a.get('role', ''))}, fontsize=8"
        lines.append(f"  {_dot_quote(u)} -> {_dot_quote(v)} [{attrs}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


FORMATS = {"json": to_json, "mermaid": to_mermaid, "dot": to_dot}


def export(G: nx.MultiDiGraph, fmt: str) -> str:
    """The graph as text: "mermaid" (a flowchart), "dot" (Graphviz) or "json" (node-link)."""
    try:
        return FORMATS[fmt](G)
    except KeyError:
        raise ValueError(f"unknown graph format {fmt!r}; expected one of {', '.join(FORMATS)}") from None
