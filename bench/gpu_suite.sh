#!/usr/bin/env bash
# Every GPU check in one go, for a machine with one NVIDIA GPU and a python that has torch and triton
# (pytest optional; DALI, DeepSpeed and MLflow are not needed). It runs from a plain checkout and
# installs nothing: tada_dist and tada_kernels are put on PYTHONPATH.
#
#   bash bench/gpu_suite.sh OUT_DIR          PYTHON=/path/to/python to pick the interpreter
#
# A first contact of about 5 minutes on an H200, each stage with a time limit:
# 1. the kernel tests on the GPU, without the Triton interpreter (the end-to-end training test is
#    deselected where DeepSpeed or MLflow is missing);
# 2. bench/bench_kernels.py at the trainer's shape (B = 64, H = 1024, bf16): copy bandwidth, CUDA-event
#    timings of grouped_mlp against bmm, entropy attention, attentive entropy; once on a channels-last
#    map without dropout, once on an NCHW map with dropout 0.5;
# 3. bench/bench_step.py: the ResNet-50 step, TADA against source-only, median step times;
# 4. bench/profile_step.py: a profiler trace of real trainer steps (torch loader, generated data),
#    where DeepSpeed is installed (it says so where it is not);
# then a short summary. OUT_DIR receives the logs, CSV and markdown results, the trace, nvidia-smi
# output and versions, and everything is packed into OUT_DIR.tar.gz as well.
# Exit status: 0 when every stage passed, 1 when one failed, timed out or was skipped, 2 when it
# cannot start (no GPU, no torch or triton).
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash bench/gpu_suite.sh OUT_DIR" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

# Check the machine before writing anything.
if ! command -v "$PYTHON" >/dev/null; then
    echo "gpu_suite.sh: no python interpreter '$PYTHON'; set PYTHON=/path/to/python" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import torch, triton' 2>/dev/null; then
    echo "gpu_suite.sh: $PYTHON cannot import torch and triton; both are needed" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_suite.sh: no CUDA device: torch.cuda.is_available() is False; this suite needs an NVIDIA GPU" >&2
    exit 2
fi

mkdir -p "$1"
OUT_DIR=$(cd "$1" && pwd)

# pyproject maps the package tada_kernels to the folder kernels/; without an install, a symlink named
# tada_kernels in a scratch folder on PYTHONPATH gives the folder that name.
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO/kernels" "$SHIM/tada_kernels"
export PYTHONPATH="$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # real kernels on the GPU; the interpreter is for CPU-only machines

{ nvidia-smi && nvidia-smi -q; } >"$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" >>"$OUT_DIR/nvidia-smi.txt"
"$PYTHON" - >"$OUT_DIR/versions.txt" 2>&1 <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)" >>"$OUT_DIR/versions.txt"
cat "$OUT_DIR/versions.txt"

SUMMARY=()
FAILED=0

# run_stage NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, record the outcome.
run_stage() {
    local name=$1 limit=$2 started=$SECONDS status
    shift 2
    echo
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    status=${PIPESTATUS[0]}
    local outcome="ok"
    if [[ $status -eq 124 || $status -eq 137 ]]; then
        outcome="TIMED OUT"
    elif [[ $status -ne 0 ]]; then
        outcome="FAILED (exit $status)"
    fi
    [[ $outcome == ok ]] || FAILED=1
    SUMMARY+=("$(printf '%-14s %-18s %4d s' "$name" "$outcome" $((SECONDS - started)))")
}

TESTS=()
for test_file in tests/test_kernels_triton.py tests/test_kernels_api.py; do
    [[ -f $test_file ]] && TESTS+=("$test_file")
done
if ! "$PYTHON" -c 'import pytest' 2>/dev/null; then
    skipped="pytest is not installed for $PYTHON"
elif [[ ${#TESTS[@]} -eq 0 ]]; then
    skipped="no kernel test files in tests/"
fi
if [[ -n ${skipped:-} ]]; then
    echo "$skipped: kernel tests skipped, the benchmarks still run" | tee "$OUT_DIR/tests.log"
    SUMMARY+=("$(printf '%-14s %s' tests "SKIPPED ($skipped)")")
    FAILED=1
else
    DESELECT=()
    if ! "$PYTHON" -c 'import deepspeed, mlflow' 2>/dev/null; then
        # This test trains through tada_dist.train, which needs DeepSpeed and MLflow.
        DESELECT=(--deselect tests/test_kernels_triton.py::test_training_run_with_triton_kernels_follows_the_eager_run)
        echo "DeepSpeed or MLflow missing: the end-to-end training test is deselected" | tee "$OUT_DIR/tests_deselected.txt"
    fi
    run_stage tests 110 "$PYTHON" -m pytest -p no:cacheprovider -q "${DESELECT[@]}" "${TESTS[@]}"
fi
SHAPE=(--batch-sizes 64 --hidden 1024 --dtypes bf16 --out-dir "$OUT_DIR")
run_stage bench_kernels 70 "$PYTHON" bench/bench_kernels.py "${SHAPE[@]}" --time-limit 50
run_stage kernels_nchw 50 "$PYTHON" bench/bench_kernels.py "${SHAPE[@]}" --layout nchw --dropout 0.5 \
    --kernels grouped_mlp entropy_attention attention_pool --modes full --name kernels_nchw_dropout --time-limit 35
run_stage bench_step 60 "$PYTHON" bench/bench_step.py --out-dir "$OUT_DIR"
if "$PYTHON" -c 'import deepspeed' 2>/dev/null; then
    run_stage profile_step 60 "$PYTHON" bench/profile_step.py --config configs/default.yaml --steps 10 --warmup 5 \
        --report "$OUT_DIR/profile_step.md" --trace "$OUT_DIR/trace_trainer.json" \
        --title "Profile of a tada-train step (ResNet-50, bf16, torch loader)" \
        data.loader=torch data.num_threads=4 model.backbone=resnet50 data.resize=256 data.crop=224 \
        model.region_hidden=1024 distributed.precision=bf16
else
    echo "DeepSpeed is not installed for $PYTHON: no profile of real trainer steps" | tee "$OUT_DIR/profile_step.log"
    SUMMARY+=("$(printf '%-14s %s' profile_step "SKIPPED (no DeepSpeed)")")
fi

# The short table last: stage outcomes, the kernel targets and the training-step comparison.
echo
echo "== summary (everything is in $OUT_DIR)"
printf '%s\n' "${SUMMARY[@]}"
if [[ -f $OUT_DIR/kernels.md ]]; then
    echo
    sed -n '/^## Targets/,/^## grouped_mlp/p' "$OUT_DIR/kernels.md" | sed '1d;$d'
fi
if [[ -f $OUT_DIR/step.md ]]; then
    grep -E '^\| |^Target' "$OUT_DIR/step.md"
fi
tar -czf "$OUT_DIR.tar.gz" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")" && echo "packed $OUT_DIR.tar.gz"
exit $FAILED
