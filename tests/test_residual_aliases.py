"""Which saved residuals the CUDA backward's gradients may overwrite (ops._residual_aliases): a residual is aliased
to the gradient that replaces it only where shape and dtype agree, and never without saved residuals."""
import jax.numpy as jnp

from flashkda_jax import ops


def _call(H, HV, dtype, saved=True):
    B, T, K = 1, 8, 16
    q = jnp.zeros((B, T, H, K), dtype)
    v = jnp.zeros((B, T, HV, K), dtype)
    inputs = (q, q, v, v, jnp.zeros((B, T, HV), dtype)) + (jnp.zeros((1,)),) * 6
    tok = (B, T, HV, K) if saved else (0,)
    res = (jnp.zeros((B, 2, HV, K, K) if saved else (0,), jnp.bfloat16),) + tuple(
        jnp.zeros(tok, jnp.bfloat16) for _ in range(4)) + (jnp.zeros((1,)), jnp.zeros((1,)))
    outs = tuple(jnp.zeros(x.shape, x.dtype) for x in inputs[:4])
    return ops._residual_aliases(len(inputs), res, outs)


def test_all_four_without_gva():
    assert _call(4, 4, jnp.bfloat16) == {12: 0, 13: 1, 15: 2, 14: 3}


def test_gva_keeps_q_k_residuals():
    assert _call(2, 4, jnp.bfloat16) == {15: 2, 14: 3}


def test_other_dtypes_and_no_residuals():
    assert _call(4, 4, jnp.float16) == {}
    assert _call(4, 4, jnp.float32) == {}
    assert _call(4, 4, jnp.bfloat16, saved=False) == {}
