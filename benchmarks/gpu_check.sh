#!/usr/bin/env bash
# One GPU check, meant for a bare GPU machine where torch and triton are preinstalled and the
# other packages travel as wheels in .whl/ (see docs/BENCHMARKS.md). Runs the GPU tests, the
# gumbel_mix benchmark and the sd14 step matrix (also under a 22 GiB cap), prints one summary
# table and leaves every result file in benchmarks/results/ (and in $OUT when set).
# Budget: under 8 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export AP_ERASE_CACHE=/tmp/ap_erase_cache AP_ERASE_JIT=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m ap_erase_fast.env_report

step() { echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }

step "GPU tests: kernels vs reference, engine on CUDA"
timeout 180 python3 -m pytest -q -x tests/ops tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15

step "gumbel_mix benchmark"
timeout 100 python3 benchmarks/bench_gumbel_mix.py --device cuda --n 1000 10000 50000 \
  --g 1 4 --reps 5 2>&1 | tail -25

step "sd14 step benchmark"
timeout 240 python3 -m ap_erase_fast.bench --preset sd14 --steps 2 --timeout 200 \
  --configs reference/faithful/xattn,fast/faithful/xattn,fast/shared/xattn,fast/faithful/noxattn,fast/shared/noxattn 2>&1 | tail -8

step "sd14 under a 22 GiB cap (24 GB card)"
timeout 150 python3 -m ap_erase_fast.bench --preset sd14 --steps 1 --memory-cap-gib 22 \
  --tag cap22 --timeout 140 \
  --configs fast/faithful/xattn,fast/faithful/noxattn+adamw8bit+ckpt 2>&1 | tail -4

step "summary"
for f in benchmarks/results/step_sd14_*.md benchmarks/results/gumbel_mix_cuda*.md; do
  [ -f "$f" ] && { echo "--- $f"; grep '^|' "$f"; }
done
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda* benchmarks/results/step_sd14_* "$OUT"/ 2>/dev/null; fi
echo "gpu_check: $(( $(date +%s) - start )) s"
