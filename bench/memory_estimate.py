"""The training-memory estimate of `avi build SPEC --batch B` against a measured CPU step.

    python bench/memory_estimate.py specs/quickstart.yaml --batch 32 [--set FIELD=VALUE] [--json]
    python bench/memory_estimate.py specs/quickstart.yaml --batch 32 --device cuda

Measured (CPU): a fresh process runs one warm-up step at one image, then builds the model
again and runs two training steps (forward, loss, backward, gradient clipping, the spec's
optimizer: what Trainer.step does); the peak is the process's peak resident memory
(ru_maxrss) less its resident memory just before that model was built (after the warm-up's
freed memory is given back with malloc_trim). glibc's malloc is pinned to return every block of 128 KiB or more
to the system when freed (MALLOC_MMAP_THRESHOLD_), so the resident memory follows the live
tensors instead of keeping freed ones. Measured (CUDA): torch.cuda.max_memory_allocated.
Prints both and their ratio; tests/test_memory.py asserts the ratio on a small spec.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _steps(spec, x, device: str, steps: int) -> None:
    """`steps` training steps of a fresh model on batch `x`: what Trainer.step does."""
    import torch

    from builders.devices import place
    from builders.network.build import build_model
    from builders.train.optim import build_optimizer
    model = place(build_model(spec, device), device)
    optimizer = build_optimizer(model, spec.train.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = out.nll.float().mean() + out.kl.float().sum(1).mean()
        loss.backward()
        del out, loss
        torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True)
        optimizer.step()


def _release_free_heap() -> None:
    """Give the warm-up's freed small blocks back to the system (glibc's malloc_trim), so the
    measured step cannot reuse memory that is resident but not counted in its delta."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(spec_path: str, overrides: list[str], batch: int, device: str) -> int:
    """Peak bytes of two training steps at `batch` images (run in this process). A step at
    one image runs first, so the code and the runtime's caches it touches (pages of libtorch,
    oneDNN's kernels, thread pools) are resident before the baseline is read."""
    import gc
    import resource

    import torch

    from avi_spec.loader import load_spec
    spec = load_spec(spec_path, overrides).spec
    d = spec.data
    side = d.image.size + 2 * d.pad
    torch.manual_seed(0)
    u = torch.rand(batch, d.image.channels, side, side)
    # Model input as the trainer feeds it: binary pixels as -1/1, 8-bit ones as x / 127.5 - 1.
    x = (u > 0.5).float() * 2 - 1 if d.distribution.kind == "bernoulli" else (u * 255).round() / 127.5 - 1
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    _steps(spec, x[:1], device, 1)
    gc.collect()
    _release_free_heap()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _steps(spec, x, device, 2)
        return torch.cuda.max_memory_allocated() - base
    before = _rss_bytes()
    _steps(spec, x, device, 2)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def compare(spec_path: str, overrides: list[str], batch: int, device: str = "cpu") -> dict:
    """Estimate here, measurement in a fresh process (so its peak is the step's own)."""
    from avi_spec.loader import load_spec
    from builders.train.memory import estimate_training_memory
    est = estimate_training_memory(load_spec(spec_path, overrides).spec, batch)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, __file__, spec_path, "--batch", str(batch), "--device", device, "--measure-only"]
    for o in overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
    measured = int(r.stdout.strip().splitlines()[-1])
    return {"spec": spec_path, "overrides": overrides, "batch": batch, "device": device,
            "estimate": est.peak, "measured": measured, "ratio": est.peak / measured,
            "parts": est.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure_only:
        print(measure(a.spec, a.overrides, a.batch, a.device))
        return
    r = compare(a.spec, a.overrides, a.batch, a.device)
    if a.json:
        print(json.dumps(r))
        return
    print(f"{r['spec']} batch {r['batch']} on {r['device']}: estimate {r['estimate'] / MIB:,.1f} MiB, "
          f"measured {r['measured'] / MIB:,.1f} MiB, estimate / measured = {r['ratio']:.3f}")
    print("BENCH " + json.dumps(r))


if __name__ == "__main__":
    main()
