#!/usr/bin/env bash
# Ablations of AP's search on ShapesWorld 2, after the main table (benchmarks/quality_shapes2.sh):
# AP faithful (or, where a setting names it, another AP method) with one search setting changed
# at a time, on one target of each look-alike group
# and the main table's 3 seeds, judged as the main table (same steps, budgets, images), each
# setting against the main table's controls (--controls-from: base, esd, the random control and
# the oracle are not re-run, except where the setting changes them: λ). Each setting writes
# benchmarks/results/quality_shapes2_abl_<name>.{md,csv,jsonl}; its "Paired at matched erasure"
# table holds AP − random and AP − oracle for that setting, the main table the same for the
# defaults (τ 2, π lr 0.1, P 2, |R| ≤ 60, hard draw, λ 1). At the end `ap-erase bench ablations`
# puts every finished setting in one table, benchmarks/results/quality_shapes2_ablations.md.
#
#   bash benchmarks/quality_shapes2_ablations.sh                  # every setting (ONLY, below)
#   ONLY=tau8,slr0.01 bash benchmarks/quality_shapes2_ablations.sh # some of them
#
# Cost: 15 AP runs per setting (45 for λ, whose random control and oracle re-run) at ~90 s each
# on one core, in SHARDS processes: about 3 hours 20 minutes on 2 cores for the 12 settings
# (measured on a 2-core Intel Xeon: 8527 s for the first nine, 3535 s for tau8, slr0.01, lam0.3).
# Resumable like the main table.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=${TARGETS:-circle,square,arrow,cross,hexagon}
SEEDS=${SEEDS:-0,1,2}
SHARDS=${SHARDS:-$(nproc)}
OUT=${OUT:-benchmarks/results}
MAIN_TAG=${MAIN_TAG:-shapes2_cpu}
# π sharper and flatter (τ, π's lr), P = 4 (three search steps per update of θ', not one),
# a smaller and a larger R, the soft and top-k draws, a stronger and a weaker λ
ONLY=${ONLY:-score_slr1,slr1,tau0.5,soft,topk,pgd4,r15,r200,lam3,tau8,slr0.01,lam0.3}
# name:flags[:AP method] (one search setting changed from its default; the method: ap_faithful
# unless named, e.g. the score-function estimator at π lr 1)
# (run in this order: the score-function estimator and the settings that move π most first,
# then λ 3, whose controls re-run; the flatter π and λ 0.3 were added after them)
SETTINGS=(
  "score_slr1:--search-lr 1:ap_score"
  "slr1:--search-lr 1"
  "tau0.5:--tau 0.5"
  "soft:--gumbel-mode soft"
  "topk:--gumbel-mode topk"
  "pgd4:--pgd-steps 4"
  "r15:--num-centers 15"
  "r200:--num-centers 200"
  "lam3:--preserve-weight 3"
  "tau8:--tau 8"
  "slr0.01:--search-lr 0.01"
  "lam0.3:--preserve-weight 0.3"
)
[ -f "$OUT/quality_${MAIN_TAG}.jsonl" ] || {
  echo "run benchmarks/quality_shapes2.sh first: the ablations reuse its controls ($OUT/quality_${MAIN_TAG}.jsonl)" >&2
  exit 2
}
# the main table's settings (see quality_shapes2.sh)
AP=("${PYTHON:-python}" -m ap_erase_fast bench quality --model shapes2 --targets "$TARGETS" --seeds "$SEEDS"
    --steps "${STEPS:-40}" --budgets "${BUDGETS:-5,10,20,30}" --lr "${LR:-1e-3}" --sweep-targets "$TARGETS" --sweep-seeds "$SEEDS"
    --images "${IMAGES:-8}" --eval-steps "${EVAL_STEPS:-10}" --out "$OUT" --controls-from "$MAIN_TAG")

start=$(date +%s)
for entry in "${SETTINGS[@]}"; do
  name=${entry%%:*}
  rest=${entry#*:}
  method=ap_faithful
  if [[ "$rest" == *:* ]]; then method=${rest##*:}; rest=${rest%:*}; fi
  read -r -a flags <<<"$rest"
  flags+=(--methods "base,esd,preserve_random,oracle,$method")
  if [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  tag="shapes2_abl_$name"
  echo "$name (${flags[*]}): $SHARDS shards ($(( $(date +%s) - start )) s so far)"
  pids=()
  for ((i = 0; i < SHARDS; i++)); do
    "${AP[@]}" "${flags[@]}" --tag "$tag" --threads 1 --shard "$i/$SHARDS" >>"$OUT/.quality_${tag}.shard$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "shard $i failed: see $OUT/.quality_${tag}.shard$i.log" >&2; exit 1; }
  done
  "${AP[@]}" "${flags[@]}" --tag "$tag" >>"$OUT/.quality_${tag}.log" 2>&1
done
# one table over every setting that has finished, in the order above
names=()
for entry in "${SETTINGS[@]}"; do
  name=${entry%%:*}
  [ -f "$OUT/quality_shapes2_abl_$name.jsonl" ] && names+=("$name")
done
"${PYTHON:-python}" -m ap_erase_fast bench ablations --out "$OUT" --main-tag "$MAIN_TAG" \
  --names "$(IFS=,; echo "${names[*]}")"
echo "done in $(( $(date +%s) - start )) s: $OUT/quality_shapes2_ablations.md"
