"""The README's walk-through can be followed as written (issue 23 item 2): its commands, in
order, never write one run directory twice, every one is a real `avi` command, and every
number tools/readme/regenerate.py puts into the README has exactly one place to go."""
from __future__ import annotations

import importlib.util
import math
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def regenerate():
    spec = importlib.util.spec_from_file_location("regenerate", REPO / "tools" / "readme" / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_walk_through_commands_run_in_order_without_collisions(regenerate):
    import typer

    from cli.main import app
    commands = regenerate.readme_commands((REPO / "README.md").read_text())
    assert commands[0] == "avi train specs/quickstart.yaml"        # the install line's avi part
    assert "avi diff runs/quickstart_1ep runs/quickstart_1ep_no_attention" in commands
    runs = regenerate.trained_runs(commands)
    assert len(runs) == 5 and len(set(runs)) == len(runs), runs     # "already holds a run" before
    names = set(typer.main.get_command(app).commands)
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "avi" and args[1] in names, command
        if args[1] in ("eval", "sample", "plot", "export", "diff"):   # they read runs made before
            for arg in args[2:]:
                if arg.startswith("runs/") and not arg.endswith((".png", ".svg", ".pdf")):
                    assert any(arg == r or arg.startswith(r + "/") for r in runs), (command, arg)
    assert regenerate.quick("avi eval runs/x -k 20") == "avi eval runs/x -k 20 --limit 20"


def test_every_number_has_one_place_in_the_readme(regenerate):
    """A README edit that drops or duplicates a sentence the script fills in fails here, not
    after half an hour of training."""
    values = {
        "quickstart": {"epochs": 8, "steps": 1128, "test_nelbo": 100.5, "seconds": 361.0},
        "quickstart_eval": {"nll": 95.0, "se": 0.9, "nelbo": 100.0, "seconds": 70.0},
        "figures": {"beta": 0.4, "attention": 130.0, "no_attention": 125.0, "epoch_minutes": [4.0, 8.0]},
        "comparing": {"steps_per_epoch": 141, "images": 500, "means": [[184.0, 1.7], [193.0, 1.4]],
                      "rows": ["│ Δ NLL (nats)     │ reference │ +9.00 ± 0.60 [+7.8, +10.2] * │",
                               "│ Δ -ELBO (nats)   │ reference │ +10.00 ± 0.50 [+9.0, +11.0] * │"],
                      "paired_se": 0.6, "separate_se": math.hypot(1.7, 1.4),
                      "train_seconds": [90.0, 52.0], "eval_seconds": [50.0, 30.0]},
        "parameters": {"quickstart.yaml": 1_079_249, "cifar10_l16.yaml": 118_974_679,
                       "cifar10_l16_nvae.yaml": 79_206_420, "omniglot_l15.yaml": 7_873_595,
                       "mnist_l15.yaml": 25_013_267, "ablations": [39_473_940, 118_974_679]},
    }
    readme = (REPO / "README.md").read_text()
    new = regenerate.rewrite(readme, regenerate.substitutions(values, "abc1234", "2-core CPU", "2026-12-02"))
    for text in ("on commit `abc1234` (2-core CPU, 2026-12-02)", "took 6 min 1 s (8 epochs, 1,128",
                 "test NELBO of **100.50 nats**", "-log p(x) = 95.00 +- 0.90 nats, -ELBO 100.00 (70 s)",
                 "the run without attention is\nahead (test NELBO 125.00 vs 130.00 nats)",
                 "Each epoch took 4.0 to 8.0 minutes.", "+9.00 ± 0.60 [+7.8, +10.2]",
                 "the two means are 184.00 ± 1.70 and 193.00 ± 1.40 nats",
                 "(0.60 nats) is 27% of the 2.20 nats", "On the 500 test digits", "Training took 90 s and 52 s",
                 "| 1.08 M |", "| 118.97 M |", "| 39.5 - 119.0 M |"):
        assert text in new, text
    assert regenerate.rewrite(new, regenerate.substitutions(values, "abc1234", "2-core CPU", "2026-12-02")) == new
    assert "tools/readme/regenerate.py" in readme
