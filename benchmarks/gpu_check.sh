#!/usr/bin/env bash
# One GPU check: install the carried wheels (.whl: nvidia-cutlass, fla-core), build the package with CUDA,
# run the GPU tests and the benchmark tables. Logs go to $1 (default /tmp/gpu_check); a short summary is
# printed last.
#   STAGES   which parts to run (default "build tests bench"): build (or: PREBUILT=wheel installs a wheel built
#            elsewhere for this machine's Python, e.g. with scripts/build_wheel_cp312.sh), tests, bwd (CUDA backward tests,
#            stage by stage first), sanitize (compute-sanitizer memcheck of small fwd/decode/bwd runs),
#            bench, softplus, grad (fwd+bwd table with the CUDA backward forced on), decode,
#            variants (the CUDA backward tests and tests/test_cuda_bwd_variants.py, test by test, in parallel
#            processes; then fwd+bwd timings of the default kernels and of the backward's first versions),
#            slices (kda(checkpoint_slices=N): tests/test_slicing.py, then fwd+bwd time and memory ratio for
#            N in SLICE_COUNTS (default "4 8 16") and without, on SLICE_CASES),
#            multi (needs >= 2 GPUs: sharded == unsharded on the GPUs, context-parallel speed-up at 64k),
#            lines (one kernel's stall samples and shared-memory wavefronts by source line: ncu's SASS metrics
#            mapped with nvdisasm -g, benchmarks/ncu_lines.py; LINES_KERNEL (ncu -k regex, default PrepKernel),
#            LINES_FUNCTION (substrings of the mangled instantiation, default PrepKernel<128, bf16, mma>),
#            LINES_CASE (default b8-t4k-h16), LINES_ARGS (prof.py, e.g. --grad), LINES_RANGES (phases by line))
#   BENCH_ARGS  extra args for bench_gpu.py's forward tables (e.g. "--reps 10 --cases b1-t8k-h16")
#   GRAD_ARGS   extra args for the fwd+bwd table
#   BENCH_FIRST_VERSION  0: the variants stage times only the defaults
#   PACK_LOGS   1: at the end, pack every log into $1/logs.tgz and leave only that (the device call returns at
#               most 8 files)
#   TESTS    pytest -k expression for the GPU test files
set -uo pipefail
LOG=${1:-/tmp/gpu_check}
STAGES=${STAGES-build tests bench}  # STAGES="" (or none): only the install
mkdir -p "$LOG"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >"$LOG/wheels.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# .whl/extra: what fla.layers needs beyond the device's packages (transformers and its dependencies). They go
# to a directory searched AFTER site-packages (only the fla-layer test adds it), so nothing the device
# already has is shadowed.
EXTRA_SITE=
if ls .whl/extra/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_extra .whl/extra/*.whl \
    >>"$LOG/wheels.log" 2>&1 && EXTRA_SITE=/tmp/site_extra
fi
# fla's Triton autotuning costs ~1 min per shape forward-only and ~4 min fwd+bwd; its results (small
# *.autotune.json files of Triton's cache, H100, fla 0.6.0 / Triton 3.6) are restored from benchmarks/fla_autotune/
# (tracked: the shapes tuned so far) and .triton_autotune/ (git-ignored; carry it), and written back to
# $LOG/triton_autotune.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
for d in benchmarks/fla_autotune .triton_autotune; do
  if [ -d "$d" ]; then mkdir -p "$TRITON_CACHE_DIR" && cp -r "$d/." "$TRITON_CACHE_DIR/"; fi
done
save_autotune() {
  (cd "$TRITON_CACHE_DIR" 2>/dev/null && find . -name "*.autotune.json" -exec cp --parents {} "$LOG/triton_autotune/" \; ) 2>/dev/null
}
mkdir -p "$LOG/triton_autotune"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv >"$LOG/gpu.txt" 2>&1
has() { [[ " $STAGES " == *" $1 "* ]]; }
summary=()
if has build; then
  t0=$(date +%s)
  CUT=$(python3 -c "import cutlass_library,os;print(os.path.join(os.path.dirname(cutlass_library.__file__),'source','include'))" 2>/dev/null)
  FLASHKDA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q ${CUT:+-C cmake.define.CUTLASS_INCLUDE_DIR=$CUT} . >"$LOG/build.log" 2>&1
  rc=$?
  summary+=("build rc=$rc ($(( $(date +%s) - t0 )) s)")
  if [ $rc -ne 0 ]; then grep -E "error|Error" "$LOG/build.log" | head -30; cat "$LOG/gpu.txt"; exit 1; fi
fi
# Directory of the installed package (imported from /tmp, not from this checkout).
installed_pkg() { (cd /tmp && python3 -c "import flashkda_jax, os; print(os.path.dirname(flashkda_jax.__file__))"); }
if [ -n "${PREBUILT:-}" ]; then
  python3 -m pip install -q --no-deps --no-index --force-reinstall $PREBUILT >"$LOG/build.log" 2>&1
  rc=$?
  summary+=("prebuilt install rc=$rc ($PREBUILT)")
  [ $rc -ne 0 ] && { cat "$LOG/build.log"; exit 1; }
  # Kernels from the wheel, Python from this checkout (a Python-only change needs no rebuild).
  PKG=$(installed_pkg)
  cp flashkda_jax/*.py "$PKG/"
fi
# pytest (400 s limit) with .whl/extra searched after site-packages (what fla.layers needs); run from tests/.
pytest_extra() {
  timeout ${PYTEST_TIMEOUT:-400} python3 -c "import sys; sys.path.append('$EXTRA_SITE') if '$EXTRA_SITE' else None; \
import pytest; sys.exit(pytest.main(sys.argv[1:]))" -p no:cacheprovider "$@"
}
# The forward's GPU tests (test_cuda_fwd.py and the files given), then the public op's cuda tests.
fwd_tests() {
  (cd tests && export XLA_PYTHON_CLIENT_PREALLOCATE=false
   pytest_extra -q -rs test_cuda_fwd.py "$@" ${TESTS:+-k "$TESTS"} >"$LOG/tests_fwd.log" 2>&1
   pytest_extra -q -rs test_kda.py test_decode.py -k "cuda" >"$LOG/tests_cuda_impl.log" 2>&1)
}
fwd_summary() { echo "$(tail -1 "$LOG/tests_fwd.log") | $(tail -1 "$LOG/tests_cuda_impl.log")"; }
if has tests; then
  fwd_tests test_nn_fla_gpu.py
  summary+=("tests: $(fwd_summary)")
fi
if has bwd; then
  (cd tests && timeout 400 python3 -m pytest -v -rs -p no:cacheprovider test_cuda_bwd_stages.py test_cuda_bwd.py \
     ${TESTS:+-k "$TESTS"} >"$LOG/tests_bwd.log" 2>&1)
  summary+=("bwd tests: $(tail -1 "$LOG/tests_bwd.log")")
fi
if has sanitize; then
  XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout 300 compute-sanitizer --tool memcheck --leak-check no \
    python3 benchmarks/sanitize_small.py ${SANITIZE_ARGS:---bwd} >"$LOG/sanitize.log" 2>&1
  summary+=("sanitize rc=$? ($(grep -c "Invalid\|ERROR SUMMARY: [1-9]" "$LOG/sanitize.log") error lines)")
fi
bench() {  # name, extra args (BENCH_ARGS, then GRAD_ARGS for the fwd+bwd table)...
  local name=$1; shift
  timeout ${BENCH_TIMEOUT:-280} python3 benchmarks/bench_gpu.py "$@" >"$LOG/$name.log" 2>&1
  summary+=("$name rc=$?")
}
fla_pid=; fwd_pid=
background_done() {  # waits for the background test stages (fla_layer, fwd)
  if [ -n "$fla_pid" ]; then wait $fla_pid; summary+=("fla_layer: $(tail -1 "$LOG/fla_layer.log")"); fla_pid=; fi
  if [ -n "$fwd_pid" ]; then wait $fwd_pid; summary+=("fwd tests: $(fwd_summary)"); fwd_pid=; fi
}
if has fwd; then
  fwd_tests &
  fwd_pid=$!
fi
if has fla_layer; then
  (cd tests && export XLA_PYTHON_CLIENT_PREALLOCATE=false
   PYTEST_TIMEOUT=${FLA_LAYER_TIMEOUT:-450} pytest_extra -v -rs test_nn_fla_gpu.py \
     ${FLA_LAYER_TESTS:+-k "$FLA_LAYER_TESTS"} >"$LOG/fla_layer.log" 2>&1) &
  fla_pid=$!
fi
if has variants; then
  # The backward's tensor-core defaults: the CUDA backward tests, and each test of test_cuda_bwd_variants.py
  # (defaults vs the first versions and vs the oracle) in its own process, all in parallel; then fwd+bwd
  # timings of the defaults and of the first versions (FIRST_VERSION below = FIRST_VERSION_ENV of test_cuda_bwd.py).
  FIRST_VERSION="FLASHKDA_BWD_GRAD2=v1 FLASHKDA_BWD_GRAD2_SOLVE=simt FLASHKDA_BWD_GRAD1=simt FLASHKDA_BWD_RECUR=v1"
  vpids=()
  (cd tests && env XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 400 python3 -m pytest -q -p no:cacheprovider \
     test_cuda_bwd_stages.py test_cuda_bwd.py >"$LOG/variant_bwd.log" 2>&1) &
  vpids+=($!)
  VARIANT_TESTS=(bv_invariant vs_first_version vs_oracle vs_simt_solve vs_first_grad2 vs_solved_wu)  # -k of each
  i=0
  for t in "${VARIANT_TESTS[@]}"; do
    (cd tests && env XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 400 python3 -m pytest -q -p no:cacheprovider \
       test_cuda_bwd_variants.py -k "$t" >"$LOG/variant_$i.log" 2>&1) &
    vpids+=($!); i=$((i + 1))
  done
  wait "${vpids[@]}"
  background_done  # the timings below must not share the GPU with them
  summary+=("[backward tests, defaults] $(tail -1 "$LOG/variant_bwd.log")")
  i=0
  for t in "${VARIANT_TESTS[@]}"; do
    summary+=("[variants -k $t] $(tail -1 "$LOG/variant_$i.log")"); i=$((i + 1))
  done
  sets=(""); [ "${BENCH_FIRST_VERSION:-1}" = 1 ] && sets+=("$FIRST_VERSION")
  for set in "${sets[@]}"; do
    env $set timeout 120 python3 benchmarks/bench_gpu.py --grad --no-fla --reps 5 \
      --cases ${VARIANT_CASES:-b1-t8k-h16,b8-t4k-h16} >"$LOG/variant_bench.log" 2>&1
    summary+=("[${set:-defaults}] fwd+bwd ms: $(grep -E '^b[0-9]+-[a-z0-9-]+ +[0-9]' "$LOG/variant_bench.log" | awk '{printf "%s %s  ", $1, $2}')")
  done
fi
has bench && bench bench_bounded ${BENCH_ARGS:-} --gate bounded
has softplus && bench bench_softplus ${BENCH_ARGS:-} --gate softplus
has grad && bench bench_grad ${GRAD_ARGS:-} --gate bounded --grad --cuda-bwd --xla
if has slices; then
  # kda(checkpoint_slices=N): the sliced, recomputing fwd+bwd against the default one (time and memory ratio).
  (cd tests && XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 python3 -m pytest -q -p no:cacheprovider \
     test_slicing.py >"$LOG/tests_slicing.log" 2>&1)
  summary+=("slicing tests: $(tail -1 "$LOG/tests_slicing.log")")
  for n in "" ${SLICE_COUNTS:-4 8 16}; do
    timeout 200 python3 benchmarks/bench_gpu.py --grad --no-fla --reps 5 ${n:+--slices $n} \
      --cases ${SLICE_CASES:-b1-t32k-h16,b8-t4k-h16,b1-t8k-h16} >"$LOG/slices_${n:-none}.log" 2>&1
    summary+=("[slices ${n:-none}] ms / mem: $(grep -E '^b[0-9]+-[a-z0-9-]+ +[0-9]' "$LOG/slices_${n:-none}.log" | \
      awk '{printf "%s %s %s  ", $1, $2, $NF}')")
  done
fi
if has decode; then
  timeout 200 python3 benchmarks/bench_decode.py --check >"$LOG/bench_decode.log" 2>&1
  summary+=("bench_decode rc=$?")
fi
if has prof; then
  # XLA's GEMM autotuner fails under ncu (session 9: a segfault, "Failed to prepare kernel"): autotuning off.
  env XLA_FLAGS=--xla_gpu_autotune_level=0 ${PROF_ENV:-} timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
    python3 benchmarks/prof.py --grad --calls 1 ${PROF_CASES:-b8-t4k-h16} >"$LOG/prof.log" 2>&1
  summary+=("prof rc=$? [${PROF_ENV:-defaults}]")
fi
if has lines; then
  LK=${LINES_KERNEL:-PrepKernel}
  PKG=$(installed_pkg)
  rm -rf /tmp/lines_cubin && mkdir -p /tmp/lines_cubin && (cd /tmp/lines_cubin && cuobjdump -xelf all "$PKG"/*.so >/dev/null 2>&1)
  CUB=$(grep -l "$LK" /tmp/lines_cubin/*.cubin | head -1)
  nvdisasm -g -c "$CUB" | gzip -c >"$LOG/lines_dis.txt.gz"
  env XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 300 ncu --clock-control none -k "regex:$LK" --launch-skip 1 \
    --launch-count 1 --import-source yes --section SourceCounters --section WarpStateStats --section SpeedOfLight \
    -f -o /tmp/lines_rep python3 benchmarks/prof.py --calls 2 ${LINES_ARGS:-} ${LINES_CASE:-b8-t4k-h16} \
    >"$LOG/lines_ncu.log" 2>&1
  ncu -i /tmp/lines_rep.ncu-rep --page details >"$LOG/lines_details.txt" 2>&1
  ncu -i /tmp/lines_rep.ncu-rep --page source --csv --print-source sass | gzip -c >"$LOG/lines_sass.csv.gz"
  python3 benchmarks/ncu_lines.py "$LOG/lines_sass.csv.gz" "$LOG/lines_dis.txt.gz" \
    --function "${LINES_FUNCTION:-PrepKernel,ILi128E13__nv_bfloat16Lb1E}" ${LINES_RANGES:+--ranges "$LINES_RANGES"} \
    >"$LOG/lines.txt" 2>&1
  summary+=("lines rc=$? ($LK: $LOG/lines.txt)")
fi
if has multi; then
  timeout 500 python3 benchmarks/multi_gpu.py --cuda-bwd >"$LOG/multi_gpu.log" 2>&1
  summary+=("multi_gpu rc=$?")
fi
background_done
save_autotune
echo "==== summary"
printf '%s\n' "${summary[@]}"
for f in tests_fwd tests_cuda_impl tests_bwd sanitize; do
  [ -f "$LOG/$f.log" ] && grep -E "^(FAILED|ERROR)" "$LOG/$f.log" | head -15
done
for f in "$LOG"/variant_*.log; do
  [ -f "$f" ] && grep -E "^(FAILED|ERROR)" "$f" | sed "s|^|$(basename "$f" .log): |" | head -6
done
[ -f "$LOG/fla_layer.log" ] && grep -E "(PASSED|FAILED|ERROR)" "$LOG/fla_layer.log" | head -12
[ -f "$LOG/prof.log" ] && grep -E "^  [^ ].*\(|gpu__time_duration" "$LOG/prof.log" | sed -E 's/ +/ /g; s/\(.*\) \(/ (/' | \
  cut -c1-140 | head -40
for f in bench_bounded bench_softplus bench_grad bench_decode multi_gpu; do
  [ -f "$LOG/$f.log" ] && { echo "---- $f"; tail -10 "$LOG/$f.log"; }
done
cat "$LOG/gpu.txt"
if [ "${PACK_LOGS:-0}" = 1 ]; then
  tar czf /tmp/flashkda_logs.tgz -C "$LOG" . && rm -rf "${LOG:?}"/* && mv /tmp/flashkda_logs.tgz "$LOG/logs.tgz"
fi
