#!/usr/bin/env bash
# The whole GPU check of issues 10 and 19 in one call, sized for about 8 minutes on an H100/H200:
#   build (sm_90 only) -> compute-sanitizer memcheck -> correctness of decode v1 and v2 against float64
#   -> correctness of the block-quantized kernels (q8_0/q4_0/q4_1 decode, also q4_1/q4_0 gate/up with q8_0 down
#   rows, tda_block_linear) against float64
#   on the dequantized weights -> kernel timings (CUDA graphs, rotating weights, cuBLAS anchors) -> quantized
#   timings (vs cuBLAS bf16 dense and our dense block GEMV at the same bytes) -> end-to-end Mistral-7B-shaped
#   decode -> racecheck -> the GPU pytest marks -> report tables.
#
#   bash bench/gpu_check.sh [OUT_DIR]     # OUT_DIR defaults to $OUT (the device tool's) or bench/gpu_out
#
# Writes into OUT_DIR: gpu_check.log (everything), gpu_correctness_v{1,2}.json, gpu_kernels_GPU.json,
# gpu_quant_GPU.json, gpu_e2e_GPU.json and RESULTS.md (bench/RESULTS.md with its GPU-check section filled in: copy it and
# the two *_GPU.json files into bench/). GPU is the card found, from nvidia-smi's name: "NVIDIA H100 80GB
# HBM3" -> h100_80gb_hbm3 (a lent machine may be an H100 or an H200; unknown_gpu without nvidia-smi). Every stage has its own time budget and the run a total one
# (GPU_CHECK_BUDGET_S, default 480 s): a stage that fails or times out is reported and the stages that do
# not need it still run; stages that would start past the total budget are skipped. Timings and the
# end-to-end run only use the decode versions whose correctness checks all passed.
# Exit status: the number of stages that failed or were skipped (0: everything ran and passed).
# GPU_CHECK_DRY_RUN=1 prints the plan and renders the report from whatever JSON exists (CPU test).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/gpu_out}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TDA_CUDA_ARCHS=${TDA_CUDA_ARCHS:-90}           # build one architecture, not three
export TDA_KERNELS_CACHE=${TDA_KERNELS_CACHE:-/tmp/tda-kernels}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
TOTAL=${GPU_CHECK_BUDGET_S:-480}
START=$SECONDS
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
GPU=$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/_/g' \
  -e 's/^_//' -e 's/_$//')
GPU=${GPU:-unknown_gpu}
STATUS=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME BUDGET_S COMMAND...: runs COMMAND under `timeout`, its output into the log.
stage() {
  local name=$1 budget=$2
  shift 2
  local left=$((TOTAL - (SECONDS - START)))
  if [ "$left" -lt 10 ]; then
    STATUS+=("$name: SKIPPED (total budget of ${TOTAL}s spent)")
    FAILED=$((FAILED + 1))
    say "=== [$name] skipped: total budget spent"
    return 1
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  say "=== [$name] (budget ${budget}s) $*"
  if [ "$DRY" = 1 ]; then
    STATUS+=("$name: dry run")
    return 0
  fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$budget" "$@" >>"$LOG" 2>&1
  rc=$?
  local dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then
    STATUS+=("$name: ok (${dt}s)")
    say "=== [$name] ok in ${dt}s"
  else
    local why="exit $rc"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && why="timed out after ${budget}s"
    STATUS+=("$name: FAILED, $why (${dt}s)")
    FAILED=$((FAILED + 1))
    say "=== [$name] FAILED: $why. Last lines of its output:"
    tail -n 12 "$LOG"
  fi
  return $rc
}

skip() {  # skip NAME REASON
  STATUS+=("$1: SKIPPED ($2)")
  FAILED=$((FAILED + 1))
  say "=== [$1] skipped: $2"
}

# ---- 0. what we run on (no budget of its own worth counting)
stage info 20 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv;
  '"$PY"' -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")"; nvcc --version | tail -1'

# ---- 1. the library for sm_90 (every later stage needs it)
LIBDIR_FILE="$OUT_DIR/.libdir"
if ! stage build 180 "$PY" -c "
from tda_export.kernels import abi
lib = abi.cuda_library()
assert lib.backend == 'cuda' and lib.abi_version == abi.ABI_VERSION, (lib.backend, lib.abi_version)
import os; open('$LIBDIR_FILE', 'w').write(os.path.dirname(lib.path))
print('built', lib.path, 'and', abi.cpu_library().path)  # the GPU tests compare with the CPU library"; then
  [ "$DRY" = 1 ] || say "build failed: the stages that need the library are skipped"
fi
LIBDIR=$(cat "$LIBDIR_FILE" 2>/dev/null || true)

# ---- 2. compute-sanitizer memcheck on small shapes (a plain C driver: no framework in the trace)
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
SAN_BIN=/tmp/tda_gpu_sanitize
if [ -n "$LIBDIR" ] || [ "$DRY" = 1 ]; then
  stage sanitizer-build 60 "$NVCC" -std=c++17 -O2 -arch=sm_90 -Icuda/include bench/gpu_sanitize.cu \
    -L"$LIBDIR" -ltda_kernels_cuda -Xlinker -rpath="$LIBDIR" -o "$SAN_BIN" &&
    stage memcheck 90 "$SAN" --tool memcheck --error-exitcode 1 --leak-check no "$SAN_BIN" full
else
  skip memcheck "no library"
fi

# ---- 3. correctness against float64 (same masks), all shapes and batches 0/1/3/8/64: one process per
# decode version, so a version that hangs or crashes cannot take the other's results with it
OK_VERSIONS=""
CHECK_JSONS=()
if [ -n "$LIBDIR" ] || [ "$DRY" = 1 ]; then
  for v in 1 2; do
    json="$OUT_DIR/gpu_correctness_v$v.json"
    rm -f "$json"
    if stage "correctness-v$v" 90 "$PY" bench/gpu_kernels.py --check-only --versions "$v" --out "$json" ||
      [ "$DRY" = 1 ]; then
      OK_VERSIONS="${OK_VERSIONS:+$OK_VERSIONS,}$v"
    fi
    [ -f "$json" ] && CHECK_JSONS+=("$json")
  done
  say "decode versions that passed every check: ${OK_VERSIONS:-none}"
else
  skip correctness "no library"
fi

# ---- 3b. the block-quantized kernels (issue 19): correctness at every shape, then their timings (only if
# every check passed: gpu_quant.py skips timing otherwise and exits non-zero)
QUANT_OK=0
if [ -n "$LIBDIR" ] || [ "$DRY" = 1 ]; then
  stage quant-correctness 90 "$PY" bench/gpu_quant.py --check-only --out "$OUT_DIR/gpu_quant_correctness.json" &&
    QUANT_OK=1
else
  skip quant-correctness "no library"
fi

# ---- 4. kernel timings and 5. end-to-end decode, for the versions that are correct
if [ -n "$OK_VERSIONS" ]; then
  stage kernel-timings 150 "$PY" bench/gpu_kernels.py --skip-check --checks-from "${CHECK_JSONS[@]}" \
    --versions "$OK_VERSIONS" --batches 1,4,8 --densities 0.1,0.3,0.5,1.0 --budget-s 120 \
    --out "$OUT_DIR/gpu_kernels_$GPU.json"
  if [ "$QUANT_OK" = 1 ]; then
    # five formats (q8_0, q4_0, q4_1, and q4_1/q4_0 gate/up rows with q8_0 down rows) at batches 1 and 8: about
    # the rows (30) the three formats at batches 1/4/8 took before
    stage quant-timings 120 "$PY" bench/gpu_quant.py --skip-check --batches 1,8 --densities 0.1,0.5,1.0 \
      --budget-s 100 --out "$OUT_DIR/gpu_quant_$GPU.json"
  else
    skip quant-timings "the quantized kernels did not pass correctness"
  fi
  stage e2e 180 "$PY" bench/gpu_e2e.py --batches 1,8 --densities 1.0,0.5 --versions "$OK_VERSIONS" \
    --max-context 4096 --out "$OUT_DIR/gpu_e2e_$GPU.json"
else
  skip kernel-timings "no decode version passed correctness"
  skip quant-timings "no decode version passed correctness"
  skip e2e "no decode version passed correctness"
fi

# ---- 6. racecheck (shared-memory hazards; slower than memcheck, so fewer cases)
if [ -n "$LIBDIR" ] || [ "$DRY" = 1 ]; then
  if [ -x "$SAN_BIN" ] || [ "$DRY" = 1 ]; then
    stage racecheck 75 "$SAN" --tool racecheck --error-exitcode 1 "$SAN_BIN" quick
  else
    skip racecheck "sanitizer driver not built"
  fi
  # ---- 7. the GPU-marked tests: kernel bodies on v1 (default), again on v2, CUDA-graph backend
  stage pytest-gpu 100 "$PY" -m pytest -q -x -m gpu -p no:cacheprovider tests/test_kernels_gpu.py
  stage pytest-gpu-v2 60 env TDA_DECODE_VERSION=2 "$PY" -m pytest -q -x -m gpu -p no:cacheprovider \
    tests/test_kernels_gpu.py
  stage pytest-backend 90 "$PY" -m pytest -q -x -m gpu -p no:cacheprovider tests/test_torch_backend.py
else
  skip racecheck "no library"
  skip pytest-gpu "no library"
fi

# ---- 8. tables (always: says which parts are missing)
LINE="$(date -u +%Y-%m-%d) ${GPU_NAME:-no GPU found}: $(IFS=';'; echo "${STATUS[*]}")"
TOTAL=$((TOTAL + 30))  # the report always gets its turn
DRY_SAVED=$DRY
DRY=0
stage report 30 "$PY" bench/gpu_report.py --kernels "$OUT_DIR/gpu_kernels_$GPU.json" \
  --e2e "$OUT_DIR/gpu_e2e_$GPU.json" --quant "$OUT_DIR/gpu_quant_$GPU.json" --results bench/RESULTS.md --out "$OUT_DIR/RESULTS.md" --log-line "$LINE"
DRY=$DRY_SAVED
rm -f "$LIBDIR_FILE"

echo
echo "gpu_check: $((SECONDS - START)) s, $FAILED stage(s) failed or skipped"
for s in "${STATUS[@]}"; do echo "  $s"; done
[ -f "$OUT_DIR/RESULTS.md" ] && sed -n '/<!-- gpu-check:begin -->/,/<!-- gpu-check:end -->/p' "$OUT_DIR/RESULTS.md"
exit "$FAILED"
