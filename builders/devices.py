"""Which torch device a command runs on (`--device auto|cpu|cuda`), for training and evaluation."""
from __future__ import annotations

import torch


class DeviceError(Exception):
    """The device asked for is not available (the CLI turns it into exit 2)."""


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """"auto" (or None) -> cuda when available, else cpu. A bare "cuda" picks the GPU of this
    data-parallel process (``local_rank``, modulo the GPUs present). Asking for cuda without a
    CUDA device is a DeviceError."""
    name = str(device or "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {name!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} was asked for, but no CUDA device is available")
        if dev.index is None:
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def place(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """The model on `device` in the memory format avi trains and evaluates in: channels_last
    (oneDNN and cuDNN convolve it without re-ordering; docs/benchmarks.md section 6). One
    layout everywhere, so that a run, its evaluation and its export compute the same bits.
    fp32 work stays IEEE fp32 on CUDA (`ieee_fp32`); bf16 is the spec's opt-in."""
    model = model.to(device, memory_format=torch.channels_last)
    ieee_fp32(next(iter(model.parameters()), torch.empty(0)).device)
    return model


def ieee_fp32(device: torch.device) -> None:
    """On CUDA, make fp32 mean IEEE fp32: PyTorch lets cuDNN convolutions run in TF32 (10-bit
    mantissa) by default, which is neither what the paper trained in (V100s have no TF32) nor
    what the equivalence tests check against the authors' code. Opt into speed with bf16."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
