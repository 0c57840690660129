"""Decode benchmark: jitted ``kda_decode`` (state donated, updated in place) against fla's Triton
``fused_recurrent_kda``, N sequences of H=16 heads, K=V=128, bf16, one new token, bounded gate (-5),
q/k l2norm and beta sigmoid in kernel, fp32 state.

Prints, per N: the state read+write floor (2·N·H·K·V·4 bytes over the measured copy bandwidth) and
  jit-noop   the same loop around a jitted call that does (almost) nothing: the host dispatch floor
  jit-call   wall time per call of a jitted kda_decode in a Python loop (state donated; async dispatch,
             so this is max(host dispatch, device time)); the number a serving loop sees per layer call
  device     per-step time of a jitted, unrolled scan of 32 decode steps with the state carried
             (device time, launch gaps included)
  cold       as device, but each step reads/writes a different slot set of a state pool (state_indices),
             so the state comes from HBM rather than L2 (only where the pool fits)
  fla        fused_recurrent_kda_fwd in place (inplace_final_state=True), CUDA events around 200 calls
  fla-bench  triton.testing.do_bench median (L2 flushed before each call) of the public fused_recurrent_kda

Usage: python benchmarks/bench_decode.py [--n 1 64 256] [--check]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

H, K, V = 16, 128, 128
LOWER_BOUND = -5.0
STEPS = 32


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large on-device elementwise copy (JAX)."""
    x = jnp.ones((256 * 1024 * 1024,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(ts)


def inputs(key, N, steps=None, dtype=jnp.bfloat16):
    lead = (N, 1) if steps is None else (steps, N, 1)
    ks = jax.random.split(key, 8)
    q = jax.random.normal(ks[0], lead + (H, K), dtype)
    k = jax.random.normal(ks[1], lead + (H, K), dtype)
    v = jax.random.normal(ks[2], lead + (H, V), dtype)
    g = jax.random.normal(ks[3], lead + (H, K), dtype)
    beta = jax.random.normal(ks[4], lead + (H,), dtype)
    return q, k, v, g, beta


def params(key):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (H,), jnp.float32) * 0.5, jax.random.normal(k2, (H, K), jnp.float32) * 0.5


def decode_kwargs(a_log, dt_bias):
    return dict(qk_l2norm=True, beta_sigmoid=True, gate="bounded", A_log=a_log, dt_bias=dt_bias,
                lower_bound=LOWER_BOUND)


def check(kda_decode, reference):
    """kda_decode against the oracle at the benchmark's options (N=4, three steps)."""
    N = 4
    a_log, dt_bias = params(jax.random.PRNGKey(7))
    kw = decode_kwargs(a_log, dt_bias)
    xs = inputs(jax.random.PRNGKey(8), N, steps=3)
    s0 = 0.3 * jax.random.normal(jax.random.PRNGKey(9), (N, H, K, V), jnp.float32)
    seq = [jnp.moveaxis(a[:, :, 0], 0, 1) for a in xs]  # [N, 3, ...]
    o_ref, s_ref = reference.kda_recurrent(*seq, initial_state=s0, return_final_state=True, **kw)
    s = s0
    outs = []
    for t in range(3):
        o, s = kda_decode(*(a[t] for a in xs), s, **kw)
        outs.append(o[:, 0])
    o = jnp.stack(outs, 1)
    rel = lambda a, b: float(jnp.linalg.norm((a.astype(jnp.float32) - b.astype(jnp.float32)).ravel())
                             / jnp.linalg.norm(b.astype(jnp.float32).ravel()))
    print(f"check vs reference.kda_recurrent: o rel err {rel(o, o_ref):.2e}, state rel err {rel(s, s_ref):.2e}")


def time_jax(kda_decode, N, cold: bool):
    a_log, dt_bias = params(jax.random.PRNGKey(1))
    kw = decode_kwargs(a_log, dt_bias)
    out = {}
    # jit-call: one jitted call per step, state donated.
    q, k, v, g, beta = inputs(jax.random.PRNGKey(2), N)
    state = 0.1 * jax.random.normal(jax.random.PRNGKey(3), (N, H, K, V), jnp.float32)
    f = jax.jit(lambda q, k, v, g, b, s: kda_decode(q, k, v, g, b, s, **kw), donate_argnums=(5,))
    hlo = f.lower(q, k, v, g, beta, state).compile().as_text()
    out["aliased"] = "input_output_alias" in hlo
    for _ in range(20):
        o, state = f(q, k, v, g, beta, state)
    state.block_until_ready()
    reps = []
    for _ in range(5):
        n = 200
        t = time.perf_counter()
        for _ in range(n):
            o, state = f(q, k, v, g, beta, state)
        state.block_until_ready()
        reps.append((time.perf_counter() - t) / n)
    out["jit"] = statistics.median(reps) * 1e6
    # Host dispatch floor: a jitted call with the same arguments that does (almost) nothing.
    f0 = jax.jit(lambda q, k, v, g, b, s: (v + 1, s), donate_argnums=(5,))
    for _ in range(20):
        o, state = f0(q, k, v, g, beta, state)
    state.block_until_ready()
    reps = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(200):
            o, state = f0(q, k, v, g, beta, state)
        state.block_until_ready()
        reps.append((time.perf_counter() - t) / 200)
    out["noop"] = statistics.median(reps) * 1e6

    # device: STEPS decode steps unrolled inside one jit, distinct inputs per step.
    xs = inputs(jax.random.PRNGKey(4), N, steps=STEPS)

    def many(s, xs):
        def body(s, x):
            o, s = kda_decode(*x, s, **kw)
            return s, o
        return jax.lax.scan(body, s, xs, unroll=True)

    fm = jax.jit(many, donate_argnums=(0,))
    out["device"] = _time_steps(fm, state, xs) * 1e6
    del state

    if cold:
        # A pool of >= 256 MiB of states; each step updates its own slot set and consecutive calls walk
        # through the pool, so the state comes from HBM (L2 is 50-60 MB), as in a real model where the
        # other layers' states and weights evict it between steps.
        sets = max(STEPS, -(-256 * 2 ** 20 // (N * H * K * V * 4)))
        sets = -(-sets // STEPS) * STEPS
        pool = 0.1 * jax.random.normal(jax.random.PRNGKey(5), (sets * N, H, K, V), jnp.float32)
        idxs = [jnp.arange(c * STEPS * N, (c + 1) * STEPS * N, dtype=jnp.int32).reshape(STEPS, N)
                for c in range(sets // STEPS)]

        def many_pool(pool, xs, idx):
            def body(pool, x):
                *x, i = x
                o, pool = kda_decode(*x, pool, state_indices=i, **kw)
                return pool, o
            return jax.lax.scan(body, pool, (*xs, idx), unroll=True)

        fp = jax.jit(many_pool, donate_argnums=(0,))
        out["cold"] = _time_steps(fp, pool, xs, idxs) * 1e6
    return out


def _time_steps(fm, state, xs, extra=None):
    """Per-step seconds of fm(state, xs[, extra[i % len(extra)]]) -> (state, o), STEPS steps a call."""
    calls = [0]

    def call(state):
        if extra is None:
            return fm(state, xs)
        calls[0] += 1
        return fm(state, xs, extra[calls[0] % len(extra)])

    for _ in range(3):
        state, o = call(state)
    state.block_until_ready()
    reps = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(10):
            state, o = call(state)
        state.block_until_ready()
        reps.append((time.perf_counter() - t) / (10 * STEPS))
    return statistics.median(reps)


def time_fla(N):
    try:
        import torch
        from fla.ops.kda.fused_recurrent import fused_recurrent_kda, fused_recurrent_kda_fwd
        import triton
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        return {"fla_error": f"{type(e).__name__}: {e}"}
    if not torch.cuda.is_available():
        return {"fla_error": "no CUDA device for torch"}
    dev = "cuda"
    torch.manual_seed(0)
    bf = torch.bfloat16
    q = torch.randn(N, 1, H, K, device=dev, dtype=bf)
    k = torch.randn(N, 1, H, K, device=dev, dtype=bf)
    v = torch.randn(N, 1, H, V, device=dev, dtype=bf)
    g = torch.randn(N, 1, H, K, device=dev, dtype=bf)
    beta = torch.randn(N, 1, H, device=dev, dtype=bf)
    a_log = torch.randn(H, device=dev) * 0.5
    dt_bias = torch.randn(H * K, device=dev) * 0.5
    h0 = torch.randn(N, H, K, V, device=dev) * 0.1
    kw = dict(A_log=a_log, dt_bias=dt_bias, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
              use_beta_sigmoid_in_kernel=True, lower_bound=LOWER_BOUND)
    out = {}
    try:
        inplace = lambda: fused_recurrent_kda_fwd(q, k, v, g, beta, initial_state=h0, inplace_final_state=True,
                                                  output_final_state=True, **kw)
        for _ in range(20):
            inplace()
        torch.cuda.synchronize()
        reps = []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(200):
                inplace()
            e1.record()
            torch.cuda.synchronize()
            reps.append(e0.elapsed_time(e1) / 200 * 1e3)
        out["fla"] = statistics.median(reps)
        public = lambda: fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)
        out["fla_bench"] = triton.testing.do_bench(public, warmup=50, rep=300, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001
        out["fla_error"] = f"{type(e).__name__}: {e}"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--check", action="store_true", help="compare with the oracle first")
    ap.add_argument("--bv", type=int, default=0, help="force the CUDA kernel's strip width (16, 32, 64)")
    ap.add_argument("--no-fla", action="store_true")
    args = ap.parse_args(argv)
    if args.bv:
        import os
        os.environ["FLASHKDA_DECODE_BV"] = str(args.bv)
    from flashkda_jax import reference
    from flashkda_jax.decode import kda_decode, _select  # noqa: F401

    dev = jax.devices()[0]
    from flashkda_jax import _inputs
    core, _ = _inputs.prepare(*inputs(jax.random.PRNGKey(0), 1), qk_l2norm=True)
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; "
          f"implementation: {_select(None, core)}; FLASHKDA_DECODE_BV={args.bv or 'auto'}")
    if args.check:
        check(kda_decode, reference)
    bw = copy_bandwidth()
    print(f"copy bandwidth (read+write): {bw / 1e9:.0f} GB/s")
    rows = []
    for N in args.n:
        state_bytes = N * H * K * V * 4
        floor = 2 * state_bytes / bw * 1e6
        cold = STEPS * state_bytes <= 4 * 2 ** 30  # N=256: 8 GiB of pool, skipped (already L2-cold)
        r = {"N": N, "MB": state_bytes / 2 ** 20, "floor": floor}
        r.update(time_jax(kda_decode, N, cold=cold))
        if not args.no_fla:
            r.update(time_fla(N))
        rows.append(r)
        print(r, flush=True)
    fmt = lambda x: f"{x:9.1f}" if isinstance(x, float) else f"{'-':>9}"
    print()
    print(f"{'N':>4} {'state MB':>9} {'floor us':>9} {'jit-noop':>9} {'jit-call':>9} {'device':>9} {'cold':>9} "
          f"{'fla':>9} {'fla-bench':>9} {'dev/floor':>9} {'fla/dev':>8}")
    for r in rows:
        ratio = r["device"] / r["floor"]
        vs = r["fla"] / r["device"] if "fla" in r else None
        print(f"{r['N']:>4} {r['MB']:>9.1f} {fmt(r['floor'])} {fmt(r['noop'])} {fmt(r['jit'])} {fmt(r['device'])} "
              f"{fmt(r.get('cold'))} {fmt(r.get('fla'))} {fmt(r.get('fla_bench'))} {ratio:>9.2f} "
              f"{(f'{vs:8.2f}' if vs else '       -')}")
    for r in rows:
        if "fla_error" in r:
            print(f"fla unavailable (N={r['N']}): {r['fla_error']}")
            break
    if not all(r["aliased"] for r in rows):
        print("WARNING: the compiled decode has no input_output_alias", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
