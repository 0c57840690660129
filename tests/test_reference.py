"""The pure-JAX programs: the oracle against an independent NumPy float64 loop, the chunked (xla)
program against the oracle in every option."""

import re

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest

from flashkda_jax import reference as R
from kda_testing import make_problem, random_state, ragged_segments, rel_err


def numpy_kda(q, k, v, g, beta, scale):
    """Literal DESIGN §2 recurrence in float64 NumPy (one dense sequence per row)."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    grp = HV // H
    o = np.zeros((B, T, HV, V))
    S = np.zeros((B, HV, K, V))
    for b in range(B):
        for h in range(HV):
            St = np.zeros((K, V))
            for t in range(T):
                kt, qt = k[b, t, h // grp], q[b, t, h // grp]
                Sp = np.exp(g[b, t, h])[:, None] * St
                St = Sp + beta[b, t, h] * np.outer(kt, v[b, t, h] - Sp.T @ kt)
                o[b, t, h] = St.T @ (scale * qt)
            S[b, h] = St
    return o, S


def test_oracle_matches_numpy_loop():
    (q, k, v, g, beta), _ = make_problem(0, B=2, T=19, H=2, HV=4, K=8, V=6)
    beta = jax.nn.sigmoid(beta)
    o, s = R.kda_recurrent(q, k, v, g, beta, scale=0.3, return_final_state=True)
    o_np, s_np = numpy_kda(q, k, v, g, beta, 0.3)
    assert rel_err(o, o_np) < 1e-5
    assert rel_err(s, s_np) < 1e-5


GATES = ["precomputed", "softplus", "bounded"]


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T,chunk", [(1, 16), (37, 16), (64, 16), (70, 64)])
def test_chunked_matches_oracle_dense(gate, T, chunk):
    (q, k, v, g, beta), kw = make_problem(1, B=2, T=T, H=2, HV=4, K=16, V=8, gate=gate)
    h0 = random_state(1, (2, 4, 16, 8))
    kw.update(qk_l2norm=True, beta_sigmoid=True, initial_state=h0, return_final_state=True)
    o1, s1 = R.kda_recurrent(q, k, v, g, beta, **kw)
    o2, s2 = R.kda_chunked(q, k, v, g, beta, chunk_size=chunk, **kw)
    assert rel_err(o2, o1) < 1e-5 and rel_err(s2, s1) < 1e-5


@pytest.mark.parametrize("layout", ["kv", "vk"])
def test_chunked_matches_oracle_segments(layout):
    B, T = 2, 90
    (q, k, v, g, beta), kw = make_problem(2, B=B, T=T, H=1, HV=2, K=16, V=8, gate="softplus")
    seg = ragged_segments(B, T, seed=3)
    S = 12
    shape = (B, S, 2, 16, 8) if layout == "kv" else (B, S, 2, 8, 16)
    kw.update(qk_l2norm=True, beta_sigmoid=True, allow_neg_eigval=True, segment_ids=seg, max_segments=S,
              initial_state=random_state(2, shape), return_final_state=True, state_layout=layout)
    o1, s1 = R.kda_recurrent(q, k, v, g, beta, **kw)
    o2, s2 = R.kda_chunked(q, k, v, g, beta, chunk_size=16, **kw)
    assert rel_err(o2, o1) < 1e-5 and rel_err(s2, s1) < 1e-5
    assert float(jnp.abs(jnp.where((seg == 0)[..., None, None], o2, 0)).max()) == 0.0


def test_chunked_matches_oracle_cu_seqlens_with_empty_sequence():
    (q, k, v, g, beta), kw = make_problem(3, B=1, T=50, H=2, K=16, V=16, gate="bounded")
    cu = jnp.array([0, 7, 7, 8, 40, 47], jnp.int32)
    h0 = random_state(3, (5, 2, 16, 16))
    kw.update(cu_seqlens=cu, initial_state=h0, return_final_state=True, beta_sigmoid=True)
    o1, s1 = R.kda_recurrent(q, k, v, g, beta, **kw)
    o2, s2 = R.kda_chunked(q, k, v, g, beta, chunk_size=16, **kw)
    assert rel_err(o2, o1) < 1e-5 and rel_err(s2, s1) < 1e-5
    np.testing.assert_array_equal(np.asarray(s1[1]), np.asarray(h0[1]))  # empty sequence: state passes through
    assert float(jnp.abs(o1[0, 47:]).max()) == 0.0  # past cu[-1]: padding


@pytest.mark.parametrize("gate", GATES)
def test_strong_gates_stay_finite(gate):
    (q, k, v, g, beta), kw = make_problem(4, T=40, gate=gate, strong=True)
    o1, s1 = R.kda_recurrent(q, k, v, g, beta, beta_sigmoid=True, qk_l2norm=True, return_final_state=True, **kw)
    o2, s2 = R.kda_chunked(q, k, v, g, beta, chunk_size=16, beta_sigmoid=True, qk_l2norm=True,
                                 return_final_state=True, **kw)
    for x in (o1, s1, o2, s2):
        assert bool(jnp.isfinite(x).all())
    # Near-singular decays cost the chunked fp32 form a little accuracy (1.3e-5 against float64 here).
    assert rel_err(o2, o1) < 5e-5


def test_chunked_gradients_match_oracle():
    (q, k, v, g, beta), kw = make_problem(5, B=1, T=21, H=1, HV=2, K=8, V=8, gate="softplus")
    h0 = random_state(5, (1, 2, 8, 8))
    w = jax.random.normal(jax.random.PRNGKey(9), (1, 21, 2, 8))

    def loss(fn, q, k, v, g, beta, A, dtb, h0):
        o, s = fn(q, k, v, g, beta, gate="softplus", A_log=A, dt_bias=dtb, initial_state=h0,
                  return_final_state=True, qk_l2norm=True, beta_sigmoid=True)
        return jnp.sum(o * w) + jnp.sum(jnp.sin(s))

    args = (q, k, v, g, beta, kw["A_log"], kw["dt_bias"], h0)
    g1 = jax.grad(lambda *a: loss(R.kda_recurrent, *a), argnums=tuple(range(8)))(*args)
    g2 = jax.grad(lambda *a: loss(lambda *x, **y: R.kda_chunked(*x, chunk_size=8, **y), *a),
                  argnums=tuple(range(8)))(*args)
    for a, b in zip(g2, g1):
        assert rel_err(a, b) < 1e-4


def test_check_grads_float64():
    with jax.enable_x64(True):
        (q, k, v, g, beta), kw = make_problem(6, B=1, T=9, H=1, K=4, V=3, dtype=jnp.float64, gate="bounded")
        f = lambda q, k, v, g, beta: R.kda_chunked(q, k, v, g, beta, chunk_size=4, beta_sigmoid=True,
                                                   qk_l2norm=True, **kw)[0]
        jax.test_util.check_grads(f, (q, k, v, g, beta), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_unit_lower_inverse_and_its_gradient():
    """(I + A)^-1 for strictly lower A, with the gradient of the matrix inverse, in float64."""
    with jax.enable_x64():
        a = jnp.tril(jax.random.normal(jax.random.PRNGKey(3), (2, 3, 24, 24), jnp.float64) * 0.3, -1)
        a_full = a + jnp.triu(jnp.ones_like(a))      # the upper part and the diagonal must be ignored
        x = R.unit_lower_inverse(a_full)
        np.testing.assert_allclose(x, np.linalg.inv(np.eye(24) + np.asarray(a)), atol=1e-12)
        jax.test_util.check_grads(R.unit_lower_inverse, (a[0, 0],), order=2, modes=["fwd", "rev"])


def test_xla_program_on_cpu_never_calls_lapack_trsm():
    """jaxlib's LAPACK trsm blocks its caller on the intra-op pool; two concurrent ones on a 2-thread
    pool deadlock (seen in CI). The CPU lowering of the chunked program, forward and backward, must use
    the forward substitution instead."""
    (q, k, v, g, beta), _ = make_problem(0, 1, 70, 2, 2, 16, 16)
    f = jax.jit(jax.grad(lambda q: jnp.sum(R.kda_chunked(q, k, v, g, beta)[0] ** 2)))
    targets = re.findall(r'custom_call_target="([^"]*)"', f.lower(q).compile().as_text())
    assert not [t for t in targets if "trsm" in t.lower() or "lapack" in t.lower()], targets
