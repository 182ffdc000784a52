"""Regenerate every number and figure of README.md from the current code.

    python tools/readme/regenerate.py            # about 30 minutes on two CPU cores
    python tools/readme/regenerate.py --quick    # the same commands, a few steps each: do they run?

It runs the `avi` commands of the README's walk-through (sections "Start here", "Figures",
"Exporting weights" and "Comparing runs"), as written and in the order shown, in a fresh
folder (--workdir, default build/readme/, holding a link to specs/), then copies the figures
to docs/images/, puts the numbers they produced into README.md and writes
docs/images/README.json: the commit (and whether the tree had changes), the machine, torch,
the date, every command with its wall time, and every number. A command that fails stops it
with its output; a README sentence that no longer matches its pattern stops it before
anything is written. `--quick` adds --max-steps 3 to every `avi train` and --limit 20 to
every `avi eval`, and writes nothing outside the work folder.

docs/benchmarks.md has its own script (bench/bench.py); docs/reference.md its fixtures
(tools/reference/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("Start here", "Figures", "Exporting weights", "Comparing runs")
IMAGES = {"runs/quickstart/samples/prior_t0.8.png": "quickstart_samples.png",
          "curves.png": "quickstart_curves.png", "kl.png": "quickstart_kl.png",
          "attention.png": "quickstart_attention.png"}


# ------------------------------------------------------------------ the README's commands

def readme_commands(text: str) -> list[str]:
    """The `avi` commands of the walk-through sections' ```bash blocks, in order:
    continuation lines joined, comments dropped, and of a `a && b && avi ...` chain (the
    install line) the avi part."""
    commands = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        if not section.startswith(SECTIONS):
            continue
        for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                for part in line.split("&&"):
                    if part.strip().startswith("avi "):
                        commands.append(" ".join(part.split()))
    return commands


def trained_runs(commands: list[str]) -> list[str]:
    """The run directory each `avi train` writes (runs/<name>, or --out)."""
    runs = []
    for command in commands:
        args = shlex.split(command)
        if args[1] != "train" or "--resume" in args:
            continue
        name = Path(args[2]).stem
        for flag, value in zip(args, args[1:]):
            if flag == "--set" and value.startswith("name="):
                name = value.split("=", 1)[1]
        out = next((v for f, v in zip(args, args[1:]) if f in ("--out", "-o")), f"runs/{name}")
        runs.append(out)
    return runs


def quick(command: str) -> str:
    args = shlex.split(command)
    if args[1] == "train":
        args += ["--max-steps", "3"]
    elif args[1] == "eval":
        args += ["--limit", "20"]
    return shlex.join(args)


def run_all(commands: list[str], workdir: Path) -> list[dict]:
    """Run every command in `workdir` with this interpreter's `avi`; stop at a failure."""
    avi = Path(sys.executable).with_name("avi")
    logs = workdir / "logs"
    logs.mkdir()
    done = []
    for i, command in enumerate(commands, 1):
        args = shlex.split(command)
        args[0] = str(avi) if avi.exists() else "avi"
        print(f"[{i}/{len(commands)}] {command}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        # as a terminal 160 columns wide shows them: the README quotes table rows whole
        proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "160"})
        seconds = time.monotonic() - t0
        (logs / f"{i:02d}.txt").write_text(f"$ {command}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        if proc.returncode not in (0, 1) or (proc.returncode == 1 and args[1] != "diff"):
            sys.exit(f"failed (exit {proc.returncode}): {command}\n{proc.stderr[-3000:]}")
        done.append({"command": command, "seconds": round(seconds, 1), "stdout": proc.stdout})
    return done


# ------------------------------------------------------------------ what the runs produced

def epoch_records(run: Path) -> list[dict]:
    """The epoch-end records; a run stopped inside its first epoch (--quick) gets one
    stand-in from its last step record, with NaN for what only an epoch end measures."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ends = [r for r in rows if "test_nelbo" in r]
    return ends or [{"step": rows[-1]["step"], "beta": rows[-1].get("beta", math.nan),
                     "test_nelbo": math.nan, "epoch_seconds": math.nan}]


def evaluation(run: Path, k: int) -> dict:
    results = json.loads((run / "eval.json").read_text())["results"]
    return next(r for r in reversed(results) if r["importance_samples"] == k)


def seconds_of(done: list[dict], start: str) -> float:
    return next(d["seconds"] for d in done if d["command"].startswith(start))


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def numbers(workdir: Path, done: list[dict]) -> dict:
    """Every number the README quotes, from the runs' files and the commands' times."""
    runs = workdir / "runs"
    v: dict = {}
    q = epoch_records(runs / "quickstart")
    v["quickstart"] = {"epochs": len(q), "steps": q[-1]["step"], "test_nelbo": q[-1]["test_nelbo"],
                       "seconds": seconds_of(done, "avi train specs/quickstart.yaml")}
    e = evaluation(runs / "quickstart", 100)
    v["quickstart_eval"] = {"nll": e["nll_nats"], "se": e["nll_stderr_nats"], "nelbo": e["nelbo_nats"],
                            "seconds": seconds_of(done, "avi eval runs/quickstart ")}
    a, b = (epoch_records(runs / n) for n in ("quickstart_2ep", "quickstart_2ep_no_attention"))
    v["figures"] = {"beta": a[-1]["beta"], "attention": a[-1]["test_nelbo"],
                    "no_attention": b[-1]["test_nelbo"],
                    "epoch_minutes": [min(r["epoch_seconds"] for r in a + b) / 60,
                                      max(r["epoch_seconds"] for r in a + b) / 60]}
    c, d = (evaluation(runs / n, 20) for n in ("quickstart_1ep", "quickstart_1ep_no_attention"))
    diff = next(x["stdout"] for x in done if x["command"].startswith("avi diff runs/quickstart_1ep"))
    rows = [line for line in diff.splitlines() if line.startswith(("│ Δ NLL", "│ Δ -ELBO"))]
    paired = re.search(r"± ([\d.]+)", rows[0]) if rows else None
    v["comparing"] = {"steps_per_epoch": epoch_records(runs / "quickstart_1ep")[-1]["step"],
                      "images": c["examples"],
                      "means": [[c["nll_nats"], c["nll_stderr_nats"]], [d["nll_nats"], d["nll_stderr_nats"]]],
                      "rows": rows, "paired_se": float(paired.group(1)) if paired else math.nan,
                      "separate_se": math.hypot(c["nll_stderr_nats"], d["nll_stderr_nats"]),
                      "train_seconds": [seconds_of(done, f"avi train specs/quickstart.yaml --set train.epochs=1 {x}")
                                        for x in ("--set name=quickstart_1ep", "--set attention")],
                      "eval_seconds": [seconds_of(done, "avi eval runs/quickstart_1ep -k"),
                                       seconds_of(done, "avi eval runs/quickstart_1ep_no_attention")]}
    v["parameters"] = spec_parameters()
    return v


def spec_parameters() -> dict:
    """Parameters of every shipped spec as the authors counted them (the README's table;
    built on the meta device: shapes only)."""
    sys.path.insert(0, str(REPO))
    from avi_spec import load_spec
    from builders.network.build import build_model, summary
    count = {p.relative_to(REPO / "specs").as_posix(): summary(build_model(load_spec(p).spec, "meta"))["parameters_reference_count"]
             for p in sorted((REPO / "specs").rglob("*.yaml"))}
    cases = [n for k, n in count.items() if k.startswith("ablations/")]
    return {**{k: n for k, n in count.items() if not k.startswith("ablations/")},
            "ablations": [min(cases), max(cases)]}


# ------------------------------------------------------------------ README.md

def substitutions(v: dict, commit: str, machine: str, date: str) -> list[tuple[str, str]]:
    """(pattern, replacement) pairs; each pattern must match README.md exactly once."""
    q, e, f, c, p = v["quickstart"], v["quickstart_eval"], v["figures"], v["comparing"], v["parameters"]
    ahead = "without" if f["no_attention"] < f["attention"] else "with"
    best, other = sorted([f["attention"], f["no_attention"]])
    (m1, s1), (m2, s2) = c["means"]
    subs = [
        (r"on commit `[0-9a-f]+\+?` \([^)]*\): `avi train specs/quickstart.yaml` took [^(]+\(\d+ epochs, [\d,]+\n"
         r"steps, about [\d.]+ steps/s\) and ended with a test NELBO of \*\*[\d.]+ nats\*\*",
         f"on commit `{commit}` ({machine}, {date}): `avi train specs/quickstart.yaml` took "
         f"{duration(q['seconds'])} ({q['epochs']} epochs, {q['steps']:,}\nsteps, about "
         f"{q['steps'] / q['seconds'] if q['seconds'] else math.nan:.1f} steps/s) and ended with a test NELBO of **{q['test_nelbo']:.2f} nats**"),
        (r"# -log p\(x\) = [\d.]+ \+- [\d.]+ nats, -ELBO [\d.]+ \(\d+ s\)",
         f"# -log p(x) = {e['nll']:.2f} +- {e['se']:.2f} nats, -ELBO {e['nelbo']:.2f} ({e['seconds']:.0f} s)"),
        (r"\(beta [\d.]+\), the run (?:with|without) attention is\nahead \(test NELBO [\d.]+ vs [\d.]+ nats\)",
         f"(beta {f['beta']:.2g}), the run {ahead} attention is\nahead (test NELBO {best:.2f} vs {other:.2f} nats)"),
        (r"Each epoch took [\d.]+ to [\d.]+ minutes\.",
         f"Each epoch took {f['epoch_minutes'][0]:.1f} to {f['epoch_minutes'][1]:.1f} minutes."),
        (r"each trained for one epoch\n\(\d+ steps\)", f"each trained for one epoch\n({c['steps_per_epoch']} steps)"),
        (r"On the [\d,]+ test digits the two means are [\d.]+ ± [\d.]+ and [\d.]+ ± [\d.]+ nats",
         f"On the {c['images']:,} test digits the two means are {m1:.2f} ± {s1:.2f} and {m2:.2f} ± {s2:.2f} nats"),
        (r"```\n│ Δ NLL[^\n]*\n│ Δ -ELBO[^\n]*\n```", "```\n" + "\n".join(c["rows"]) + "\n```"),
        (r"The paired standard error \([\d.]+ nats\) is [\d]+% of the [\d.]+ nats",
         f"The paired standard error ({c['paired_se']:.2f} nats) is {c['paired_se'] / c['separate_se']:.0%} "
         f"of the {c['separate_se']:.2f} nats"),
        (r"Training took \d+ s and \d+ s, evaluation \d+ s and \d+ s;",
         "Training took {:.0f} s and {:.0f} s, evaluation {:.0f} s and {:.0f} s;".format(
             *c["train_seconds"], *c["eval_seconds"])),
    ]
    for spec, count in p.items():
        if spec != "ablations":
            subs.append((rf"(\| `specs/{re.escape(spec)}` \|[^|\n]*\| )[\d.]+ M \|", rf"\g<1>{count / 1e6:.2f} M |"))
    subs.append((r"(\| `specs/ablations/case01\.\.16\.yaml` \|[^|\n]*\| )[\d.]+ - [\d.]+ M \|",
                 rf"\g<1>{p['ablations'][0] / 1e6:.1f} - {p['ablations'][1] / 1e6:.1f} M |"))
    return subs


def rewrite(text: str, subs: list[tuple[str, str]]) -> str:
    for pattern, replacement in subs:
        text, n = re.subn(pattern, lambda m, r=replacement: m.expand(r) if "\\g<" in r else r, text)
        if n != 1:
            sys.exit(f"README.md: {n} matches (need 1) for the pattern {pattern!r}; update "
                     f"tools/readme/regenerate.py with the README")
    return text


# ------------------------------------------------------------------ main

def provenance() -> tuple[str, str, str]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+"                          # made from a tree with uncommitted changes
    import torch
    machine = f"{os.cpu_count()}-core CPU, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    return commit, machine, datetime.date.today().isoformat()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "readme")
    parser.add_argument("--quick", action="store_true", help="a few steps per run; write nothing")
    args = parser.parse_args(argv)
    readme = (REPO / "README.md").read_text()
    commands = readme_commands(readme)
    if args.quick:
        commands = [quick(c) for c in commands]
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    (args.workdir / "specs").symlink_to(REPO / "specs", target_is_directory=True)
    commit, machine, date = provenance()
    done = run_all(commands, args.workdir)
    values = numbers(args.workdir, done)
    new = rewrite(readme, substitutions(values, commit, machine, date))
    record = {"commit": commit, "machine": machine, "date": date, "python": platform.python_version(),
              "commands": [{k: d[k] for k in ("command", "seconds")} for d in done], "numbers": values}
    if args.quick:
        print(json.dumps(record, indent=2, default=float))
        print(f"--quick: every command ran; nothing written outside {args.workdir}", file=sys.stderr)
        return
    images = REPO / "docs" / "images"
    for source, target in IMAGES.items():
        shutil.copyfile(args.workdir / source, images / target)
    (images / "README.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    (REPO / "README.md").write_text(new)
    print(f"README.md, docs/images/ and docs/images/README.json regenerated on {commit}", file=sys.stderr)


if __name__ == "__main__":
    main()
