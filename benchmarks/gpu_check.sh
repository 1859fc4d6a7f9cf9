#!/usr/bin/env bash
# One pass over everything that needs a GPU, for a CUDA machine without network (an H200 here: torch
# 2.11, triton 3.6.0, driver 580, nvcc 13.0), sized to one 10-minute call: the stage budgets below add
# up to DEADLINE_S (570 s; the call is limited to 600 s) and --dry-run fails when they do not fit. Most
# informative first:
#
#   precheck       driver vs the CUDA runtime lisa_fused._C links, setuptools/wheel/pybind11 (no GPU work)
#   install        pip install --no-build-isolation --no-deps . (sm_90 only: LISA_FUSED_CUDA_ARCHS=90)
#   versions       nvidia-smi, torch/triton/lisa_fused versions, which backends can run
#   sync-debug     6 steps (3 switches) of every moments x master_weights mode on cuda and triton under
#                  torch.cuda.set_sync_debug_mode("error"): no host sync in step or switch
#   sanitizer      compute-sanitizer memcheck (cuda, triton), racecheck, synccheck (cuda) on one launch per
#                  mode (segments of 1, 255, 257, 2049, 65537 and a misaligned slice); then the same
#                  launches and the lean GPU tests under CUDA_FORCE_PTX_JIT=1 (bitwise; JIT time printed)
#   delayed-copies ~1 s of GPU sleep on the page-in/page-out streams before each switch, a bf16 model
#                  overwritten after construction, 3 switches: bitwise equal to inactive_moments="device"
#   gpu-tests      every test marked `gpu` (paging race test and store round trip on real streams, ...)
#   bench-kernels  7B-shaped active set: packed CUDA / Triton vs torch AdamW fused / foreach, GB/s, % copy
#   bench-switch   page-out + page-in vs pinned host<->device bandwidth; switch step vs normal step
#   kernel-tests   tests/test_kernels.py on CUDA tensors (every backend against the reference)
#   bench-7b       lisa-fused bench on Llama-2-7B shape: full vs LoRA r=128 vs FusedLISA (host, device)
#
# A failing stage is reported and the next one runs; the exit status is non-zero if any stage failed.
#
#   OUT=/path benchmarks/gpu_check.sh    # on the GPU machine (OUT defaults to /tmp/lisa_fused_gpu_check)
#   benchmarks/gpu_check.sh --dry-run    # print the plan: stages, budgets, their sum, commands; run nothing
#   benchmarks/gpu_check.sh --cpu        # rehearse on a CPU machine: same stages, small, no install,
#                                        # limits x3 (GPU_CHECK_CPU_SCALE)
#
# Everything goes under $OUT: results.md, results.json (device, driver, versions, date, command, numbers),
# summary.txt, gpu_check.log, precheck.json, versions.txt, bench-kernels.json, bench-switch.json,
# bench/results.{json,md}, bench/bench.png: ready to copy to benchmarks/results/.
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
COMMAND="benchmarks/gpu_check.sh $*"

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/lisa_fused_gpu_check}
PY=${PYTHON:-python3}
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-570}  # all stages together; the device call itself is limited to 600 s
# name:budget_s, in the order they run (sync-debug, sanitizer, delayed-copies: not yet timed on a GPU)
PLAN=(precheck:15 install:95 versions:15 sync-debug:40 sanitizer:60 delayed-copies:25 gpu-tests:70
      bench-kernels:65 bench-switch:45 kernel-tests:35 bench-7b:105)
# --cpu rehearsals run on small shared CPUs, not inside the device call: every limit x SCALE there
SCALE=1
[ "$TARGET" = cpu ] && [ "$DRY" = 0 ] && SCALE=${GPU_CHECK_CPU_SCALE:-3}
DEADLINE=$((SECONDS + DEADLINE_S * SCALE))
FAILED=0

budget_of() { local s; for s in "${PLAN[@]}"; do [ "${s%%:*}" = "$1" ] && { echo "${s##*:}"; return; }; done; echo 0; }
TOTAL=0
for s in "${PLAN[@]}"; do TOTAL=$((TOTAL + ${s##*:})); done

if [ "$TARGET" = gpu ]; then
  DEV=cuda
  BENCH_ARGS=(--preset llama-2-7b --device cuda --dtype bfloat16 --steps 16 --switch-every 4 --batch-size 1
              --seq-len 1024 --lora-rank 128 --eval-windows 4)
  # pytest runs outside the source tree so that it imports the installed package and its CUDA extension.
  WORK=$(mktemp -d)
  TEST_CWD=$WORK
else
  DEV=cpu
  BENCH_ARGS=(--preset tiny --device cpu --steps 4 --base-steps 2 --batch-size 2 --seq-len 32
              --eval-windows 2 --switch-every 2)
  WORK=$(mktemp -d)
  TEST_CWD=$REPO                # nothing is installed: the source tree is the package
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
trap 'rm -rf "$WORK"' EXIT    # pytest's cwd and the bench cache (base weights, per-method files): not kept

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT"
  LOG="$OUT/gpu_check.log"
  SUMMARY="$OUT/summary.txt"
  : >"$LOG"
  : >"$SUMMARY"
  STARTED=$(date -u +%FT%TZ)
else
  printf 'plan (%s): %s stages, deadline %ss\n' "$TARGET" "${#PLAN[@]}" "$DEADLINE_S"
fi

# stage NAME COMMAND...: run in $TEST_CWD under the smaller of its budget and the time left.
stage() {
  local name=$1 limit left=$((DEADLINE - SECONDS))
  shift
  limit=$(($(budget_of "$name") * SCALE))
  if [ "$DRY" = 1 ]; then
    printf '  %-14s %4ss  %s\n' "$name" "$limit" "$*"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    printf '%-14s SKIPPED  (no time left before the deadline)\n' "$name" | tee -a "$SUMMARY"
    FAILED=1
    return
  fi
  echo "==== $name (limit ${limit}s): $*" >>"$LOG"
  local t0=$SECONDS rc how=ok
  (cd "$TEST_CWD" && timeout --kill-after=5 "$limit" "$@") >>"$LOG" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then how=TIMEOUT; elif [ $rc -ne 0 ]; then how=FAILED; fi
  [ $how = ok ] || FAILED=1
  printf '%-14s %-8s rc=%-3s %4ss of %ss\n' "$name" "$how" "$rc" "$((SECONDS - t0))" "$limit" | tee -a "$SUMMARY"
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
import numpy
print("numpy", numpy.__version__)
import lisa_fused
from lisa_fused import kernels
print("lisa_fused", lisa_fused.__version__, "from", lisa_fused.__file__)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for b in ("cuda", "triton", "cpu", "torch"):
    print(f"backend {b} on {dev}:", kernels.backend_unavailable_reason(b, dev) or "available")
print("auto resolves to", kernels.resolve_backend("auto", dev))
PY
}
export -f versions

# compute-sanitizer's three tools on one launch per mode, then the launches and the lean GPU tests with every
# kernel of lisa_fused._C JIT-compiled from its PTX (torch's own kernels are not needed there: the tensors
# are made by copies). --cpu: the launch script alone, on the CPU kernel.
sanitize() {
  local rc=0 script="$REPO/benchmarks/gpu_sanitize.py" tool backends t0
  if [ "${1:-}" = --cpu ]; then "$PY" "$script" --cpu; return; fi
  if ! command -v compute-sanitizer >/dev/null; then echo "compute-sanitizer: not found" >&2; return 1; fi
  for tool in memcheck racecheck synccheck; do
    backends=cuda; [ $tool = memcheck ] && backends=cuda,triton
    echo "-- compute-sanitizer --tool $tool ($backends)"
    compute-sanitizer --tool $tool --error-exitcode 99 "$PY" "$script" --backends $backends || rc=1
  done
  echo "-- CUDA_FORCE_PTX_JIT=1: launches (first-launch JIT time per mode), then the lean GPU tests"
  CUDA_FORCE_PTX_JIT=1 CUDA_CACHE_DISABLE=1 "$PY" "$script" --backends cuda --ptx-jit || rc=1
  t0=$SECONDS
  CUDA_FORCE_PTX_JIT=1 CUDA_CACHE_DISABLE=1 "$PY" -m pytest "$REPO/tests/test_lean_kernels.py" -m gpu \
    -k "cuda and native_bitwise" -q -p no:cacheprovider --durations=3 || rc=1
  echo "lean GPU tests under CUDA_FORCE_PTX_JIT=1: $((SECONDS - t0)) s"
  return $rc
}
export -f sanitize
export PY REPO

BENCH_PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
if [ "$TARGET" = cpu ]; then
  export LISA_FUSED_BENCH_SMALL=1       # rehearsal: timed, at the smoke sizes, few rounds
  BENCH_PYTEST+=(--benchmark-min-rounds=1 --benchmark-max-time=0.05 --benchmark-warmup=off)
else
  BENCH_PYTEST+=(--benchmark-min-rounds=5 --benchmark-max-time=0.5 --benchmark-warmup=on)
fi

stage precheck "$PY" "$REPO/benchmarks/gpu_precheck.py" $([ "$TARGET" = cpu ] && echo --cpu) --json "$OUT/precheck.json"
if [ "$TARGET" = gpu ]; then
  stage install env LISA_FUSED_CUDA_ARCHS=90 "$PY" -m pip install --no-build-isolation --no-deps "$REPO"
elif [ "$DRY" = 1 ]; then
  printf '  %-14s %4ss  %s\n' install "$(budget_of install)" "(skipped with --cpu: the source tree is used)"
fi
stage versions bash -c "versions | tee '$OUT/versions.txt'"
CPU_FLAG=$([ "$TARGET" = cpu ] && echo --cpu)
stage sync-debug "$PY" "$REPO/benchmarks/gpu_sync_debug.py" $CPU_FLAG
stage sanitizer bash -c "sanitize $CPU_FLAG"
stage delayed-copies "$PY" "$REPO/benchmarks/gpu_delayed_copies.py" $CPU_FLAG
stage gpu-tests env LISA_FUSED_TEST_DEVICE=$DEV "$PY" -m pytest "$REPO/tests" -m gpu -q -p no:cacheprovider -rs
stage bench-kernels "${BENCH_PYTEST[@]}" "$REPO/benchmarks/test_bench_kernels.py" --benchmark-json "$OUT/bench-kernels.json"
stage bench-switch "${BENCH_PYTEST[@]}" "$REPO/benchmarks/test_bench_switch.py" --benchmark-json "$OUT/bench-switch.json"
stage kernel-tests env LISA_FUSED_TEST_DEVICE=$DEV "$PY" -m pytest "$REPO/tests/test_kernels.py" -m "not gpu" -q -p no:cacheprovider -x
# last: the most likely to outgrow its budget (four 7B processes; FusedLISA "host" pins ~78 GB at construction)
stage bench-7b "$PY" -m lisa_fused bench "${BENCH_ARGS[@]}" --methods full,lora,lisa,lisa-device,lisa-4bit-sr \
  --out "$OUT/bench" --cache-dir "$WORK/bench-cache"

if [ "$DRY" = 1 ]; then
  printf '  %-14s %4ss  (deadline %ss)\n' total "$TOTAL" "$DEADLINE_S"
  if [ "$TOTAL" -gt "$DEADLINE_S" ]; then
    echo "the stage budgets add up to ${TOTAL}s, over the ${DEADLINE_S}s deadline: shrink a stage" >&2
    exit 1
  fi
  exit 0
fi
"$PY" "$REPO/benchmarks/gpu_report.py" --out "$OUT" --command "$COMMAND" --started "$STARTED" \
  --target "$TARGET" --failed "$FAILED" >>"$LOG" 2>&1 || { echo "gpu_report.py failed (see gpu_check.log)"; FAILED=1; }
echo
echo "== gpu_check ($TARGET), $(date -u +%FT%TZ), files in $OUT"
cat "$SUMMARY"
[ -f "$OUT/results.md" ] && { echo; cat "$OUT/results.md"; }
exit $FAILED
