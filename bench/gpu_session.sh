#!/usr/bin/env bash
# Issue 12 part 2 in one run of the device tool (one H100 or H200, about 9 minutes of the 15
# a session gets). Never run in CI. Prepare once, here, in the repository root (the device
# image has torch, numpy, pyyaml, typer, rich and networkx, but not pydantic):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
#
# then call the device tool's run with command "bash bench/gpu_session.sh", carry [".whl"],
# timeout_s 590. Everything it prints is also in $OUT/gpu_session.log; the BENCH lines are
# the figures for docs/benchmarks.md (section 8 lists what each step exercises).
set -uo pipefail
OUT=${OUT:-/tmp/avi-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_session.log") 2>&1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
PY=python3

# Each step has its own time limit, so one that hangs costs its limit, not the session.
step() { local limit=$1; shift; echo "== $* (limit ${limit}s, $(date +%T))"
         timeout "$limit" "$@"; local rc=$?; [ $rc -eq 0 ] || echo "!! exit $rc: $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

# 1. The authors' numbers on CUDA: IEEE fp32 (TF32 off), channels_last, cuDNN and CUDA SDPA.
step 120 env AVI_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider tests/test_equivalence.py -k same_terms

# 2. Training step of case 9 and case 16 at batch 32: fp32, bf16, bf16 compiled (Triton).
for dtype in fp32 bf16; do
    step 100 $PY bench/bench.py step --device cuda --dtype $dtype --batch 32 --repeats 5 --warmup 2
done
step 200 $PY bench/bench.py step --device cuda --dtype bf16 --batch 32 --repeats 5 --warmup 2 --compile

# 3. Importance sampling at K = 500 (the estimator and K forward passes).
step 60 $PY bench/bench.py eval --device cuda --samples 500 --batch 16 --chunk 500 --repeats 1
step 90 $PY bench/bench.py eval --device cuda --samples 500 --batch 8 --chunk 250 --repeats 1 \
    --eval-spec specs/omniglot_l15.yaml

# 4. Two minutes of `avi train` on the paper's CIFAR-10 spec, 40 images per GPU as the
#    authors' README, on CIFAR-shaped noise; Ctrl-C (SIGINT) ends it with a checkpoint.
$PY bench/synthetic_cifar.py /tmp/cifar --per-batch 2000 --test 500
timeout -s INT 150 $PY -m cli.main train specs/cifar10_l16.yaml --device cuda \
    --set data.root=/tmp/cifar --set train.batch_size=40 --out /tmp/avi-run
cp /tmp/avi-run/metrics.jsonl "$OUT/" 2>/dev/null
$PY - <<'EOF'
import json, statistics
rows = [json.loads(l) for l in open("/tmp/avi-run/metrics.jsonl") if '"it_per_s"' in l]
rate = statistics.median(r["it_per_s"] for r in rows[1:] or rows) * 40      # images / s
hours = 400 * 50_000 / rate / 3600
print(f"avi train cifar10_l16, batch 40, fp32: {rate:.1f} images/s; 400 epochs of 50,000 images "
      f"= {hours:.0f} GPU-hours on this GPU (paper: 272 V100-hours)")
print("BENCH " + json.dumps({"bench": "train_projection", "images_per_s": rate, "gpu_hours_400_epochs": hours}))
EOF
echo "== done $(date +%T)"
