"""GPU forward benchmark (DESIGN §6): flashkda_jax.kda (CUDA) vs fla's Triton chunk_kda, same process.

Shapes: bf16, K=V=128, bounded gate (lower_bound -5, A_log, dt_bias), q/k l2norm and beta sigmoid in
kernel, fp32 initial and final state. Prints one table (ms, ratio, memory-traffic floor) last.

    python benchmarks/bench_gpu.py [--cases b1-t8k-h16,...] [--xla] [--reps 30]
    python benchmarks/bench_gpu.py --grad --cuda-bwd --xla   # fwd+bwd, CUDA backward forced on

With --grad the table adds "mem": the compiled program's peak (arguments + results + temporaries, from
XLA's memory analysis) over inputs + forward outputs + gradients (issue target: <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("FLA_FLASH_KDA", "0")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

import flashkda_jax as F
from flashkda_jax import _capabilities as _caps

CASES = {
    "b1-t8k-h16": (1, 8192, 16, None),
    "b1-t32k-h16": (1, 32768, 16, None),
    "b8-t4k-h16": (8, 4096, 16, None),
    "b1-t8k-h64": (1, 8192, 64, None),
    "b1-t8k-h96": (1, 8192, 96, None),
    "varlen-32k-h16": (1, 32768, 16, [8000, 300, 12000, 5, 12463]),
    "varlen-8k-h64": (1, 8192, 64, [1300, 547, 2048, 963, 271, 3063]),
}
FLA_REF_MS = {"b1-t8k-h16": 0.83, "b1-t32k-h16": 2.5, "b8-t4k-h16": 2.2, "b1-t8k-h64": 2.1,
              "b1-t8k-h96": 3.2, "varlen-32k-h16": 2.2, "varlen-8k-h64": 2.2}
TARGET = {"b1-t8k-h16": 1.5, "b1-t32k-h16": 1.5, "b8-t4k-h16": 2.5, "b1-t8k-h64": 2.0, "b1-t8k-h96": 2.5,
          "varlen-32k-h16": 1.5, "varlen-8k-h64": 2.0}
GRAD_TARGET = 1.3  # fwd+bwd vs fla, every shape (issue 4)
K = V = 128


def make_inputs(B, T, H, lens, seed=0, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    bf = dtype
    q = jax.random.normal(ks[0], (B, T, H, K), bf)
    k = jax.random.normal(ks[1], (B, T, H, K), bf)
    v = jax.random.normal(ks[2], (B, T, H, V), bf)
    g = jax.random.normal(ks[3], (B, T, H, K), bf)
    beta = jax.random.normal(ks[4], (B, T, H), bf)
    A_log = jax.random.normal(ks[5], (H,), jnp.float32) * 0.5
    dt_bias = jax.random.normal(ks[6], (H, K), jnp.float32) * 0.5
    N = B if lens is None else len(lens)
    h0 = 0.1 * jax.random.normal(ks[7], (N, H, K, V), jnp.float32)
    cu = None if lens is None else jnp.asarray(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    return (q, k, v, g, beta), dict(A_log=A_log, dt_bias=dt_bias, h0=h0, cu=cu)


def jax_fn(impl, varlen, gate="bounded", grad=False, slices=None):
    def f(q, k, v, g, beta, A_log, dt_bias, h0, cu):
        kw = dict(gate=gate, A_log=A_log, dt_bias=dt_bias, qk_l2norm=True,
                  beta_sigmoid=True, initial_state=h0, return_final_state=True, implementation=impl,
                  checkpoint_slices=slices)
        if gate == "bounded":
            kw["lower_bound"] = -5.0
        if varlen:
            kw["cu_seqlens"] = cu
        return F.kda(q, k, v, g, beta, **kw)
    if not grad:
        return jax.jit(f)

    def loss(q, k, v, g, beta, A_log, dt_bias, h0, cu):
        o, s = f(q, k, v, g, beta, A_log, dt_bias, h0, cu)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
    # fwd+bwd: the loss and the gradients of every float input, as fla's forward + backward produce them.
    # value_and_grad, not grad: with the primal discarded XLA drops the forward FFI call (it saves only its
    # inputs), and a training step always needs the loss.
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6, 7)))


def memory_ratio(f, args, B, T, H):
    """Peak bytes of the compiled fwd+bwd over inputs + forward outputs (o, final state) + gradients."""
    ma = f.lower(*args).compile().memory_analysis()
    if ma is None:
        return None
    peak = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    o_bytes = B * T * H * V * 2 + args[7].size * 4    # o (bf16) + final state (f32)
    return peak / (ma.argument_size_in_bytes + o_bytes + ma.output_size_in_bytes)


def time_jax(f, args, reps, inner=10):
    """Steady-state time per call, ms: the median over reps of (wall time of 2 * inner back-to-back calls - that
    of inner calls) / inner. The latency before a batch's first call reaches the GPU and after its last one ends is
    the same for both batches and cancels (H100: 0.3-0.7 ms per batch, which over 10 calls added 3-7% to the
    per-call time of earlier sessions' tables), as fla's device events, recorded on the stream around its calls,
    leave out the host's time before the first launch."""
    out = f(*args)
    jax.block_until_ready(out)
    for _ in range(3):
        jax.block_until_ready(f(*args))

    def batch(n):
        t0 = time.perf_counter()
        for _ in range(n):
            res = f(*args)
        jax.block_until_ready(res)
        return time.perf_counter() - t0, res

    ts = []
    for _ in range(reps):
        t1, _ = batch(inner)
        t2, out = batch(2 * inner)
        ts.append((t2 - t1) / inner * 1e3)
    return statistics.median(ts), out


def time_fla(B, T, H, lens, reps, gate="bounded", grad=False):
    try:
        import torch
        from fla.ops.kda import chunk_kda
    except Exception as e:  # pragma: no cover
        return None, f"fla unavailable: {e}"
    dev = "cuda"
    torch.manual_seed(0)
    bf = torch.bfloat16
    rg = dict(requires_grad=grad)
    q = torch.randn(B, T, H, K, device=dev, dtype=bf, **rg)
    k = torch.randn(B, T, H, K, device=dev, dtype=bf, **rg)
    v = torch.randn(B, T, H, V, device=dev, dtype=bf, **rg)
    g = torch.randn(B, T, H, K, device=dev, dtype=bf, **rg)
    beta = torch.randn(B, T, H, device=dev, dtype=bf, **rg)
    A_log = (torch.randn(H, device=dev) * 0.5).requires_grad_(grad)
    dt_bias = (torch.randn(H * K, device=dev) * 0.5).requires_grad_(grad)
    N = B if lens is None else len(lens)
    h0 = (torch.randn(N, H, K, V, device=dev) * 0.1).requires_grad_(grad)
    cu = None
    if lens is not None:
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), device=dev, dtype=torch.long)

    gate_kw = dict(safe_gate=True, lower_bound=-5.0) if gate == "bounded" else {}

    def fwd():
        return chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                         use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                         A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu, **gate_kw)

    def run():
        if not grad:
            return fwd()
        o, s = fwd()
        (o.float().sum() + s.sum()).backward()
        for t in (q, k, v, g, beta, A_log, dt_bias, h0):
            t.grad = None

    with (torch.no_grad() if not grad else torch.enable_grad()):
        for _ in range(5):
            run()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(10):
                run()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 10)
    return statistics.median(ts), None


def copy_bandwidth():
    x = jnp.ones((256, 1024, 1024), jnp.float32)  # 1 GiB
    f = jax.jit(lambda a: a * 1.0001)
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        ts.append(time.perf_counter() - t0)
    return 2 * x.nbytes / min(ts)


def floor_bytes(B, T, H, N):
    tok = B * T * H
    return tok * (2 * K * 2 + V * 2 + K * 2 + 2 + V * 2) + 2 * N * H * K * V * 4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--xla", action="store_true", help="also time the pure-JAX chunked program")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--gate", choices=["bounded", "softplus"], default="bounded")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="dtype of this library's inputs (float32: the CUDA forward's float32 recurrence); fla "
                         "keeps bf16, so its column stays the bf16 reference")
    ap.add_argument("--grad", action="store_true", help="time fwd+bwd (jax.value_and_grad / torch forward + backward)")
    ap.add_argument("--slices", type=int, default=None,
                    help="kda(checkpoint_slices=N): the sequence-sliced, recomputing fwd+bwd (memory for time)")
    ap.add_argument("--cuda-bwd", action="store_true",
                    help="use the CUDA backward even while _capabilities.CUDA_BWD_READY is False")
    a = ap.parse_args()
    if not _caps.CUDA_FWD_READY:
        _caps.CUDA_FWD_READY = True
    if a.cuda_bwd:
        _caps.CUDA_BWD_READY = True
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}; gate={a.gate}; {'fwd+bwd' if a.grad else 'fwd'}; ours in {a.dtype}", flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name in a.cases.split(","):
        B, T, H, lens = CASES[name]
        args, extra = make_inputs(B, T, H, lens, dtype=jnp.dtype(a.dtype))
        fargs = args + (extra["A_log"], extra["dt_bias"], extra["h0"], extra["cu"])
        fn = jax_fn("cuda", lens is not None, a.gate, a.grad, a.slices)
        ms, out = time_jax(fn, fargs, a.reps)
        mem = memory_ratio(fn, fargs, B, T, H) if a.grad else None
        xla_ms = None
        if a.xla:
            xla_ms, _ = time_jax(jax_fn("xla", lens is not None, a.gate, a.grad), fargs, max(3, a.reps // 4), inner=2)
        fla_ms, why = (None, "skipped") if a.no_fla else time_fla(B, T, H, lens, a.reps, a.gate, a.grad)
        if why and not a.no_fla:
            print(why)
        N = B if lens is None else len(lens)
        fl = floor_bytes(B, T, H, N) / bw * 1e3
        rows.append((name, ms, fla_ms, xla_ms, fl, mem))
        print(f"{name}: cuda {ms:.3f} ms  fla {fla_ms if fla_ms is None else round(fla_ms, 3)} ms", flush=True)
        del out
    print()
    print(f"{'case':16s} {'cuda ms':>8s} {'fla ms':>8s} {'fla/cuda':>8s} {'target':>6s} {'xla ms':>8s} "
          f"{'xla/cuda':>8s} {'floor ms':>8s} {'mem':>5s}")
    for name, ms, fla_ms, xla_ms, fl, mem in rows:
        ratio = f"{fla_ms / ms:8.2f}" if fla_ms else f"{'-':>8s}"
        xs = f"{xla_ms:8.3f}" if xla_ms else f"{'-':>8s}"
        xr = f"{xla_ms / ms:8.1f}" if xla_ms else f"{'-':>8s}"
        fs = f"{fla_ms:8.3f}" if fla_ms else f"{'-':>8s}"
        ms_ = f"{mem:5.2f}" if mem else f"{'-':>5s}"
        target = GRAD_TARGET if a.grad else TARGET[name]
        print(f"{name:16s} {ms:8.3f} {fs} {ratio} {target:6.1f} {xs} {xr} {fl:8.3f} {ms_}")


if __name__ == "__main__":
    sys.exit(main())
