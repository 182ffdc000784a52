"""`--devices N` of `avi train` and `avi eval`: run the same command again under torchrun with N
processes on this machine (torchrun, not avi, starts and watches them)."""
from __future__ import annotations

import signal
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
    """Run this same command under torchrun with n processes (without --devices); its exit code.

    torchrun runs in a session of its own, so that a Ctrl-C reaches it once, through this
    process, which waits for it whatever happens: torchrun passes the signal on to its workers
    (they finish the step and write last.pt) and waits for them. A second Ctrl-C is not passed
    on (it would make torchrun leave with its workers still writing); SIGTERM and SIGHUP are."""
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
    started: list[subprocess.Popen] = []
    received: list[int] = []

    def pass_on(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in received:
            sys.stderr.write("interrupt: still waiting for the processes to write checkpoints/last.pt\n")
            return
        received.append(signum)
        for proc in started:
            proc.send_signal(signum)

    # Handlers first: a signal between the start and the handlers would leave torchrun orphaned.
    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        started.append(subprocess.Popen(cmd, start_new_session=True))
        for signum in received:                  # arrived while it was starting
            started[0].send_signal(signum)
        return started[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def torchrun() -> int:
    """torchrun's own main, in the launching process. When a worker fails it has said why on
    stderr (or was killed); torchrun then raises ChildFailedError, whose traceback and failure
    table would bury that message, so only its exit code is kept: the first failed worker's
    (1 for a worker killed by a signal). A signal to torchrun itself (passed on by relaunch)
    ends in SignalException once its workers are gone: 128 + the signal, as a shell says."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main
    try:
        main()
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    except SignalException as e:     # its workers were sent the signal and waited for
        return 128 + int(e.sigval)
    return 0
