"""train.sync_batch_norm: batch norm over the global batch of a data-parallel run
(builders.train.sync_batch_norm), checked in two real processes against one process's
nn.BatchNorm2d on the whole batch (tests/sync_bn_worker.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_global_batch_norm_in_two_processes_equals_one_process_on_the_whole_batch():
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(REPO / "tests" / "sync_bn_worker.py"), str(REPO)],
                       capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: all equal" in r.stdout
        assert f"rank {rank}: input grad max |diff|" in r.stdout
