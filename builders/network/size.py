"""How large a spec's model is before anything is allocated: its tensors' shapes from a build
on torch's meta device (shapes only: a 26-billion-parameter model in a tenth of a second), the
memory they take, and a refusal of a model this machine cannot hold or of weights that do
not fit it. A model file of 100 KB whose spec says `filters: 4096` would otherwise allocate
100 GB before its weights were even compared.
"""
from __future__ import annotations

import os

import torch

from .build import build_model

BYTES_PER_VALUE = 4          # float32 parameters and buffers
# Training holds per parameter: the weight, its gradient, Adamax's two moments and the EMA copy.
COPIES = {"train": 5, "load": 2, "build": 1,    # load: the model and the weights read from the file
          "import": 3}   # import-davi: their tensors as read, converted to avi's layout, and the model


class ModelSizeError(ValueError):
    """The model of a spec does not fit in this machine's memory, or the weights of a model
    file do not fit the model of its spec."""


def shapes(spec) -> dict[str, tuple[int, ...]]:
    """Every parameter's and buffer's shape of the spec's model (built on the meta device)."""
    return {k: tuple(t.shape) for k, t in build_model(spec, "meta").state_dict().items()}


def values(shape_map: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shape_map.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def available_memory(device: torch.device) -> int | None:
    """Bytes this process may still allocate on ``device`` (None where it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def check_fits(spec, device: str | torch.device, purpose: str = "train") -> int:
    """The spec's number of parameters and buffers' values; ModelSizeError, with the estimate,
    when ``purpose`` ("train", "load" or "import") needs more memory than ``device`` has free. The
    estimate counts the model's tensors only (activations come on top): a lower bound."""
    n = values(shapes(spec))
    need = n * BYTES_PER_VALUE * COPIES[purpose]
    free = available_memory(torch.device(device))
    if free is not None and need > free:
        raise ModelSizeError(
            f"the model of this spec has {n:,} parameters and buffers: to {purpose} it needs at "
            f"least {human(need)} of memory ({COPIES[purpose]} float32 copies{_why(purpose)}), "
            f"and {torch.device(device).type} has {human(free)} free; make the model smaller "
            f"(cells.*.filters, hierarchy.layers)")
    return n


def _why(purpose: str) -> str:
    return {"train": ": weights, gradients, 2 optimizer moments, EMA",
            "import": ": their weights as read, converted, and the model"}.get(purpose, "")


def check_weights_fit(spec, weights: dict[str, tuple[int, ...]], where: str) -> None:
    """ModelSizeError when the weights of a model file (name -> shape) are not the tensors of the
    model of its spec: compared on shapes, before the model is allocated."""
    expected = shapes(spec)
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & weights.keys() if tuple(weights[k]) != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
            f"{len(wrong)} of another shape (e.g. {wrong[0]}: {list(weights[wrong[0]])} in the file, "
            f"{list(expected[wrong[0]])} in the model)" if wrong else "") if part)
        raise ModelSizeError(f"{where}: the weights ({values(weights):,} values) do not fit the model "
                            f"of its spec ({values(expected):,} values): {detail}")
