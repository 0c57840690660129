"""What each compiled kernel supports; ops.py validates against this at trace time.

Edited by whoever lands a kernel: a capability listed here must be covered by GPU tests.
"""

# CUDA forward kernel: supported (K, V) head dims and whether it exists at all.
CUDA_FWD_READY = True
CUDA_FWD_HEAD_DIMS = frozenset({(64, 64), (128, 128), (256, 256)})
# Also taken by the CUDA forward, for context parallelism's combined run (values | map columns), not by kda().
CUDA_FWD_MAP_HEAD_DIMS = frozenset({(64, 128), (128, 256)})
CUDA_FWD_DTYPES = frozenset({"bfloat16", "float16", "float32"})

# CUDA backward kernel (validated on an H100: tests/test_cuda_bwd*.py). Head dims outside
# CUDA_BWD_HEAD_DIMS take the pure-JAX chunked backward on the GPU, with a one-time warning, never silently.
CUDA_BWD_READY = True
CUDA_BWD_HEAD_DIMS = frozenset({(64, 64), (128, 128)})
