"""flashkda_jax: Kimi Delta Attention for JAX (CUDA and CPU kernels behind XLA FFI, a Flax layer)."""

from flashkda_jax import reference
from flashkda_jax.ops import available_implementations, kda

__all__ = ["kda", "available_implementations", "reference"]
__version__ = "0.1.0"
