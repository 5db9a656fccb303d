# Sourced by the ShapesWorld 2 table scripts (bash): the 15 shape targets, and `shards METHODS`,
# which runs the script's bench command "${AP[@]}" for METHODS as $SHARDS processes of one torch
# thread each (--shard i/$SHARDS, logs in $OUT/.quality_$TAG.shard<i>.log) and fails if any did.
SHAPES=circle,ring,ellipse,crescent,square,rectangle,diamond,triangle,arrow,star,cross,plus,pentagon,hexagon,heart

shards() {
  local pids=() i
  for ((i = 0; i < SHARDS; i++)); do
    "${AP[@]}" --methods "$1" --threads 1 --shard "$i/$SHARDS" >>"$OUT/.quality_${TAG}.shard$i.log" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "shard $i/$SHARDS failed: see $OUT/.quality_${TAG}.shard$i.log" >&2; rc=1; }
  done
  return $rc
}

# trajectory_table CONTROLS: the settings and bench command "${AP[@]}" of the trajectory-source
# tables (the main table's settings and near sets; TAG set by the script; rows borrowed from the
# tags CONTROLS); refuses to start without the pre-registered near sets.
trajectory_table() {
  SEEDS=${SEEDS:-0,1,2}
  SHARDS=${SHARDS:-$(nproc)}
  OUT=${OUT:-benchmarks/results}
  NEAR=${NEAR:-benchmarks/results/quality_shapes2_cpu_near.json}
  [ -f "$NEAR" ] || { echo "the pre-registered near sets are missing: $NEAR" >&2; exit 2; }
  AP=("${PYTHON:-python}" -m ap_erase_fast bench quality --model shapes2 --targets "$SHAPES" --seeds "$SEEDS"
      --steps 40 --budgets 5,10,20,30 --lr 1e-3 --sweep-targets "$SHAPES" --sweep-seeds "$SEEDS"
      --images 8 --eval-steps 10 --out "$OUT" --tag "$TAG" --near-sets "$NEAR"
      --controls-from "$1" --trajectory-table)
  mkdir -p "$OUT"
}
