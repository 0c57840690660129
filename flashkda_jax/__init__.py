"""flashkda_jax: Kimi Delta Attention for JAX (CUDA and CPU kernels behind XLA FFI, a Flax layer)."""

from flashkda_jax import reference
from flashkda_jax.ops import available_implementations, kda
from flashkda_jax.decode import kda_decode
from flashkda_jax import convert, nn  # noqa: E402  (Flax layer, fla checkpoint conversion)

__all__ = ["kda", "kda_decode", "available_implementations", "reference", "nn", "convert"]
__version__ = "0.1.0"
