#!/usr/bin/env bash
# Spending what the trajectory bank saves: --preserve-draws K. With a bank, each further draw of
# c_a for theta''s preservation term costs two UNet evaluations (and a backward) instead of a
# trajectory, so a bank run can average the preservation errors of K candidates per sample and
# still cost less per step than the authors' loop (benchmarks/results/step_*_cpu_trajectories.md).
# ShapesWorld 2, matched erasure, for the random control and AP faithful.
#
# Fixed before running (this file was committed before its first run):
#   * the trajectory table's settings (benchmarks/quality_shapes2_trajectories.sh): 15 shape
#     targets, seeds 0, 1, 2, 40 outer steps judged after 5, 10, 20, 30, 40; lr 1e-3; batch 2;
#     8 images per shape, 10 DDIM steps; the main table's near sets; bank M = 4, the same bank
#     file per (target, seed) as the one-draw bank runs. K = 8.
#   * the one-draw bank rows (<method>_bank) are that table's own runs (--controls-from
#     shapes2_traj: same code path with K = 1, same settings); the student rows are the main
#     table's (--controls-from shapes2_cpu).
#   * primary question, per method: PSR-near(<method>_bank_draws8) - PSR-near(<method>_bank) at
#     ESR 80 % and 95 %. K draws improve preservation where the lower end of the two-sided 95 %
#     t-interval of the paired mean difference is > 0 at both levels (2 comparisons per method,
#     each at level 0.05, both must pass). ESR after 40 steps, PSR-far, the sign tests and the
#     comparison with the student runs are reported, not tested.
#   * jobs run seed by seed (seed 0 for every target first); if the session's time ends first,
#     the report states how many curves it covers.
#
#   bash benchmarks/quality_shapes2_draws.sh
#
# Resumable like the main table. Writes benchmarks/results/quality_shapes2_draws.{md,csv,jsonl}.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=benchmarks/_quality_shards.sh
source benchmarks/_quality_shards.sh  # SHAPES, shards() and trajectory_table()
TAG=${TAG:-shapes2_draws}
trajectory_table shapes2_cpu,shapes2_traj  # SEEDS, SHARDS, OUT, NEAR and the command AP
METHODS=base,preserve_random,ap_faithful,preserve_random_bank,ap_faithful_bank
METHODS+=,preserve_random_bank_draws8,ap_faithful_bank_draws8

start=$(date +%s)
echo "phase 1/2: K = 8 draws over $SHARDS shards (the other methods are borrowed)"
shards "$METHODS"
echo "phase 2/2: the report ($(( $(date +%s) - start )) s so far)"
"${AP[@]}" --methods "$METHODS"
echo "done in $(( $(date +%s) - start )) s: $OUT/quality_${TAG}.md"
