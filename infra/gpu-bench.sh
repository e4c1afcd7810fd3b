#!/usr/bin/env bash
# GPU check from a fresh checkout, in one go (a few minutes on one GPU):
#   1. install the project with its test extra into a virtual environment under $TMPDIR,
#   2. run the CUDA tests (every test whose name contains "cuda"),
#   3. write N synthetic JPEGs of ImageNet's size distribution (default 5,000) and run
#      `python -m jobs.bench` on them at full size (resnet34 width 64, 256 -> 224 crops): CPU
#      decode and nvJPEG decode side by side, truncated forward, analysis, end to end,
#      accumulators,
#   4. print ONE JSON line: GPU name, versions, every figure, projected seconds for 50,000 images.
#
#   infra/gpu-bench.sh                                   # on the GPU machine
#   infra/gpu-bench.sh --device cpu --images 64 --no-install --no-tests -- --width 8
#
# Options: --device cuda|cpu (default cuda), --images N (default 5000), --data DIR (where the
# synthetic JPEGs go; default a folder under $TMPDIR, kept for reruns), --no-install (use
# $PYTHON or python3 as it is), --no-tests; arguments after `--` go to jobs.bench as they are.
set -euo pipefail

DEVICE=cuda
IMAGES=5000
INSTALL=1
TESTS=1
DATA="${TMPDIR:-/tmp}/preferred-stimuli-gpu-bench"
PY="${PYTHON:-python3}"
EXTRA=()

die() { echo "infra/gpu-bench.sh: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) [[ $# -ge 2 ]] || die "--device needs a value (cuda or cpu)"; DEVICE="$2"; shift 2 ;;
    --images) [[ $# -ge 2 ]] || die "--images needs a value"; IMAGES="$2"; shift 2 ;;
    --data) [[ $# -ge 2 ]] || die "--data needs a folder"; DATA="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --no-tests) TESTS=0; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (allowed: --device, --images, --data, --no-install, --no-tests, -- BENCH-ARGS)" ;;
  esac
done
[[ "$DEVICE" == cuda || "$DEVICE" == cpu ]] || die "--device must be cuda or cpu, got $DEVICE"
[[ "$IMAGES" =~ ^[1-9][0-9]*$ ]] || die "--images must be a positive integer, got $IMAGES"

cd "$(dirname "$0")/.."
START=$(date +%s)
LOG="$(mktemp -t gpu-bench-log.XXXXXX)"

if [[ $INSTALL == 1 ]]; then
  VENV="${TMPDIR:-/tmp}/preferred-stimuli-gpu-bench-venv"   # outside the checkout (ray uploads it)
  "$PY" -m venv "$VENV"
  PY="$VENV/bin/python"
  "$PY" -m pip install --quiet --upgrade pip >>"$LOG" 2>&1
  "$PY" -m pip install --quiet -e '.[test]' >>"$LOG" 2>&1 || { tail -20 "$LOG" >&2; die "install failed (log: $LOG)"; }
fi

TESTS_RESULT="not run"
if [[ $TESTS == 1 ]]; then
  if PYTHONPATH="$PWD" "$PY" -m pytest -q -p no:cacheprovider -k cuda tests >>"$LOG" 2>&1; then
    TESTS_RESULT="passed: $(grep -Eo '[0-9]+ passed' "$LOG" | tail -1)"
  else
    tail -30 "$LOG" >&2
    die "CUDA tests failed (log: $LOG)"
  fi
fi

BENCH_OUT="$(mktemp -t gpu-bench-json.XXXXXX)"
PYTHONPATH="$PWD" "$PY" -m jobs.bench --device "$DEVICE" --synthetic "$IMAGES" --data "$DATA" \
  --images "$IMAGES" --batch-size 256 --width 64 --resize 256 --crop 224 --repeats 2 \
  --scaling-images 512 --json ${EXTRA[@]+"${EXTRA[@]}"} >"$BENCH_OUT" 2>>"$LOG" \
  || { tail -30 "$LOG" >&2; die "jobs.bench failed (log: $LOG)"; }
sed '$d' "$BENCH_OUT" >&2          # the human-readable lines, to stderr

WALL=$(( $(date +%s) - START ))
DRIVER="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)"
PYTHONPATH="$PWD" "$PY" - "$BENCH_OUT" "$TESTS_RESULT" "$WALL" "$DRIVER" <<'EOF'
import json, platform, sys

res = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
res.update({"check": "infra/gpu-bench.sh", "cuda_tests": sys.argv[2], "script_seconds": int(sys.argv[3]),
            "driver": sys.argv[4] or None, "python": platform.python_version()})
res.setdefault("gpu", None)
print(json.dumps(res, sort_keys=True))
EOF
