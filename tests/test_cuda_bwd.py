"""The CUDA backward kernel (flashkda_bwd on GPU) against jax.grad of the fp32 oracle. Skipped without a GPU.

The public op routes GPU gradients to the pure-JAX backward until ``_capabilities.CUDA_BWD_READY``; this
file turns the flag on (it tests the kernel itself) and also calls the FFI backward directly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_testing import chunk_crossing_segments, cuda_kernels_present, gpu_visible, rel_err, random_state, requires_cuda_kernels, run_child

pytestmark = requires_cuda_kernels()

if gpu_visible():
    import flashkda_jax as F
    from flashkda_jax import _capabilities as _caps
    from flashkda_jax import _ffi
    from flashkda_jax import reference as R

    if cuda_kernels_present():
        _caps.CUDA_FWD_READY = True
        _caps.CUDA_BWD_READY = True  # this file tests the kernel itself

# DESIGN §5: bf16 gradients <= 1e-2 (dg, dbeta <= 2e-2). fp32 inputs still go through bf16 tensor-core
# operands in the forward prep, so they get the bf16 bounds too.
TOL = dict(q=1e-2, k=1e-2, v=1e-2, g=2e-2, beta=2e-2, A_log=2e-2, dt_bias=2e-2, initial_state=1e-2)
NAMES = ("q", "k", "v", "g", "beta")


def _inputs(seed, B, T, H, HV, K, V, dtype, gate="bounded"):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, HV, V), jnp.float32)
    beta = jax.random.normal(ks[4], (B, T, HV), jnp.float32)
    kw = dict(qk_l2norm=True, beta_sigmoid=True)
    params = {}
    if gate == "precomputed":
        g = -jnp.exp(jax.random.normal(ks[3], (B, T, HV, K)) - 2.0)
    else:
        g = jax.random.normal(ks[3], (B, T, HV, K))
        kw["gate"] = gate
        params["A_log"] = jax.random.normal(ks[5], (HV,)) * 0.5 - 1.0
        params["dt_bias"] = jax.random.normal(ks[6], (HV, K)) * 0.5
        if gate == "bounded":
            kw["lower_bound"] = -5.0
    c = lambda x: x.astype(dtype)
    return (c(q), c(k), c(v), c(g), c(beta)), params, kw


def _grads(impl, args, params, kw, init=None, dfin=None, seed=0):
    """Gradients of sum(o * do) (+ sum(final * dfin)) w.r.t. every differentiable input."""
    B, T, HV, V = args[2].shape
    do = jax.random.normal(jax.random.PRNGKey(100 + seed), (B, T, HV, V), jnp.float32)

    def loss(args, params, init):
        a = args if impl == "cuda" else tuple(x.astype(jnp.float32) for x in args)
        extra = dict(kw)
        extra.update(params)
        if init is not None:
            extra["initial_state"] = init
        fn = F.kda if impl == "cuda" else R.kda_recurrent
        if impl == "cuda":
            extra["implementation"] = "cuda"
        o, fin = fn(*a, return_final_state=dfin is not None, **extra)
        out = jnp.sum(o.astype(jnp.float32) * do)
        if dfin is not None:
            out = out + jnp.sum(fin * dfin)
        return out

    ga, gp, gi = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(args, params, init)
    out = dict(zip(NAMES, ga))
    out.update(gp)
    if init is not None:
        out["initial_state"] = gi
    return out


def _compare(args, params, kw, init=None, dfin=None, what=""):
    got = _grads("cuda", args, params, kw, init, dfin)
    ref = _grads("ref", args, params, kw, init, dfin)
    for name, r in ref.items():
        o = got[name]
        assert o.shape == r.shape, name
        assert np.all(np.isfinite(np.asarray(o, np.float32))), f"{what} {name} not finite"
        e = rel_err(o, r)
        assert e <= TOL[name], f"{what} d{name} rel err {e:.3e}"
    return got


@pytest.mark.parametrize("gate", ["precomputed", "softplus", "bounded"])
@pytest.mark.parametrize("KV", [64, 128])
def test_gates_gva_states(gate, KV):
    B, T, H, HV = 2, 200, 2, 4
    args, params, kw = _inputs(1, B, T, H, HV, KV, KV, jnp.bfloat16, gate)
    init = random_state(3, (B, HV, KV, KV))
    dfin = random_state(4, (B, HV, KV, KV))
    _compare(args, params, kw, init, dfin, f"{gate} K={KV}")


def test_full_width_forward_states():
    # K = 128 with B x HV >= 64: the forward's recurrence runs over all 128 value columns (16 warps) and writes
    # the chunk states that this backward reads (saved residuals).
    B, T, H, HV = 1, 200, 16, 64
    args, params, kw = _inputs(7, B, T, H, HV, 128, 128, jnp.bfloat16, "bounded")
    _compare(args, params, kw, what="full width")


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_lengths(T):
    args, params, kw = _inputs(2, 1, T, 1, 2, 64, 64, jnp.bfloat16, "bounded")
    _compare(args, params, kw, what=f"T={T}")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_dtypes(dtype):
    B, T, H, HV, K = 1, 150, 2, 2, 128
    args, params, kw = _inputs(5, B, T, H, HV, K, K, dtype, "softplus")
    kw.update(allow_neg_eigval=True, scale=0.2)
    got = _compare(args, params, kw, what=str(dtype))
    assert got["q"].dtype == dtype


def test_options_off_state_vk():
    """No l2norm / sigmoid (unit-norm keys, beta in (0, 1)), bounded gate without A_log, vk state layout."""
    B, T, H, HV, K = 2, 96, 2, 2, 64
    args, params, kw = _inputs(6, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    q, k, v, g, beta = args
    kf = k.astype(jnp.float32)
    k = (kf / jnp.linalg.norm(kf, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    beta = jax.nn.sigmoid(beta.astype(jnp.float32)).astype(jnp.bfloat16)
    params.pop("A_log")
    kw.update(qk_l2norm=False, beta_sigmoid=False, state_layout="vk")
    init = random_state(7, (B, HV, K, K))
    dfin = random_state(8, (B, HV, K, K))
    _compare((q, k, v, g, beta), params, kw, init, dfin, "vk")


def test_segments_padding_states():
    B, T, H, HV, K = 2, 400, 1, 2, 128
    seg = chunk_crossing_segments(B, T, 11)
    S = int(max(len(set(r[r > 0])) for r in seg))  # an upper bound on sequences per row
    args, params, kw = _inputs(12, B, T, H, HV, K, K, jnp.bfloat16, "softplus")
    kw.update(segment_ids=jnp.asarray(seg), max_segments=S)
    init = random_state(13, (B, S, HV, K, K))
    dfin = random_state(14, (B, S, HV, K, K))
    got = _compare(args, params, kw, init, dfin, "segments")
    pad = seg == 0
    for name in NAMES:
        x = np.asarray(got[name], np.float32)
        assert np.all(x[pad] == 0), f"d{name} not zero at padding"


def test_segments_equal_separate_sequences():
    K = 64
    T1, T2 = 70, 101
    args, params, kw = _inputs(15, 1, T1 + T2, 1, 2, K, K, jnp.bfloat16, "bounded")
    seg = jnp.asarray(np.array([[1] * T1 + [2] * T2], np.int32))
    packed = _grads("cuda", args, params, dict(kw, segment_ids=seg, max_segments=2))
    B, T, HV, V = args[2].shape
    do = jax.random.normal(jax.random.PRNGKey(100), (B, T, HV, V), jnp.float32)
    for a, e in ((0, T1), (T1, T1 + T2)):
        part = tuple(x[:, a:e] for x in args)

        def loss(part):
            o, _ = F.kda(*part, implementation="cuda", **params, **kw)
            return jnp.sum(o.astype(jnp.float32) * do[:, a:e])

        one = jax.jit(jax.grad(loss))(part)
        for name, x in zip(NAMES, one):
            e_ = rel_err(packed[name][:, a:e], x)
            assert e_ <= 1e-2, f"d{name} packed vs separate rel err {e_:.3e}"


def test_deterministic():
    B, T, H, HV, K = 1, 300, 2, 4, 128
    args, params, kw = _inputs(16, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    init = random_state(17, (B, HV, K, K))
    dfin = random_state(18, (B, HV, K, K))
    a = _grads("cuda", args, params, kw, init, dfin)
    b = _grads("cuda", args, params, kw, init, dfin)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name], np.float32), np.asarray(b[name], np.float32), err_msg=name)


@pytest.mark.parametrize("shape", ["segments", "split"])
def test_saved_residuals(shape, monkeypatch):
    """The differentiated CUDA forward saves its chunk states and prep outputs for the backward (which then skips
    its states pass and its prep): o and the final states are bit-identical to the forward without them; with the
    saved prep alone the backward is bit-identical to the recomputing one (the same kernel on the same inputs);
    with the saved states too it agrees to the bf16 rounding of two kernels' f32 states; through `kda`, saving
    (default) and recomputing (FLASHKDA_SAVE_RESIDUALS=0) agree and meet the oracle. "split": a sequence long
    enough for the forward to split it into segments (phase 3 writes the states)."""
    from flashkda_jax import _inputs as I
    from flashkda_jax import _workspace as W
    from flashkda_jax import ops

    if shape == "segments":
        B, T, H, HV, K = 2, 400, 1, 2, 128
        seg = chunk_crossing_segments(B, T, 21)
        S = int(max(len(set(r[r > 0])) for r in seg))
        extra = dict(segment_ids=jnp.asarray(seg), max_segments=S)
        st_shape = (B, S, HV, K, K)
    else:
        B, T, H, HV, K = 1, 3000, 1, 2, 64
        extra, st_shape = {}, (B, HV, K, K)
    assert shape == "segments" or W.cuda_fwd_seglen(B, T, HV, K, K) < -(-T // 64), "the forward must split"
    args, params, kw = _inputs(22, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    kw.update(extra)
    init, dfin = random_state(23, st_shape), random_state(24, st_shape)
    core, opts = I.prepare(*args, scale=None, initial_state=init, segment_ids=kw.get("segment_ids"),
                           max_segments=kw.get("max_segments"), cu_seqlens=None, return_final_state=True,
                           qk_l2norm=True, beta_sigmoid=True, allow_neg_eigval=False, gate="bounded",
                           A_log=params["A_log"], dt_bias=params["dt_bias"], lower_bound=-5.0, state_layout="kv")
    B_ = core.q.shape[0]
    fargs = (core.q, core.k, core.v, core.g, core.beta, jnp.broadcast_to(core.a_log, (B_, HV)),
             jnp.broadcast_to(core.dt_bias, (B_, HV, K)), core.slot, core.initial_state)
    saving = dataclasses.replace(opts, save_residuals=True)
    o0, f0, none = jax.jit(lambda *a: ops._ffi_forward_saving(a, opts, "cuda"))(*fargs)
    o1, f1, saved = jax.jit(lambda *a: ops._ffi_forward_saving(a, saving, "cuda"))(*fargs)
    assert none is None
    for x, (shp, dt) in zip(saved, W.saved_structs(B_, T, HV, K, K, opts.num_slots)):
        assert x.shape == shp and x.dtype == jnp.dtype(dt)
    np.testing.assert_array_equal(np.asarray(o0, np.float32), np.asarray(o1, np.float32))
    np.testing.assert_array_equal(np.asarray(f0), np.asarray(f1))
    do = jax.random.normal(jax.random.PRNGKey(25), core.v.shape, jnp.float32).astype(core.v.dtype)
    dfc = dfin.astype(jnp.float32)
    names = NAMES + ("A_log", "dt_bias", "initial_state")
    bwd = jax.jit(lambda fa, sv: ops._ffi_backward(fa, do, dfc, opts, "cuda", sv))
    recomputed = jax.jit(lambda fa: ops._ffi_backward(fa, do, dfc, opts, "cuda"))(fargs)
    # The saved prep with recomputed states: bit-identical. The chunk states' operand must then be empty.
    prep_only = jax.jit(lambda fa, sv: ops._ffi_backward_call(
        fa, do, dfc, opts, "cuda", ops._grad_types(fa), (jnp.zeros((0,), jnp.bfloat16),) + tuple(sv[1:])))(fargs, saved)
    for name, x, y in zip(names, prep_only, recomputed):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=name)
    given = bwd(fargs, saved)
    for name, x, y in zip(names, given, recomputed):
        e = rel_err(x, y)
        assert e <= 2e-3, f"d{name}: saved vs recomputed residuals rel err {e:.3e}"
    # Through the public op: saving (default) and recomputing, both against the oracle.
    got = _compare(args, params, kw, init, dfin, "saved residuals")
    monkeypatch.setenv("FLASHKDA_SAVE_RESIDUALS", "0")
    again = _grads("cuda", args, params, kw, init, dfin)
    for name in got:
        e = rel_err(got[name], again[name])
        assert e <= 2e-3, f"d{name}: kda with saved vs recomputed residuals rel err {e:.3e}"


def test_vmap_grad_saved_residuals():
    """jax.vmap of jax.grad through the CUDA kernels (three instances: the saved residuals are folded into the
    batch axis and back) equals each instance's own gradient (to f32 rounding: the kernels' column blocks
    may be chosen differently for the larger batch)."""
    B, T, H, HV, K = 2, 150, 1, 2, 64
    insts = [_inputs(30 + i, B, T, H, HV, K, K, jnp.bfloat16, "bounded") for i in range(3)]
    _, params, kw = insts[0]
    stacked = tuple(jnp.stack([a[0][j] for a in insts]) for j in range(5))

    def loss(args):
        o, _ = F.kda(*args, implementation="cuda", **params, **kw)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    gv = jax.jit(jax.vmap(jax.grad(loss)))(stacked)
    for i, (args, _, _) in enumerate(insts):
        gi = jax.jit(jax.grad(loss))(args)
        for name, x, y in zip(NAMES, gv, gi):
            e = rel_err(x[i], y)
            assert e <= 1e-5, f"instance {i} d{name}: vmap vs alone rel err {e:.3e}"


def test_ffi_backward_direct():
    """The FFI call itself (no custom_vjp): shapes, dtypes, zero dinitial_state without states."""
    from flashkda_jax import _inputs as I
    from flashkda_jax import ops

    B, T, H, HV, K = 1, 77, 1, 2, 64
    args, params, kw = _inputs(19, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    core, opts = I.prepare(*args, scale=None, initial_state=None, segment_ids=None, max_segments=None,
                           cu_seqlens=None, return_final_state=False, qk_l2norm=True, beta_sigmoid=True,
                           allow_neg_eigval=False, gate="bounded", A_log=params["A_log"],
                           dt_bias=params["dt_bias"], lower_bound=-5.0, state_layout="kv")
    fargs = (core.q, core.k, core.v, core.g, core.beta, core.a_log, core.dt_bias, core.slot, core.initial_state)
    do = jnp.ones_like(core.v)
    outs = jax.jit(lambda *a: ops._ffi_backward(a, do, None, opts, "cuda"))(*fargs)
    dq, dk, dv, dg, dbeta, da, ddt, dinit = outs
    assert dq.shape == core.q.shape and dq.dtype == core.q.dtype
    assert dg.shape == core.g.shape and dbeta.shape == core.beta.shape
    assert da.dtype == jnp.float32 and ddt.dtype == jnp.float32
    assert dinit is None
    for x in (dq, dk, dv, dg, dbeta, da, ddt):
        assert np.all(np.isfinite(np.asarray(x, np.float32)))


@pytest.mark.parametrize("K", [64, 128])
def test_state_only_backward_matches_full(K):
    # State-only mode (only the reverse pass runs): bit-identical dinitial_state to the full backward's.
    from kda_testing import state_only_vs_full_backward

    only, full, err = state_only_vs_full_backward("cuda", K=K, dtype=jnp.bfloat16)
    assert only.shape == full.shape and np.abs(full).max() > 0
    np.testing.assert_array_equal(only, full)
    assert err is not None and "needs an initial_state" in str(err)


# The backward's first versions (SIMT), selected per process by these switches; the defaults are the
# tensor-core kernels. tests/test_cuda_bwd_variants.py compares the two sets on larger problems.
FIRST_VERSION_ENV = {"FLASHKDA_BWD_GRAD2": "v1", "FLASHKDA_BWD_GRAD2_SOLVE": "simt", "FLASHKDA_BWD_GRAD1": "simt",
                     "FLASHKDA_BWD_RECUR": "v1"}

_FIRST_VERSION_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax.numpy as jnp
import numpy as np
import test_cuda_bwd as t
from kda_testing import random_state

def case(name, seed, B, T, H, HV, K, gate, strong=False):
    args, params, kw = t._inputs(seed, B, T, H, HV, K, K, jnp.bfloat16, gate)
    if strong:  # precomputed gate x30: some diagonal 16-row blocks beyond e^80 (exact path), others factored
        q, k, v, g, beta = args
        args = (q, k, v, (g.astype(jnp.float32) * 30.0).astype(jnp.bfloat16), beta)
    init = random_state(seed + 2, (B, HV, K, K))
    dfin = random_state(seed + 3, (B, HV, K, K))
    got = t._compare(args, params, kw, init, dfin, "first version " + name)
    print("ok", name, flush=True)
    return got

got = case("bounded K=128", 1, 2, 200, 2, 4, 128, "bounded")
np.save(sys.argv[2], np.asarray(got["k"], np.float32))
case("softplus K=64", 2, 2, 200, 2, 4, 64, "softplus")
case("strong precomputed K=128", 3, 1, 150, 1, 2, 128, "precomputed", strong=True)
"""


def test_first_version_kernels_env(tmp_path):
    # The first-version kernels (FIRST_VERSION_ENV, read once per process at the first launch) in a fresh
    # process against the oracle at the usual tolerances; their dk must differ from this process's (the
    # tensor-core defaults) in some bits, or the switches did nothing.
    import os

    out, saved = run_child(_FIRST_VERSION_CHILD, tmp_path, "v1_dk.npy", env=FIRST_VERSION_ENV,
                           what="first-version run", timeout=900)
    assert out.count("ok ") == 3, out
    if not any(os.environ.get(k) == v for k, v in FIRST_VERSION_ENV.items()):  # this process: the defaults
        args, params, kw = _inputs(1, 2, 200, 2, 4, 128, 128, jnp.bfloat16, "bounded")
        init = random_state(3, (2, 4, 128, 128))
        dfin = random_state(4, (2, 4, 128, 128))
        default = np.asarray(_grads("cuda", args, params, kw, init, dfin)["k"], np.float32)
        assert not np.array_equal(default, np.load(saved)), "the first-version switches gave the defaults' bits"
