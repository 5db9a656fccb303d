#!/usr/bin/env bash
# Where should AP's trajectories come from? ShapesWorld 2, matched erasure, for ESD (lambda = 0),
# the random control and AP faithful, each with --trajectories student (the authors: sampled with
# the model being trained), bank (M = 4 base-model trajectories per prompt, sampled once) and
# base (sampled every iteration with the frozen base model).
#
# Fixed before running (this file was committed before its first run):
#   * the main table's settings: 15 shape targets, seeds 0, 1, 2, 40 outer steps judged after
#     5, 10, 20, 30, 40; lr 1e-3; batch 2; 8 images per shape, 10 DDIM steps; the main table's
#     near sets (quality_shapes2_cpu_near.json). The student rows are the main table's own runs
#     of esd, preserve_random and ap_faithful (--controls-from shapes2_cpu: same code path, same
#     settings, same run identity).
#   * primary question, bank against student, on the same (target, seed) curves:
#     - preservation: PSR-near(bank) - PSR-near(student) at ESR 80 % and at ESR 95 %, for each of
#       esd, preserve_random, ap_faithful. Non-inferior where the lower end of the two-sided 95 %
#       t-interval of the paired mean difference is >= -2 points.
#     - erasure: ESR after 40 steps, bank - student, per method. Non-inferior where the lower end
#       of its 95 % t-interval is >= -5 points.
#     - bank is called non-inferior only if all 9 comparisons pass (an intersection-union test:
#       each at level 0.05, no multiplicity adjustment needed). Only then does the fast profile
#       default change. PSR-far and the sign tests are reported, not tested.
#   * secondary: base against student, the same comparisons, reported. It runs after bank; if the
#     session's time ends first, the report states how many curves it covers (jobs run seed by
#     seed: seed 0 for every target first).
#
#   bash benchmarks/quality_shapes2_trajectories.sh
#
# Banks: one per (target, seed), built by the first of the three methods that needs it and read
# by the others, under $OUT/.banks/ (not committed; rebuilt bit-identically from the seed).
# Resumable like the main table. Writes benchmarks/results/quality_shapes2_traj.{md,csv,jsonl}.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=benchmarks/_quality_shards.sh
source benchmarks/_quality_shards.sh  # SHAPES, shards() and trajectory_table()
TAG=${TAG:-shapes2_traj}
trajectory_table shapes2_cpu  # SEEDS, SHARDS, OUT, NEAR and the command AP
STUDENT=base,esd,preserve_random,ap_faithful
BANK=esd_bank,preserve_random_bank,ap_faithful_bank
BASE=esd_base,preserve_random_base,ap_faithful_base


start=$(date +%s)
echo "phase 1/3: student (borrowed) and bank over $SHARDS shards"
shards "$STUDENT,$BANK"
echo "phase 2/3: base ($(( $(date +%s) - start )) s so far)"
shards "$STUDENT,$BANK,$BASE"
echo "phase 3/3: the report ($(( $(date +%s) - start )) s so far)"
"${AP[@]}" --methods "$STUDENT,$BANK,$BASE"
echo "done in $(( $(date +%s) - start )) s: $OUT/quality_${TAG}.md"
