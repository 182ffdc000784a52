"""Batch norm over the global batch of a data-parallel run (train.sync_batch_norm).

Each process normalises its share of the batch by the mean and variance of the whole batch:
the per-channel sums of every process are added with a differentiable all-reduce, whose
backward adds the gradients of every process's loss with respect to those sums. Each process
then holds the gradient of the summed losses for its own inputs, and DDP's average over
processes makes the parameter gradients those of the global batch's mean loss, as in one
process (tests/test_sync_batch_norm.py checks both against one process's nn.BatchNorm2d).

torch.nn.SyncBatchNorm does the same on GPUs only (it refuses CPU tensors and gloo), so the
CPU tests could not exercise it; this one runs on both, with the same two passes (mean, then
centred squares) as one process's batch norm. It costs two small all-reduces per batch norm
per forward, and as many in the backward. The differentiable all-reduce is our own few lines:
torch.distributed.nn.functional.all_reduce is deprecated, and the private replacement it names
is differentiable only in recent torch releases.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SumOverProcesses(torch.autograd.Function):
    """y = the sum of x over all processes. Its backward is the same sum of the gradients:
    every process's loss depends on every process's x through y."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverProcesses.apply(grad)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _SumOverProcesses.apply(x)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are the global batch's. Evaluation mode
    is nn.BatchNorm2d's own (running statistics, equal on every process since every process
    updates them from the same global statistics). Every process's share must have the same
    number of images (the trainer splits the global batch evenly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        x32, dims = x.float(), (0, 2, 3)
        n = x.numel() // x.shape[1] * dist.get_world_size()
        mean = all_reduce(x32.sum(dims)) / n
        centred = x32 - mean[None, :, None, None]
        var = all_reduce(centred.square().sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            self._track(mean.detach(), var.detach(), n)
        return y.to(x.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """The running statistics as nn.BatchNorm2d keeps them (the unbiased variance)."""
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_((var * n / max(n - 1, 1)).to(self.running_var.dtype), m)


def use_global_batch_statistics(model: nn.Module) -> int:
    """Make every nn.BatchNorm2d of ``model`` a GlobalBatchNorm2d in place, keeping its
    parameter and buffer tensors (the optimizer and the EMA hold the same ones). Returns how
    many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
            changed += 1
    return changed
