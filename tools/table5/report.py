"""Summarise the miniature Table 5 sweep (docs/table5_mini.md): each case's -log p(x) and the
paired differences behind the paper's three observations, from `avi diff --json`.

    python tools/table5/report.py sweeps/table5_mini      # Markdown tables on stdout

Needs the sweep's 16 runs evaluated on the same test images (avi sweep --eval-k ...)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SWITCHES = [(g, i, n) for g in "-G" for i in "-I" for n in "-N"]
PAIRS = [("attention + non-local vs none, L = 4 (paper 1 vs 8)", 1, 8),
         ("attention + non-local vs none, L = 8 (paper 9 vs 16)", 9, 16),
         ("shallow all-on vs deep baseline (paper 8 vs 9)", 9, 8),
         ("non-local cells alone, L = 4 (paper 1 vs 2)", 1, 2),
         ("non-local cells alone, L = 8 (paper 9 vs 10)", 9, 10)]


def diff(sweep: Path, runs: list[int]) -> dict:
    args = [str(sweep / f"mini{c:02d}") for c in runs]
    out = subprocess.run([sys.executable, "-m", "cli.main", "diff", *args, "--json"],
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def main(sweep: Path) -> None:
    d = diff(sweep, list(range(1, 17)))
    print("| case | L | G | I | N | parameters | -log p(x) (nats) | -ELBO (nats) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in range(1, 17):
        g, i, n = SWITCHES[(c - 1) % 8]
        r = d["results"][c - 1]
        print(f"| {c} | {4 if c <= 8 else 8} | {g} | {i} | {n} | {d['parameters'][c - 1]:,} | "
              f"{r['nll_nats']:.2f} ± {r['nll_stderr_nats']:.2f} | {r['nelbo_nats']:.2f} |")
    print(f"\n{d['results'][0]['evaluated']}.\n")
    print("| comparison | Δ -log p(x), paired (nats) | 95% interval |")
    print("|---|---|---|")
    for what, ref, other in PAIRS:
        p = diff(sweep, [ref, other])["paired"]["comparisons"][1]["nll"]
        mark = " *" if p["significant"] else ""
        print(f"| {what}: case {other} − case {ref} | {p['mean']:+.2f} ± {p['stderr']:.2f}{mark} | "
              f"[{p['low']:+.2f}, {p['high']:+.2f}] |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
