"""avi benchmarks: speed and memory of training, evaluation, building, and the attention op.

Run by hand (never as a timed test):

    python bench/bench.py all                       # everything, CPU defaults
    python bench/bench.py step --batch 8            # case 16 vs case 9 training step
    python bench/bench.py depth                     # L = 4, 8, 16, 32
    python bench/bench.py eval                      # importance sampling vs forward passes
    python bench/bench.py build                     # avi validate / avi build wall time
    python bench/bench.py attention                 # vectorised vs loop depth-wise attention
    python bench/bench.py step --device cuda --dtype bf16 --batch 32 [--compile]
    python bench/bench.py reference --davi-src PATH/src --tf-python PATH/bin/python
                                                    # avi vs the authors' TF code (not in "all")
    python bench/breakdown.py SPEC --batch 8        # a step's time per module class; the fp32 floor
    bash bench/gpu_session.sh                       # issue 12 part 2 on a lent GPU (see its header)

Each benchmark prints a table and one JSON line (prefix "BENCH "), the median of --repeats
timed runs after --warmup untimed ones, and the device, dtype, batch and threads it used.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avi_spec import load_spec  # noqa: E402
from builders.devices import ieee_fp32, place  # noqa: E402
from builders.network.build import build_model  # noqa: E402
from builders.network.depthwise_attention import depthwise_attend  # noqa: E402
from builders.train.optim import build_optimizer  # noqa: E402


# ----------------------------------------------------------------------------- helpers

def context(args) -> dict:
    return {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "compile": getattr(args, "compile", False),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, args) -> float:
    """Median seconds of fn() over args.repeats runs after args.warmup runs."""
    for _ in range(args.warmup):
        fn()
    sync(args.device)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fn()
        sync(args.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def autocast(args):
    if args.dtype == "bf16":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return nullcontext()


def peak_memory_reset(args) -> None:
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:                                  # Linux: writing 5 resets the process's peak RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(args) -> float | None:
    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:                                  # CPU: peak resident set since the reset (Linux)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def model_for(spec_path: str, args, overrides=()):
    spec = load_spec(ROOT / spec_path, list(overrides)).spec
    model = build_model(spec, args.device)
    if args.memory_format == "channels_last":          # as `avi train` places it
        return place(model, args.device), spec
    ieee_fp32(torch.device(args.device))                # fp32 means IEEE fp32 either way
    return model, spec


def batch_for(spec, n: int, device: str, memory_format: str = "channels_last") -> torch.Tensor:
    side = spec.data.image.size + 2 * spec.data.pad
    x = torch.rand(n, spec.data.image.channels, side, side, device=device)
    if spec.data.distribution.kind == "bernoulli":
        x = torch.bernoulli(x) * 2 - 1
    else:
        x = torch.round(x * 255) / 127.5 - 1
    return x.contiguous(memory_format=getattr(torch, memory_format.replace("contiguous", "contiguous_format")))


def train_step_fn(model, spec, x, args):
    opt = build_optimizer(model, spec.train.optimizer)      # the spec's Adamax and L2 groups
    model.train()
    forward = torch.compile(model) if getattr(args, "compile", False) else model   # --compile

    def step():
        with autocast(args):
            out = forward(x)
            loss = (out.nll + out.kl.sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def report(title: str, columns: list[str], rows: list[list], payload: dict) -> None:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(str(c).rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))
    print("BENCH " + json.dumps(payload))
    sys.stdout.flush()


def free(model) -> None:
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------- benchmarks

def bench_step(args) -> None:
    """Training step (forward + backward + Adamax) of case 16 (attentive) vs case 9 (NVAE)."""
    rows, results = [], {}
    for case in ("specs/ablations/case09.yaml", "specs/ablations/case16.yaml"):
        model, spec = model_for(case, args)
        x = batch_for(spec, args.batch, args.device, args.memory_format)
        peak_memory_reset(args)
        seconds = timed(train_step_fn(model, spec, x, args), args)
        params = sum(p.numel() for p in model.parameters())
        mem = peak_memory_mb(args)
        results[spec.name] = {"seconds": seconds, "images_per_s": args.batch / seconds,
                              "peak_mb": mem, "parameters": params}
        rows.append([spec.name, f"{params / 1e6:.2f}M", f"{seconds * 1000:.0f}",
                     f"{args.batch / seconds:.2f}", f"{mem:.0f}" if mem else "-"])
        free(model)
    ratio = results["case16"]["seconds"] / results["case09"]["seconds"]
    pratio = results["case16"]["parameters"] / results["case09"]["parameters"]
    rows.append(["ratio 16/9", f"{pratio:.2f}", f"{ratio:.2f}", "", ""])
    report(f"training step, batch {args.batch}", ["spec", "params", "ms/step", "images/s", "peak MB"],
           rows, {"bench": "step", "batch": args.batch, **context(args), "results": results,
                  "time_ratio": ratio, "param_ratio": pratio})


def bench_depth(args) -> None:
    """Step time and memory of the attentive hierarchy as L grows, all else fixed."""
    rows, results = [], {}
    for layers in args.depths:
        model, spec = model_for("specs/ablations/case16.yaml", args,
                                [f"hierarchy.layers={layers}"] + args.depth_overrides)
        x = batch_for(spec, args.batch, args.device, args.memory_format)
        peak_memory_reset(args)
        seconds = timed(train_step_fn(model, spec, x, args), args)
        mem = peak_memory_mb(args)
        results[layers] = {"seconds": seconds, "peak_mb": mem}
        rows.append([layers, f"{seconds * 1000:.0f}", f"{seconds * 1000 / layers:.1f}",
                     f"{mem:.0f}" if mem else "-"])
        free(model)
    report(f"depth scaling (case 16, {' '.join(args.depth_overrides) or 'as published'}), batch {args.batch}",
           ["L", "ms/step", "ms/step/layer", "peak MB"], rows,
           {"bench": "depth", "batch": args.batch, "overrides": args.depth_overrides,
            **context(args), "results": results})


def bench_eval(args) -> None:
    """Importance sampling (log_weights: bottom-up once, K samples in the batch) vs the K
    forward passes a naive estimator would need."""
    model, spec = model_for(args.eval_spec, args)
    model.eval()
    x = batch_for(spec, args.batch, args.device, args.memory_format)
    rows, results = [], {}
    with torch.no_grad(), autocast(args):
        t_fwd = timed(lambda: model(x), args)
        for k in args.samples:
            chunk = min(k, args.chunk)

            def estimate():
                for start in range(0, k, chunk):
                    model.log_weights(x, min(chunk, k - start))
            t = timed(estimate, args)
            naive = k * t_fwd
            results[k] = {"seconds": t, "forward_equivalent_seconds": naive,
                          "image_samples_per_s": args.batch * k / t, "ratio_to_forwards": t / naive}
            rows.append([k, f"{t:.3f}", f"{naive:.3f}", f"{args.batch * k / t:.1f}", f"{t / naive:.2f}"])
    report(f"importance sampling ({spec.name}), batch {args.batch}, chunk {args.chunk}",
           ["K", "s (estimator)", "s (K forwards)", "image x samples/s", "ratio"], rows,
           {"bench": "eval", "spec": spec.name, "batch": args.batch, "chunk": args.chunk,
            **context(args), "forward_seconds": t_fwd, "results": results})


def bench_build(args) -> None:
    """Wall time of the real commands for the 119M-parameter spec (fresh processes)."""
    rows, results = [], {}
    avi = [sys.executable, "-m", "cli.main"]
    for name, cmd in (("validate", avi + ["validate", "specs/cifar10_l16.yaml"]),
                      ("build (meta)", avi + ["build", "specs/cifar10_l16.yaml", "--json"])):
        times = []
        for _ in range(max(1, args.repeats)):
            t = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        results[name] = statistics.median(times)
        rows.append([name, f"{results[name]:.2f}"])
    report("avi validate / avi build, specs/cifar10_l16.yaml (process wall time, incl. imports)",
           ["command", "seconds"], rows, {"bench": "build", **context(args), "results": results})


def attend_layer_loop(query, keys, values):
    """The equations as they read: one score map per earlier layer, a softmax across them,
    then a weighted sum, one layer at a time."""
    logits = [(query * k).sum(1) for k in keys]
    top = torch.stack(logits).amax(0)
    weights = [torch.exp(l - top) for l in logits]
    total = sum(weights)
    out = 0
    for w, v in zip(weights, values):
        out = out + (w / total).unsqueeze(1) * v
    return out


def attend_pixel_loop(query, keys, values):
    """Eq. 3-4 literally: for every image and pixel, a softmax over the candidate layers."""
    b_, _, h_, w_ = query.shape
    out = torch.zeros(b_, values[0].shape[1], h_, w_)
    for b in range(b_):
        for i in range(h_):
            for j in range(w_):
                logits = torch.stack([query[b, :, i, j] @ k[b, :, i, j] for k in keys])
                a = torch.softmax(logits, 0)
                out[b, :, i, j] = sum(a[m] * values[m][b, :, i, j] for m in range(len(keys)))
    return out


def bench_attention(args) -> None:
    """All generative attentions of an L = 16 pass: vectorised op vs the per-layer loop."""
    L, C, d, S = 16, 276, 20, 16
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(args.device)  # noqa: E731
    rows, results = [], {}
    for batch in args.attention_batches:
        keys = [mk(batch, d, S, S) for _ in range(L)]
        values = [mk(batch, C, S, S) for _ in range(L)]
        queries = [mk(batch, d, S, S) for _ in range(L)]
        def vectorised():
            for l in range(1, L):
                depthwise_attend(queries[l], keys[:l], values[:l])

        def loop():
            for l in range(1, L):
                attend_layer_loop(queries[l], keys[:l], values[:l])

        ref = attend_layer_loop(queries[L - 1], keys[:L - 1], values[:L - 1])
        got = depthwise_attend(queries[L - 1], keys[:L - 1], values[:L - 1])[0]
        assert torch.allclose(ref, got, atol=1e-4), "vectorised and loop attention disagree"
        tv, tl = timed(vectorised, args), timed(loop, args)
        results[batch] = {"vectorised_s": tv, "loop_s": tl, "speedup": tl / tv}
        pixel = "-"
        if batch == 1:      # the per-pixel reference is too slow to time at larger batches
            assert torch.allclose(attend_pixel_loop(queries[L - 1], keys[:L - 1], values[:L - 1]),
                                  got, atol=1e-4)
            t = time.perf_counter()
            for l in range(1, L):
                attend_pixel_loop(queries[l], keys[:l], values[:l])
            tp = time.perf_counter() - t
            results[batch].update(pixel_loop_s=tp, pixel_speedup=tp / tv)
            pixel = f"{tp * 1000:.0f} ({tp / tv:.0f}x)"
        rows.append([batch, f"{tv * 1000:.2f}", f"{tl * 1000:.2f}", f"{tl / tv:.1f}x", pixel])
    report(f"depth-wise attention, L={L}, C={C}, d={d}, {S}x{S} (15 attending layers)",
           ["batch", "avi op ms", "layer-loop ms", "speed-up", "per-pixel loop ms"], rows,
           {"bench": "attention", **context(args), "results": results})


def reference_run(args) -> dict:
    """One run of bench/reference_step.py under the TensorFlow interpreter (its own process:
    TF and torch do not share one)."""
    cmd = [args.tf_python, str(ROOT / "bench" / "reference_step.py"), "--davi-src", args.davi_src,
           "--batch", str(args.batch), "--threads", str(torch.get_num_threads()),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup + 1)]
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in r.stdout.splitlines() if l.startswith("REFERENCE ")), None)
    if r.returncode or line is None:
        sys.exit(f"reference run failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[len("REFERENCE "):])


def timed_cpu(fn, args) -> tuple[float, float]:
    """Medians of wall and process CPU seconds (all threads) of fn(): on a shared machine the
    CPU time is what another process's load does not inflate (much)."""
    for _ in range(args.warmup):
        fn()
    wall, cpu = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def bench_reference(args) -> None:
    """A training step of the authors' TF code vs avi's, OMNIGLOT configuration of the paper
    (specs/omniglot_l15.yaml), same batch and threads, in one run: avi, TF, avi again."""
    if not (args.davi_src and args.tf_python):
        sys.exit("reference needs --davi-src (the authors' src/, patched) and --tf-python")
    model, spec = model_for("specs/omniglot_l15.yaml", args)
    x = batch_for(spec, args.batch, args.device, args.memory_format)
    step = train_step_fn(model, spec, x, args)
    peak_memory_reset(args)
    avi = [timed_cpu(step, args)]
    mem = peak_memory_mb(args)
    tf = reference_run(args)
    avi.append(timed_cpu(step, args))
    seconds, cpu = statistics.median(w for w, _ in avi), statistics.median(c for _, c in avi)
    params = sum(p.numel() for p in model.parameters())
    rows = [["authors' TF " + tf["tf"], f"{tf['parameters'] / 1e6:.2f}M", f"{tf['seconds'] * 1000:.0f}",
             f"{tf['cpu_seconds'] * 1000:.0f}", f"{tf['peak_mb']:.0f}" if tf["peak_mb"] else "-"],
            ["avi", f"{params / 1e6:.2f}M", f"{seconds * 1000:.0f}", f"{cpu * 1000:.0f}",
             f"{mem:.0f}" if mem else "-"],
            ["TF / avi", "", f"{tf['seconds'] / seconds:.2f}", f"{tf['cpu_seconds'] / cpu:.2f}", ""]]
    report(f"training step, OMNIGLOT L=15, batch {args.batch}",
           ["code", "params", "wall ms/step", "CPU ms/step", "peak MB"], rows,
           {"bench": "reference", "batch": args.batch, **context(args), "reference": tf,
            "avi": {"seconds": seconds, "cpu_seconds": cpu, "runs": avi, "peak_mb": mem,
                    "parameters": params},
            "speedup": tf["seconds"] / seconds, "cpu_speedup": tf["cpu_seconds"] / cpu})


BENCHES = {"step": bench_step, "depth": bench_depth, "eval": bench_eval, "build": bench_build,
           "attention": bench_attention, "reference": bench_reference}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=[*BENCHES, "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--depth-overrides", nargs="*", default=[],
                   help="--set style overrides for the depth benchmark (e.g. to shrink widths)")
    p.add_argument("--eval-spec", default="specs/quickstart.yaml")
    p.add_argument("--samples", type=int, nargs="+", default=[1, 50, 500])
    p.add_argument("--chunk", type=int, default=50, help="importance samples per image per pass")
    p.add_argument("--attention-batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last",
                   help="of the model's weights and inputs (avi train uses channels_last)")
    p.add_argument("--compile", action="store_true",
                   help="step: torch.compile the model, as train.compile: true (compile time not timed)")
    p.add_argument("--davi-src", help="reference: the src/ folder of the authors' code (patched)")
    p.add_argument("--tf-python", help="reference: a Python with TensorFlow 2.21 + tf_keras + TFP")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name in ([n for n in BENCHES if n != "reference"] if args.which == "all" else [args.which]):
        BENCHES[name](args)


if __name__ == "__main__":
    main()
