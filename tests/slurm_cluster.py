"""The real SLURM the sweep tests run against (tools/slurm/start.sh starts a one-node cluster
on this machine; .ci/run starts it before the tests). No mocks: where `sbatch` is not on the
PATH the tests skip with the reason, except under CI, where a missing SLURM is a failure."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

START = "bash tools/slurm/start.sh"


def require_slurm() -> None:
    """Skip (fail under CI) unless a SLURM cluster answers here."""
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"SLURM tests cannot run under CI: {reason} (.ci/run starts it with {START})")
    pytest.skip(f"{reason}; start a one-node cluster with `sudo {START}` to run the SLURM tests")


def _missing() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on the PATH (no SLURM here)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo does not answer ({e})"
    if not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
        return f"the SLURM cluster has no usable node (sinfo: {' '.join(states) or 'nothing'})"
    return None
