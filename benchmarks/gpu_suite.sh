#!/usr/bin/env bash
# The CUDA test suite (`make test-gpu`'s tests) split into parallel pytest processes, so that it fits one
# lent-device call: the kernel tests are most of the time and each process compiles its own kernels.
# Usage: bash benchmarks/gpu_suite.sh [OUTDIR] [SECONDS]; prints one summary line per group, rc 1 if any failed.
set -u
out=${1:-/tmp/gpu_suite}; limit=${2:-240}; mkdir -p "$out"
export PYTHONPATH=$PWD/src
others=$(grep -l -E 'cuda\.is_available\(\)|^@cuda$' tests/test_*.py | grep -v -E 'test_cuda_(fp8|kernels)\.py')
run() {  # name, pytest args...
  local name=$1; shift
  timeout "$limit" python -m pytest -q -p no:cacheprovider -rs -m cuda "$@" > "$out/$name.log" 2>&1
  echo "$? $name: $(tail -1 "$out/$name.log")"
}
run fp8_gemv tests/test_cuda_fp8.py -k "gemv" > "$out/1.rc" &
run fp8_rest tests/test_cuda_fp8.py -k "not gemv" > "$out/2.rc" &
run kernels_moe tests/test_cuda_kernels.py -k "moe or mxfp4 or expert or route" > "$out/3.rc" &
run kernels_attn tests/test_cuda_kernels.py -k "paged_attention or reduce_fusion or chained or pdl" > "$out/4.rc" &
run kernels_rest tests/test_cuda_kernels.py \
  -k "not (moe or mxfp4 or expert or route or paged_attention or reduce_fusion or chained or pdl)" > "$out/5.rc" &
run others $others > "$out/6.rc" &
wait
cat "$out"/[1-6].rc
! grep -qv '^0 ' "$out"/[1-6].rc
