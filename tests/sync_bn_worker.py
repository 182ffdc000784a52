"""Run by tests/test_sync_batch_norm.py under `torchrun --nproc-per-node 2` (gloo, CPU): each
process holds its half of one batch in a GlobalBatchNorm2d; the outputs, input gradients,
DDP-averaged parameter gradients and running statistics must equal one process's
nn.BatchNorm2d on the whole batch. Prints one line per check; exits 1 on a mismatch."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, sys.argv[1])                      # the repository
from builders.train.sync_batch_norm import GlobalBatchNorm2d, use_global_batch_statistics  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)                             # the same batch and weights everywhere
    batch, channels = 8, 5
    x = (torch.randn(batch, channels, 6, 6) * 3 + 2).contiguous(memory_format=torch.channels_last)
    target = torch.randn(batch, channels, 6, 6)
    reference = nn.BatchNorm2d(channels)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    mine = nn.Sequential(nn.BatchNorm2d(channels))
    mine.load_state_dict(nn.Sequential(reference).state_dict())
    assert use_global_batch_statistics(mine) == 1 and isinstance(mine[0], GlobalBatchNorm2d)

    whole = x.clone().requires_grad_()
    y_ref = reference(whole)
    ((y_ref - target) ** 2).mean().backward()        # one process: the mean loss of the batch

    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    part = x[rows].clone().requires_grad_()
    y = mine(part)
    ((y - target[rows]) ** 2).mean().backward()      # each process: the mean of its share
    grads = [mine[0].weight.grad.clone(), mine[0].bias.grad.clone()]
    for g in grads:                                  # what DDP does to parameter gradients
        dist.all_reduce(g)
        g /= world

    checks = {
        "output": (y, y_ref[rows]),
        # each process's input gradient is that of the summed losses: world x the mean's
        "input grad": (part.grad / world, whole.grad[rows]),
        "weight grad": (grads[0], reference.weight.grad),
        "bias grad": (grads[1], reference.bias.grad),
        "running mean": (mine[0].running_mean, reference.running_mean),
        "running var": (mine[0].running_var, reference.running_var),
    }
    for name, (got, want) in checks.items():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
        print(f"rank {rank}: {name} max |diff| {(got - want).abs().max().item():.2e}", flush=True)
    assert mine[0].num_batches_tracked.item() == reference.num_batches_tracked.item() == 1
    mine.eval()                                      # evaluation: the running statistics
    torch.testing.assert_close(mine(x), reference.eval()(x), rtol=1e-5, atol=1e-6)
    print(f"rank {rank}: all equal", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
