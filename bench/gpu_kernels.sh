#!/usr/bin/env bash
# The kernels' GPU tests and benchmarks, for the device machine, one part per call (so that each call stays short):
#   OUT=$OUT bash bench/gpu_kernels.sh tests       # GPU tests of every kernel (cross-entropy, linear + CE,
#                                                  #   RMSNorm, RoPE, SwiGLU), log in $OUT/tests/tests.log
#   OUT=$OUT bash bench/gpu_kernels.sh lce         # linear + CE at 8K and 32K tokens: ours, Liger, Cut-CE,
#                                                  #   eager, the 3-GEMM floor; peak extra memory, dx / dW error
#   OUT=$OUT bash bench/gpu_kernels.sh norm_rope   # RMSNorm and RoPE against Liger and torch.compile
#   OUT=$OUT bash bench/gpu_kernels.sh swiglu      # SwiGLU and the MLP block against their GEMMs and peers
# Several parts in one call run in that order. Each part writes its log and one results JSON (with the card,
# its measured ceilings and every record) under $OUT/<part>/, through bench/gpu_run.sh, which also installs the
# carried peer wheels (.whl/, filled by ../shared/gpu/wheels.sh; carry ".whl").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_kernels}
[ $# -gt 0 ] || { sed -n '2,11p' "$0"; exit 2; }
status=0
for part in "$@"; do
  case $part in
    tests) tests="tests/test_cross_entropy.py tests/test_linear_cross_entropy.py tests/test_rms_norm.py
                  tests/test_rope.py tests/test_swiglu.py"; bench=none ;;
    lce) tests=none; bench=bench/bench_linear_cross_entropy.py ;;
    norm_rope) tests=none; bench="bench/bench_rms_norm.py bench/bench_rope.py" ;;
    swiglu) tests=none; bench=bench/bench_swiglu.py ;;
    *) echo "unknown part '$part' (tests, lce, norm_rope, swiglu)" >&2; exit 2 ;;
  esac
  OUT="$OUT/$part" TESTS="$tests" BENCH="$bench" BENCH_NAME="kernels_$part" bash bench/gpu_run.sh
  status=$((status | $?))
done
exit $status
