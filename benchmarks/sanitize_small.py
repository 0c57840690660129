"""Small runs of every CUDA op for compute-sanitizer (benchmarks/gpu_check.sh, stage "sanitize").

Each buffer must be its own allocation for memcheck to see an out-of-bounds access, so run it as

    XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck python3 benchmarks/sanitize_small.py

Covers: forward (ragged segments with padding, GVA, initial + final state, T not a multiple of 64; bf16, and
float32 inputs with the "vk" state layout),
decode through a state pool, and the backward (the CUDA one forced on with --bwd).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

import flashkda_jax as F
from flashkda_jax import _capabilities as _caps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bwd", action="store_true", help="also run the backward (the CUDA one forced on)")
    ap.add_argument("--impl", default="cuda", help="cuda (default); cpu to try the script without a GPU")
    a = ap.parse_args()
    if a.bwd:
        _caps.CUDA_BWD_READY = True
    B, T, H, HV, K = 2, 130, 2, 4, 64
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    bf = jnp.bfloat16
    q = jax.random.normal(ks[0], (B, T, H, K), bf)
    k = jax.random.normal(ks[1], (B, T, H, K), bf)
    v = jax.random.normal(ks[2], (B, T, HV, K), bf)
    g = jax.random.normal(ks[3], (B, T, HV, K), bf)
    beta = jax.random.normal(ks[4], (B, T, HV), bf)
    A_log = jax.random.normal(ks[5], (HV,)) * 0.5
    dt_bias = jax.random.normal(ks[6], (HV, K)) * 0.5
    seg = np.zeros((B, T), np.int32)
    seg[0, :70], seg[0, 70:71], seg[0, 71:120] = 1, 2, 3      # lengths 70, 1, 49, then padding
    seg[1, 5:] = 1                                            # leading padding, one long sequence
    S = 3
    h0 = jax.random.normal(ks[7], (B, S, HV, K, K)) * 0.1
    kw = dict(gate="bounded", lower_bound=-5.0, A_log=A_log, dt_bias=dt_bias, qk_l2norm=True, beta_sigmoid=True,
              segment_ids=jnp.asarray(seg), max_segments=S, initial_state=h0, return_final_state=True,
              implementation=a.impl)

    def loss(q, k, v, g, beta, h0):
        o, fin = F.kda(q, k, v, g, beta, **{**kw, "initial_state": h0})
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(fin)

    o, fin = jax.jit(lambda *x: F.kda(*x, **kw))(q, k, v, g, beta)
    print("forward finite:", bool(jnp.all(jnp.isfinite(o.astype(jnp.float32)))), flush=True)
    # float32 inputs: the forward's float32 recurrence (cutlass/kda_fwd_f32.cu), state layout "vk" too.
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
    o32, fin32 = jax.jit(lambda *x: F.kda(*x, **{**kw, "state_layout": "vk"}))(*f32)
    print("float32 forward finite:", bool(jnp.all(jnp.isfinite(o32)) & jnp.all(jnp.isfinite(fin32))), flush=True)

    pool = jax.random.normal(ks[0], (5, HV, K, K)) * 0.1
    idx = jnp.asarray([3, -1], jnp.int32)
    od, pool2 = jax.jit(lambda *x: F.kda_decode(*x, state_indices=idx, gate="bounded", lower_bound=-5.0,
                                                  A_log=A_log, dt_bias=dt_bias, qk_l2norm=True, beta_sigmoid=True,
                                                  implementation=a.impl))(
        q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], pool)
    print("decode finite:", bool(jnp.all(jnp.isfinite(od.astype(jnp.float32)))), flush=True)

    if a.bwd:
        grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(q, k, v, g, beta, h0)
        ok = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in grads)
        print("backward finite:", ok, flush=True)
    jax.block_until_ready((o, fin, od, pool2))
    print("done")


if __name__ == "__main__":
    sys.exit(main())
