#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh needs on a bare GPU machine (Python 3.12, x86-64,
# CUDA 13; torch, triton, transformers, accelerate, scikit-learn, pytest already installed) into
# .whl/ (ignored by git). The device tool carries at most 64 MiB with the working tree, so the
# bitsandbytes wheel keeps only its CUDA 13 and CPU libraries.
#
#   bash benchmarks/gpu_wheels.sh            # then carry .whl to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$@"
}
get diffusers==0.42.1 importlib_metadata==10.2.0 bitsandbytes==0.50.2
for whl in .whl/bitsandbytes-*.whl; do
  libs=$(python3 -m zipfile -l "$whl" | awk '{print $1}' | grep -E 'libbitsandbytes_.*\.so$' \
         | grep -v -E '_(cpu|cuda13[0-9]*)\.so$' || true)
  # shellcheck disable=SC2086
  [ -n "$libs" ] && zip -q -d "$whl" $libs
done
# xformers is optional (gpu_check.sh skips its step when it is not importable); a wheel must
# match the GPU machine's torch exactly, e.g.: get xformers==<version built for its torch>
du -sh .whl/*
