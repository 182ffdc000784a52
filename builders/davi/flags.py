"""The authors' run.py flags -> an avi spec document.

Their trainer writes the command it ran (`train.sh`, `eval_command.sh`): `--name=value`
flags, the `*_hparams` ones holding `key=value,...` lists (`[..]` groups nested lists).
Every flag that shapes the model, the data or the training maps to a spec field; a flag
(or hparam) left at their default maps to avi's equal default; a value avi cannot express
is a FlagError naming it. `Mapping.rows` says what went where (the import table).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .command import FlagError, _clip, parse_command, split_hparams  # noqa: F401 (re-exported)


# Flags that only place files or pick the mode: recorded, never mapped.
BOOKKEEPING = {"mode", "train_log_dir", "train_log_subdir", "eval_log_dir", "model_filepath",
               "checkpoint_period", "epoch"}
_DATASETS = {  # their dataset -> (avi dataset, image channels, side, pad, distribution, binarize)
    "omniglot": ("omniglot", 1, 28, 2, "bernoulli", "dynamic"),
    # Their MNIST (tfds) is 8-bit: scaled to [0, 1] ("dequantize") and then sampled binary,
    # avi's dynamic binarisation of the IDX files.
    "mnist": ("mnist", 1, 28, 2, "bernoulli", "dynamic"),
    "cifar10": ("cifar10", 3, 32, 0, "discretized_logistic_mixture", "none"),
}


def _int(flag: str, key: str, v: str) -> int:
    """An integer value: digits (or a float literal of an integer, as their parser allows);
    never inf, nan or 1e400, which int() would turn into a traceback or a 400-digit number."""
    x = _num(flag, key, v)
    if not x.is_integer() or abs(x) > _MAX_INT:
        raise FlagError(f"--{flag}: {key}={_clip(v)} is not an integer avi can use")
    return int(x)


_MAX_INT = 2 ** 53      # exact in a float; far above any size, count or epoch


def _int_list(flag: str, key: str, v: str) -> list[int]:
    return [_int(flag, key, x) for x in v.strip("[]").split(",") if x.strip()]


def _num(flag: str, key: str, v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise FlagError(f"--{flag}: {key}={_clip(v)} is not a number") from None
    if not math.isfinite(x):
        raise FlagError(f"--{flag}: {key}={_clip(v)} is not a finite number")
    return x


def _bool(flag: str, key: str, v: str) -> bool:
    if v not in ("True", "False"):
        raise FlagError(f"--{flag}: {key}={v} must be True or False")
    return v == "True"


@dataclass
class Mapping:
    document: dict = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (flag, value, where)

    def put(self, path: str, value: Any, flag: str, raw: str) -> None:
        node = self.document
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
        self.rows.append((flag, raw, f"{path} = {value}"))

    def note(self, flag: str, raw: str, why: str) -> None:
        self.rows.append((flag, raw, why))


# Their cell hparams whose default is the only value avi builds (value -> must equal).
_CELL_FIXED = {"activation": "swish", "use_batch_norm": "True", "use_weight_norm": "True",
               "use_bias": "True", "kernel_size": "3", "use_se": "False", "bn_momentum": "0.9",
               "use_data_init": "False", "node_type": "conv2d", "layer_type": "resnet",
               "stem_kernel_size": "3", "kernel_regularizer": "l2", "bias_regularizer": "l2",
               "batch_norm_regularizer": "l2"}


def _nonlocal(flag: str, hp: dict[str, str]) -> dict | None:
    if not _bool(flag, "use_nonlocal", hp.get("use_nonlocal", "False")):
        return None
    inner = split_hparams(hp.get("nonlocop_hparams", "").strip("[]"))
    for k, v in inner.items():
        if k not in ("key_dim", "query_dim", "use_scale", "alignment_function", "use_layer_norm",
                     "subsample"):
            raise FlagError(f"--{flag}: nonlocop_hparams {k} is not a parameter avi knows")
    for k, ok in (("use_scale", "True"), ("alignment_function", "softmax"),
                  ("use_layer_norm", "False"), ("subsample", "False")):
        if inner.get(k, ok) != ok:
            raise FlagError(f"--{flag}: nonlocop_hparams {k}={inner[k]} cannot be expressed in avi "
                            f"(avi's non-local block has {k}={ok})")
    key = _int(flag, "key_dim", inner.get("key_dim", "32"))
    query = _int(flag, "query_dim", inner.get("query_dim", str(key)))
    return {"key_dim": key, "query_dim": query}


def _cells(m: Mapping, flag: str, raw: str, where: str, own_filters: bool) -> None:
    hp = split_hparams(raw)
    for k, v in hp.items():
        if k in _CELL_FIXED:
            if v != _CELL_FIXED[k]:
                raise FlagError(f"--{flag}: {k}={v} cannot be expressed in avi (its cells use {k}={_CELL_FIXED[k]})")
            m.note(flag, f"{k}={v}", "avi's fixed cell design")
        elif k == "scale":
            scales = _int_list(flag, k, v)
            if any(s not in (-2, 0, 2) for s in scales):
                raise FlagError(f"--{flag}: scale={v}: avi's blocks take -2, 0 or 2")
            m.put(f"{where}.scales", scales, flag, f"{k}={v}")
        elif k == "num_blocks":
            n = _int(flag, k, v)
            scales = _int_list(flag, "scale", hp.get("scale", "-2"))
            if n != len(scales):
                raise FlagError(f"--{flag}: num_blocks={n} but scale has {len(scales)} entries; "
                                "avi takes one scale per block")
            m.note(flag, f"{k}={v}", f"{where}.scales has {n} entries")
        elif k == "num_nodes":
            m.put(f"{where}.nodes", _int(flag, k, v), flag, f"{k}={v}")
        elif k == "num_filters":
            if own_filters:
                m.put(f"{where}.filters", _int(flag, k, v), flag, f"{k}={v}")
            else:
                m.note(flag, f"{k}={v}", "unused by their model here (no stem; the width is derived)")
        elif k == "use_stem":
            m.note(flag, f"{k}={v}", "avi puts the stem in preprocess only, as their defaults do")
        elif k == "lambda_reg":
            m.put("train.optimizer.l2", _num(flag, k, v), flag, f"{k}={v}")
        elif k not in ("use_nonlocal", "nonlocop_hparams"):
            raise FlagError(f"--{flag}: {k}={v} is not a cell parameter avi can express")
    if "use_nonlocal" in hp:
        m.put(f"{where}.nonlocal", _nonlocal(flag, hp), flag, f"use_nonlocal={hp['use_nonlocal']}")


def _merge(m: Mapping, flag: str, raw: str, where: str) -> None:
    hp = split_hparams(raw)
    for k, v in hp.items():
        if k not in ("use_nonlocal", "nonlocop_hparams") and not (k in _CELL_FIXED and v == _CELL_FIXED[k]):
            raise FlagError(f"--{flag}: {k}={v} is not a merge parameter avi can express")
    m.put(f"{where}.nonlocal", _nonlocal(flag, hp), flag, raw or "(no non-local block)")


def _attention(m: Mapping, flag: str, raw: str, where: str) -> None:
    if not raw:
        m.put(where, None, flag, "(empty: no attention)")
        return
    hp = split_hparams(raw)
    doc: dict[str, Any] = {"key_dim": 20, "query_dim": 20, "layer_norm": False}   # their defaults
    for k, v in hp.items():
        if k in ("key_dim", "query_dim"):
            doc[k] = _int(flag, k, v)
        elif k == "use_layer_norm":
            doc["layer_norm"] = _bool(flag, k, v)
        elif (k, v) in (("use_scale", "True"), ("alignment_function", "softmax")) or k == "value_dim":
            continue                      # value_dim is read nowhere in their code
        else:
            raise FlagError(f"--{flag}: {k}={v} cannot be expressed in avi's depth-wise attention")
    m.put(where, doc, flag, raw)


def _gaussian(m: Mapping, flag: str, raw: str, where: str) -> None:
    hp = split_hparams(raw)
    lo, hi = _num(flag, "log_scale_low_bound", hp.pop("log_scale_low_bound", "-5")), \
        _num(flag, "log_scale_upper_bound", hp.pop("log_scale_upper_bound", "5"))
    m.put(f"{where}.log_scale", [lo, hi], flag, f"log_scale bounds [{lo}, {hi}]")
    noise = max(_num(flag, "noise_stddev", hp.pop("noise_stddev", "-1")), 0.0)
    m.put(f"{where}.noise", noise, flag, f"noise_stddev={noise}")
    if hp:
        raise FlagError(f"--{flag}: {next(iter(hp))} is not a Gaussian parameter avi can express")


def _data_dist(m: Mapping, flag: str, raw: str, kind: str) -> None:
    hp = split_hparams(raw)
    where = "data.distribution"
    for k, v in hp.items():
        if kind == "discretized_logistic_mixture" and k == "num_logistic_mix":
            m.put(f"{where}.mixtures", _int(flag, k, v), flag, f"{k}={v}")
        elif kind == "discretized_logistic_mixture" and k == "log_scale_low_bound":
            m.put(f"{where}.min_log_scale", _num(flag, k, v), flag, f"{k}={v}")
        elif (k, v) in (("high", "255"), ("low", "0")):
            m.note(flag, f"{k}={v}", "their default; avi's only value")
        elif k == "log_scale_upper_bound":
            m.note(flag, f"{k}={v}", "read nowhere in their code (only the lower bound clamps)")
        else:
            raise FlagError(f"--{flag}: {k}={v} cannot be expressed in avi's {kind} distribution")


def _model(m: Mapping, raw: str) -> str:
    hp = split_hparams(raw)
    fixed = {"posterior_type": "gaussian_diag", "prior_type": "gaussian_diag", "num_proc_blocks": "1",
             "data_layer_type": "conv2d", "posterior_layer_type": "conv2d", "prior_layer_type": "conv2d",
             "preproc_encoder_type": "resnet", "encoder_type": "resnet",
             "postproc_decoder_type": "resnet", "decoder_type": "resnet",
             "merge_encoder_type": "conv2d_sum", "merge_decoder_type": "concat_conv2d"}
    kind = hp.get("data_distribution", "discretized_logistic_mixture")
    for k, v in hp.items():
        if k in fixed:
            if v != fixed[k]:
                raise FlagError(f"--hparams: {k}={v} cannot be expressed in avi (it builds {k}={fixed[k]})")
            m.note("hparams", f"{k}={v}", "avi's fixed design")
        elif k == "num_layers":
            m.put("hierarchy.layers", _int("hparams", k, v), "hparams", f"{k}={v}")
        elif k == "layer_latent_shape":
            s = _int_list("hparams", k, v)
            if len(s) != 3 or s[0] != s[1]:
                raise FlagError(f"--hparams: layer_latent_shape={v}: avi takes a square [S,S,Z]")
            m.put("hierarchy.latent", {"channels": s[2], "size": s[0]}, "hparams", f"{k}={v}")
        elif k == "data_distribution":
            if v not in ("bernoulli", "discretized_logistic_mixture"):
                raise FlagError(f"--hparams: data_distribution={v} is not one avi has")
            m.put("data.distribution.kind", v, "hparams", f"{k}={v}")
        elif k == "residual_var_layer":
            m.put("hierarchy.posterior.residual", _bool("hparams", k, v), "hparams", f"{k}={v}")
        else:
            raise FlagError(f"--hparams: {k}={v} is not a model parameter avi can express")
    if kind == "discretized_logistic_mixture":
        m.put("data.distribution.kind", kind, "hparams", "data_distribution (their default)")
    return kind


_SCHEDULES = {"cosine_warmup": "cosine", "cosine_restart_warmup": "cosine_restart"}


def _train(m: Mapping, raw: str) -> None:
    hp = split_hparams(raw)
    gpus = _int("train_hparams", "num_gpus", hp.pop("num_gpus", "1"))
    per = _int("train_hparams", "batch_size", hp.pop("batch_size", "256"))
    m.put("train.batch_size", gpus * per, "train_hparams", f"num_gpus={gpus} x batch_size={per}")
    simple = {"epochs": ("train.epochs", _int), "learning_rate": ("train.optimizer.lr", _num),
              "lr_warmup_epochs": ("train.schedule.warmup_epochs", _num),
              "lr_min_learning_rate": ("train.schedule.min_lr", _num),   # also the warm-up start
              "lr_first_decay_epochs": ("train.schedule.first_cycle_epochs", _num),
              "lr_t_mul": ("train.schedule.cycle_mult", _num),
              "keras_lr_epsilon": ("train.optimizer.eps", _num)}
    betas = [0.9, 0.999]
    for k, v in hp.items():
        if k in simple:
            path, read = simple[k]
            m.put(path, read("train_hparams", k, v), "train_hparams", f"{k}={v}")
            if k == "lr_min_learning_rate":      # their warm-up rises from the minimum
                m.put("train.schedule.warmup_start_lr", _num("train_hparams", k, v), "train_hparams", f"{k}={v}")
        elif k == "learning_rate_schedule":
            if v not in _SCHEDULES:
                raise FlagError(f"--train_hparams: learning_rate_schedule={v} has no avi equivalent")
            m.put("train.schedule.name", _SCHEDULES[v], "train_hparams", f"{k}={v}")
        elif k in ("keras_lr_beta_1", "keras_lr_beta_2"):
            betas[k.endswith("2")] = _num("train_hparams", k, v)
            m.put("train.optimizer.betas", list(betas), "train_hparams", f"{k}={v}")
        elif k == "kl_scheduler":
            kl = split_hparams(v.strip("[]"))
            for kk, vv in kl.items():
                target = {"warmup_epochs": "epochs", "warmup_smooth_start": "start"}.get(kk)
                if target is None:
                    raise FlagError(f"--train_hparams: kl_scheduler {kk} cannot be expressed in avi")
                m.put(f"train.kl_warmup.{target}", _num("train_hparams", kk, vv), "train_hparams", f"{kk}={vv}")
        elif (k, v) in (("optimizer", "adamax"), ("lr_m_mul", "1.0"), ("lr_m_mul", "1")) or \
                k in ("lr_name", "lr_verbose", "lr_steps_per_epoch", "lr_decay_epochs", "keras_lr_name",
                      "keras_lr_kwargs", "keras_lr_momentum"):
            m.note("train_hparams", f"{k}={v}", "no effect here (derived from the data, unused, or avi's only value)")
        else:
            raise FlagError(f"--train_hparams: {k}={v} cannot be expressed in avi's training recipe")
    if hp.get("learning_rate_schedule") == "cosine_restart_warmup" and "lr_first_decay_epochs" not in hp:
        m.put("train.schedule.first_cycle_epochs", 100.0, "train_hparams",
              "lr_first_decay_epochs (their default, 100)")


def _eval(m: Mapping, raw: str) -> None:
    for k, v in split_hparams(raw).items():
        if k == "num_importance_samples":
            m.put("eval.importance_samples", _int("eval_hparams", k, v), "eval_hparams", f"{k}={v}")
        elif k == "batch_size":
            m.put("eval.batch_size", _int("eval_hparams", k, v), "eval_hparams", f"{k}={v}")
        else:
            m.note("eval_hparams", f"{k}={v}", "what their evaluation prints; `avi eval/sample/reconstruct` do it")


def _dataset(m: Mapping, name: str, path: str | None, transform: str | None) -> None:
    if name not in _DATASETS:
        raise FlagError(f"--dataset={name}: avi imports mnist, omniglot and cifar10 runs")
    if name == "mnist" and path:
        # With --dataset_path their trainer reads any dataset from a MATLAB file in OMNIGLOT's
        # layout (transposed on the way); which way up that file's digits are, nothing says.
        raise FlagError(f"--dataset=mnist with --dataset_path={path}: their run.py then reads a "
                        f"MATLAB file in OMNIGLOT's layout, whose image orientation avi cannot "
                        f"know; avi imports MNIST runs made on tfds's MNIST (no --dataset_path), "
                        f"whose IDX files you give with --data-root DIR")
    ds, ch, side, pad, _, binarize = _DATASETS[name]
    m.put("data.dataset", ds, "dataset", name)
    m.put("data.image", {"channels": ch, "size": side}, "dataset", name)
    m.put("data.pad", pad, "dataset", name)
    m.put("data.binarize", binarize, "dataset", name)
    m.put("data.flips", {"horizontal": True, "vertical": True} if name == "cifar10" else None,
          "dataset", f"{name} (their default transform)")
    if name == "omniglot":     # their loader reshapes each 784-column row-major: transposed
        m.put("data.transpose", True, "dataset", "omniglot (their .mat reader's orientation)")
    if path:
        m.put("data.root", path, "dataset_path", path)
    if transform:
        raise FlagError(f"--dataset_transform={transform}: avi imports runs with their default transform only")


def to_spec(flags: dict[str, str], name: str, data_root: str | None = None) -> Mapping:
    """Map a parsed command to a spec document (not yet validated) and the import table."""
    m = Mapping(document={"version": 1, "name": name,
                          "description": "Imported from the authors' run.py flags (avi import-davi)."})
    handlers: dict[str, Callable[[str], Any]] = {
        "decoder_hparams": lambda v: _cells(m, "decoder_hparams", v, "cells.decoder", True),
        "encoder_hparams": lambda v: _cells(m, "encoder_hparams", v, "cells.encoder", False),
        "preproc_encoder_hparams": lambda v: _cells(m, "preproc_encoder_hparams", v, "cells.preprocess", True),
        "postproc_decoder_hparams": lambda v: _cells(m, "postproc_decoder_hparams", v, "cells.postprocess", False),
        "merge_encoder_hparams": lambda v: _merge(m, "merge_encoder_hparams", v, "cells.bottomup_merge"),
        "merge_decoder_hparams": lambda v: _merge(m, "merge_decoder_hparams", v, "cells.topdown_merge"),
        "decoder_attention_hparams": lambda v: _attention(m, "decoder_attention_hparams", v, "attention.generative"),
        "encoder_attention_hparams": lambda v: _attention(m, "encoder_attention_hparams", v, "attention.inference"),
        "posterior_hparams": lambda v: _gaussian(m, "posterior_hparams", v, "hierarchy.posterior"),
        "prior_hparams": lambda v: _gaussian(m, "prior_hparams", v, "hierarchy.prior"),
        "train_hparams": lambda v: _train(m, v),
        "eval_hparams": lambda v: _eval(m, v),
    }
    unknown = [f for f in flags if f not in handlers and f not in BOOKKEEPING
               and f not in ("dataset", "dataset_path", "dataset_transform", "hparams", "data_dist_hparams")]
    if unknown:
        raise FlagError(f"--{unknown[0]} is not a flag of their run.py that avi knows")
    _dataset(m, flags.get("dataset", "cifar10"), flags.get("dataset_path"), flags.get("dataset_transform"))
    kind = _named("hparams", _model, m, flags.get("hparams", ""))
    # Unset attention / merge flags are their defaults: no attention, no non-local block.
    for f in ("decoder_attention_hparams", "encoder_attention_hparams", "merge_encoder_hparams",
              "merge_decoder_hparams", "posterior_hparams", "prior_hparams"):
        _named(f, handlers[f], flags.get(f, ""))
    for f in ("decoder_hparams", "encoder_hparams", "preproc_encoder_hparams",
              "postproc_decoder_hparams", "eval_hparams"):
        if f in flags:
            _named(f, handlers[f], flags[f])
        elif f != "eval_hparams":
            raise FlagError(f"--{f} is not given: their default cell (scale=-2, 16 filters) is not "
                            "one avi imports; give their command with the flag stated")
    _named("train_hparams", handlers["train_hparams"], flags.get("train_hparams", ""))   # their defaults differ from avi's
    _named("data_dist_hparams", _data_dist, m, "data_dist_hparams", flags.get("data_dist_hparams", ""), kind)
    for f in BOOKKEEPING & flags.keys():
        m.note(f, flags[f], "run bookkeeping (paths, mode): not part of the spec")
    if data_root is not None:      # where the data is on this machine wins over their path
        m.put("data.root", data_root, "(--data-root)", data_root)
    elif "root" not in m.document["data"]:
        m.note("dataset_path", "(none)", f"their {m.document['data']['dataset']} came from tfds: "
               "data.root is unset; avi train/eval ask for it (--data-root DIR when importing)")
    return m


def _named(flag: str, handler: Callable, *args: Any) -> Any:
    """handler(*args), its FlagError naming the flag (split_hparams knows only the text)."""
    try:
        return handler(*args)
    except FlagError as e:
        if str(e).startswith("--"):
            raise
        raise FlagError(f"--{flag}: {e}") from None
