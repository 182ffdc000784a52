"""`--devices N` of `avi train` and `avi eval`: run the same command again under torchrun with N
processes on this machine (torchrun, not avi, starts and watches them)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# The workers' interpreter must not look in the current folder for modules: a user's own
# `cli/` or `builders/` package there would be imported instead of avi's (issue 11 item 4).
# `-c` puts '' (the current folder) first on sys.path; dropping it, then putting the folder
# this avi is imported from first, makes every import resolve to this installation.
_SAFE_START = ("import sys; sys.path[:1] = [{root!r}]; sys.argv[0] = {prog!r}; "
               "from {module} import {func}; sys.exit({func}())")


def launched() -> bool:
    """Whether this process is one of several started by torchrun or srun."""
    from builders.launch.environment import launch_environment
    return launch_environment().world_size > 1


def relaunch(n: int) -> int:
    """Run this same command under torchrun with n processes (without --devices); its exit code."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--devices":
            skip = True
            continue
        if a.startswith("--devices="):
            continue
        argv.append(a)
    root = str(Path(__file__).resolve().parents[1])
    launcher = _SAFE_START.format(root=root, prog="torchrun", module="cli.relaunch", func="torchrun")
    worker = _SAFE_START.format(root=root, prog="avi", module="cli.main", func="main")
    cmd = [sys.executable, "-c", launcher, "--standalone", f"--nproc_per_node={n}", "--no-python",
           sys.executable, "-c", worker, *argv]
    return subprocess.call(cmd)


def torchrun() -> int:
    """torchrun's own main, in the launching process. When a worker fails it has said why on
    stderr (or was killed); torchrun then raises ChildFailedError, whose traceback and failure
    table would bury that message, so only its exit code is kept: the first failed worker's
    (1 for a worker killed by a signal)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main
    try:
        main()
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0
