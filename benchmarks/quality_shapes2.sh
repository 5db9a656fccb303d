#!/usr/bin/env bash
# The ShapesWorld 2 quality table: every shape target, 3 seeds, every method over learning rates,
# PSR-near / PSR-far at matched erasure with the oracle row. It regenerates
# benchmarks/results/quality_shapes2_cpu.{md,csv,jsonl} and their PNGs.
#
#   bash benchmarks/quality_shapes2.sh              # the full table, one shard per core
#   bash benchmarks/quality_shapes2.sh --quick      # the same pipeline in about a minute: circle,
#                                                   # seed 0, base / esd / ap_shared / oracle, tiny budgets
#   SHARDS=4 bash benchmarks/quality_shapes2.sh     # more shards (one torch thread each)
#   ORACLE=0 bash benchmarks/quality_shapes2.sh     # without the oracle (phase 2)
#
# Four phases, each resumable (run the script again and finished runs are kept):
#   1. the methods the main question needs (FIRST: base, esd, preserve_random, ap_faithful,
#      ap_shared), SHARDS processes in parallel, one thread each;
#   2. the oracle, in the same shards: it preserves the near set that phase 1's base and esd runs
#      measured (every seed), so it cannot start before them;
#   3. the other methods (preserve "", AP normalised, AP with the score estimator);
#   4. one process without --shard collects the shards' rows and writes the report.
# Settings: 40 outer steps at learning rate LR (the main setting; its esd runs define the near
# sets), each erasure judged also after BUDGETS steps on the way, so that every (target, seed)
# curve runs base model -> 5 -> 10 -> 20 -> 30 -> 40 steps for one training; SWEEP_LRS (none by default) adds
# learning rates; IMAGES evaluation images per shape prompt at EVAL_STEPS DDIM steps.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/quality_shapes2.sh [--quick]" >&2; exit 2 ;;
esac

# shellcheck source=benchmarks/_quality_shards.sh
source benchmarks/_quality_shards.sh  # SHAPES and shards()
MODEL=${MODEL:-shapes2}  # shapes2-flow: benchmarks/quality_shapes2_flow.sh
FIRST=${FIRST:-base,esd,preserve_random,ap_faithful,ap_shared}
METHODS=${METHODS:-$FIRST,preserve_null,ap_normalised,ap_score}
LR=${LR:-1e-3}
BUDGETS=${BUDGETS:-5,10,20,30}
SWEEP_LRS=${SWEEP_LRS:-}
SEEDS=${SEEDS:-0,1,2}
IMAGES=${IMAGES:-8}
EVAL_STEPS=${EVAL_STEPS:-10}
SHARDS=${SHARDS:-$(nproc)}
OUT=${OUT:-benchmarks/results}
TAG=${TAG:-${MODEL//-/_}_cpu}
STEPS=40
if [ "$QUICK" = 1 ]; then
  SHAPES=circle; SEEDS=0; IMAGES=1; EVAL_STEPS=4; STEPS=2; BUDGETS=1; FIRST=base,esd,ap_shared; METHODS=$FIRST
  OUT=${QUICK_OUT:-$(mktemp -d /tmp/quality_shapes2.XXXXXX)}; TAG=${MODEL//-/_}_quick
fi

AP=("${PYTHON:-python}" -m ap_erase_fast bench quality --model "$MODEL" --targets "$SHAPES" --seeds "$SEEDS"
    --steps "$STEPS" --budgets "$BUDGETS" --lr "$LR" --sweep-lrs "$SWEEP_LRS" --sweep-targets "$SHAPES"
    --sweep-seeds "$SEEDS"
    --images "$IMAGES" --eval-steps "$EVAL_STEPS" --out "$OUT" --tag "$TAG")
mkdir -p "$OUT"


start=$(date +%s)
echo "phase 1/4: $FIRST over $SHARDS shards (logs: $OUT/.quality_${TAG}.shard*.log)"
shards "$FIRST"
ORACLE_M=,oracle
if [ "${ORACLE:-1}" = 0 ]; then
  ORACLE_M=; echo "phase 2/4: no oracle (ORACLE=0)"
else
  echo "phase 2/4: oracle ($(( $(date +%s) - start )) s so far)"
  shards "$FIRST,oracle"
fi
echo "phase 3/4: $METHODS ($(( $(date +%s) - start )) s so far)"
shards "$METHODS$ORACLE_M"
echo "phase 4/4: the report ($(( $(date +%s) - start )) s so far)"
"${AP[@]}" --methods "$METHODS$ORACLE_M"
echo "done in $(( $(date +%s) - start )) s: $OUT/quality_${TAG}.md"
