"""The public ``kda`` in every implementation this install can run, against the oracle."""

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest

import flashkda_jax as F
from flashkda_jax import reference as R
from kda_testing import make_problem, random_state, ragged_segments, rel_err, split_by_segments

IMPLS = list(F.available_implementations())


def fwd_tol(impl, dtype):
    if dtype == jnp.bfloat16 or dtype == jnp.float16:
        return 5e-3
    # DESIGN §5's GPU bar for float32 inputs (the CUDA forward runs them through its float32 recurrence).
    return 2e-3 if impl == "cuda" else 1e-5


def grad_tol(impl, dtype, name=""):
    if dtype in (jnp.bfloat16, jnp.float16):
        return 2e-2 if name in ("g", "beta") else 1e-2
    return 2e-3 if impl == "cuda" else 1e-4


def hd(impl, n):
    """Head dim for a test: small on CPU/XLA, the smallest the CUDA kernel takes on the GPU."""
    return 64 if impl == "cuda" else n


def test_available_implementations():
    assert "xla" in IMPLS
    assert IMPLS == sorted(IMPLS, key=["cuda", "cpu", "xla"].index)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", ["precomputed", "softplus", "bounded"])
@pytest.mark.parametrize("heads", [(2, 2), (1, 4)])
@pytest.mark.parametrize("layout", ["kv", "vk"])
def test_forward_matches_oracle(impl, gate, heads, layout):
    H, HV = heads
    B, T, K, V = 2, 45, hd(impl, 16), hd(impl, 8)
    (q, k, v, g, beta), kw = make_problem(10, B=B, T=T, H=H, HV=HV, K=K, V=V, gate=gate)
    shape = (B, HV, K, V) if layout == "kv" else (B, HV, V, K)
    kw.update(qk_l2norm=True, beta_sigmoid=True, initial_state=random_state(10, shape),
              return_final_state=True, state_layout=layout, scale=0.37)
    o_ref, s_ref = R.kda_recurrent(q, k, v, g, beta, **kw)
    o, s = jax.jit(lambda *a: F.kda(*a, implementation=impl, **kw))(q, k, v, g, beta)
    assert o.shape == o_ref.shape and o.dtype == v.dtype
    assert s.shape == shape and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < fwd_tol(impl, jnp.float32)
    assert rel_err(s, s_ref) < fwd_tol(impl, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 2, 17, 130])
def test_forward_lengths_and_plain_options(impl, T):
    (q, k, v, g, beta), kw = make_problem(11, B=1, T=T, H=2, K=hd(impl, 16), V=hd(impl, 16))
    beta = jax.nn.sigmoid(beta)  # raw beta in (0, 1), no in-kernel sigmoid, no l2norm
    q, k = q * 0.25, k * 0.25
    o_ref, _ = R.kda_recurrent(q, k, v, g, beta)
    o, s = F.kda(q, k, v, g, beta, implementation=impl)
    assert s is None
    assert rel_err(o, o_ref) < fwd_tol(impl, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(impl, dtype):
    (q, k, v, g, beta), kw = make_problem(12, B=1, T=70, H=2, HV=4, K=hd(impl, 32), V=hd(impl, 32), gate="bounded",
                                          dtype=dtype)
    kw.update(qk_l2norm=True, beta_sigmoid=True, return_final_state=True,
              initial_state=random_state(12, (1, 4, hd(impl, 32), hd(impl, 32))))
    up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
    o_ref, s_ref = R.kda_recurrent(*up, **kw)
    o, s = F.kda(q, k, v, g, beta, implementation=impl, **kw)
    assert o.dtype == dtype and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < fwd_tol(impl, dtype)
    assert rel_err(s, s_ref) < fwd_tol(impl, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", ["precomputed", "softplus"])
def test_strong_gates_finite(impl, gate):
    (q, k, v, g, beta), kw = make_problem(13, B=1, T=64, H=2, K=hd(impl, 16), V=hd(impl, 16), gate=gate,
                                          strong=True)
    kw.update(qk_l2norm=True, beta_sigmoid=True, return_final_state=True)
    o, s = F.kda(q, k, v, g, beta, implementation=impl, **kw)
    o_ref, s_ref = R.kda_recurrent(q, k, v, g, beta, **kw)
    assert bool(jnp.isfinite(o).all()) and bool(jnp.isfinite(s).all())
    # Gates of -3000 per step leave few live channels: the chunked fp32 forms lose a little (1.5e-4 for the
    # pure-JAX one here, 1e-7 in float64), the token-by-token ones do not.
    assert rel_err(o, o_ref) < max(5e-4, fwd_tol(impl, jnp.float32))


def _seg_problem(seed, impl, B=2, T=80, H=1, HV=2, K=16, V=8):
    K, V = hd(impl, K), hd(impl, V)
    (q, k, v, g, beta), kw = make_problem(seed, B=B, T=T, H=H, HV=HV, K=K, V=V, gate="softplus")
    kw.update(qk_l2norm=True, beta_sigmoid=True)
    return (q, k, v, g, beta), kw, ragged_segments(B, T, seed=seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_equals_separate_sequences(impl):
    """Outputs, final states and gradients of a packed batch == each sequence run on its own."""
    (q, k, v, g, beta), kw, seg = _seg_problem(14, impl)
    B, T, HV, K, V = 2, 80, 2, hd(impl, 16), hd(impl, 8)
    S = 16
    h0 = random_state(14, (B, S, HV, K, V))
    w = jax.random.normal(jax.random.PRNGKey(1), v.shape)

    def packed(q, k, v, g, beta, h0):
        o, s = F.kda(q, k, v, g, beta, segment_ids=seg, max_segments=S, initial_state=h0,
                     return_final_state=True, implementation=impl, **kw)
        return jnp.sum(o * w) + jnp.sum(s * s), (o, s)

    (_, (o, s)), grads = jax.value_and_grad(packed, argnums=tuple(range(6)), has_aux=True)(q, k, v, g, beta, h0)
    tol = fwd_tol(impl, jnp.float32)
    for b in range(B):
        runs = split_by_segments(seg[b])
        assert len(runs) <= S
        for i, (t0, t1) in enumerate(runs):
            sl = lambda x: x[b:b + 1, t0:t1]

            def single(q, k, v, g, beta, h):
                o1, s1 = F.kda(q, k, v, g, beta, initial_state=h, return_final_state=True,
                               implementation=impl, **kw)
                return jnp.sum(o1 * sl(w)) + jnp.sum(s1 * s1), (o1, s1)

            (_, (o1, s1)), g1 = jax.value_and_grad(single, argnums=tuple(range(6)), has_aux=True)(
                sl(q), sl(k), sl(v), sl(g), sl(beta), h0[b:b + 1, i])
            assert rel_err(o[b:b + 1, t0:t1], o1) < tol
            assert rel_err(s[b:b + 1, i], s1) < tol
            for gp, gs in zip(grads[:5], g1[:5]):
                assert rel_err(sl(gp), gs) < grad_tol(impl, jnp.float32)
            assert rel_err(grads[5][b:b + 1, i], g1[5]) < grad_tol(impl, jnp.float32)
        # Unused slots pass the initial state through, with identity gradient.
        for i in range(len(runs), S):
            np.testing.assert_allclose(np.asarray(s[b, i]), np.asarray(h0[b, i]), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_gets_zero_output_and_gradient(impl):
    (q, k, v, g, beta), kw, seg = _seg_problem(15, impl)
    pad = (seg == 0)
    assert bool(pad.any())

    def loss(q, k, v, g, beta):
        o, _ = F.kda(q, k, v, g, beta, segment_ids=seg, implementation=impl, **kw)
        return jnp.sum(o * o), o

    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, g, beta)
    assert float(jnp.abs(jnp.where(pad[..., None, None], o, 0)).max()) == 0.0
    for gr in grads:
        m = pad.reshape(pad.shape + (1,) * (gr.ndim - 2))
        assert float(jnp.abs(jnp.where(m, gr, 0)).max()) == 0.0
        assert float(jnp.abs(gr).max()) > 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_cu_seqlens_matches_segment_ids(impl):
    (q, k, v, g, beta), kw = make_problem(16, B=1, T=60, H=2, K=hd(impl, 16), V=hd(impl, 16), gate="bounded")
    kw.update(beta_sigmoid=True, qk_l2norm=True)
    cu = jnp.array([0, 9, 9, 10, 52], jnp.int32)
    seg = jnp.asarray(np.repeat(np.array([1, 3, 4, 0], np.int32), [9, 1, 42, 8])[None])
    h0 = random_state(16, (4, 2, hd(impl, 16), hd(impl, 16)))
    o1, s1 = F.kda(q, k, v, g, beta, cu_seqlens=cu, initial_state=h0, return_final_state=True,
                   implementation=impl, **kw)
    o_ref, s_ref = R.kda_recurrent(q, k, v, g, beta, cu_seqlens=cu, initial_state=h0, return_final_state=True, **kw)
    assert rel_err(o1, o_ref) < fwd_tol(impl, jnp.float32) and rel_err(s1, s_ref) < fwd_tol(impl, jnp.float32)
    o0, _ = F.kda(q, k, v, g, beta, cu_seqlens=cu, implementation=impl, **kw)
    o2, _ = F.kda(q, k, v, g, beta, segment_ids=seg, implementation=impl, **kw)
    assert rel_err(o2, o0) < fwd_tol(impl, jnp.float32)
    np.testing.assert_array_equal(np.asarray(s1[1]), np.asarray(h0[1]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", ["precomputed", "softplus", "bounded"])
def test_gradients_match_oracle(impl, gate):
    B, T, H, HV, K, V = 1, 33, 1, 2, hd(impl, 8), hd(impl, 8)
    (q, k, v, g, beta), kw = make_problem(17, B=B, T=T, H=H, HV=HV, K=K, V=V, gate=gate)
    h0 = random_state(17, (B, HV, K, V))
    w = jax.random.normal(jax.random.PRNGKey(3), (B, T, HV, V))
    ws = jax.random.normal(jax.random.PRNGKey(4), (B, HV, K, V))
    names = ["q", "k", "v", "g", "beta", "h0"] + [n for n in ("A_log", "dt_bias") if n in kw]
    extra = {n: kw[n] for n in ("lower_bound", "gate") if n in kw}

    def loss(fn, *args):
        d = dict(zip(names, args))
        o, s = fn(d["q"], d["k"], d["v"], d["g"], d["beta"], initial_state=d["h0"], return_final_state=True,
                  qk_l2norm=True, beta_sigmoid=True, A_log=d.get("A_log"), dt_bias=d.get("dt_bias"), **extra)
        return jnp.sum(o * w) + jnp.sum(s * ws)

    args = [q, k, v, g, beta, h0] + [kw[n] for n in names[6:]]
    gi = jax.jit(jax.grad(lambda *a: loss(lambda *x, **y: F.kda(*x, implementation=impl, **y), *a),
                          argnums=tuple(range(len(args)))))(*args)
    gr = jax.grad(lambda *a: loss(R.kda_recurrent, *a), argnums=tuple(range(len(args))))(*args)
    for n, a, b in zip(names, gi, gr):
        assert a.shape == b.shape, n
        assert rel_err(a, b) < grad_tol(impl, jnp.float32, n), n


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "cuda"])
def test_check_grads_float64(impl):
    with jax.enable_x64(True):
        (q, k, v, g, beta), kw = make_problem(18, B=1, T=7, H=1, K=4, V=3, dtype=jnp.float64, gate="softplus")
        kw = {n: (x.astype(jnp.float64) if hasattr(x, "dtype") else x) for n, x in kw.items()}
        h0 = random_state(18, (1, 1, 4, 3), jnp.float64)

        def f(q, k, v, g, beta, h0, A, dtb):
            o, s = F.kda(q, k, v, g, beta, gate="softplus", A_log=A, dt_bias=dtb, initial_state=h0,
                         return_final_state=True, qk_l2norm=True, beta_sigmoid=True, implementation=impl)
            return o, s

        jax.test_util.check_grads(f, (q, k, v, g, beta, h0, kw["A_log"], kw["dt_bias"]), order=1,
                                  modes=("rev",), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_and_checkpoint(impl):
    (q, k, v, g, beta), kw = make_problem(19, B=2, T=20, H=2, K=hd(impl, 8), V=hd(impl, 8), gate="softplus")
    kw.update(qk_l2norm=True, beta_sigmoid=True)
    stack = lambda x: jnp.stack([x, x[::-1] * 0.5])
    qs, ks_, vs, gs, bs = map(stack, (q, k, v, g, beta))
    f = lambda q, k, v, g, beta: F.kda(q, k, v, g, beta, implementation=impl, **kw)[0]
    ov = jax.jit(jax.vmap(f))(qs, ks_, vs, gs, bs)
    for i in range(2):
        ref = R.kda_recurrent(qs[i], ks_[i], vs[i], gs[i], bs[i], **kw)[0]
        assert rel_err(ov[i], ref) < fwd_tol(impl, jnp.float32)
    # vmap over the gate parameters too (different A_log per vmapped instance).
    A2 = jnp.stack([kw["A_log"], kw["A_log"] - 1.0])
    kw2 = {n: x for n, x in kw.items() if n != "A_log"}
    fa = lambda A: F.kda(q, k, v, g, beta, A_log=A, implementation=impl, **kw2)[0]
    oa = jax.vmap(fa)(A2)
    for i in range(2):
        ref = R.kda_recurrent(q, k, v, g, beta, A_log=A2[i], **kw2)[0]
        assert rel_err(oa[i], ref) < fwd_tol(impl, jnp.float32)
    # jax.checkpoint + grad agrees with plain grad.
    loss = lambda q: jnp.sum(f(q, k, v, g, beta) ** 2)
    g1 = jax.grad(jax.checkpoint(loss))(q)
    g2 = jax.grad(loss)(q)
    assert rel_err(g1, g2) < 1e-6


def test_segment_replay_under_jit():
    """One compiled call serves new segment ids of the same shape (no host-side shape derivation)."""
    impl = IMPLS[0]
    (q, k, v, g, beta), kw, _ = _seg_problem(20, impl)
    f = jax.jit(lambda seg: F.kda(q, k, v, g, beta, segment_ids=seg, implementation=impl, **kw)[0])
    for seed in (1, 2):
        seg = ragged_segments(2, 80, seed=seed + 40)
        ref = R.kda_recurrent(q, k, v, g, beta, segment_ids=seg, **kw)[0]
        assert rel_err(f(seg), ref) < fwd_tol(impl, jnp.float32)
