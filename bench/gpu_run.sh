#!/usr/bin/env bash
# Every GPU check in one command, for the device machine: installs the carried peer wheels (.whl/, filled by
# ../shared/gpu/wheels.sh), records the device and its ceilings, runs the GPU tests, then the benchmarks.
# Logs (tests.log, bench.log) and one results JSON land in $OUT: few files, since the device tool returns
# at most 8. Run it twice with OUT=$OUT/a and OUT=$OUT/b for two suites in one call.
#   TESTS="tests/test_rms_norm.py" BENCH="bench/bench_rms_norm.py" bash bench/gpu_run.sh
# TESTS=none or BENCH=none skips that part; PYTEST_ARGS adds arguments to both pytest runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
python3 - <<'PY'  # the device and its ceilings, first in the log (the results JSON records them too)
import json
from bench.harness import environment, device_ceilings
print(json.dumps({"env": environment(), "ceilings": device_ceilings()}, indent=1))
PY
status=0
if [ "${TESTS:-tests}" != none ]; then
  python3 -m pytest ${TESTS:-tests} -q --timeout 600 ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -40
  status=$((status | ${PIPESTATUS[0]}))
fi
if [ "${BENCH:-bench}" != none ]; then
  BENCH_OUT="$OUT" BENCH_NAME=${BENCH_NAME:-bench} python3 -m pytest ${BENCH:-bench} -q -p no:xdist \
    --benchmark-json=/tmp/pytest-benchmark.json ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
  status=$((status | ${PIPESTATUS[0]}))
fi
exit $status
