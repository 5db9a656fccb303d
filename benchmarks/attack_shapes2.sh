#!/usr/bin/env bash
# The ShapesWorld 2 attack table (ap_erase_fast/attack/table.py; the analysis rule is in its
# docstring): every method of the quality table's matched-erasure runs, trained again at the step
# budget where its committed curve reached ESR 80 %, then attacked by `ap-erase attack` (prompt,
# inversion, rephrase). It regenerates benchmarks/results/attack_shapes2_cpu.{md,jsonl}.
#
#   bash benchmarks/attack_shapes2.sh                 # TARGETS (default below) x SEEDS, SHARDS processes
#   TARGETS=circle SEEDS=0 bash benchmarks/attack_shapes2.sh
#
# Resumable: run it again and the attacked runs already in the shards' rows are kept. Each run
# takes a few minutes on one core (training to the matched budget, then the attacks).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/_quality_shards.sh
source benchmarks/_quality_shards.sh  # SHAPES
TARGETS=${TARGETS:-$SHAPES}
SEEDS=${SEEDS:-0}
SHARDS=${SHARDS:-$(nproc)}
OUT=${OUT:-benchmarks/results}
TAG=${TAG:-shapes2_cpu}
PY=("${PYTHON:-python}" -m ap_erase_fast.attack.table)
pids=()
for ((i = 0; i < SHARDS; i++)); do
  "${PY[@]}" run --targets "$TARGETS" --seeds "$SEEDS" --shard "$i/$SHARDS" --out "$OUT" --tag "$TAG" \
    >>"$OUT/.attack_${TAG}.shard$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "shard $i/$SHARDS failed: see $OUT/.attack_${TAG}.shard$i.log" >&2; rc=1; }
done
[ "$rc" = 0 ] || exit "$rc"
"${PY[@]}" report --out "$OUT" --tag "$TAG"
