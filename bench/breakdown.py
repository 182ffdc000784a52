"""Where a training step's time goes, and how fast it could be on this machine.

    python bench/breakdown.py specs/omniglot_l15.yaml --batch 16 --threads 1
    python bench/breakdown.py specs/ablations/case16.yaml --batch 8 --threads 2

Prints, for one training step (forward + backward + optimizer, fp32, the layout `avi train`
uses):
  - process CPU time per module class, forward and backward (hooks, no profiler: the profiler
    inflated oneDNN convolutions by about 1.5x here);
  - the step's arithmetic (FlopCounterMode, with SDPA's CPU flash kernel counted as the widths
    it runs on, zero padding included);
  - the floor: those FLOPs at the rate oneDNN reaches on the model's own most common 3x3
    convolution (forward + backward, measured in isolation, same threads). No implementation
    that runs this arithmetic in fp32 through the same kernels can step faster than the floor,
    so `step / floor` bounds any speed-up that keeps the function computed.

CPU time is used because a 2-core machine is rarely quiet: another process's load inflates the
wall time of a step by up to 2x, its CPU time by a few percent. Not run in CI.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import batch_for, model_for, train_step_fn  # noqa: E402

from builders.network import attention_paths, conv, depthwise_attention, merge, nonlocal_block  # noqa: E402

aten = torch.ops.aten
# SDPA's CPU flash kernels have no FLOP formula in torch; count them as torch counts the CUDA ones.
FLASH_CPU = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
}
TIMED = (conv.WNConv2d, nonlocal_block.NonLocal, torch.nn.BatchNorm2d, torch.nn.ELU,
         depthwise_attention.ContextLayerNorm)
FORWARD_ONLY = (merge.TopDownMerge, merge.BottomUpMerge, attention_paths.GenerativeAttention,
                attention_paths.InferenceAttention)


def step_flops(model, x) -> int:
    with FlopCounterMode(display=False, custom_mapping=FLASH_CPU) as counter:
        out = model(x)
        (out.nll + out.kl.sum(1)).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def module_times(model, step) -> tuple[float, dict]:
    """CPU seconds of one step, and per module class {name: [forward s, backward s]}.
    Classes nest (a NonLocal runs inside a merge), so the rows overlap: read them one by one."""
    spent = collections.defaultdict(lambda: [0.0, 0.0])
    started: dict = {}
    handles = []

    def timer(kind: int, key: str, start: bool):
        def hook(m, *_):
            if start:
                started[(kind, id(m))] = time.process_time()
            elif (kind, id(m)) in started:
                spent[key][kind] += time.process_time() - started.pop((kind, id(m)))
        return hook

    for m in model.modules():
        if isinstance(m, TIMED + FORWARD_ONLY):
            key = type(m).__name__
            handles += [m.register_forward_pre_hook(timer(0, key, True)),
                        m.register_forward_hook(timer(0, key, False))]
            if isinstance(m, TIMED):    # full backward hooks on leaves only (they wrap inputs)
                handles += [m.register_full_backward_pre_hook(timer(1, key, True)),
                            m.register_full_backward_hook(timer(1, key, False))]
    t = time.process_time()
    step()
    total = time.process_time() - t
    for h in handles:
        h.remove()
    return total, dict(spent)


def conv_rate(model, batch: int, memory_format) -> tuple[float, str]:
    """FLOP/s of oneDNN on the model's most common 3x3 convolution, forward + backward."""
    shapes = collections.Counter((m.c_in, m.c_out) for m in model.modules()
                                 if isinstance(m, conv.WNConv2d) and m.kernel_size == 3 and m.stride == 1)
    (c_in, c_out), _ = shapes.most_common(1)[0]
    side = model.derived.feature_size
    x = torch.randn(batch, c_in, side, side).contiguous(memory_format=memory_format).requires_grad_()
    w = torch.randn(c_out, c_in, 3, 3).contiguous(memory_format=memory_format).requires_grad_()
    b = torch.zeros(c_out, requires_grad=True)
    flops = 3 * 2 * batch * c_in * c_out * 9 * side * side     # forward, grad input, grad weight
    best = float("inf")
    for i in range(7):
        t = time.process_time()
        y = F.conv2d(x, w, b, padding=1)
        y.backward(torch.ones_like(y))
        if i >= 2:
            best = min(best, time.process_time() - t)
    return flops / best, f"{c_in}->{c_out} 3x3 at {side}x{side}, batch {batch}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last")
    args = p.parse_args()
    args.device, args.dtype = "cpu", "fp32"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, spec = model_for(args.spec, args)
    x = batch_for(spec, args.batch, "cpu", args.memory_format)
    flops = step_flops(model, x)
    step = train_step_fn(model, spec, x, args)
    step()
    runs = [module_times(model, step) for _ in range(args.repeats)]
    total = sorted(r[0] for r in runs)[len(runs) // 2]
    spent = runs[[r[0] for r in runs].index(total)][1]
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    rate, shape = conv_rate(model, args.batch, fmt)
    floor = flops / rate
    print(f"{spec.name}, batch {args.batch}, {args.threads} thread(s), {args.memory_format}, fp32")
    print(f"step: {total * 1e3:,.0f} ms CPU (median of {args.repeats}), {flops / 1e9:,.1f} GFLOP, "
          f"{flops / total / 1e9:.0f} GFLOP/s per CPU second")
    print(f"{'module class':<22} {'forward ms':>11} {'backward ms':>12} {'share':>7}")
    for name, (f, b) in sorted(spent.items(), key=lambda kv: -sum(kv[1])):
        back = f"{b * 1e3:12,.0f}" if b else f"{'(in parts)':>12}"
        print(f"{name:<22} {f * 1e3:11,.0f} {back} {(f + b) / total:7.0%}")
    print(f"convolution rate: {rate / 1e9:.0f} GFLOP/s per CPU second ({shape}, forward + backward)")
    print(f"floor: {floor * 1e3:,.0f} ms CPU; the step is {total / floor:.2f}x the floor")
    print("BENCH " + json.dumps({"bench": "breakdown", "spec": spec.name, "batch": args.batch,
                                 "threads": args.threads, "memory_format": args.memory_format,
                                 "cpu_seconds": total, "flops": flops, "conv_flops_per_s": rate,
                                 "floor_cpu_seconds": floor,
                                 "modules": {k: {"forward": f, "backward": b} for k, (f, b) in spent.items()}}))


if __name__ == "__main__":
    main()
