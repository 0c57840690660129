#!/usr/bin/env bash
# One GPU check: install the carried wheels (.whl: nvidia-cutlass, fla-core), build the package with CUDA,
# run the GPU tests and the forward benchmark table. Logs go to $1 (default /tmp/gpu_check); a short
# summary is printed last. Extra env: BENCH_ARGS (passed to bench_gpu.py), TESTS (pytest -k expression).
set -uo pipefail
LOG=${1:-/tmp/gpu_check}
mkdir -p "$LOG"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >"$LOG/wheels.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv >"$LOG/gpu.txt" 2>&1
t0=$(date +%s)
CUT=$(python3 -c "import cutlass_library,os;print(os.path.join(os.path.dirname(cutlass_library.__file__),'source','include'))" 2>/dev/null)
FLASHKDA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q ${CUT:+-C cmake.define.CUTLASS_INCLUDE_DIR=$CUT} . >"$LOG/build.log" 2>&1
build_rc=$?
t1=$(date +%s)
test_rc=-1; bench_rc=-1
if [ $build_rc -eq 0 ]; then
  (cd tests && timeout 240 python3 -m pytest -q -rs test_cuda_fwd.py ${TESTS:+-k "$TESTS"} >"$LOG/tests.log" 2>&1); test_rc=$?
  timeout 200 python3 benchmarks/bench_gpu.py ${BENCH_ARGS:-} >"$LOG/bench.log" 2>&1; bench_rc=$?
fi
echo "==== build rc=$build_rc ($((t1 - t0)) s)"
[ $build_rc -ne 0 ] && grep -E "error|Error" "$LOG/build.log" | head -30
echo "==== tests rc=$test_rc"
[ -f "$LOG/tests.log" ] && grep -E "passed|failed|Error|error|assert" "$LOG/tests.log" | tail -25
echo "==== bench rc=$bench_rc"
[ -f "$LOG/bench.log" ] && tail -14 "$LOG/bench.log"
cat "$LOG/gpu.txt"
