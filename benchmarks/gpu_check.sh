#!/usr/bin/env bash
# One pass over everything that needs a GPU, for a CUDA machine without network (an H200 here).
# Builds and installs lisa_fused (the CUDA extension included), prints versions, runs the GPU tests,
# `lisa-fused bench` on a Llama-2-7B-shaped model, the benchmarks, and the rest of the test suite on
# CUDA, in that order (most informative first). Every stage has its own timeout inside one overall deadline (under 8 minutes); a failing stage
# is reported and the next one runs; the exit status is non-zero if any stage failed.
#
#   OUT=/path benchmarks/gpu_check.sh    # on the GPU machine (OUT defaults to /tmp/lisa_fused_gpu_check)
#   benchmarks/gpu_check.sh --dry-run    # print the stages, their limits and commands; run nothing
#   benchmarks/gpu_check.sh --cpu        # rehearse on a CPU machine: same stages, small, no install
#
# Files (8 at most, none deeper than $OUT/bench/): summary.txt, gpu_check.log, versions.txt,
# benchmarks.json, bench/results.json, bench/results.md, bench/bench.png.
set -u
TARGET=gpu
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --cpu) TARGET=cpu ;;
    *) echo "usage: $0 [--cpu] [--dry-run]" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/lisa_fused_gpu_check}
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + 460))   # all stages together: 7 min 40 s
FAILED=0
WORK=$(mktemp -d)             # pytest's cwd and the bench cache (base weights, per-method files): not kept
trap 'rm -rf "$WORK"' EXIT

if [ "$TARGET" = gpu ]; then
  DEV=cuda
  BENCH_ARGS=(--preset llama-2-7b --device cuda --dtype bfloat16 --steps 20 --batch-size 1 --seq-len 1024
              --lora-rank 128 --eval-windows 16)
  # pytest runs outside the source tree so that it imports the installed package and its CUDA extension.
  TEST_CWD=$WORK
else
  DEV=cpu
  BENCH_ARGS=(--preset tiny --device cpu --steps 4 --base-steps 2 --batch-size 2 --seq-len 32
              --eval-windows 2 --switch-every 2)
  TEST_CWD=$REPO                # nothing is installed: the source tree is the package
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT"
  LOG="$OUT/gpu_check.log"
  SUMMARY="$OUT/summary.txt"
  : >"$LOG"
  : >"$SUMMARY"
fi

# stage NAME LIMIT_S COMMAND...: run in $TEST_CWD under the smaller of LIMIT_S and the time left.
stage() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
  shift 2
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY" = 1 ]; then
    printf '%-11s limit %3ss: %s\n' "$name" "$limit" "$*"
    return
  fi
  if [ "$limit" -lt 10 ]; then
    printf '%-11s SKIPPED  (no time left before the deadline)\n' "$name" | tee -a "$SUMMARY"
    FAILED=1
    return
  fi
  echo "==== $name (limit ${limit}s): $*" >>"$LOG"
  local t0=$SECONDS rc how=ok
  (cd "$TEST_CWD" && timeout --kill-after=10 "$limit" "$@") >>"$LOG" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then how=TIMEOUT; elif [ $rc -ne 0 ]; then how=FAILED; fi
  [ $how = ok ] || FAILED=1
  printf '%-11s %-8s rc=%-3s %4ss\n' "$name" "$how" "$rc" "$((SECONDS - t0))" | tee -a "$SUMMARY"
  [ $how = ok ] || tail -n 15 "$LOG" | sed 's/^/    | /'
}

versions() {
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" - <<'PY'
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
import lisa_fused
print("lisa_fused", lisa_fused.__version__, "from", lisa_fused.__file__)
import lisa_fused._C as C
print("lisa_fused._C has CUDA:", C.has_cuda())
PY
}
export -f versions
export PY

if [ "$TARGET" = gpu ]; then
  stage install 180 "$PY" -m pip install --no-build-isolation --no-deps "$REPO"
fi
stage versions 30 bash -c "versions | tee '$OUT/versions.txt'"
stage gpu-tests 90 env LISA_FUSED_TEST_DEVICE=$DEV "$PY" -m pytest "$REPO/tests" -m gpu -q -p no:cacheprovider
stage bench 200 "$PY" -m lisa_fused bench "${BENCH_ARGS[@]}" --methods full,lora,lisa,lisa-device \
  --out "$OUT/bench" --cache-dir "$WORK/bench-cache"
stage benchmarks 80 "$PY" -m pytest "$REPO/benchmarks" -q -p no:cacheprovider --benchmark-json "$OUT/benchmarks.json"
# Last: the rest of the suite on CUDA gets whatever time is left.
stage all-tests 150 env LISA_FUSED_TEST_DEVICE=$DEV "$PY" -m pytest "$REPO/tests" -m "not gpu" -q -p no:cacheprovider --durations=5

[ "$DRY" = 1 ] && exit 0
echo
echo "== gpu_check ($TARGET), $(date -u +%FT%TZ), files in $OUT"
cat "$SUMMARY"
if [ -f "$OUT/bench/results.md" ]; then
  echo
  grep '^|' "$OUT/bench/results.md"
fi
exit $FAILED
