#!/usr/bin/env bash
# The GPU check: every GPU path of the library tested and benchmarked in one run of under 8
# minutes on one H100/H200 (the SD3/FLUX rows of the last step, flow-lora-cap-22gib, build 12 B
# random weights: run them alone with --only flow-lora-cap-22gib when the budget is tight), on a bare machine where torch, triton and transformers are installed
# and the other packages travel as wheels in .whl/ (benchmarks/gpu_wheels.sh fetches them;
# docs/BENCHMARKS.md lists them).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps on CPU: tiny preset, few reps
#   bash benchmarks/gpu_check.sh --only engine,step-matrix   # rerun only some steps
#
# Every step runs whatever happened before it and prints one line `<step>: PASS|FAIL|SKIP
# (<seconds> s)`; the script exits non-zero when any step failed. SKIP is only for a step left out
# by --only and for a step that exits 77 (not applicable by design: torch.compile on the CPU dry
# run, xformers not installed); a step the time budget (GPU_CHECK_BUDGET_S) leaves no time for,
# and a pytest step that runs no test (exit 5: none collected or all deselected; or every test
# skipped) are FAIL, so a run cannot read as a success without having run its checks. Results go
# to $OUT when it is set (at most 8 files: the summary, the full log, the benchmark tables as
# markdown), else to a new folder under /tmp (the dry run never writes into benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --only) ONLY=",${2:-},"; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-dry-run] [--only step,step,...]" >&2
       exit 2 ;;
  esac
  shift
done

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-460}           # whole-run deadline (8 min on one H100)
RES=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
SUMMARY="$RES/gpu_check.md"
: >"$LOG"

if [ "$DRY" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { echo "wheels: FAIL (see $LOG)"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export AP_ERASE_CACHE=${AP_ERASE_CACHE:-/tmp/ap_erase_cache} AP_ERASE_JIT=1
PY=${PYTHON:-python3}

if [ "$DRY" = 1 ]; then
  DEVICE=cpu PRESET=tiny SDXL_PRESET=tiny-sdxl
  export AP_ERASE_TEST_DEVICE=cpu TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  KERNEL_TESTS=(tests/ops/test_backends.py -k "noise_matches or (small_e and soft)")
  GUMBEL_ARGS=(--n 100 1000 --g 1 --dtypes float32 --reps 1)
  STEP_CONFIGS=reference/faithful/xattn,fast/faithful/xattn,fast/shared/noxattn
  STEP_ARGS=(--steps 1 --threads 1)
  FEW=(--ddim-steps 10)  # the code paths, not the numbers: short trajectories, a small bank
else
  FEW=()
  DEVICE=cuda PRESET=sd14 SDXL_PRESET=sdxl
  unset TRITON_INTERPRET
  KERNEL_TESTS=(tests/ops -m "not gpu_build")  # the compile-only checks are CI's
  GUMBEL_ARGS=(--n 1000 10000 50000 --g 1 4 --reps 5)
  STEP_CONFIGS=reference/faithful/xattn,fast/faithful/xattn+classic-attn,fast/faithful/xattn,fast/shared/xattn,fast/faithful/noxattn,fast/shared/noxattn
  STEP_ARGS=(--steps 2)
fi
CAP_CONFIGS=fast/faithful/xattn,fast/faithful/noxattn+adamw8bit+ckpt,fast/faithful/noxattn+lora8
SDXL_CONFIGS=fast/faithful/xattn+lora8+ckpt,fast/faithful/noxattn+lora8+adamw8bit+ckpt
# the trajectory bank (M = 1 here: the build time is linear in M·(|R| + 1), the table gives it per
# trajectory): SD1.4 xattn at |R| = 100 against the student row of the step matrix; SDXL LoRA under
# the 22 GiB cap at |R| = 8 (its full build, minutes on a GPU, does not fit the 8-minute check)
BANK_CONFIGS=fast/faithful/xattn,fast/faithful/xattn+bank,fast/shared/xattn+bank
[ "$DRY" = 1 ] && BANK_CONFIGS=${BANK_CONFIGS#fast/faithful/xattn,}  # the step matrix has the student row
SDXL_BANK_CONFIGS=fast/faithful/xattn+lora8+bank
# SD3/FLUX LoRA on a 24 GB card (benchmarks/bench_memory_flow.py --measure): FLUX.1-dev with an NF4
# and an int8 base, SD3.5-medium with a bf16 base; LoRA 16, checkpointing, AdamW 8-bit, 1024 px,
# T5 length 64. Random weights built from the shipped transformer configs (no real weights on the
# machine) and stand-in text encoders (released before training). The dry run: the same rows'
# arguments on tiny-flux / tiny-sd3.
FLOW_ROWS="flux-nf4 flux-int8 sd35m-bf16"
FLOW_ARGS="--memory-cap-gib 22 --ddim-steps 4"
[ "$DRY" = 1 ] && FLOW_ARGS="--tiny --device cpu --ddim-steps 2"

declare -a LINES=()
FAILED=0

# step NAME LIMIT_S CMD...: run CMD with a time limit (never past the whole-run deadline),
# classify: exit 0 → PASS (FAIL when it is a pytest run that only skipped), exit 77 → SKIP,
# anything else → FAIL (pytest's exit 5, no test collected, included); no time left → FAIL.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local t0 status out rc
  t0=$(date +%s)
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then
    status=SKIP; echo "=== $name: not selected (--only)" >>"$LOG"
  elif [ "$left" -le 5 ]; then
    status=FAIL; FAILED=1
    echo "=== $name: FAIL, not run: no time left in the ${BUDGET} s budget" >>"$LOG"
  else
    [ "$limit" -gt "$left" ] && limit=$left
    out=$(mktemp)
    echo "=== $name (limit ${limit} s): $*" >>"$LOG"
    timeout "$limit" "$@" >"$out" 2>&1
    rc=$?
    cat "$out" >>"$LOG"
    if [ "$rc" = 0 ]; then
      status=PASS
      if grep -qE '^[0-9]+ skipped' "$out" || grep -qE '^=+ [0-9]+ skipped' "$out"; then
        if ! grep -qE '[0-9]+ passed' "$out"; then
          status=FAIL; FAILED=1
          echo "=== $name: FAIL, pytest skipped every test it collected" >>"$LOG"
        fi
      fi
    elif [ "$rc" = 77 ]; then
      status=SKIP
    else
      status=FAIL; FAILED=1
      [ "$rc" = 124 ] && echo "=== $name: timed out after ${limit} s" >>"$LOG"
      [ "$rc" = 5 ] &&
        echo "=== $name: FAIL, pytest ran no test (exit 5: none collected or all deselected)" >>"$LOG"
    fi
    rm -f "$out"
  fi
  local line="$name: $status ($(( $(date +%s) - t0 )) s)"
  echo "$line"
  LINES+=("$line")
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -s)

echo "gpu_check: device $DEVICE, preset $PRESET, results in $RES"
step environment 60 bash -c "{ [ $DRY = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } && $PY -m ap_erase_fast.env_report"
step native-build 240 "$PY" -c "
from ap_erase_fast.ops import available_backends
from ap_erase_fast.ops._backends import why_unavailable
dev = '$DEVICE'
want = ('cuda', 'triton') if dev == 'cuda' else ('cpp', 'triton')
have = available_backends(dev)
print('available backends on', dev, have)
missing = [b for b in want if b not in have]
for b in missing:
    print(b, 'unavailable:', why_unavailable(b, dev))
raise SystemExit(1 if missing else 0)"
step kernel-tests 200 "${PYTEST[@]}" "${KERNEL_TESTS[@]}"
step engine 120 "${PYTEST[@]}" tests/test_gpu.py -k "not compile and not xformers"
if [ "$DRY" = 1 ]; then
  step compile-cuda-graphs 5 bash -c "echo 'CPU dry run: torch.compile is covered by tests/test_fast_options.py'; exit 77"
else
  step compile-cuda-graphs 120 "${PYTEST[@]}" tests/test_gpu.py -k compile
fi
if [ "$DRY" = 1 ]; then  # the xformers test runs on CUDA only (it would skip: FAIL)
  step xformers 5 bash -c "echo 'CPU dry run: xformers runs on CUDA only'; exit 77"
elif "$PY" -c "import xformers.ops" >/dev/null 2>&1; then
  step xformers 60 "${PYTEST[@]}" tests/test_gpu.py -k xformers
else
  step xformers 5 bash -c "echo 'xformers is not importable: skipped'; exit 77"
fi
step gumbel-mix-bench 60 "$PY" benchmarks/bench_gumbel_mix.py --device "$DEVICE" \
  "${GUMBEL_ARGS[@]}" --out "$RES/gumbel_mix_$DEVICE"
step step-matrix 200 "$PY" -m ap_erase_fast.bench --preset "$PRESET" "${STEP_ARGS[@]}" "${FEW[@]}" \
  --timeout 150 --configs "$STEP_CONFIGS" --out "$RES"
step cap-22gib 100 "$PY" -m ap_erase_fast.bench --preset "$PRESET" --steps 1 --memory-cap-gib 22 "${FEW[@]}" \
  --tag cap22 --timeout 90 --configs "$CAP_CONFIGS" --out "$RES"
step sdxl-lora-cap-22gib 150 "$PY" -m ap_erase_fast.bench --preset "$SDXL_PRESET" --steps 1 "${FEW[@]}" \
  --memory-cap-gib 22 --tag cap22 --timeout 140 --configs "$SDXL_CONFIGS" --out "$RES"
step trajectory-bank 120 "$PY" -m ap_erase_fast.bench --preset "$PRESET" "${STEP_ARGS[@]}" "${FEW[@]}" \
  --bank-size 1 --tag bank --timeout 110 --configs "$BANK_CONFIGS" --out "$RES"
step sdxl-lora-bank-cap-22gib 100 "$PY" -m ap_erase_fast.bench --preset "$SDXL_PRESET" --steps 1 "${FEW[@]}" \
  --bank-size 1 --num-centers 8 --memory-cap-gib 22 --tag bank_cap22 --timeout 90 \
  --configs "$SDXL_BANK_CONFIGS" --out "$RES"
step flow-lora-cap-22gib 300 bash -c "rc=0; for r in $FLOW_ROWS; do \"$PY\" benchmarks/bench_memory_flow.py \
  --measure \$r $FLOW_ARGS || rc=1; done; exit \$rc"

{
  echo "# gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEVICE$([ "$DRY" = 1 ] && echo ' (CPU dry run)')"
  echo
  [ "$DRY" = 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/* GPU: /'
  echo "* commit: $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  echo
  for l in "${LINES[@]}"; do echo "* $l"; done
  echo
  echo "## Measurements of the engine checks"
  echo
  grep '^GPUCHECK ' "$LOG" | sed 's/^GPUCHECK /* /'
  for f in "$RES"/step_*.md "$RES"/gumbel_mix_*.md; do
    [ -f "$f" ] && { echo; echo "## $(basename "$f")"; echo; grep '^|' "$f"; }
  done
} >"$SUMMARY"

# The device tool brings back at most 8 files: the markdown tables carry every column of the CSVs.
rm -f "$RES"/*.csv
echo "gpu_check: $([ "$FAILED" = 0 ] && echo all steps passed or skipped || echo SOME STEPS FAILED) in $(( $(date +%s) - START )) s; summary $SUMMARY"
exit "$FAILED"
