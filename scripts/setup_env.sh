#!/usr/bin/env bash
# Creates .venv (or $FLASHKDA_VENV) with flashkda-jax built from this checkout plus test/example deps.
# CUDA handlers are built when nvcc is found (CUTLASS headers come from the nvidia-cutlass wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLASHKDA_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "scikit-build-core>=0.10" "nanobind>=2.0" "jax>=0.6" "flax>=0.10" numpy pytest optax matplotlib tqdm
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  # Only the headers are needed; the package's Python deps (cuda-python, scipy, ...) are not.
  $PIP install -q --no-deps "nvidia-cutlass==4.2.0.0"
  export PATH="$PATH:/usr/local/cuda/bin"
  # With nvcc present the CUDA sources must build (CI has nvcc and no GPU): no silent CPU-only fallback.
  export FLASHKDA_CUDA=${FLASHKDA_CUDA:-ON}
  export CUDACXX=${CUDACXX:-$(command -v nvcc)}
fi
$PIP install -q --no-build-isolation --no-deps .
# (checked from / so that the installed package, not this source tree, is imported)
PYBIN=$(cd "$VENV/bin" && pwd)/python
echo "flashkda-jax installed in $VENV (CUDA handlers: $(cd / && "$PYBIN" -c 'import flashkda_jax._ffi as f; print(f.extension_has_cuda())'))"
