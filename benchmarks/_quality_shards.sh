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
