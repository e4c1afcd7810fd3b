#!/usr/bin/env bash
# Device check, as shipped: run from a checkout with the host's python3 and nothing installed
# (no Ray, no s3fs, no network; torch >= 2.11, torchvision >= 0.26, numpy, pyarrow, pillow,
# fsspec). A few minutes on one GPU, data included. Without CUDA the same stages run on the CPU
# (the rehearsal that CI runs on a few hundred images).
#
#   bash infra/gpu-bench.sh                         # 5,000 images; results in ./bench-out/
#   OUT=/tmp/check BENCH_IMAGES=256 bash infra/gpu-bench.sh
#
# Steps, all logged to $OUT/device-check.log:
#   1. nvidia-smi (if there is one);
#   2. the CUDA tests, by node id (none needs Ray; they skip without CUDA), through pytest if
#      the host has it, else through tests/nodes.py (the same test functions, no pytest);
#   3. python -m pipeline.stats.devicecheck: BENCH_IMAGES synthetic ImageNet-size JPEGs made on
#      the spot, then one analysis worker's path without Ray at batch 64 and 256, strict fp32,
#      timed per stage (read, CPU decode, nvJPEG decode, preprocess, forward, accumulators,
#      state to host, end to end), with the projected seconds for 50,000 images.
# Writes $OUT/device-check.json (every figure, the test results, the GPU, the versions).
#
# Environment: OUT (default ./bench-out), BENCH_IMAGES (default 5000), BENCH_DATA (where the
# JPEGs go, kept for reruns; default $TMPDIR/preferred-stimuli-device-check), BENCH_DEVICE
# (auto, cuda or cpu), BENCH_WIDTH (resnet34 base width, default 64), BENCH_BATCHES (default
# 64,256), PYTHON (default python3). Bad values: one line on stderr, exit 2.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
OUT="${OUT:-./bench-out}"
IMAGES="${BENCH_IMAGES:-5000}"
DATA="${BENCH_DATA:-${TMPDIR:-/tmp}/preferred-stimuli-device-check}"
DEVICE="${BENCH_DEVICE:-auto}"
WIDTH="${BENCH_WIDTH:-64}"
BATCHES="${BENCH_BATCHES:-64,256}"
# the CUDA tests that need no Ray (and no moto, hypothesis or network)
NODES=(
  tests/pipeline/data/test_decode_cuda.py::test_cuda_nvjpeg_matches_cpu_path_and_falls_back
  tests/pipeline/data/test_decode_cuda.py::test_cuda_prefetcher_streams_nvjpeg_batches
  tests/pipeline/stats/test_analysis_cuda.py::test_cuda_analysis_equals_cpu_on_the_same_activations
  tests/pipeline/stats/test_analysis_cuda.py::test_cuda_steady_state_never_waits_for_the_device
)

die() { echo "infra/gpu-bench.sh: error: $*" >&2; exit 2; }
[[ "$IMAGES" =~ ^[1-9][0-9]*$ ]] || die "BENCH_IMAGES must be a positive integer, got '$IMAGES'"
[[ "$WIDTH" =~ ^[1-9][0-9]*$ ]] || die "BENCH_WIDTH must be a positive integer, got '$WIDTH'"
[[ "$DEVICE" =~ ^(auto|cuda|cpu)$ ]] || die "BENCH_DEVICE must be auto, cuda or cpu, got '$DEVICE'"
[[ "$BATCHES" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "BENCH_BATCHES must be a comma list of positive integers, got '$BATCHES'"
command -v "$PY" >/dev/null 2>&1 || die "no Python interpreter '$PY' (set PYTHON)"
mkdir -p "$OUT" || die "cannot create OUT=$OUT"
LOG="$OUT/device-check.log"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

say "nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >>"$LOG" 2>&1
  DRIVER="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
else
  echo "(no nvidia-smi on this host)" >>"$LOG"
  DRIVER=""
fi

say "CUDA tests: ${#NODES[@]} by node id"
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  RUNNER=(-m pytest -q -p no:cacheprovider -rs)
else
  RUNNER=(-m tests.nodes)
fi
if "$PY" "${RUNNER[@]}" "${NODES[@]}" >>"$LOG" 2>&1; then
  TESTS="$(tail -n 1 "$LOG")"
else
  TESTS="FAILED: $(tail -n 1 "$LOG")"
  say "CUDA tests failed (see $LOG); going on with the benchmark"
fi
say "CUDA tests: $TESTS"

say "device check: $IMAGES images, batches $BATCHES, device $DEVICE"
"$PY" -m pipeline.stats.devicecheck --out "$OUT" --data "$DATA" --images "$IMAGES" \
  --device "$DEVICE" --width "$WIDTH" --batches "$BATCHES" \
  --note "cuda_tests=$TESTS" --note "driver=$DRIVER" \
  --note "script_seconds_before_check=$(( $(date +%s) - START ))" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
say "done in $(( $(date +%s) - START )) s (exit $RC): $OUT/device-check.json, $LOG"
exit "$RC"
