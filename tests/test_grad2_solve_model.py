"""bf16 rounding model of grad2's tensor-core WY solve (FLASHKDA_BWD_GRAD2_SOLVE=mma, cutlass/kda_bwd_chunk.cu:
Grad2InvertDiag / Grad2InvertOffDiag / Grad2SolveMma) on the float64 model of tests/test_bwd_algorithm.py.
CPU only, a few seconds.

grad2 recomputes, per (chunk, value head), W | U = T diag(beta) [e^G k | v] and [dKb | dVb] = T^T [dW | dU] with
T = (I + diag(beta) B_kk)^{-1}. The default kernel does both by fp32 substitution (forward, then back). The mma
path forms T in fp32 by 16 x 16 blocks exactly as the forward prep's InvertDiagBlocks / InvertOffDiagBlocks
(tests/test_prep_solve_model.py: invert_blocked), then both products on bf16 tensor cores with fp32 accumulation:
  W | U      = bf16(T)   bf16(beta [e^G k | v])   (the right-hand side formed in fp32 as the substitution does)
  dKb | dVb  = bf16(T)^T bf16([dW | dU])          (grad1's fp32 dW | dU)
Everything else of grad2 is unchanged (dA = -strict_tril(dKb W^T + dVb U^T), dbeta, the decay products ...).

This file replays grad2 (and the gate / beta chains, the finish and reduce stages) from the exact intermediates of
test_bwd_algorithm.chunked_backward (its `stages`), once exactly (checked to equal the model's outputs) and once
with the mma solve's roundings, on the configurations of tests/test_cuda_bwd.py, and bounds the solve's share of
the error of every gradient well inside that file's tolerances (q, k, v, initial_state 1e-2; g, beta, A_log,
dt_bias 2e-2). It also combines it with grad2 v2's roundings (FLASHKDA_BWD_GRAD2=v2,
tests/test_bwd_precision_model.py), as both switches can be on together. Run as a script for the table.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import test_bwd_algorithm as A
import test_bwd_precision_model as PM
import test_prep_solve_model as PS

f32, f64 = np.float32, np.float64
NAMES = ("q", "k", "v", "g", "beta", "A_log", "dt_bias")


def _bf16(x):
    return PS.bf16(np.asarray(x, f64).astype(f32)).astype(f64)


def _r32(x):
    return np.asarray(x, f64).astype(f32).astype(f64)


def solve_exact(Bkk, bb, Kb, Vb, dW, dU, G, kk, vv, L):
    """The default kernel (fp32 substitution), modelled exactly: the float64 model's formulas."""
    Am = bb[:, None] * Bkk
    Mi = np.linalg.inv(np.eye(Am.shape[0]) + Am)
    return Mi @ Kb, Mi @ Vb, A.back_substitute(Am, dW), A.back_substitute(Am, dU)


def solve_mma(Bkk, bb, Kb, Vb, dW, dU, G, kk, vv, L):
    """Grad2SolveMma: T in fp32 by blocks (A = fp32(beta_i B_ij) as the substitution forms it), then
    bf16(T) bf16(rhs) and bf16(T)^T bf16([dW | dU]) (products of bf16 values exact, sums in float64: the fp32
    accumulation adds ~1e-7)."""
    Cn = Bkk.shape[0]
    assert Cn == 64, "the kernel's chunk"
    b32 = _r32(bb)
    A32 = (b32[:, None] * _r32(Bkk)).astype(f32)
    Tb = _bf16(PS.invert_blocked(A32))
    valid = (np.arange(Cn) < L)[:, None]
    rw = np.where(valid, _r32(b32[:, None] * _r32(np.exp(_r32(G)) * _r32(kk))), 0.0)  # sBeta * (e^G k)
    ru = np.where(valid, _r32(b32[:, None] * _r32(vv)), 0.0)
    return (Tb @ _bf16(rw), Tb @ _bf16(ru), Tb.T @ _bf16(np.where(valid, dW, 0.0)),
            Tb.T @ _bf16(np.where(valid, dU, 0.0)))


def _l2(x):
    return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + A.EPS)


def grad2_replay(args, kw, st, solve, v2=False):
    """grad2 + gate / beta chains + finish + reduce of A.chunked_backward, from its recorded intermediates `st`
    (grad1's scratch, dgamma, gamma), with the WY solve `solve` and, v2, grad2 v2's bf16 decay products."""
    q, k, v, g, beta, a_log, dt_bias, slot, init, do, dfin = args
    gate, scale = kw["gate"], kw["scale"]
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    grp, C = HV // H, 64
    qe = np.repeat(_l2(q) if kw["qk_l2norm"] else q, grp, axis=2) * scale
    ke = np.repeat(_l2(k) if kw["qk_l2norm"] else k, grp, axis=2)
    x = g + dt_bias[None, None]
    Aexp = np.exp(a_log)[None, None, :, None]
    if gate == "precomputed":
        ge = g
    elif gate == "softplus":
        ge = -Aexp * A._softplus(x)
    else:
        z = Aexp * x if kw["use_a_log"] else x
        ge = kw["lower_bound"] * A._sigmoid(z)
    sb = A._sigmoid(beta)
    be = sb * (2.0 if kw.get("allow_neg_eigval") else 1.0) if kw["beta_sigmoid"] else beta
    dqe, dke, dge = np.zeros_like(qe), np.zeros_like(ke), np.zeros_like(ge)
    dv, dbe = np.zeros_like(v), np.zeros_like(be)
    S_out = 0 if dfin is None else dfin.shape[1]
    NW = -(-T // C)
    pad = lambda x, L: np.concatenate([x, np.zeros((C - L,) + x.shape[1:])], 0) if L < C else x
    for (b, cs, se, sl) in st["chunks"]:
        L = min(C, se - cs)
        r = slice(cs, cs + L)
        gi = -(-cs // C) if cs + C < se else (NW + sl if sl < S_out else -1)
        for hv in range(HV):
            kk, qq, vv, gg, bb = (pad(t[b, r, hv], L) for t in (ke, qe, v, ge, be))
            p = A.prep_chunk(qq, kk, vv, gg, bb)
            dW, dU, dQg, dKd, dAqk = (pad(st[n][b, r, hv], L) for n in ("dW", "dU", "dQg", "dKd", "dAqk"))
            G, eG = p["G"], p["eG"]
            if v2:
                Bkk = PM._product_bf16(kk, kk, G, strict=True)
                dpg = lambda dM, x_, y_, E: PM._grad_bf16("factors")(dM, x_, y_, G)
            else:
                Bkk = p["Bkk"]
                dpg = A.decay_product_grad
            Wm, Um, dKb, dVb = solve(Bkk, bb, p["Kb"], p["Vb"], dW, dU, G, kk, vv, L)
            dA = -np.tril(dKb @ Wm.T + dVb @ Um.T, -1)
            db = np.sum(dA * Bkk, axis=1) + np.sum(vv * dVb, axis=1) + np.sum(eG * kk * dKb, axis=1)
            dv[b, r, hv] = (bb[:, None] * dVb)[:L]
            dk = bb[:, None] * eG * dKb
            dG = p["Kb"] * dKb
            dx, dy, dg_ = dpg(bb[:, None] * dA, kk, kk, p["Es"])
            dk = dk + dx + dy
            dG = dG + dg_
            dx, dy, dg_ = dpg(dAqk, qq, kk, p["E"])
            dq = dx + eG * dQg
            dk = dk + dy + np.exp(G[-1][None] - G) * dKd
            dG = dG + dg_ + p["Qg"] * dQg - p["Kd"] * dKd
            dG[L - 1] += np.sum(p["Kd"] * dKd, axis=0) + (st["gamma"][b, gi, hv] * st["dgam"][b, gi, hv]
                                                          if gi >= 0 else 0.0)
            dge[b, r, hv] = np.cumsum(dG[:L][::-1], axis=0)[::-1]
            dqe[b, r, hv], dke[b, r, hv], dbe[b, r, hv] = dq[:L], dk[:L], db[:L]
    da_log, ddt = np.zeros((B, HV)), np.zeros((B, HV, K))
    if gate == "precomputed":
        dg = dge
    else:
        if gate == "softplus":
            dg = -Aexp * A._sigmoid(x) * dge
            da_tok = np.sum(dge * ge, axis=-1)
        else:
            z = Aexp * x if kw["use_a_log"] else x
            dz = kw["lower_bound"] * A._sigmoid(z) * (1 - A._sigmoid(z)) * dge
            dg = Aexp * dz if kw["use_a_log"] else dz
            da_tok = np.sum(dz * z, axis=-1) if kw["use_a_log"] else np.zeros(dge.shape[:-1])
        ddt, da_log = dg.sum(1), da_tok.sum(1)
    dbeta = dbe * (2.0 if kw.get("allow_neg_eigval") else 1.0) * sb * (1 - sb) if kw["beta_sigmoid"] else dbe

    def l2_bwd(x_, dy):
        rr = 1.0 / np.sqrt(np.sum(x_ * x_, -1, keepdims=True) + A.EPS)
        y = x_ * rr
        return rr * (dy - y * np.sum(dy * y, -1, keepdims=True))

    dqn = dqe.reshape(B, T, H, grp, K).sum(3) * scale
    dkn = dke.reshape(B, T, H, grp, K).sum(3)
    return dict(q=l2_bwd(q, dqn) if kw["qk_l2norm"] else dqn, k=l2_bwd(k, dkn) if kw["qk_l2norm"] else dkn, v=dv,
                g=dg, beta=dbeta, A_log=da_log, dt_bias=ddt)


def problem(seed, B, T, H, HV, K, gate, states=False, allow_neg=False, scale=None):
    """The inputs of tests/test_cuda_bwd.py::_inputs (bf16 values, l2norm, beta sigmoid), float64."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    f = lambda i, shape: np.asarray(jax.random.normal(ks[i], shape, jnp.float32), f64)
    q, k, v, beta = f(0, (B, T, H, K)), f(1, (B, T, H, K)), f(2, (B, T, HV, K)), f(4, (B, T, HV))
    g = -np.exp(f(3, (B, T, HV, K)) - 2.0) if gate == "precomputed" else f(3, (B, T, HV, K))
    a_log = f(5, (HV,)) * 0.5 - 1.0
    dt_bias = f(6, (HV, K)) * 0.5
    do = np.asarray(jax.random.normal(jax.random.PRNGKey(100), (B, T, HV, K), jnp.float32), f64)
    st = lambda s: np.asarray(0.5 * jax.random.normal(jax.random.PRNGKey(s + 1000), (B, 1, HV, K, K)), f64)
    init, dfin = (st(3), st(4)) if states else (None, None)
    args = [_bf16(t) for t in (q, k, v, g, beta)] + [a_log, dt_bias, np.zeros((B, T), np.int64), init, do, dfin]
    kw = dict(scale=scale if scale is not None else K ** -0.5, gate=gate, lower_bound=-5.0, use_a_log=True,
              qk_l2norm=True, beta_sigmoid=True, allow_neg_eigval=allow_neg)
    return args, kw


def _rel(o, r):
    den = np.linalg.norm(r)
    return float(np.linalg.norm(o - r) / (den if den > 0 else 1.0))


def errors(args, kw):
    """{variant: {gradient: rel err vs the exact model}} for mma, v2 (grad2 v2 alone) and v2+mma."""
    st = {}
    ref = A.chunked_backward(*args, **kw, stages=st)
    exact = grad2_replay(args, kw, st, solve_exact)
    for n in NAMES:  # the replay is the model
        assert _rel(exact[n], ref[n]) < 1e-10, n
    out = {}
    for name, solve, v2 in (("mma", solve_mma, False), ("v2", solve_exact, True), ("v2+mma", solve_mma, True)):
        got = grad2_replay(args, kw, st, solve, v2)
        out[name] = {n: _rel(got[n], ref[n]) for n in NAMES}
    return out


# (name, problem arguments): the configurations of tests/test_cuda_bwd.py (B = 1 and fewer heads where they only
# repeat; GVA kept)
CASES = [
    ("gates_precomputed_K64", dict(seed=1, B=1, T=200, H=1, HV=2, K=64, gate="precomputed", states=True)),
    ("gates_softplus_K128", dict(seed=1, B=1, T=200, H=1, HV=2, K=128, gate="softplus", states=True)),
    ("gates_bounded_K128", dict(seed=1, B=1, T=200, H=1, HV=2, K=128, gate="bounded", states=True)),
    ("lengths_bounded_T63", dict(seed=2, B=1, T=63, H=1, HV=2, K=64, gate="bounded")),
    ("lengths_bounded_T130", dict(seed=2, B=1, T=130, H=1, HV=2, K=64, gate="bounded")),
    ("dtypes_softplus_T150_K128", dict(seed=5, B=1, T=150, H=2, HV=2, K=128, gate="softplus", allow_neg=True,
                                       scale=0.2)),
]
# The mma solve's own share (every other stage exact) must stay well inside the GPU tolerances: 1/4 of them
# (dA_log, one sum per head, is noisier: 1/2).
BOUND = dict(q=2.5e-3, k=2.5e-3, v=2.5e-3, g=5e-3, beta=5e-3, dt_bias=5e-3, A_log=1e-2)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_grad2_mma_solve_error_within_budget(case):
    name, pk = case
    e = errors(*problem(**pk))
    for n in NAMES:
        assert e["mma"][n] < BOUND[n], f"{name} d{n}: mma solve {e['mma'][n]:.3e}"
        # with grad2 v2: not worse than v2's own error plus the solve's bound
        assert e["v2+mma"][n] < e["v2"][n] + BOUND[n], f"{name} d{n}: v2+mma {e['v2+mma'][n]:.3e}"


def test_blocked_inverse_inverts_the_backward_matrix():
    """T of the mma path solves both substitutions of the default kernel (float64, before rounding)."""
    rng = np.random.default_rng(3)
    kk = _l2(rng.standard_normal((64, 128)))
    G = np.cumsum(-np.exp(rng.standard_normal((64, 128)) - 2.0), 0)
    bb = 2.0 * A._sigmoid(rng.standard_normal(64))
    Bkk = A.decay_product(kk, kk, A.decay_matrix(G, strict=True))
    T = PS.invert_blocked((bb[:, None] * Bkk).astype(f32)).astype(f64)
    d = rng.standard_normal((64, 96))
    ref = A.back_substitute(bb[:, None] * Bkk, d)
    assert _rel(T.T @ d, ref) < 1e-5


if __name__ == "__main__":
    print(f"{'case':28s} {'variant':7s} " + " ".join(f"{'d' + n:>9s}" for n in NAMES))
    for name, pk in CASES:
        e = errors(*problem(**pk))
        for var in ("mma", "v2", "v2+mma"):
            print(f"{name:28s} {var:7s} " + " ".join(f"{e[var][n]:9.2e}" for n in NAMES))
