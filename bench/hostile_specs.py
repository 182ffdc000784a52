"""Time and memory of `avi validate` on hostile specs (issue 10's acceptance: a 1 KB alias
bomb and a 10,000-key spec rejected in under 1 s and 2 s, under 200 MB).

    python bench/hostile_specs.py            # one process per case, wall time and peak RSS

Each case runs as its own `python -m cli.main validate` process, so the numbers include the
interpreter start and imports; the `quickstart` row (a valid spec) is that baseline.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cases() -> dict[str, str]:
    bomb = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    return {
        "alias bomb (9^12 values, 1 KB)": "description: x\n" + "\n".join(bomb) + "\n",
        "10,000 unknown keys": "name: many\n" + "".join(f"key{i}: {i}\n" for i in range(10_000)),
        "brackets 5,000 deep": "description: " + "[" * 5000 + "]" * 5000 + "\n",
        "dense flow list (512 KiB)": "[" + "a," * ((512 << 10) // 2 - 2) + "a]",
    }


def run(path: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one `avi validate` process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "validate", str(path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(proc.pid, 0)          # this child's own peak, not the largest so far
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode


def main() -> None:
    print(f"{'case':34s} {'wall s':>7s} {'peak MB':>8s} {'exit':>5s}   (load average {os.getloadavg()[0]:.1f})")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("quickstart (valid, the baseline)", REPO / "specs" / "quickstart.yaml")]
        for name, text in cases().items():
            path = Path(tmp) / f"{len(rows)}.yaml"
            path.write_text(text)
            rows.append((name, path))
        for name, path in rows:
            wall, rss, code = run(path)
            print(f"{name:34s} {wall:7.2f} {rss:8.0f} {code:5d}")


if __name__ == "__main__":
    main()
