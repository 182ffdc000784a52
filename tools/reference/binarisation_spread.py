"""-log p(x) of an imported run over several binarisations of its test set (not run in CI).

The authors' evaluation binarises the OMNIGLOT test images with an unseeded Bernoulli draw,
so their printed number belongs to a draw nobody recorded. This prints avi's importance-
sampled estimate for DRAWS test-set draws (and, for one draw, over sampling seeds), so a
reference number can be placed within the spread. docs/reference.md has the results.

    python tools/reference/binarisation_spread.py runs/trained_tiny_attn --draws 10 -k 100
"""
from __future__ import annotations

import argparse
import statistics

from builders.evaluation.evaluate import batched, eval_images, importance_sampled_nll
from builders.loading import load_trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--sampling-seeds", type=int, default=5)
    ap.add_argument("-k", type=int, default=100)
    a = ap.parse_args()
    model, resolved, _ = load_trained(a.run, "cpu")
    per_draw = []
    for draw in range(a.draws):
        x = eval_images(resolved.spec, "test", seed=draw)
        r = importance_sampled_nll(model, batched(x, resolved.spec.eval.batch_size), a.k, seed=0)
        per_draw.append(-r["nll_nats"])
        print(f"binarisation draw {draw}: log p(x) = {-r['nll_nats']:.2f} nats", flush=True)
    x = eval_images(resolved.spec, "test", seed=0)
    per_seed = [-importance_sampled_nll(model, batched(x, resolved.spec.eval.batch_size), a.k,
                                        seed=s)["nll_nats"] for s in range(a.sampling_seeds)]
    print(f"over {a.draws} binarisation draws: mean {statistics.mean(per_draw):.2f}, "
          f"sd {statistics.stdev(per_draw):.2f}, min {min(per_draw):.2f}, max {max(per_draw):.2f}")
    print(f"draw 0 over {a.sampling_seeds} sampling seeds: mean {statistics.mean(per_seed):.2f}, "
          f"sd {statistics.stdev(per_seed):.2f}")


if __name__ == "__main__":
    main()
