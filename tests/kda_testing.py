"""Shared helpers for the test suite: random KDA problems and error measures."""

from __future__ import annotations

import os
import subprocess
import sys
import jax
import jax.numpy as jnp
import numpy as np


def gpu_visible() -> bool:
    """Whether jax sees a GPU (False where no backend can start)."""
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def cuda_kernels_present() -> bool:
    """A GPU and an extension built with the CUDA handlers."""
    if not gpu_visible():
        return False
    from flashkda_jax import _ffi

    return _ffi.extension_has_cuda()


def requires_cuda_kernels():
    """``pytestmark`` of a file that tests the CUDA kernels themselves: skipped without a GPU or where the
    extension was built without CUDA."""
    import pytest

    if not gpu_visible():
        return pytest.mark.skip(reason="needs a GPU")
    return pytest.mark.skipif(not cuda_kernels_present(), reason="extension built without CUDA")


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float64) if out.dtype == jnp.float64 else jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (den if den > 0 else 1.0))


def make_problem(seed, B=2, T=37, H=2, HV=None, K=16, V=8, dtype=jnp.float32, gate="precomputed",
                 strong=False, with_a_log=True, with_dt_bias=True):
    """Fresh random inputs (never zeros) and the gate kwargs for one gate mode."""
    HV = HV or H
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, HV, V), jnp.float32)
    if gate == "precomputed":
        g = -jnp.exp(jax.random.normal(ks[3], (B, T, HV, K)) - 1.0)
        if strong:
            g = g * 1e4
    else:
        g = jax.random.normal(ks[3], (B, T, HV, K)) * (30.0 if strong else 1.0)
    beta = jax.random.normal(ks[4], (B, T, HV), jnp.float32)
    kw = {}
    if gate != "precomputed":
        kw["gate"] = gate
        if with_a_log:
            kw["A_log"] = jax.random.normal(ks[5], (HV,)) * 0.5 + (3.0 if strong else 0.0)
        if with_dt_bias:
            kw["dt_bias"] = jax.random.normal(ks[6], (HV, K)) * 0.5
        if gate == "bounded":
            kw["lower_bound"] = -5.0
    cast = lambda x: x.astype(dtype)
    return (cast(q), cast(k), cast(v), cast(g), cast(beta)), kw


def random_state(seed, shape, dtype=jnp.float32):
    return (0.5 * jax.random.normal(jax.random.PRNGKey(seed + 1000), shape)).astype(dtype)


def ragged_segments(B, T, seed=0):
    """Segment ids with padding, a length-1 sequence, repeated ids split by padding, and long runs."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(B):
        row = []
        nid = 1
        while len(row) < T:
            kind = rng.integers(0, 4)
            n = {0: 1, 1: int(rng.integers(2, 6)), 2: int(rng.integers(8, 30)), 3: int(rng.integers(1, 4))}[kind]
            val = 0 if kind == 3 else nid
            if kind != 3:
                nid += 1
            row.extend([val] * n)
        rows.append(row[:T])
    return jnp.asarray(np.array(rows, np.int32))


def chunk_crossing_segments(B, T, seed=0):
    """numpy int32 [B, T] segment ids for the chunked kernels: lengths 1, short, and 40-150 (some just
    over one 64-token chunk), with padding runs, so sequences start and end anywhere inside chunks."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        row, nid = [], 1
        while len(row) < T:
            kind = rng.integers(0, 5)
            n = {0: 1, 1: int(rng.integers(2, 20)), 2: int(rng.integers(40, 150)), 3: int(rng.integers(1, 5)),
                 4: int(rng.integers(60, 70))}[kind]
            if kind == 3:
                row.extend([0] * n)
            else:
                row.extend([nid] * n)
                nid += 1
        rows.append(row[:T])
    return np.array(rows, np.int32)


def split_by_segments(seg_row):
    """[(start, end)] of each sequence (non-padding run) of one row, in order."""
    seg_row = np.asarray(seg_row)
    out = []
    t = 0
    T = len(seg_row)
    while t < T:
        if seg_row[t] == 0:
            t += 1
            continue
        s = t
        while t < T and seg_row[t] == seg_row[s]:
            t += 1
        out.append((s, t))
    return out


def state_only_vs_full_backward(impl, *, K, dtype, seed=0):
    """(dinitial_state of the backward's state-only mode, that of the full backward, state-only without an
    initial state -> the error it raises or None): the FFI contract of docs/ffi.md."""
    from flashkda_jax import _inputs as I
    from flashkda_jax import ops

    B, T, H, HV = 2, 150, 1, 2
    args, kw = make_problem(seed, B=B, T=T, H=H, HV=HV, K=K, V=K, dtype=dtype, gate="bounded")
    segs = ragged_segments(B, T, seed)
    S = 4  # fewer slots than sequences: later sequences start from zero and keep no state
    init = random_state(seed + 1, (B, S, HV, K, K))
    core, opts = I.prepare(*args, scale=None, initial_state=init, segment_ids=segs, max_segments=S,
                           cu_seqlens=None, return_final_state=True, qk_l2norm=True, beta_sigmoid=True,
                           allow_neg_eigval=False, gate="bounded", A_log=kw["A_log"], dt_bias=kw["dt_bias"],
                           lower_bound=kw["lower_bound"], state_layout="kv")
    rows = lambda x: jnp.broadcast_to(x, (B,) + x.shape)
    fargs = (core.q, core.k, core.v, core.g, core.beta, rows(core.a_log), rows(core.dt_bias), core.slot,
             core.initial_state)
    do = jax.random.normal(jax.random.PRNGKey(seed + 7), core.v.shape, jnp.float32).astype(core.v.dtype)
    dfin = random_state(seed + 2, core.initial_state.shape)
    only = jax.jit(lambda *a: ops._ffi_backward_state(a, do, dfin, opts, impl))(*fargs)
    full = jax.jit(lambda *a: ops._ffi_backward(a, do, dfin, opts, impl))(*fargs)[-1]
    try:
        no_init = fargs[:-1] + (jnp.zeros((0,), core.initial_state.dtype),)
        jax.block_until_ready(jax.jit(lambda *a: ops._ffi_backward_state(a, do, None, opts, impl))(*no_init))
        err = None
    except Exception as e:  # noqa: BLE001 - the FFI error surfaces as an XlaRuntimeError
        err = e
    return np.asarray(only), np.asarray(full), err


def run_child(code, tmp_path, saved_name, *args, env, drop=(), what="child run", timeout=1200):
    """Runs `code` (``python -c``) in a fresh process, as the kernel variant switches are read once per
    process: argv = [this tests dir, tmp_path / saved_name (where the child saves its results), *args];
    environment = this one without the names in `drop`, plus `env`, without GPU memory preallocation; cwd =
    tmp_path, so that the child imports the installed package, not the checkout. Asserts that it succeeded.
    -> (its stdout, the save path)."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = tmp_path / saved_name
    full_env = {k: v for k, v in os.environ.items() if k not in drop}
    full_env.update(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, "-c", code, here, str(saved), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(tmp_path))
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout, saved
