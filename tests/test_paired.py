"""Per-example estimates of `avi eval` and the paired comparisons of `avi diff` (issue 14):
two tiny runs trained for two steps on 48 digits and scored on 16, their paired standard
error checked against a direct computation from the per-example files, and runs scored on
other images refused for pairing with the reason."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from avi_spec import load_spec
from builders.evaluation import paired, per_example
from builders.data.datasets import load_images
from builders.evaluation.eval_results import read_results, record_result
from builders.train.training import train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
SPEC = """extends: {base}
name: tiny
data: {{dataset: folder, root: {root}}}
hierarchy: {{layers: 2, latent: {{channels: 4, size: 8}}}}
cells:
  preprocess: {{filters: 8}}
  decoder: {{filters: 8}}
train: {{batch_size: 16, epochs: 1, log_every: 1, checkpoint_every: 2}}
"""


def avi(*args, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def evaluate(run: Path, *args, in_process: bool = False) -> dict:
    """`avi eval --json`: through `python -m cli.main`, or (saving a torch import) the same
    Typer app in this process."""
    argv = ["eval", str(run), "--device", "cpu", "--json", *args]
    if not in_process:
        r = avi(*argv, cwd=run.parent)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    from typer.testing import CliRunner

    from cli.main import app
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """tiny (both attentions) and tiny_b (no generative attention), 2 steps each, scored on
    the 16 test images with K = 3; tiny_b's weights scored on other bits (binarisation seed 1),
    on the train split with K = 2, and an evaluation of an older avi (no per-example file)."""
    root = tmp_path_factory.mktemp("paired")
    for split, n in (("train", 48), ("test", 16)):
        (root / "data" / split).mkdir(parents=True)
        np.save(root / "data" / split / "images.npy", load_images("mnist5k", None, split)[:n, 0])
    spec = root / "tiny.yaml"
    spec.write_text(SPEC.format(base=REPO / "specs" / "quickstart.yaml", root=root / "data"))
    out = {"a": root / "a", "b": root / "b"}
    train(load_spec(spec), out["a"], device="cpu", max_steps=2, progress_mode="quiet")
    train(load_spec(spec, ["attention.generative=null", "name=tiny_b"]), out["b"], device="cpu",
          max_steps=2, progress_mode="quiet")
    for name in ("other_bits", "train_split", "old"):
        out[name] = root / name
        shutil.copytree(out["b"] / "checkpoints", out[name] / "checkpoints")
        shutil.copy(out["b"] / "spec.yaml", out[name] / "spec.yaml")
    evaluate(out["a"], "-k", "3")
    evaluate(out["b"], "-k", "3")
    evaluate(out["other_bits"], "-k", "3", "--binarization-seed", "1", in_process=True)
    evaluate(out["train_split"], "-k", "2", "--split", "train", "--limit", "16", in_process=True)
    old = [{k: v for k, v in d.items() if k not in ("per_example", "binarization_seed", "data_sha256")}
           for d in read_results(out["b"] / "eval.json")]
    (out["old"] / "eval.json").write_text(json.dumps({"format": "avi-evaluations", "results": old}))
    return out


def estimates(run: Path) -> tuple[dict, dict]:
    """(the eval.json document, the arrays of its per-example file, loaded without pickle)."""
    doc = read_results(run / "eval.json")[-1]
    with np.load(run / doc["per_example"]["file"], allow_pickle=False) as z:
        return doc, {k: z[k] for k in z.files}


def test_eval_keeps_the_estimate_of_every_image(runs):
    doc, z = estimates(runs["a"])
    assert doc["per_example"]["file"] == "eval/test_k3_n16_last_raw_bin0.npz"
    assert (runs["a"] / doc["per_example"]["file"]).stat().st_size < 4096          # mostly zip headers
    assert z["index"].tolist() == list(range(16))
    assert z["nll_nats"].dtype == z["nelbo_nats"].dtype == np.float32
    # the summary is the mean (and standard error) of the kept estimates
    assert z["nll_nats"].mean(dtype=np.float64) == pytest.approx(doc["nll_nats"], rel=1e-6)
    assert z["nelbo_nats"].mean(dtype=np.float64) == pytest.approx(doc["nelbo_nats"], rel=1e-6)
    assert z["nll_nats"].std(ddof=1, dtype=np.float64) / 4 == pytest.approx(doc["nll_stderr_nats"], rel=1e-5)
    assert (z["nll_nats"] <= z["nelbo_nats"] + 1e-3).all()        # the IWAE bound, image by image
    identity = json.loads(str(z["identity"]))
    assert identity["binarization_seed"] == doc["binarization_seed"] == 0
    assert identity["data_sha256"] == doc["data_sha256"] and identity["importance_samples"] == 3
    other, _ = estimates(runs["other_bits"])                       # other bits, other images
    assert other["binarization_seed"] == 1 and other["data_sha256"] != doc["data_sha256"]


def test_ten_thousand_cifar_images_stay_small():
    doc = {"split": "test", "importance_samples": 1000, "examples": 10_000, "checkpoint": "best.pt",
           "ema": True, "binarization_seed": None}
    rng = np.random.default_rng(0)
    data = per_example.encode(doc, {"nll_nats": rng.normal(6000, 300, 10_000),
                                    "nelbo_nats": rng.normal(6100, 300, 10_000)})
    assert len(data) < 125_000
    assert per_example.file_name(doc) == "eval/test_k1000_n10000_best_ema.npz"


def test_paired_standard_error_against_a_direct_computation(runs):
    r = avi("diff", runs["a"], runs["b"], "--json", "--no-params", cwd=runs["a"].parent)
    assert r.returncode == 1, r.stderr
    result = json.loads(r.stdout)
    assert result["paired"]["baseline"] == 0 and result["paired"]["comparisons"][0] is None
    c = result["paired"]["comparisons"][1]
    assert c["paired"] is True and c["unit"] == "nats" and c["examples"] == 16
    assert (c["split"], c["importance_samples"], c["binarization_seed"]) == ("test", 3, 0)
    (_, a), (_, b) = estimates(runs["a"]), estimates(runs["b"])
    for key in ("nll", "nelbo"):
        d = b[f"{key}_nats"].astype(np.float64) - a[f"{key}_nats"].astype(np.float64)
        se = d.std(ddof=1) / math.sqrt(d.size)
        t = stats.t.ppf(0.975, d.size - 1)
        got = c[key]
        assert got["mean"] == pytest.approx(d.mean(), rel=1e-12)
        assert got["stderr"] == pytest.approx(se, rel=1e-12)
        assert (got["low"], got["high"]) == pytest.approx((d.mean() - t * se, d.mean() + t * se), rel=1e-9)
        assert got["significant"] == (not got["low"] <= 0 <= got["high"])
        # pairing: the standard error of the difference, not the two separate ones combined
        unpaired = math.hypot(a[f"{key}_nats"].std(ddof=1), b[f"{key}_nats"].std(ddof=1)) / 4
        assert got["stderr"] != pytest.approx(unpaired)

    # the other run as the reference: the same differences, of the other sign
    r = avi("diff", runs["a"], runs["b"], "--json", "--no-params", "--baseline", "tiny_b", cwd=runs["a"].parent)
    flipped = json.loads(r.stdout)["paired"]
    assert flipped["baseline"] == 1
    assert flipped["comparisons"][0]["nll"]["mean"] == pytest.approx(-c["nll"]["mean"])
    assert flipped["comparisons"][0]["nll"]["stderr"] == pytest.approx(c["nll"]["stderr"])

    text = avi("diff", runs["a"], runs["b"], "--no-params", cwd=runs["a"].parent).stdout
    row = next(line for line in text.splitlines() if "Δ NLL (nats)" in line)
    assert "reference" in row and f"{c['nll']['mean']:+.2f} ± {c['nll']['stderr']:.2f}" in row
    assert "tiny_b: paired with tiny on test, K=3, 16 images, binarisation seed 0" in text


def test_runs_scored_on_other_images_are_not_paired(runs):
    names = ("a", "b", "other_bits", "train_split", "old")
    r = avi("diff", *(runs[n] for n in names), "--json", "--no-params", cwd=runs["a"].parent)
    assert r.returncode == 1, r.stderr
    comparisons = dict(zip(names, json.loads(r.stdout)["paired"]["comparisons"]))
    assert comparisons["b"]["paired"] is True
    assert comparisons["other_bits"] == {"paired": False, "reasons": ["binarisation seed differs (0 vs 1)"]}
    assert comparisons["train_split"]["reasons"] == ["split differs (test vs train)", "K differs (3 vs 2)"]
    assert comparisons["old"]["paired"] is False
    assert "no per-example estimates" in comparisons["old"]["reasons"][0]
    assert "re-run avi eval" in comparisons["old"]["reasons"][0]

    text = avi("diff", *(runs[n] for n in names), "--no-params", cwd=runs["a"].parent).stdout
    assert "test, K=3, 16 images, binarisation seed 1" in text          # the evaluated column
    assert "not paired with tiny: binarisation seed differs (0 vs 1)" in text
    assert "not paired with tiny: split differs (test vs train); K differs (3 vs 2)" in text


# ------------------------------------------------------------------ without training

def _doc(**changes) -> dict:
    base = {"dataset": "mnist5k", "split": "test", "importance_samples": 100, "examples": 1000,
            "binarization_seed": 0, "data_sha256": "x", "per_example": {"file": "eval/f.npz"}}
    return {**base, **changes}


def test_every_difference_is_named():
    assert paired.reasons_not_paired(_doc(), _doc(seed=7, checkpoint="other")) == []   # sampling seed: fine
    assert paired.reasons_not_paired(_doc(), _doc(examples=50)) == ["number of images differs (1000 vs 50)"]
    assert paired.reasons_not_paired(_doc(), _doc(dataset="omniglot", data_sha256="y")) == \
        ["data set differs (mnist5k vs omniglot)"]
    assert "the images differ" in paired.reasons_not_paired(_doc(), _doc(data_sha256="y"))[0]
    # the best pair both runs have: K = 100 although the reference also has K = 500
    ref = [_doc(), _doc(importance_samples=500)]
    assert paired.choose_pair(ref, [_doc(examples=50), _doc()]) == (ref[0], _doc())
    assert paired.choose_pair(ref, [_doc(importance_samples=5)]) == ["K differs (500 vs 5)"]
    assert "this run has no evaluation" in paired.choose_pair(ref, [])[0]
    # a spec whose run is an argument too has no results of its own: say how to pick that run
    assert paired.choose_pair([], ref) == ["the reference has no evaluation: run avi eval (or pick an "
                                           "evaluated one with --baseline)"]


def test_one_image_has_no_standard_error():
    one = paired.paired_difference(np.array([1.0]), np.array([3.0]))
    assert one["mean"] == 2.0 and one["stderr"] is None and one["significant"] is False
    same = paired.paired_difference(np.arange(5.0), np.arange(5.0))
    assert same["stderr"] == 0 and same["significant"] is False
    bits = paired.paired_difference(np.zeros(4), np.array([1.0, 2, 3, 4]), scale=0.5)
    assert bits["mean"] == 1.25


def test_a_changed_or_hostile_file_is_refused(tmp_path):
    doc = _doc(checkpoint="best.pt", ema=True)
    saved = record_result(tmp_path / "eval.json", doc, {"nll_nats": [1.0, 2.0], "nelbo_nats": [2.0, 3.0]})
    assert per_example.read(tmp_path, saved).nll_nats.tolist() == [1.0, 2.0]
    # another binarisation is another evaluation: kept beside, not replacing
    record_result(tmp_path / "eval.json", {**doc, "binarization_seed": 1}, {"nll_nats": [1.0], "nelbo_nats": [2.0]})
    assert len(read_results(tmp_path / "eval.json")) == 2 and len(list((tmp_path / "eval").iterdir())) == 2
    path = tmp_path / saved["per_example"]["file"]
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(per_example.PerExampleError, match="changed since"):
        per_example.read(tmp_path, saved)
    buffer = io.BytesIO()                       # an object array: loading it would unpickle
    np.savez(buffer, index=np.arange(2), nll_nats=np.array([object(), 1], dtype=object),
             nelbo_nats=np.zeros(2), identity=np.array("{}"))
    path.write_bytes(buffer.getvalue())
    hostile = {**saved, "per_example": {**saved["per_example"], "sha256": per_example.sha256(buffer.getvalue())}}
    with pytest.raises(per_example.PerExampleError, match="not a per-example file"):
        per_example.read(tmp_path, hostile)
    with pytest.raises(per_example.PerExampleError, match="outside the run"):
        per_example.read(tmp_path, {"per_example": {"file": "../elsewhere.npz"}})
    path.write_bytes(b"hello")                  # numpy would call it a pickle and suggest allow_pickle
    with pytest.raises(per_example.PerExampleError, match=r"not a numpy \.npz archive"):
        per_example.read(tmp_path, {**saved, "per_example": {**saved["per_example"], "sha256": per_example.sha256(b"hello")}})


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero are POSIX")
def test_a_device_or_fifo_is_refused_unread(tmp_path):
    """A copied run directory whose per-example file is a symlink to /dev/zero (read to the
    end: memory exhausted) or a FIFO (open waits for a writer for ever) is refused at once."""
    saved = record_result(tmp_path / "eval.json", _doc(checkpoint="best.pt", ema=True),
                          {"nll_nats": [1.0, 2.0], "nelbo_nats": [2.0, 3.0]})
    path = tmp_path / saved["per_example"]["file"]
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(per_example.PerExampleError, match="not a regular file"):
        per_example.read(tmp_path, saved)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(per_example.PerExampleError, match="not a regular file"):
        per_example.read(tmp_path, saved)


def test_eight_bit_data_are_compared_in_bits_per_dim(tmp_path):
    doc = _doc(dataset="cifar10", binarization_seed=None, dims=3072, checkpoint="best.pt", ema=True)
    nll = np.array([6000.0, 6100.0, 5900.0])
    for name, shift in (("a", 0.0), ("b", [3.0, 5.0, 4.0])):
        record_result(tmp_path / name / "eval.json", doc, {"nll_nats": nll + shift, "nelbo_nats": nll + 50})
    runs = [(tmp_path / n, read_results(tmp_path / n / "eval.json")) for n in ("a", "b")]
    c = paired.compare_runs(runs)["comparisons"][1]
    assert c["unit"] == "bits_per_dim"
    assert c["nll"]["mean"] == pytest.approx(4.0 / (3072 * math.log(2)))
    assert c["nll"]["stderr"] == pytest.approx(1.0 / math.sqrt(3) / (3072 * math.log(2)))
    assert c["nelbo"]["mean"] == 0.0
    record_result(tmp_path / "b" / "eval.json", doc, {"nll_nats": [np.inf, 1, 2], "nelbo_nats": nll})
    runs[1] = (tmp_path / "b", read_results(tmp_path / "b" / "eval.json"))
    assert paired.compare_runs(runs)["comparisons"][1]["reasons"] == \
        ["this run has non-finite estimates (a diverged model?)"]


def test_an_edited_eval_json_neither_crashes_nor_prints_nan(tmp_path):
    """dims that is not a positive whole number compares in nats (it raised TypeError, or
    scaled by a negative or boolean D); a NaN, infinite or overflowing result is not shown
    (it printed 'nan' and made --json invalid JSON, or raised OverflowError)."""
    from cli.diff_runs import shown_result

    est = {"nll_nats": [1.0, 2.0, 4.0], "nelbo_nats": [2.0, 3.0, 5.0]}
    for name in ("a", "b"):
        record_result(tmp_path / name / "eval.json", _doc(checkpoint="best.pt", ema=True), est)
    runs = [(tmp_path / n, read_results(tmp_path / n / "eval.json")) for n in ("a", "b")]
    for dims in ("x", [1], True, -5, 0):
        runs[0][1][0]["dims"] = dims
        c = paired.compare_runs(runs)["comparisons"][1]
        assert c["unit"] == "nats" and c["nll"]["mean"] == 0.0
    runs[0][1].append({**runs[0][1][0], "full_split": "yes"})
    assert paired.compare_runs(runs)["comparisons"][1]["paired"]    # rank compared bool with str
    resolved = load_spec(REPO / "specs" / "quickstart.yaml")
    good = {"nll_nats": 90.5, "importance_samples": 5}
    assert shown_result(tmp_path / "a", [good], resolved)["value"] == 90.5
    for bad in (float("nan"), float("inf"), 10 ** 400, True, "90"):
        assert shown_result(tmp_path / "a", [{**good, "nll_nats": bad}], resolved) is None
        shown = shown_result(tmp_path / "a", [{**good, "nll_stderr_nats": bad, "nelbo_nats": bad}], resolved)
        assert "nll_stderr_nats" not in shown and "nelbo_nats" not in shown      # --json stays JSON


@pytest.mark.parametrize("argv", [["eval", "RUN", "--binarization-seed", str(2 ** 70)],
                                  ["eval", "RUN", "--seed", str(-2 ** 64)],
                                  ["sample", "RUN", "--seed", str(2 ** 64)]])
def test_a_seed_past_64_bits_is_a_bad_flag(argv, runs):
    """torch's generators overflow past 64 bits (ValueError: Overflow when unpacking long long,
    a traceback after the model was loaded): refused as a flag, exit 2, before any work."""
    from typer.testing import CliRunner

    from cli.main import app
    r = CliRunner().invoke(app, [str(runs["a"]) if a == "RUN" else a for a in argv])
    assert r.exit_code == 2 and "a seed is a whole number" in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_a_file_in_the_way_of_eval_folder_is_named(runs, tmp_path):
    """RUN/eval being a file: the result is printed, not saved, and the warning names RUN/eval
    (it said 'eval.json: File exists')."""
    run = tmp_path / "run"
    shutil.copytree(runs["a"] / "checkpoints", run / "checkpoints")
    shutil.copy(runs["a"] / "spec.yaml", run / "spec.yaml")
    (run / "eval").write_text("")
    r = avi("eval", run, "--device", "cpu", "-k", "1", "--limit", "2", cwd=tmp_path)
    assert r.returncode == 0 and "-log p(x)" in r.stdout, r.stderr
    assert f"not saved to {run / 'eval.json'}: File exists ({run / 'eval'}" in r.stderr
    assert not (run / "eval.json").exists()
