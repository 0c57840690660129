"""CPU timing: the C++ FFI kernel (``kda(..., implementation="cpu")``) vs the pure-JAX chunked program
(``reference.kda_chunked``), forward and forward+backward, under jit.

    python benchmarks/bench_cpu.py [--dtype float32] [--repeats 5] [--shapes 2x2048x4x64,1x8192x4x128]

Shapes are B x T x H x K (V = K, HV = H). Options as the DESIGN standard shapes: bounded gate (lower bound
-5, A_log, dt_bias), q/k l2norm and beta sigmoid in kernel. Each time is the median of --repeats runs after
one warm-up run (compile excluded), with fresh non-zero random inputs; "cpu-time" is the process CPU time per
call in ms (all threads), which is less sensitive than wall time to other load on the machine.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import flashkda_jax
from flashkda_jax import reference


def _inputs(B, T, H, K, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    V = K
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, H, K)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, V)).astype(dtype)
    g = jax.random.normal(ks[3], (B, T, H, K)).astype(dtype)
    beta = jax.random.normal(ks[4], (B, T, H)).astype(dtype)
    kw = dict(gate="bounded", lower_bound=-5.0, A_log=0.5 * jax.random.normal(ks[5], (H,)),
              dt_bias=0.5 * jax.random.normal(ks[6], (H, K)), qk_l2norm=True, beta_sigmoid=True)
    w = jax.random.normal(ks[7], (B, T, H, V)).astype(jnp.float32)
    return (q, k, v, g, beta), kw, w


def _time(f, args, repeats):
    jax.block_until_ready(f(*args))  # compile + warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(f(*args))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)) * 1e3, float(np.median(cpus)) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default="2x2048x4x64,1x8192x4x128")
    ap.add_argument("--skip-chunked", action="store_true", help="time only the FFI kernel")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)

    impls = {"cpu": lambda *a, **kw: flashkda_jax.kda(*a, implementation="cpu", **kw),
             "chunked": reference.kda_chunked}
    if args.skip_chunked:
        impls.pop("chunked")

    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, dtype {dtype.name}, median of {args.repeats}")
    rows = []
    for spec in args.shapes.split(","):
        B, T, H, K = (int(x) for x in spec.split("x"))
        xs, kw, w = _inputs(B, T, H, K, dtype)
        res = {}
        for name, fn in impls.items():
            fwd = jax.jit(lambda *a, fn=fn: fn(*a, **kw)[0])
            loss = lambda *a, fn=fn: jnp.sum(fn(*a, **kw)[0].astype(jnp.float32) * w)
            fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
            res[name, "fwd"] = _time(fwd, xs, args.repeats)
            res[name, "fwdbwd"] = _time(fwdbwd, xs, args.repeats)
        rows.append((spec, res))

    hdr = f"{'B x T x H x K':<16}{'pass':<8}{'ffi ms':>10}{'cpu-time':>10}"
    if not args.skip_chunked:
        hdr += f"{'chunked ms':>12}{'cpu-time':>10}{'speedup':>9}"
    print(hdr)
    print("-" * len(hdr))
    for spec, res in rows:
        for p in ("fwd", "fwdbwd"):
            ms, cs = res["cpu", p]
            line = f"{spec:<16}{p:<8}{ms:>10.1f}{cs:>10.1f}"
            if not args.skip_chunked:
                ms2, cs2 = res["chunked", p]
                line += f"{ms2:>12.1f}{cs2:>10.1f}{ms2 / ms:>8.1f}x"
            print(line)


if __name__ == "__main__":
    main()
