"""The fused pre-processing of KDA (DESIGN §2) in pure JAX: the kernels implement the same formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp

L2NORM_EPS = 1e-6


def l2norm(x):
    """x / sqrt(sum(x²) + 1e-6) over the last axis."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def effective_beta(beta, opts):
    """sigmoid(beta) (× 2 with allow_neg_eigval) when beta_sigmoid, else beta itself."""
    if not opts.beta_sigmoid:
        return beta
    b = jax.nn.sigmoid(beta)
    return 2.0 * b if opts.allow_neg_eigval else b


def effective_gate(g, a_log, dt_bias, opts):
    """The per-channel log-decay (≤ 0) from the raw gate input, for gate modes of DESIGN §2.

    g: [..., HV, K]; a_log: [HV]; dt_bias: [HV, K] (broadcast along leading axes).
    """
    if opts.gate == "precomputed":
        return g
    x = g + dt_bias.astype(g.dtype)
    a = jnp.exp(a_log.astype(g.dtype))[:, None]
    if opts.gate == "softplus":
        return -a * jax.nn.softplus(x)
    # bounded
    if opts.use_a_log:
        x = a * x
    return opts.lower_bound * jax.nn.sigmoid(x)


def expand_heads(x, num_v_heads: int):
    """[B, T, H, K] -> [B, T, HV, K]: value head j reads q/k head j // (HV / H)."""
    group = num_v_heads // x.shape[2]
    return x if group == 1 else jnp.repeat(x, group, axis=2)


def effective_inputs(core, opts):
    """q (scaled), k, v, log-decay g, beta as compute-dtype arrays with HV heads each."""
    from flashkda_jax._inputs import compute_dtype

    cdt = compute_dtype(core.q.dtype)
    HV = core.v.shape[2]
    q = core.q.astype(cdt)
    k = core.k.astype(cdt)
    if opts.qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = expand_heads(q, HV) * jnp.asarray(opts.scale, cdt)
    k = expand_heads(k, HV)
    g = effective_gate(core.g.astype(cdt), core.a_log.astype(cdt), core.dt_bias.astype(cdt), opts)
    beta = effective_beta(core.beta.astype(cdt), opts)
    return q, k, core.v.astype(cdt), g, beta
