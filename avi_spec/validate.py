"""Checks a spec cannot express in its schema: the whole architecture must fit together.

`validate(resolved)` reports every problem it finds (not the first only), each with the dotted
field path, what was expected and what was found, and, when the spec came from YAML, the file,
line and column of the offending field (`resolved.locate`). The schema has already checked
every field on its own; these checks are about fields against each other, the data, and the
graph `avi_spec.graph.build_graph` draws.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import networkx as nx

from .derived import Derived, _walk, derive
from .errors import Problem
from .graph import build_graph
from .schema import DepthwiseAttention, Explicit, Folder, LastK, Spec

# Raw image shape of each dataset avi knows (folder: anything).
DATASET_CHANNELS = {"mnist": 1, "mnist5k": 1, "omniglot": 1, "cifar10": 3}
DATASET_SIZE = {"mnist": 28, "mnist5k": 28, "omniglot": 28, "cifar10": 32}

# The part of the spec each kind of graph node comes from (for graph-level problems).
NODE_PATH = {
    "data": "data", "preprocess": "cells.preprocess", "encoder": "cells.encoder",
    "context": "cells.decoder", "merge": "cells.topdown_merge", "prior": "hierarchy.prior",
    "posterior": "hierarchy.posterior", "latent": "hierarchy.latent",
    "postprocess": "cells.postprocess", "distribution": "data.distribution",
}


class Idx(int):
    """A list index inside a field path (written `[i]`, as opposed to a mapping key `.k`)."""


def dotted(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, Idx):
            out += f"[{int(p)}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _span(lo: int, hi: int) -> str:
    """'0..2', '3', or 'none' for an empty range lo..hi."""
    if hi < lo:
        return "none"
    return str(lo) if lo == hi else f"{lo}..{hi}"


class _Checker:
    def __init__(self, spec: Spec, locate: Callable | None, positions: dict | None = None):
        self.spec = spec
        self._locate = locate
        self._written = {tuple(map(str, k)) for k in (positions or {})}
        # The file the user named (positions of the document root); other written fields
        # may come from the specs it extends.
        self._root_file = (positions or {}).get((), (None,))[0]
        self.problems: list[Problem] = []
        self.d: Derived = derive(spec)
        self.G = build_graph(spec, self.d)

    # -------------------------------------------------------------------- reporting

    def where(self, parts: tuple) -> tuple[str | None, int | None, int | None]:
        """File, line and column of the field, or of its nearest ancestor the YAML states."""
        if self._locate is None:
            return None, None, None
        key = tuple(int(p) if isinstance(p, Idx) else p for p in parts)
        try:
            file, line, col = self._locate(key)
        except Exception:  # noqa: BLE001 - a missing position is not a spec problem
            return None, None, None
        return file, line, col

    def add(self, parts: tuple, message: str, hint: str | None = None,
            near: tuple[tuple, ...] = ()) -> Problem:
        """Record a problem of the field `parts`; located at `parts` if the user wrote it,
        else at the first of `near` they wrote (e.g. the dataset that needs a missing root),
        else at the nearest written ancestor. A candidate written in the file the user named
        wins over one inherited through `extends` (that is the line they just changed)."""
        written = [c for c in (parts,) + near if tuple(map(str, c)) in self._written]
        at = written[0] if written else parts
        for c in written:
            if self._root_file is not None and self.where(c)[0] == self._root_file:
                at = c
                break
        file, line, col = self.where(at)
        p = Problem(path=dotted(parts), message=message, file=file, line=line, column=col, hint=hint)
        self.problems.append(p)
        return p

    # -------------------------------------------------------------------- checks

    def run(self) -> list[Problem]:
        self.check_data()
        self.check_train()
        self.check_sizes()
        self.check_keys()
        self.check_sources()
        self.check_graph()
        return sorted(self.problems, key=Problem.sort_key)

    def check_data(self) -> None:
        data = self.spec.data
        dist = data.distribution
        ds = data.dataset
        if dist.kind == "bernoulli":
            if data.binarize != "dynamic":
                self.add(("data", "distribution", "kind"),
                         "a bernoulli likelihood needs binary pixels (data.binarize: dynamic), "
                         f"found data.binarize: {data.binarize} (grey levels)",
                         hint="set data.binarize: dynamic, or use kind: discretized_logistic_mixture for 8-bit images", near=(("data", "distribution"), ("data", "binarize")))
            if dist.crop > data.pad:
                self.add(("data", "distribution", "crop"),
                         f"crop may leave out at most the {data.pad} padding pixels per side (data.pad), "
                         f"found crop: {dist.crop}, which would drop real pixels from the likelihood",
                         hint=f"set crop: {data.pad}", near=(("data", "pad"),))
            if data.flips is not None:
                self.add(("data", "flips"),
                         "flips are an augmentation of 8-bit images; binary data (a bernoulli "
                         "likelihood) is trained without them, found data.flips set",
                         hint="set data.flips: null")
        else:
            if ds == "omniglot":
                self.add(("data", "distribution", "kind"),
                         "a discretized logistic mixture needs 8-bit images, found dataset omniglot, "
                         "whose grey levels are floats in [0, 1]",
                         hint="use kind: bernoulli with data.binarize: dynamic",
                         near=(("data", "distribution"), ("data", "dataset")))
            if data.binarize != "none":
                self.add(("data", "distribution", "kind"),
                         "a discretized logistic mixture scores 8-bit values (data.binarize: none), "
                         f"found data.binarize: {data.binarize} (binary pixels)",
                         hint="set data.binarize: none, or use kind: bernoulli for binary data", near=(("data", "distribution"), ("data", "binarize")))
            if data.pad > 0:
                self.add(("data", "pad"),
                         "a discretized logistic mixture scores every pixel of the model's grid, "
                         f"padding included, so its images cannot be padded, found pad: {data.pad}",
                         hint="set data.pad: 0",
                         near=(("data", "distribution", "kind"),))
        if ds != "folder" and data.folder != Folder():
            self.add(("data", "folder"),
                     f"data.folder says how dataset: folder reads image files, found dataset: {ds}",
                     hint="remove data.folder, or set data.dataset: folder", near=(("data", "dataset"),))
        if ds in DATASET_CHANNELS and data.image.channels != DATASET_CHANNELS[ds]:
            self.add(("data", "image", "channels"),
                     f"{ds} images have {DATASET_CHANNELS[ds]} channel(s), found channels: {data.image.channels}",
                     hint=f"set data.image.channels: {DATASET_CHANNELS[ds]}",
                     near=(("data", "image"), ("data", "dataset")))
        if ds in DATASET_SIZE and data.image.size != DATASET_SIZE[ds]:
            self.add(("data", "image", "size"),
                     f"{ds} images are {DATASET_SIZE[ds]}x{DATASET_SIZE[ds]}, found size: {data.image.size}",
                     hint=f"set data.image.size: {DATASET_SIZE[ds]}",
                     near=(("data", "image"), ("data", "dataset")))

    def check_train(self) -> None:
        train = self.spec.train
        if train.batch_size % train.accumulate:
            self.add(("train", "accumulate"),
                     f"each optimizer step runs its batch as {train.accumulate} equal micro-batches, "
                     f"so train.batch_size must be divisible by it, found batch_size: {train.batch_size}",
                     hint=f"set train.batch_size to a multiple of {train.accumulate}",
                     near=(("train", "batch_size"),))
        sched, lr = train.schedule, train.optimizer.lr
        if sched.name != "constant" and sched.min_lr > lr:
            self.add(("train", "schedule", "min_lr"),
                     f"the {sched.name} schedule decays from train.optimizer.lr = {lr:g} down to "
                     f"min_lr, so min_lr may not exceed it, found min_lr: {sched.min_lr:g}",
                     hint=f"set train.schedule.min_lr <= {lr:g}", near=(("train", "optimizer", "lr"),))

    def check_sizes(self) -> None:
        spec, d = self.spec, self.d
        pre = spec.cells.preprocess
        S = spec.hierarchy.latent.size
        if d.stages < 0:
            self.add(("cells", "preprocess", "scales"),
                     f"preprocessing must down-sample to the latent grid, found a net up-sampling "
                     f"(scales {list(pre.scales)}: {pre.scales.count(2)} x 2 against {pre.scales.count(-2)} x -2)")
        size = d.input_size
        for i, s in enumerate(pre.scales):
            if s == -2 and size % 2:
                self.add(("cells", "preprocess", "scales", Idx(i)),
                         f"block {i} halves a side of {size} pixels, which is odd; the padded image side "
                         f"{d.input_size} must be divisible by 2^{max(d.stages, 0)} = {2 ** max(d.stages, 0)}",
                         hint="change data.pad or the preprocessing scales", near=(("data", "pad"),))
                break
            size = size // 2 if s == -2 else size * 2 if s == 2 else size
        if d.feature_size != S:
            self.add(("hierarchy", "latent", "size"),
                     f"the latent grid must have the side of the bottom-up features: padded image "
                     f"{d.input_size} / 2^{d.stages} = {d.feature_size}, found size: {S}",
                     hint=f"set hierarchy.latent.size: {d.feature_size}, or change cells.preprocess.scales",
                     near=(("cells", "preprocess", "scales"), ("data", "pad"), ("data", "image")))
        enc = spec.cells.encoder.scales
        _, enc_size = _walk(d.bottom_up_width, d.feature_size, enc)
        if enc_size != d.feature_size:
            self.add(("cells", "encoder", "scales"),
                     "every encoder cell must keep the spatial size (all layers work at one resolution), "
                     f"found scales {list(enc)}, which take each e_l from {d.feature_size}x{d.feature_size} "
                     f"to {enc_size}x{enc_size}",
                     hint="use scales of 0 in cells.encoder")
        dec = spec.cells.decoder.scales
        _, dec_size = _walk(d.decoder_width(1), S, dec)
        if dec_size != S and spec.hierarchy.layers > 1:
            self.add(("cells", "decoder", "scales"),
                     "every decoder cell must keep the spatial size of the latent grid "
                     f"({S}x{S}), found scales {list(dec)}, which give {dec_size}x{dec_size}",
                     hint="use scales of 0 in cells.decoder")
        post = spec.cells.postprocess.scales
        _, post_size = _walk(d.context_width, d.feature_size, post)
        if post_size != d.input_size:
            self.add(("cells", "postprocess", "scales"),
                     f"postprocessing must return to the padded image side {d.input_size}, found scales "
                     f"{list(post)}, which take {d.feature_size}x{d.feature_size} to {post_size}x{post_size}",
                     hint=f"use {max(d.stages, 0)} up-sampling block(s) (scale 2) to undo the preprocessing",
                     near=(("cells", "preprocess", "scales"), ("data", "pad"), ("data", "image")))

    def check_keys(self) -> None:
        att = self.spec.attention
        for name in ("generative", "inference"):
            a: DepthwiseAttention | None = getattr(att, name)
            if a is not None and a.key_dim != a.query_dim:
                self.add(("attention", name, "query_dim"),
                         f"queries and keys are compared by a dot product, so query_dim must equal "
                         f"key_dim = {a.key_dim}, found query_dim: {a.query_dim}",
                         hint=f"set query_dim: {a.key_dim}")
        cells = self.spec.cells
        for group in ("preprocess", "encoder", "decoder", "postprocess", "topdown_merge", "bottomup_merge"):
            nl = getattr(cells, group).nonlocal_
            if nl is not None and nl.key_dim != nl.query_dim:
                self.add(("cells", group, "nonlocal", "query_dim"),
                         f"the non-local block compares queries with keys, so query_dim must equal "
                         f"key_dim = {nl.key_dim}, found query_dim: {nl.query_dim}",
                         hint=f"set query_dim: {nl.key_dim}")
        inf = att.inference
        P = self.d.stages
        if inf is not None and P > 0 and inf.key_dim % (2 ** P):
            k = inf.key_dim
            up = -(-k // 2 ** P) * 2 ** P
            self.add(("attention", "inference", "key_dim"),
                     f"the stem is widened by key_dim / 2^P channels so that the {P} down-sampling "
                     f"block(s) double them into exactly key_dim key channels; key_dim must be divisible "
                     f"by 2^{P} = {2 ** P}, found {k}",
                     hint=f"use key_dim: {up}" + (f" or {up - 2 ** P}" if up - 2 ** P > 0 else ""),
                     near=(("cells", "preprocess", "scales"),))

    def check_sources(self) -> None:
        L = self.spec.hierarchy.layers
        for name in ("generative", "inference"):
            a: DepthwiseAttention | None = getattr(self.spec.attention, name)
            if a is None:
                continue
            base = ("attention", name)
            if name == "generative" and L < 2:
                self.add(base, f"the generative attention of layer l reads the contexts of layers 0..l-1, "
                               f"so it needs at least 2 layers, found hierarchy.layers: {L}",
                         hint="set attention.generative: null", near=(("hierarchy", "layers"),))
                continue
            most = L - 1 if name == "generative" else L + 1
            src = a.sources
            if isinstance(src, LastK):
                at = base + ("sources", "last")
                if src.last == 1:
                    self.add(at, "a window of 1 leaves each layer a single candidate, so the softmax weight "
                                 "is always 1 and the attention only copies it; expected last >= 2",
                             hint=f"use last: 2 or more, or set attention.{name}: null")
                elif src.last > most:
                    self.add(at, f"the window is wider than the most candidates any layer has ({most} with "
                                 f"{L} layers), found last: {src.last}; it means the same as sources: all",
                             hint=f"use sources: all, or last <= {most}")
            elif isinstance(src, Explicit):
                for l in sorted(src.explicit):
                    self._check_explicit(name, l, src.explicit[l])

    def _check_explicit(self, name: str, l: int, entries: list[int]) -> None:
        L = self.spec.hierarchy.layers
        at = ("attention", name, "sources", "explicit", l)
        gen = name == "generative"
        lo_l = 1 if gen else 0
        if not lo_l <= l <= L - 1:
            if gen and l == 0:
                self.add(at, "layer 0's prior is N(0, I) and attends to nothing; explicit sources are "
                             f"for layers 1..{L - 1}, found layer 0")
            else:
                self.add(at, f"layer {l} does not exist: explicit sources are for layers "
                             f"{_span(lo_l, L - 1)} ({L} layers), found layer {l}")
            return
        seen: set[int] = set()
        for i, m in enumerate(entries):
            here = at + (Idx(i),)
            if m in seen:
                self.add(here, f"layer {m} is listed twice in the sources of layer {l}; each candidate may appear once")
                continue
            seen.add(m)
            if gen:
                allowed = _span(0, l - 1)
                if not 0 <= m <= L - 1:
                    self.add(here, f"layer {m} does not exist ({L} layers): the prior of layer {l} may attend "
                                   f"to layers above it ({allowed}), found {m}")
                elif m >= l:
                    msg = (f"the prior of layer {l} may only attend to layers above it ({allowed}), found {m}")
                    if m > l and nx.has_path(self.G, f"prior/{l}", f"ctx/{m}"):
                        cycle = nx.shortest_path(self.G, f"prior/{l}", f"ctx/{m}") + [f"prior/{l}"]
                        if len(cycle) > 10:
                            cycle = cycle[:5] + ["..."] + cycle[-3:]
                        msg += f"; the context of layer {m} depends on z_{l}, so this closes a cycle: " + " -> ".join(cycle)
                    self.add(here, msg, hint="the prior p(z_l | z_<l) may only read layers sampled before it")
            else:
                allowed = f"{_span(l, L)}, where {L} is the preprocessing output"
                if not 0 <= m <= L:
                    self.add(here, f"layer {m} does not exist: the posterior of layer {l} may attend to "
                                   f"bottom-up features at or below it ({allowed}), found {m}")
                elif m < l:
                    self.add(here, f"the posterior of layer {l} may only attend to bottom-up features at or "
                                   f"below it ({allowed}), found {m}",
                             hint="the posterior reads e_l and the maps between it and the data")

    def check_graph(self) -> None:
        for p in check_graph(self.G, self.spec):
            self.add(p["parts"], p["message"], p.get("hint"), near=p.get("near", ()))


# ------------------------------------------------------------------------ graph checks

def _order_violations(G: nx.MultiDiGraph) -> set[tuple[str, str, str]]:
    """Attention edges that break the factorisation order (reported from the spec's lists)."""
    L = G.graph.get("layers", 0)
    bad = set()
    for u, v, k, a in G.edges(keys=True, data=True):
        if a.get("kind") != "attention":
            continue
        m, l = a["src_layer"], a["layer"]
        if (a["path"] == "generative" and not m < l) or (a["path"] == "inference" and not l <= m <= L):
            bad.add((u, v, k))
    return bad


def check_graph(G: nx.MultiDiGraph, spec: Spec | None = None) -> list[dict]:
    """Problems of the graph itself: cycles (beyond the order violations reported per list
    entry), nodes the data cannot reach or that cannot reach the data distribution, and
    attention over maps of different spatial sizes. Returns dicts with `parts`, `message` and
    `hint` (the caller turns them into located `Problem`s)."""
    out: list[dict] = []
    H = G.copy()
    H.remove_edges_from(_order_violations(G))
    if not nx.is_directed_acyclic_graph(H):
        try:
            cycle = [u for u, *_ in nx.find_cycle(H)]
        except nx.NetworkXNoCycle:  # pragma: no cover
            cycle = []
        out.append({"parts": ("attention",),
                    "message": "the graph must be acyclic, found a cycle: " + " -> ".join(cycle + cycle[:1])})
    if "x" in G:
        reach = nx.descendants(G, "x") | {"x"}
        lost = [n for n in G if n not in reach and not G.nodes[n].get("constant")]
        if lost:
            kind = G.nodes[lost[0]].get("kind", "")
            out.append({"parts": tuple(NODE_PATH.get(kind, "hierarchy").split(".")),
                        "message": f"every node must be reachable from the data x, found {len(lost)} that "
                                   f"are not: " + ", ".join(lost[:8]) + (" ..." if len(lost) > 8 else "")})
    if "px" in G:
        feeds = nx.ancestors(G, "px") | {"px"}
        dead = [n for n in G if n not in feeds]
        if dead:
            kind = G.nodes[dead[0]].get("kind", "")
            out.append({"parts": tuple(NODE_PATH.get(kind, "hierarchy").split(".")),
                        "message": f"every node must reach the data distribution px, found {len(dead)} that "
                                   f"do not: " + ", ".join(dead[:8]) + (" ..." if len(dead) > 8 else "")})
    for path in ("generative", "inference"):
        mismatched: list[tuple[int, str]] = []
        per_layer: dict[int, list[str]] = {}
        for u, v, a in G.edges(data=True):
            if a.get("kind") == "attention" and a["path"] == path:
                per_layer.setdefault(a["layer"], [v]).append(u)
        for l, nodes in sorted(per_layer.items()):
            reader, cands = nodes[0], sorted(nodes[1:], key=lambda n: G.nodes[n]["layer"])
            sizes = {n: G.nodes[n]["size"] for n in [reader] + cands}
            if len(set(sizes.values())) > 1:
                desc = ", ".join(f"{n} {s}x{s}" for n, s in sizes.items())
                mismatched.append((l, desc))
        if mismatched:
            cause = "cells.encoder.scales" if path == "inference" else "cells.decoder.scales"
            layers = [l for l, _ in mismatched]
            who = "posterior" if path == "inference" else "prior"
            out.append({"parts": ("attention", path),
                        "message": f"attended maps must share the spatial size of the {who} that reads them, "
                                   f"found different sizes at {len(layers)} layer(s) ({_list(layers)}), e.g. "
                                   f"layer {mismatched[0][0]}: {mismatched[0][1]}",
                        "hint": f"keep the spatial size constant across layers ({cause} of 0)",
                        "near": (tuple(cause.split(".")),)})
    return out


def _list(xs: list[int]) -> str:
    return ", ".join(map(str, xs[:6])) + (" ..." if len(xs) > 6 else "")


# ------------------------------------------------------------------------ entry point

def validate(resolved: Any) -> list[Problem]:
    """Every problem of a resolved spec (`loader.ResolvedSpec`, or a bare `Spec`), located in
    its YAML when the spec came from a file; an empty list when the spec is sound."""
    if isinstance(resolved, Spec):
        return _Checker(resolved, None).run()
    return _Checker(resolved.spec, getattr(resolved, "locate", None),
                    getattr(resolved, "positions", None)).run()
