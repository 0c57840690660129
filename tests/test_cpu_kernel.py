"""The C++ CPU handlers of ``flashkda_fwd`` / ``flashkda_bwd`` against the pure-JAX oracle.

Two entry points are exercised: the FFI targets called directly on canonical inputs (the contract of
docs/ffi.md, independent of the Python wrapper), and the public ``kda(..., implementation="cpu")``.
Shapes are small so that the whole file runs in well under two minutes on two cores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

from flashkda_jax import _ffi, _inputs, reference  # noqa: E402
from flashkda_jax import _workspace as W  # noqa: E402
from flashkda_jax.segments import slots_from_segment_ids  # noqa: E402

from kda_testing import make_problem, ragged_segments, random_state, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(not _ffi.has_extension(), reason="flashkda_jax extension not built")

F32_TOL = 1e-5
F32_GRAD_TOL = 1e-4
F64_TOL = 1e-12


# ----------------------------------------------------------------------------------------------------
# Direct FFI calls on canonical inputs.
# ----------------------------------------------------------------------------------------------------

def _rows(core):
    B = core.q.shape[0]
    return (jnp.broadcast_to(core.a_log, (B,) + core.a_log.shape),
            jnp.broadcast_to(core.dt_bias, (B,) + core.dt_bias.shape))


def _state_struct(core, opts, present):
    cdt = _inputs.compute_dtype(core.q.dtype)
    if not present:
        return jax.ShapeDtypeStruct((0,), cdt)
    B, HV, K, V = core.q.shape[0], core.v.shape[2], core.q.shape[3], core.v.shape[3]
    kv = (V, K) if opts.state_vk else (K, V)
    return jax.ShapeDtypeStruct((B, opts.num_slots, HV) + kv, cdt)


def _init_operand(core):
    if core.initial_state is None:
        return jnp.zeros((0,), _inputs.compute_dtype(core.q.dtype))
    return core.initial_state


def ffi_fwd(core, opts):
    a_rows, dt_rows = _rows(core)
    outs = (jax.ShapeDtypeStruct(core.v.shape, core.v.dtype),
            _state_struct(core, opts, opts.return_final_state),
            # chunk_states, saved_qg, saved_kd, saved_w, saved_u, saved_aqk, saved_gamma: CUDA only
            *[jax.ShapeDtypeStruct((0,), jnp.bfloat16)] * 6, jax.ShapeDtypeStruct((0,), jnp.float32),
            jax.ShapeDtypeStruct((0,), jnp.uint8))
    o, fin = jax.ffi.ffi_call("flashkda_fwd", outs)(
        core.q, core.k, core.v, core.g, core.beta, a_rows, dt_rows, core.slot, _init_operand(core),
        **opts.ffi_attrs())[:2]
    return o, (fin if opts.return_final_state else None)


def ffi_bwd(core, opts, do, dfin):
    a_rows, dt_rows = _rows(core)
    f32 = jnp.float32
    outs = (jax.ShapeDtypeStruct(core.q.shape, core.q.dtype), jax.ShapeDtypeStruct(core.k.shape, core.k.dtype),
            jax.ShapeDtypeStruct(core.v.shape, core.v.dtype), jax.ShapeDtypeStruct(core.g.shape, core.g.dtype),
            jax.ShapeDtypeStruct(core.beta.shape, core.beta.dtype),
            jax.ShapeDtypeStruct(a_rows.shape, f32), jax.ShapeDtypeStruct(dt_rows.shape, f32),
            _state_struct(core, opts, core.initial_state is not None),
            jax.ShapeDtypeStruct((0,), jnp.uint8))
    if dfin is None:
        dfin = jnp.zeros((0,), _inputs.compute_dtype(core.q.dtype))
    res = jax.ffi.ffi_call("flashkda_bwd", outs)(
        core.q, core.k, core.v, core.g, core.beta, a_rows, dt_rows, core.slot, _init_operand(core), do, dfin,
        *[jnp.zeros((0,), jnp.bfloat16)] * 6, jnp.zeros((0,), jnp.float32), **opts.ffi_attrs(),
        bwd_window=np.int64(0))
    return res[:8]


def _prepare(seed, *, B=2, T=29, H=2, HV=4, K=16, V=24, dtype=jnp.float32, gate="bounded", strong=False,
             states=True, segments=True, layout="kv", S=8, l2=True, bsig=True, neg=True, with_a_log=True,
             return_final_state=None, scale=None):
    (q, k, v, g, beta), kw = make_problem(seed, B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=dtype, gate=gate,
                                          strong=strong, with_a_log=with_a_log)
    cdt = _inputs.compute_dtype(dtype)
    extra = {}
    if segments:
        extra["segment_ids"] = ragged_segments(B, T, seed)
        extra["max_segments"] = S if states else None
        shape = (B, S, HV)
    else:
        shape = (B, HV)
    shape = shape + ((V, K) if layout == "vk" else (K, V))
    init = random_state(seed, shape, cdt) if states else None
    if extra.get("max_segments") is None:
        extra.pop("max_segments", None)
    rfs = states if return_final_state is None else return_final_state
    core, opts = _inputs.prepare(q, k, v, g, beta, initial_state=init, return_final_state=rfs,
                                 qk_l2norm=l2, beta_sigmoid=bsig, allow_neg_eigval=neg and bsig,
                                 state_layout=layout, scale=scale, **kw, **extra)
    return core, opts


def _jit(fn, static_argnums=1):
    """jit over a function whose first argument is a CoreInputs (passed as a dict pytree)."""
    jf = jax.jit(lambda d, *a: fn(_inputs.CoreInputs(**d), *a), static_argnums=static_argnums)
    return lambda core, *a: jf(dict(core.__dict__), *a)


# ----------------------------------------------------------------------------------------------------
# Forward and backward against the oracle (one jit per case: FFI fwd + bwd, oracle fwd + vjp).
# ----------------------------------------------------------------------------------------------------

def _grads_ref(core, opts, do, dfin):
    """The oracle's outputs and its vjp w.r.t. every float input of the core op."""
    def f(q, k, v, g, beta, a_log, dt_bias, init):
        c = _inputs.CoreInputs(q=q, k=k, v=v, g=g, beta=beta, a_log=a_log, dt_bias=dt_bias, slot=core.slot,
                               initial_state=init)
        o, fin = reference.recurrent_core(c, opts)
        return (o, fin) if opts.return_final_state else o
    prim = (core.q, core.k, core.v, core.g, core.beta, core.a_log, core.dt_bias, core.initial_state)
    out, vjp = jax.vjp(f, *prim)
    out = out if opts.return_final_state else (out, None)
    return out, vjp((do, dfin) if opts.return_final_state else do)


def _all_impl(core, opts, do, dfin):
    mine = ffi_fwd(core, opts), ffi_bwd(core, opts, do, dfin if opts.return_final_state else None)
    return mine, _grads_ref(core, opts, do, dfin)


_all = _jit(_all_impl)


def _cotangents(core, opts, seed=11):
    cdt = _inputs.compute_dtype(core.q.dtype)
    do = jax.random.normal(jax.random.PRNGKey(seed), core.v.shape, jnp.float32).astype(core.v.dtype)
    dfin = None
    if opts.return_final_state:
        st = _state_struct(core, opts, True)
        dfin = jax.random.normal(jax.random.PRNGKey(seed + 1), st.shape, jnp.float32).astype(cdt)
    return do, dfin


def _check(core, opts, tol, gtol, gtol_gb=None):
    """Forward (o, final state) within tol, gradients within gtol (dg, dbeta within gtol_gb)."""
    do, dfin = _cotangents(core, opts)
    ((o, fin), grads), ((ro, rfin), rgrads) = _all(core, opts, do, dfin)
    assert o.dtype == core.v.dtype and o.shape == core.v.shape
    assert np.all(np.isfinite(np.asarray(o, np.float64)))
    errs = dict(o=(rel_err(o, ro), tol))
    if opts.return_final_state:
        assert fin.dtype == rfin.dtype and fin.shape == rfin.shape
        assert np.all(np.isfinite(np.asarray(fin)))
        errs["final_state"] = (rel_err(fin, rfin), tol)
    dq, dk, dv, dg, dbeta, da, ddt, dinit = grads
    rq, rk, rv, rg, rb, ra, rdt, rinit = rgrads
    gtol_gb = gtol if gtol_gb is None else gtol_gb
    for name, x, r in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert x.dtype == r.dtype and x.shape == r.shape, name
        errs[name] = (rel_err(x, r), gtol)
    errs["dg"] = (rel_err(dg, rg), gtol_gb)
    errs["dbeta"] = (rel_err(dbeta, rb), gtol_gb)
    if opts.gate != "precomputed":
        # Per-row partials in f32 (the contract), summed over rows here; f32 caps their precision.
        t = max(gtol_gb, 1e-6)
        errs["dA_log"] = (rel_err(jnp.sum(da.astype(jnp.float64), 0), ra), t)
        errs["ddt_bias"] = (rel_err(jnp.sum(ddt.astype(jnp.float64), 0), rdt), t)
    if core.initial_state is not None:
        assert dinit.shape == core.initial_state.shape
        errs["dinitial_state"] = (rel_err(dinit, rinit), gtol)
    bad = {n: e for n, e in errs.items() if not e[0] <= e[1]}
    assert not bad, (bad, errs)
    return (o, fin), grads


TOLS = {jnp.float32: (F32_TOL, F32_GRAD_TOL, None), jnp.float64: (F64_TOL, 1e-11, None),
        jnp.bfloat16: (5e-3, 1e-2, 2e-2), jnp.float16: (1e-3, 1e-2, 2e-2)}


@pytest.mark.parametrize("gate,dtype", [("precomputed", jnp.float32), ("softplus", jnp.float32),
                                        ("bounded", jnp.float32), ("softplus", jnp.float64),
                                        ("bounded", jnp.float64)])
def test_options(gate, dtype):
    """GVA 2, l2norm, beta sigmoid x2, ragged segments with padding, initial + final state."""
    core, opts = _prepare(1, gate=gate, dtype=dtype)
    _check(core, opts, *TOLS[dtype])


@pytest.mark.parametrize("dtype,gate", [(jnp.bfloat16, "bounded"), (jnp.float16, "softplus")])
def test_half_dtypes(dtype, gate):
    core, opts = _prepare(2, gate=gate, dtype=dtype)
    _check(core, opts, *TOLS[dtype])


@pytest.mark.parametrize("kw", [
    dict(layout="vk"),
    dict(layout="vk", segments=False, return_final_state=False),  # initial state only
    dict(T=1),
    dict(K=5, V=13, H=1, HV=3),                  # odd head dims, GVA 3
    dict(K=33, V=70, H=1, HV=1, segments=False),  # V spans several state blocks (and V ranges)
    dict(l2=False, bsig=False, gate="bounded", with_a_log=False, scale=0.375),
    # scale and lower bound not representable in f32: float64 problems must get them exactly (f64 attributes)
    dict(dtype=jnp.float64, l2=False, gate="bounded", scale=0.1, K=24),
    dict(states=False),
    dict(S=2),                                    # more sequences than state slots
    dict(gate="softplus", strong=True, neg=False),  # strong gates: finite everywhere
    dict(gate="precomputed", strong=True),        # g down to about -1e4 per step
])
def test_variants(kw):
    core, opts = _prepare(3, **kw)
    _check(core, opts, *TOLS[kw.get("dtype", jnp.float32)])


def test_final_state_without_initial():
    core, opts = _prepare(4)
    core = _inputs.CoreInputs(**{**core.__dict__, "initial_state": None})
    _check(core, opts, *TOLS[jnp.float32])


def test_public_cu_seqlens_with_empty_sequence():
    (q, k, v, g, beta), kw = make_problem(7, B=1, T=30, H=2, HV=2, K=8, V=16, gate="softplus")
    cu = jnp.array([0, 5, 5, 6, 21, 28], jnp.int32)  # an empty and a length-1 sequence, padding at the end
    init = random_state(7, (5, 2, 8, 16))
    from flashkda_jax import kda
    args = dict(cu_seqlens=cu, initial_state=init, return_final_state=True, qk_l2norm=True, **kw)
    o, fin = kda(q, k, v, g, beta, implementation="cpu", **args)
    ro, rfin = reference.kda_recurrent(q, k, v, g, beta, **args)
    assert rel_err(o, ro) <= F32_TOL and rel_err(fin, rfin) <= F32_TOL
    np.testing.assert_array_equal(np.asarray(fin[1]), np.asarray(init[1]))  # empty: copied through
    np.testing.assert_array_equal(np.asarray(o[:, 28:]), 0.0)              # padding


def test_vmap_leading_dims():
    """Extra leading dims (vmap broadcast_all) are flattened into B by the handler."""
    (q, k, v, g, beta), kw = make_problem(9, B=2, T=17, H=2, HV=2, K=8, V=8, gate="bounded")
    from flashkda_jax import kda
    f = lambda q, k, v, g, beta: kda(q, k, v, g, beta, implementation="cpu", qk_l2norm=True, **kw)[0]
    xs = [jnp.stack([x, 0.5 * x]) for x in (q, k, v, g, beta)]
    out = jax.vmap(f)(*xs)
    for i in range(2):
        ref = reference.kda_recurrent(*(x[i] for x in xs), qk_l2norm=True, **kw)[0]
        assert rel_err(out[i], ref) <= F32_TOL


def test_bad_operands_raise():
    core, opts = _prepare(10, states=False)
    bad = _inputs.CoreInputs(**{**core.__dict__, "beta": core.beta[:, :, :3]})
    with pytest.raises(Exception, match="beta"):
        jax.block_until_ready(ffi_fwd(bad, opts))


def test_saved_results_are_cuda_only():
    """The CPU handlers reject the CUDA-only saved results (chunk_states, saved_*) instead of ignoring them."""
    core, opts = _prepare(11, states=False, segments=False)
    a_rows, dt_rows = _rows(core)
    B, T, H, K = core.q.shape
    HV, V = core.v.shape[2], core.v.shape[3]
    saved = tuple(jax.ShapeDtypeStruct(shp, jnp.dtype(dt))
                  for shp, dt in W.saved_structs(B, T, HV, K, V, opts.num_slots))
    outs = (jax.ShapeDtypeStruct(core.v.shape, core.v.dtype), _state_struct(core, opts, False)) + saved + (
        jax.ShapeDtypeStruct((0,), jnp.uint8),)
    with pytest.raises(Exception, match="CUDA forward only"):
        jax.block_until_ready(jax.ffi.ffi_call("flashkda_fwd", outs)(
            core.q, core.k, core.v, core.g, core.beta, a_rows, dt_rows, core.slot, _init_operand(core),
            **opts.ffi_attrs()))
    do = jnp.ones_like(core.v)
    gouts = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (core.q, core.k, core.v, core.g, core.beta)) + (
        jax.ShapeDtypeStruct(a_rows.shape, jnp.float32), jax.ShapeDtypeStruct(dt_rows.shape, jnp.float32),
        jax.ShapeDtypeStruct((0,), jnp.float32), jax.ShapeDtypeStruct((0,), jnp.uint8))
    with pytest.raises(Exception, match="CUDA forward only"):
        jax.block_until_ready(jax.ffi.ffi_call("flashkda_bwd", gouts)(
            core.q, core.k, core.v, core.g, core.beta, a_rows, dt_rows, core.slot, _init_operand(core), do,
            jnp.zeros((0,), jnp.float32), *[jnp.zeros(x.shape, x.dtype) for x in saved], **opts.ffi_attrs(),
            bwd_window=np.int64(0)))


def test_padding_exactly_zero():
    """Padding tokens: zero output and exactly zero gradients."""
    core, opts = _prepare(16, gate="softplus")
    do, dfin = _cotangents(core, opts)
    (o, _), (dq, dk, dv, dg, dbeta, *_) = _jit(lambda c, o_, d, s: (ffi_fwd(c, o_), ffi_bwd(c, o_, d, s)))(
        core, opts, do, dfin)
    pad = np.asarray(core.slot) < 0
    assert pad.any()
    for x in (o, dq, dk, dv, dg, dbeta):
        assert np.all(np.asarray(x)[pad] == 0)


def test_long_gva_deterministic():
    """T past the forward's 64-token pre-processing chunk, GVA 4, several V blocks; two runs bit-identical."""
    core, opts = _prepare(17, T=70, HV=4, H=1, V=70)
    _check(core, opts, *TOLS[jnp.float32])
    do, dfin = _cotangents(core, opts)
    f = _jit(lambda c, d, s: (ffi_fwd(c, opts), ffi_bwd(c, opts, d, s)), static_argnums=())
    a = jax.tree_util.tree_leaves(f(core, do, dfin))
    b = jax.tree_util.tree_leaves(f(core, do, dfin))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_public_grad_matches_reference():
    """jax.grad through kda(implementation="cpu") (custom_vjp) vs the oracle, every differentiable input."""
    from flashkda_jax import kda
    (q, k, v, g, beta), kw = make_problem(18, B=2, T=33, H=2, HV=4, K=16, V=24, gate="softplus")
    seg = ragged_segments(2, 33, 18)
    init = random_state(18, (2, 4, 4, 16, 24))
    wo = jax.random.normal(jax.random.PRNGKey(1), v.shape)
    ws = jax.random.normal(jax.random.PRNGKey(2), init.shape)

    def loss(fn, q, k, v, g, beta, A_log, dt_bias, init):
        o, fin = fn(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, gate="softplus", initial_state=init,
                    segment_ids=seg, max_segments=4, return_final_state=True, qk_l2norm=True, beta_sigmoid=True)
        return jnp.sum(o * wo) + jnp.sum(fin * ws)

    args = (q, k, v, g, beta, kw["A_log"], kw["dt_bias"], init)
    mine = jax.jit(jax.grad(functools.partial(loss, functools.partial(kda, implementation="cpu")),
                            argnums=tuple(range(8))))(*args)
    ref = jax.jit(jax.grad(functools.partial(loss, reference.kda_recurrent), argnums=tuple(range(8))))(*args)
    for a, b in zip(mine, ref):
        assert rel_err(a, b) <= F32_GRAD_TOL, rel_err(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_state_only_backward_matches_full(dtype):
    # The backward's state-only mode (empty input-gradient results; context parallelism's incoming-state
    # gradient): the same dinitial_state as the full backward, and an error without an initial state.
    from kda_testing import state_only_vs_full_backward

    only, full, err = state_only_vs_full_backward("cpu", K=16, dtype=dtype)
    assert only.shape == full.shape and np.abs(full).max() > 0
    np.testing.assert_array_equal(only, full)
    assert err is not None and "needs an initial_state" in str(err)
