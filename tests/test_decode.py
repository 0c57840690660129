"""``kda_decode`` in every implementation this install can run, against the oracle (a full-sequence
``reference.kda_recurrent`` pass). CUDA cases run where a GPU and the CUDA handlers are present and are
skipped elsewhere."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashkda_jax import _ffi
from flashkda_jax import reference as R
from flashkda_jax.decode import kda_decode
from kda_testing import gpu_visible

IMPLS = ["xla"]
if _ffi.has_extension():
    IMPLS.append("cpu")
if _ffi.extension_has_cuda() and gpu_visible():
    IMPLS.append("cuda")
KERNEL_IMPLS = [i for i in IMPLS if i != "xla"]


def _device(impl):
    """Arrays for an implementation live on its platform (CPU kernel: CPU device even on a GPU box)."""
    if impl == "cpu":
        return jax.devices("cpu")[0]
    if impl == "cuda":
        return jax.devices("gpu")[0]
    return jax.devices()[0]


def _put(impl, *xs):
    d = _device(impl)
    return [None if x is None else jax.device_put(x, d) for x in xs]


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (den if den > 0 else 1.0))


def tol(impl, dtype):
    if dtype in (jnp.bfloat16, jnp.float16):
        return 5e-3
    return 2e-3 if impl == "cuda" else 1e-5


def problem(seed, B=2, T=6, H=2, HV=2, K=16, V=8, dtype=jnp.float32, gate="precomputed", strong=False,
            a_log=True, dt_bias=True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, HV, V))
    if gate == "precomputed":
        g = -jnp.exp(jax.random.normal(ks[3], (B, T, HV, K)) - 1.0) * (1e4 if strong else 1.0)
    else:
        g = jax.random.normal(ks[3], (B, T, HV, K)) * (30.0 if strong else 1.0)
    beta = jax.random.normal(ks[4], (B, T, HV))
    kw = {}
    if gate != "precomputed":
        kw["gate"] = gate
        if a_log:
            kw["A_log"] = jax.random.normal(ks[5], (HV,)) * 0.5
        if dt_bias:
            kw["dt_bias"] = jax.random.normal(ks[6], (HV, K)) * 0.5
        if gate == "bounded":
            kw["lower_bound"] = -5.0
    xs = tuple(x.astype(dtype) for x in (q, k, v, g, beta))
    return xs, kw


def state_of(seed, shape):
    return 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 999), shape, jnp.float32)


def _norm_kw(kw, beta_sigmoid):
    out = dict(kw)
    if beta_sigmoid:
        out["beta_sigmoid"] = True
    return out


def run_stepwise(impl, xs, s0, steps, **kw):
    """Decodes the T tokens of xs in the given step sizes; returns (o [B,T,HV,V], final state)."""
    q, k, v, g, beta = xs
    f = jax.jit(lambda *a: kda_decode(*a, implementation=impl, **kw))
    outs, st, t = [], s0, 0
    for n in steps:
        sl = slice(t, t + n)
        o, st = f(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], st)
        outs.append(o)
        t += n
    assert t == q.shape[1]
    return jnp.concatenate(outs, axis=1), st


# ------------------------------------------------------------------------------------------------
# Decode steps == the matching positions of one full-sequence oracle pass.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", ["precomputed", "softplus", "bounded"])
@pytest.mark.parametrize("heads", [(2, 2), (1, 4)])
@pytest.mark.parametrize("layout", ["kv", "vk"])
@pytest.mark.parametrize("pre", [(False, False, False), (True, True, False), (True, True, True)])
def test_decode_matches_full_sequence(impl, gate, heads, layout, pre):
    l2, bsig, neg = pre
    H, HV = heads
    B, T, K, V = 2, 5, 32, 16
    xs, kw = problem(1, B=B, T=T, H=H, HV=HV, K=K, V=V, gate=gate)
    kw.update(qk_l2norm=l2, beta_sigmoid=bsig, allow_neg_eigval=neg, state_layout=layout)
    shape = (B, HV, K, V) if layout == "kv" else (B, HV, V, K)
    s0 = state_of(1, shape)
    o_ref, s_ref = R.kda_recurrent(*xs, initial_state=s0, return_final_state=True, **kw)
    xs, (s0,) = _put(impl, *xs), _put(impl, s0)
    o, s = run_stepwise(impl, xs, s0, [1] * T, **kw)
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert s.shape == s0.shape and s.dtype == jnp.float32
    assert rel_err(o, o_ref) <= tol(impl, jnp.float32)
    assert rel_err(s, s_ref) <= tol(impl, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("steps", [[1, 1, 1, 1, 1, 1, 1], [3, 1, 2, 1], [7]])
def test_multi_token_and_dtypes(impl, dtype, steps):
    B, T, H, HV, K, V = 3, 7, 2, 4, 64, 36  # V not a multiple of the CUDA column strip
    xs, kw = problem(2, B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=dtype, gate="bounded")
    kw.update(qk_l2norm=True, beta_sigmoid=True)
    s0 = state_of(2, (B, HV, K, V))
    o_ref, s_ref = R.kda_recurrent(*xs, initial_state=s0, return_final_state=True, **kw)
    xs, (s0,) = _put(impl, *xs), _put(impl, s0)
    o, s = run_stepwise(impl, xs, s0, steps, **kw)
    assert o.dtype == dtype
    assert np.isfinite(np.asarray(o, np.float32)).all()
    assert rel_err(o, o_ref) <= tol(impl, dtype)
    assert rel_err(s, s_ref) <= tol(impl, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_long_multi_token_chunking(impl):
    """More new tokens than one pre-processing chunk of the CUDA kernel (8)."""
    B, T, H, HV, K, V = 2, 19, 1, 2, 32, 32
    xs, kw = problem(3, B=B, T=T, H=H, HV=HV, K=K, V=V, gate="softplus")
    kw.update(state_layout="vk")
    s0 = state_of(3, (B, HV, V, K))
    o_ref, s_ref = R.kda_recurrent(*xs, initial_state=s0, return_final_state=True, **kw)
    xs, (s0,) = _put(impl, *xs), _put(impl, s0)
    o, s = run_stepwise(impl, xs, s0, [19], **kw)
    t = max(tol(impl, jnp.float32), 5e-5)  # a 19-step fp32 chain: two summation orders drift apart
    assert rel_err(o, o_ref) <= t
    assert rel_err(s, s_ref) <= t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K,V", [(128, 128), (256, 64), (64, 256)])
@pytest.mark.parametrize("layout", ["kv", "vk"])
def test_head_dims(impl, K, V, layout):
    B, T, H, HV = 2, 2, 2, 2
    xs, kw = problem(4, B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=jnp.bfloat16, gate="bounded", a_log=False)
    kw.update(qk_l2norm=True, beta_sigmoid=True, state_layout=layout)
    shape = (B, HV, K, V) if layout == "kv" else (B, HV, V, K)
    s0 = state_of(4, shape)
    o_ref, s_ref = R.kda_recurrent(*xs, initial_state=s0, return_final_state=True, **kw)
    xs, (s0,) = _put(impl, *xs), _put(impl, s0)
    o, s = run_stepwise(impl, xs, s0, [1, 1], **kw)
    assert rel_err(o, o_ref) <= tol(impl, jnp.bfloat16)
    assert rel_err(s, s_ref) <= tol(impl, jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_strong_gates_finite(impl):
    B, T, H, HV, K, V = 2, 3, 2, 2, 32, 32
    for gate in ("precomputed", "softplus"):
        xs, kw = problem(5, B=B, T=T, H=H, HV=HV, K=K, V=V, gate=gate, strong=True)
        s0 = state_of(5, (B, HV, K, V))
        o_ref, s_ref = R.kda_recurrent(*xs, initial_state=s0, return_final_state=True, **kw)
        xs, (s0,) = _put(impl, *xs), _put(impl, s0)
        o, s = run_stepwise(impl, xs, s0, [1, 2], **kw)
        assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(s)).all()
        assert rel_err(o, o_ref) <= tol(impl, jnp.float32)
        assert rel_err(s, s_ref) <= tol(impl, jnp.float32)


# ------------------------------------------------------------------------------------------------
# State pools (continuous batching).
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["kv", "vk"])
@pytest.mark.parametrize("T", [1, 3])
def test_pool_indexing(impl, layout, T):
    B, P, H, HV, K, V = 5, 7, 2, 4, 32, 16
    xs, kw = problem(6, B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=jnp.bfloat16, gate="softplus")
    kw.update(qk_l2norm=True, state_layout=layout)
    shape = (P, HV, K, V) if layout == "kv" else (P, HV, V, K)
    pool = state_of(6, shape)
    idx = jnp.array([4, -1, 0, 7, 2], jnp.int32)  # -1: empty slot; 7 == P: out of range, same as -1
    valid = [0, 2, 4]
    pick = jnp.array([4, 0, 2])
    o_ref, s_ref = R.kda_recurrent(*(x[jnp.array(valid)] for x in xs), initial_state=pool[pick],
                                   return_final_state=True, **kw)
    xs, (pool_d, idx_d) = _put(impl, *xs), _put(impl, pool, idx)
    o, new_pool = jax.jit(lambda *a: kda_decode(*a[:6], state_indices=a[6], implementation=impl, **kw))(
        *xs, pool_d, idx_d)
    o = np.asarray(o, np.float32)
    new_pool = np.asarray(new_pool)
    pool = np.asarray(pool)
    assert rel_err(o[valid], o_ref) <= tol(impl, jnp.bfloat16)
    assert (o[[1, 3]] == 0).all()
    assert rel_err(new_pool[np.asarray(pick)], s_ref) <= tol(impl, jnp.bfloat16)
    untouched = [1, 3, 5, 6]
    np.testing.assert_array_equal(new_pool[untouched], pool[untouched])


@pytest.mark.parametrize("impl", IMPLS)
def test_pool_all_padding_and_negative_big(impl):
    B, P, H, HV, K, V = 3, 2, 1, 1, 32, 32
    xs, kw = problem(7, B=B, T=1, H=H, HV=HV, K=K, V=V)
    pool = state_of(7, (P, HV, K, V))
    idx = jnp.array([-1, -2 ** 31, 2 ** 31 - 1], jnp.int32)
    xs, (pool_d, idx_d) = _put(impl, *xs), _put(impl, pool, idx)
    o, new_pool = kda_decode(*xs, pool_d, state_indices=idx_d, implementation=impl, **kw)
    assert (np.asarray(o) == 0).all()
    np.testing.assert_array_equal(np.asarray(new_pool), np.asarray(pool))


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_new_tokens(impl):
    xs, kw = problem(8, B=2, T=0, K=32, V=8)
    s0 = state_of(8, (2, 2, 32, 8))
    o, s = kda_decode(*xs, s0, implementation=impl, **kw)
    assert o.shape == (2, 0, 2, 8)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s0))


# ------------------------------------------------------------------------------------------------
# In-place update: the state operand is aliased to the new state, and donation removes every copy.
# ------------------------------------------------------------------------------------------------

def _pool_copies(hlo: str, shape) -> list[str]:
    dims = ",".join(str(d) for d in shape)
    pat = re.compile(r"f32\[" + re.escape(dims) + r"\][^=]*=\s*f32\[" + re.escape(dims) + r"\]\S*\s+copy\(")
    pat2 = re.compile(r"=\s*f32\[" + re.escape(dims) + r"\]\{[^}]*\}\s+copy\(")
    return [ln for ln in hlo.splitlines() if pat.search(ln) or pat2.search(ln)]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("pool_mode", [False, True])
def test_donated_state_is_updated_in_place(impl, pool_mode):
    B, P, H, HV, K, V = 4, 9, 2, 2, 32, 32
    xs, kw = problem(9, B=B, T=1, H=H, HV=HV, K=K, V=V, dtype=jnp.bfloat16, gate="bounded")
    kw.update(qk_l2norm=True, beta_sigmoid=True)
    n = P if pool_mode else B
    state = state_of(9, (n, HV, K, V))
    idx = jnp.array([3, 0, -1, 8], jnp.int32) if pool_mode else None
    if pool_mode:
        fn = lambda q, k, v, g, b, s, i: kda_decode(q, k, v, g, b, s, state_indices=i, implementation=impl, **kw)
        args = (*xs, state, idx)
    else:
        fn = lambda q, k, v, g, b, s: kda_decode(q, k, v, g, b, s, implementation=impl, **kw)
        args = (*xs, state)
    args = _put(impl, *args)
    expect_o, expect_s = jax.jit(fn)(*args)  # not donated
    jf = jax.jit(fn, donate_argnums=(5,))
    hlo = jf.lower(*args).compile().as_text()
    assert "input_output_alias" in hlo, hlo[:2000]
    assert "output_to_operand_aliasing" in hlo
    assert not _pool_copies(hlo, state.shape), _pool_copies(hlo, state.shape)
    donated = args[5]
    ptr = donated.unsafe_buffer_pointer()
    o, s = jf(*args)
    assert donated.is_deleted()
    assert s.unsafe_buffer_pointer() == ptr  # the caller's buffer, updated in place
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(expect_o, np.float32))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(expect_s))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_not_donated_input_survives(impl):
    """Without donation XLA copies before the in-place kernel: the caller's state must not change."""
    xs, kw = problem(10, B=2, T=1, K=32, V=32)
    s0 = state_of(10, (2, 2, 32, 32))
    xs, (s0,) = _put(impl, *xs), _put(impl, s0)
    keep = np.asarray(s0).copy()
    _, s = jax.jit(lambda *a: kda_decode(*a, implementation=impl, **kw))(*xs, s0)
    np.testing.assert_array_equal(np.asarray(s0), keep)
    assert not np.array_equal(np.asarray(s), keep)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_loop_in_scan(impl):
    """The usual serving loop: lax.scan over decode steps with the state carried."""
    B, T, H, HV, K, V = 2, 6, 2, 2, 32, 16
    xs, kw = problem(11, B=B, T=T, H=H, HV=HV, K=K, V=V, gate="softplus")
    s0 = state_of(11, (B, HV, K, V))
    o_ref, s_ref = R.kda_recurrent(*xs, initial_state=s0, return_final_state=True, **kw)
    xs, (s0,) = _put(impl, *xs), _put(impl, s0)

    def body(s, x):
        q, k, v, g, b = (a[:, None] for a in x)
        o, s = kda_decode(q, k, v, g, b, s, implementation=impl, **kw)
        return s, o[:, 0]

    s, o = jax.jit(lambda s, xs: jax.lax.scan(body, s, tuple(jnp.moveaxis(a, 1, 0) for a in xs)))(s0, xs)
    assert rel_err(jnp.moveaxis(o, 0, 1), o_ref) <= tol(impl, jnp.float32)
    assert rel_err(s, s_ref) <= tol(impl, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap(impl):
    B, T, H, HV, K, V, N = 2, 2, 1, 2, 32, 8, 3
    xs, kw = problem(12, B=N * B, T=T, H=H, HV=HV, K=K, V=V, gate="bounded")
    s0 = state_of(12, (N * B, HV, K, V))
    o_ref, s_ref = R.kda_recurrent(*xs, initial_state=s0, return_final_state=True, **kw)
    split = lambda x: x.reshape((N, B) + x.shape[1:])
    xs, (s0,) = _put(impl, *xs), _put(impl, s0)
    f = jax.vmap(lambda q, k, v, g, b, s: kda_decode(q, k, v, g, b, s, implementation=impl, **kw))
    o, s = jax.jit(f)(*map(split, xs), split(s0))
    assert rel_err(o.reshape(o_ref.shape), o_ref) <= tol(impl, jnp.float32)
    assert rel_err(s.reshape(s_ref.shape), s_ref) <= tol(impl, jnp.float32)


def test_default_implementation_runs():
    xs, kw = problem(13, B=2, T=1, K=32, V=32)
    s0 = state_of(13, (2, 2, 32, 32))
    o_ref, s_ref = R.kda_recurrent(*xs, initial_state=s0, return_final_state=True, **kw)
    o, s = kda_decode(*xs, s0, **kw)
    assert rel_err(o, o_ref) <= 2e-3 and rel_err(s, s_ref) <= 2e-3


# ------------------------------------------------------------------------------------------------
# Bad inputs raise clear errors at trace time.
# ------------------------------------------------------------------------------------------------

def _bad_cases():
    xs, _ = problem(20, B=2, T=1, H=2, HV=2, K=16, V=8)
    q, k, v, g, beta = xs
    s = state_of(20, (2, 2, 16, 8))
    pool = state_of(21, (5, 2, 16, 8))
    return [
        ("state must be \\[B, HV, K, V\\]", ValueError, (q, k, v, g, beta, s[:, :, :, :4]), {}),
        ("first dim must be B=2", ValueError, (q, k, v, g, beta, pool), {}),
        ("state must be float32", TypeError, (q, k, v, g, beta, s.astype(jnp.bfloat16)), {}),
        ("state must be an array", TypeError, (q, k, v, g, beta, None), {}),
        ("state_layout='vk'", ValueError, (q, k, v, g, beta, s), {"state_layout": "vk"}),
        ("state_indices must be \\[B\\]", ValueError, (q, k, v, g, beta, pool),
         {"state_indices": jnp.zeros((3,), jnp.int32)}),
        ("state_indices must be int32", TypeError, (q, k, v, g, beta, pool),
         {"state_indices": jnp.zeros((2,), jnp.float32)}),
        ("multiple of the q/k heads", ValueError, (q[:, :, :1].repeat(3, 2), k[:, :, :1].repeat(3, 2), v, g, beta, s), {}),
        ("needs A_log", ValueError, (q, k, v, g, beta, s), {"gate": "softplus"}),
        ("lower_bound must be negative", ValueError, (q, k, v, g, beta, s), {"gate": "bounded", "lower_bound": 1.0}),
        ("implementation must be", ValueError, (q, k, v, g, beta, s), {"implementation": "tpu"}),
        ("g must be", ValueError, (q, k, v, g[..., :3], beta, s), {}),
        ("beta must be", ValueError, (q, k, v, g, beta[..., :1], s), {}),
        ("must be bf16, fp16, fp32 or fp64", TypeError, (q.astype(jnp.int32), k, v, g, beta, s), {}),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise(case):
    msg, exc, args, kw = _bad_cases()[case]
    with pytest.raises(exc, match=msg):
        kda_decode(*args, **kw)
    with pytest.raises(exc, match="kda_decode"):
        kda_decode(*args, **kw)


@pytest.mark.skipif(not _ffi.extension_has_cuda(), reason="extension built without CUDA")
def test_cuda_unsupported_head_dim_raises():
    xs, kw = problem(22, B=1, T=1, K=48, V=8)
    s = state_of(22, (1, 2, 48, 8))
    with pytest.raises(ValueError, match="K=48"):
        kda_decode(*xs, s, implementation="cuda", **kw)
