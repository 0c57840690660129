#!/usr/bin/env bash
# Build the CUDA wheel for a GPU machine on a machine without a GPU (nvcc only), so that a short GPU lease
# spends no time compiling: `benchmarks/gpu_check.sh` installs it with PREBUILT=<wheel> instead of its
# build stage. The wheel's nanobind extension is tied to the Python that builds it, so use the GPU machine's
# Python version (3.12 for the lent H100/H200 machines).
#   PY        python of that version with nanobind, scikit-build-core, cmake, ninja and jax installed
#   OUTDIR    where the wheel goes (default .prebuilt, git-ignored)
#   BUILDDIR  persistent CMake build directory: rebuilds only the changed translation units
# CUTLASS headers come from the nvidia-cutlass wheel installed for PY or the repo's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.12}
OUTDIR=${OUTDIR:-.prebuilt}
BUILDDIR=${BUILDDIR:-/tmp/flashkda_build_$($PY -c 'import sys;print("cp%d%d" % sys.version_info[:2])')}
CUT=$($PY -c "import cutlass_library,os;print(os.path.join(os.path.dirname(cutlass_library.__file__),'source','include'))" 2>/dev/null \
  || .venv/bin/python -c "import cutlass_library,os;print(os.path.join(os.path.dirname(cutlass_library.__file__),'source','include'))")
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/flashkda_jax-*.whl
FLASHKDA_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  $PY -m pip wheel -q --no-build-isolation --no-deps -w "$OUTDIR" -C build-dir="$BUILDDIR" \
  -C cmake.define.CUTLASS_INCLUDE_DIR="$CUT" .
ls "$OUTDIR"/flashkda_jax-*.whl
