"""Sharded KDA on every visible GPU (issue 7's GPU half): correctness, then the context-parallel speed-up.

1. check: the cases of tests/sharding_worker.py (batch, heads, batch+heads, context, data+context) on the
   GPUs with implementation="cuda" (K = V = 64, T = 192), sharded == unsharded for outputs and gradients.
2. speed: fwd+bwd (jax.value_and_grad under jit) of b1-t64k-h16 (bf16, K = V = 128, bounded gate, l2norm, beta
   sigmoid) on one GPU, then with T sharded over all GPUs and context_parallel_axis="cp"; prints both
   times and the speed-up (issue target: >= 1.6x on 2 GPUs).

    python benchmarks/multi_gpu.py [--skip-check] [--T 65536] [--reps 10] [--cuda-bwd] [--impl cuda]

--cuda-bwd uses the CUDA backward while _capabilities.CUDA_BWD_READY is still False.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import flashkda_jax as F  # noqa: E402
from flashkda_jax import _capabilities as _caps  # noqa: E402

TOL = 2e-2  # bf16-level kernels on both sides; the CPU test holds the same checks to 2e-5 in fp32


def check(devs, impl):
    import sharding_worker as W  # noqa: E402 (tests/; sets a host-device flag that GPUs ignore)

    n = len(devs)
    T, R = 192, P()
    half = max(n // 2, 1)
    cases = {
        "batch": (("dp",), (n,), [P("dp")] * 5 + [R, R, P("dp"), P("dp"), P("dp"), P("dp")], (2 * n, T, 2, 4), None),
        "heads": (("tp",), (n,), [P(None, None, "tp")] * 5 + [P("tp"), P("tp"), P(None, None, "tp"), R,
                                                             P(None, None, "tp"), P(None, None, "tp")],
                  (2, T, n, 2 * n), None),
        "context": (("cp",), (n,), [R] * 11, (2, T, 2, 4), "cp"),
        "context_bf16": (("cp",), (n,), [R] * 11, (2, T, 2, 4), "cp"),
        "data_context": (("dp", "cp"), (n // half, half), [P("dp", "cp")] * 5 + [R, R, P("dp"), P("dp", "cp"),
                                                                              P("dp", "cp"), P("dp")],
                         (2, T, 2, 4), "cp"),
    }
    ok = True
    # The other modes of tests/test_sharding.py on these devices: the Flax layer (heads on "model", sequence on
    # "cp"), kda inside shard_map, kda_decode (dense states over rows and heads, a pool over heads).
    others = {
        "layer": lambda: W.run_layer_case(devs, impl, shape=(1, 1, n), head_dim=64, expand_v=1.0),
        "layer_heads": lambda: W.run_layer_case(devs, impl, shape=(1, n, 1), head_dim=64, expand_v=1.0),
        "shard_map": lambda: W.run_shard_map_case(devs, impl, K=64, V=64),
        "decode": lambda: W.run_decode_case(devs, impl, shape=(1, n), K=64, V=64),
    }
    for name, run in others.items():
        try:
            r = run()
            bad = {k: v for k, v in r["errors"].items() if not v < TOL}
            comm = [c for c in r["collectives"] if name == "decode"]  # decode must not communicate at all
            status = "ok" if not bad and not comm else "FAIL"
            ok &= status == "ok"
            print(f"check {name:13s} {status}  max rel err {max(r['errors'].values()):.2e}"
                  f"{'  bad ' + str(bad) if bad else ''}{'  collectives ' + str(comm) if comm else ''}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on to the next case
            ok = False
            print(f"check {name:13s} ERROR {type(e).__name__}: {str(e)[:500]}", flush=True)
    for name, (axes, shape, specs, dims, cp) in cases.items():
        mesh = Mesh(np.array(devs[: int(np.prod(shape))]).reshape(shape), axes)
        try:
            r = W.run_case(name, mesh, specs, dims, cp_axis=cp, impl=impl, K=64, V=64,
                           dtype=jnp.bfloat16 if name.endswith("_bf16") else jnp.float32)
            bad = {k: v for k, v in r["errors"].items() if not v < TOL}
            # segment ids (int32) may be gathered; no float tensor with the sequence axis may be
            gathers = [c for c in r["collectives"]
                       if c[0] == "all-gather" and c[1].startswith(("f", "bf")) and T in c[2]]
            status = "ok" if not bad and not gathers else "FAIL"
            ok &= status == "ok"
            print(f"check {name:13s} {status}  max rel err {max(r['errors'].values()):.2e}"
                  f"{'  bad ' + str(bad) if bad else ''}{'  gathers of T ' + str(gathers) if gathers else ''}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on to the next case
            ok = False
            print(f"check {name:13s} ERROR {type(e).__name__}: {str(e)[:500]}", flush=True)
    return ok


def make_inputs(T, H, K):
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    bf = jnp.bfloat16
    q = jax.random.normal(ks[0], (1, T, H, K), bf)
    k = jax.random.normal(ks[1], (1, T, H, K), bf)
    v = jax.random.normal(ks[2], (1, T, H, K), bf)
    g = jax.random.normal(ks[3], (1, T, H, K), bf)
    beta = jax.random.normal(ks[4], (1, T, H), bf)
    A = jax.random.normal(ks[5], (H,)) * 0.5
    dt = jax.random.normal(ks[6], (H, K)) * 0.5
    return q, k, v, g, beta, A, dt


def grad_fn(cp_axis, impl):
    def loss(q, k, v, g, beta, A, dt):
        o, _ = F.kda(q, k, v, g, beta, gate="bounded", lower_bound=-5.0, A_log=A, dt_bias=dt, qk_l2norm=True,
                     beta_sigmoid=True, implementation=impl, context_parallel_axis=cp_axis)
        return jnp.sum(o.astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7))))  # the loss too: keeps the forward


def time_it(f, args, reps):
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def speed(devs, T, reps, impl):
    H, K = 16, 128
    args = make_inputs(T, H, K)
    one = jax.device_put(args, devs[0])
    t1 = time_it(grad_fn(None, impl), one, reps)
    mesh = Mesh(np.array(devs), ("cp",))
    specs = [P(None, "cp")] * 5 + [P(), P()]
    sharded = tuple(jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs))
    with jax.set_mesh(mesh):
        tn = time_it(grad_fn("cp", impl), sharded, reps)
    print(f"speed b1-t{T // 1024}k-h{H} fwd+bwd: 1 GPU {t1:.2f} ms, {len(devs)} GPUs (context parallel) "
          f"{tn:.2f} ms, speed-up {t1 / tn:.2f}x (target >= 1.6x on 2 GPUs)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--cuda-bwd", action="store_true")
    ap.add_argument("--impl", default="cuda", help="cuda; cpu/xla to try the script on host devices "
                    "(XLA_FLAGS=--xla_force_host_platform_device_count=N JAX_PLATFORMS=cpu)")
    a = ap.parse_args()
    if a.cuda_bwd:
        _caps.CUDA_BWD_READY = True
    devs = jax.devices()
    print(f"{len(devs)} x {devs[0].device_kind}", flush=True)
    if len(devs) < 2:
        print("needs at least 2 devices")
        return 1
    ok = True if a.skip_check else check(devs, a.impl)
    speed(devs, a.T, a.reps, a.impl)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
