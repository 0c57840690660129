"""CPU model of the two WY solves of the CUDA forward's prep kernel (cutlass/kda_fwd_prep.cu).

The prep kernel solves, per (chunk, value head), (I + A) [W | U] = diag(beta) [exp(G) * k | v] with A the
beta-scaled strictly lower A_kk (fp32 in shared memory). Two variants:

  simt (fp32 inputs)        one column per thread, fp32 right-looking substitution (SolveSimt);
  mma (bf16 / fp16 inputs)  T = (I + A)^{-1} in fp32, blocked: the 16x16 diagonal blocks by substitution
                            (InvertDiagBlocks), then T_IJ = -T_II sum_{M=J}^{I-1} A_IM T_MJ in order of
                            distance I - J = 1, 2, 3 on tensor cores in 3xTF32 (InvertOffDiagBlocks); T and
                            the right-hand side are rounded to bf16 and multiplied on tensor cores with fp32
                            accumulation (SolveMma).

This file replays both in NumPy in the kernels' order of operations (fp32 FMAs emulated in float64 and
rounded once; tensor-core products exact and each 16-deep k block summed before it is added to the fp32
accumulator), on realistic chunks (l2-normalised K = 128 keys, beta in (0, 1) or (0, 2), bounded and softplus
gates), and compares W and U (bf16, as the kernel writes them) with a float64 solve of the same fp32 system.
The mma variant must stay within 2x the simt variant's error or below 4e-3 relative, whichever is larger.
Run as a script for the table of errors.
"""

from __future__ import annotations

import numpy as np
import pytest

C = 64
KDIM = 128
VDIM = 128
TOL_ABS = 4e-3
f32, f64 = np.float32, np.float64


def bf16(x):
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, f32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(f32)


def fma32(a, b, c):
    """fp32 fma(a, b, c): the product is exact in float64, the sum rounded (to float64, then float32)."""
    return (np.asarray(a, f32).astype(f64) * np.asarray(b, f32).astype(f64) + np.asarray(c, f32).astype(f64)).astype(f32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def make_chunk(seed, gate, beta_max, correlated=False):
    """(A fp32 [C, C] strictly lower, beta-scaled; rhs fp32 [C, K + V] = beta [exp(G) k | v])."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((C, KDIM))
    if correlated:  # keys sharing a common direction: larger |A_ij|, more cancellation in T R
        k = k + 3.0 * rng.standard_normal(KDIM)[None, :]
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    k = bf16(k.astype(f32))  # sK
    v = bf16(rng.standard_normal((C, VDIM)).astype(f32))  # sV
    x = rng.standard_normal((C, KDIM)) + 0.5 * rng.standard_normal(KDIM)[None, :]  # g + dt_bias
    a_coef = np.exp(rng.normal(-1.0, 0.5))  # exp(A_log)
    if gate == "bounded":
        g = -5.0 * _sigmoid(x * a_coef)  # lower_bound = -5
    else:
        g = -a_coef * _softplus(x)
    G = np.cumsum(g.astype(f32), axis=0, dtype=f32)  # sG (fp32 running sum)
    beta = (beta_max * _sigmoid(rng.standard_normal(C))).astype(f32)
    kf = k.astype(f64)
    Gd = G.astype(f64)
    A = np.zeros((C, C))
    for i in range(1, C):
        # A_ij = beta_i sum_c k_ic k_jc exp(G_ic - G_jc), j < i (every decay factor <= 1)
        A[i, :i] = beta[i] * ((kf[i][None, :] * np.exp(Gd[i][None, :] - Gd[:i])) * kf[:i]).sum(-1)
    A = A.astype(f32)
    rhs_w = beta[:, None] * (k * np.exp(G).astype(f32))  # fp32, as SolveSimt / the mma epilogue form it
    rhs_u = beta[:, None] * v
    return A, np.concatenate([rhs_w, rhs_u], axis=1).astype(f32)


def solve_simt(A, rhs):
    """SolveSimt: x[i] -= A_ij x_j for j = 0..C-1, i > j (fp32 FMAs)."""
    x = rhs.copy()
    for j in range(C - 1):
        x[j + 1:] = fma32(-A[j + 1:, j:j + 1], x[j:j + 1], x[j + 1:])
    return x


def tf32(x):
    """cvt.rna.tf32.f32: round float32 to 10 mantissa bits, ties away from zero (returned as float32)."""
    u = np.ascontiguousarray(x, f32).view(np.uint32).astype(np.uint64)
    u = (u + 0x1000) & ~np.uint64(0x1FFF)
    return u.astype(np.uint32).view(f32)


def mma_tf32(a, b, acc, split=True):
    """Mma3xTF32 over one 8-deep k block: acc += Al Bh + Ah Bl + Ah Bh (split = False: acc += Ah Bh only), each
    tf32 product exact, each mma's sum rounded to fp32 once."""
    ah, bh = tf32(a), tf32(b)
    terms = [(tf32(a - ah), bh), (ah, tf32(b - bh))] if split else []
    for x, y in terms + [(ah, bh)]:
        acc = (acc.astype(f64) + x.astype(f64) @ y.astype(f64)).astype(f32)
    return acc


def invert_blocked(A, split=True):
    """InvertDiagBlocks + InvertOffDiagBlocks: T = (I + A)^{-1} (fp32). The diagonal blocks by fp32 substitution
    (one thread per column), then, in order of distance d = I - J, P = sum_{M=J}^{I-1} A_IM T_MJ and
    T_IJ = -T_II P on tensor cores (m16n8k8 tf32, 3xTF32), k blocks of 8 in order."""
    T = np.zeros((C, C), f32)
    for I in range(4):  # one thread per column j of T_II: right-looking substitution from e_j
        a = A[16 * I:16 * I + 16, 16 * I:16 * I + 16]
        x = np.eye(16, dtype=f32)  # x[i, j]: row i of column j
        for m in range(15):
            x[m + 1:] = fma32(-a[m + 1:, m:m + 1], x[m:m + 1], x[m + 1:])
        T[16 * I:16 * I + 16, 16 * I:16 * I + 16] = x
    for d in (1, 2, 3):
        for I in range(d, 4):
            J = I - d
            rows, cols = slice(16 * I, 16 * I + 16), slice(16 * J, 16 * J + 16)
            P = np.zeros((16, 16), f32)
            for M in range(J, I):
                for kb in (0, 8):
                    ks = slice(16 * M + kb, 16 * M + kb + 8)
                    P = mma_tf32(A[rows, ks], T[ks, cols], P, split)
            tii = T[rows, rows]
            out = np.zeros((16, 16), f32)
            for kb in (0, 8):
                out = mma_tf32(tii[:, kb:kb + 8], P[kb:kb + 8], out, split)
            T[rows, cols] = -out
    return T


def solve_mma(A, rhs):
    """SolveMma: bf16(T) bf16(rhs), fp32 accumulation over 16-deep k blocks."""
    Tb = bf16(invert_blocked(A)).astype(f64)
    Rb = bf16(rhs).astype(f64)
    acc = np.zeros(rhs.shape, f32)
    for kk in range(4):
        ks = slice(16 * kk, 16 * kk + 16)
        acc = (acc.astype(f64) + (Tb[:, ks] @ Rb[ks]).astype(f32).astype(f64)).astype(f32)
    return acc


def _rel(x, ref):
    return float(np.linalg.norm(x.astype(f64) - ref) / np.linalg.norm(ref))


def errors(A, rhs):
    """Relative errors of W and U (bf16 outputs, and the fp32 values before that rounding) against float64."""
    exact = np.linalg.solve(np.eye(C) + A.astype(f64), rhs.astype(f64))
    out = {}
    for name, x in (("simt", solve_simt(A, rhs)), ("mma", solve_mma(A, rhs))):
        for part, cols in (("W", slice(0, KDIM)), ("U", slice(KDIM, KDIM + VDIM))):
            out[f"{name}_{part}"] = _rel(bf16(x[:, cols]), exact[:, cols])
            out[f"{name}_{part}_f32"] = _rel(x[:, cols], exact[:, cols])
    return out


CASES = [(gate, beta_max, corr) for gate in ("bounded", "softplus") for beta_max in (1.0, 2.0) for corr in (False, True)]


def test_blocked_inverse_is_the_inverse():
    A, _ = make_chunk(0, "softplus", 2.0, correlated=True)
    T = invert_blocked(A)
    ref = np.linalg.inv(np.eye(C) + A.astype(f64))
    assert np.allclose(np.triu(T, 1), 0.0) and np.allclose(np.diag(T), 1.0)
    assert np.linalg.norm(T - ref) / np.linalg.norm(ref) < 1e-5


def test_tf32_tails_keep_the_inverse_fp32_accurate():
    """3xTF32 (head and tail of each operand) keeps T's off-diagonal blocks at fp32 accuracy (~3e-8 relative);
    the heads alone (one tf32 mma) give ~1e-4, a tenth of T's bf16 rounding for the solve."""
    for seed in range(3):
        A, _ = make_chunk(seed, "softplus", 2.0, correlated=True)
        ref = np.linalg.inv(np.eye(C) + A.astype(f64))
        e3 = np.linalg.norm(invert_blocked(A) - ref) / np.linalg.norm(ref)
        e1 = np.linalg.norm(invert_blocked(A, split=False) - ref) / np.linalg.norm(ref)
        assert e3 < 1e-6 and e1 > 10 * e3, (seed, e3, e1)


@pytest.mark.parametrize("gate,beta_max,correlated", CASES)
def test_mma_solve_error_within_budget(gate, beta_max, correlated):
    for seed in range(3):
        A, rhs = make_chunk(100 + seed, gate, beta_max, correlated)
        e = errors(A, rhs)
        for part in ("W", "U"):
            simt, mma = e[f"simt_{part}"], e[f"mma_{part}"]
            assert mma <= max(2.0 * simt, TOL_ABS), f"{gate} beta<{beta_max} corr={correlated} seed {seed} {part}: {e}"


if __name__ == "__main__":
    print(f"{'gate':9s} {'beta':>5s} {'corr':>5s} | {'W simt':>9s} {'W mma':>9s} {'U simt':>9s} {'U mma':>9s} | "
          f"fp32 before output rounding: {'W simt':>9s} {'W mma':>9s} {'U simt':>9s} {'U mma':>9s}")
    for gate, beta_max, corr in CASES:
        es = [errors(*make_chunk(100 + s, gate, beta_max, corr)) for s in range(3)]
        m = {k: max(e[k] for e in es) for k in es[0]}
        print(f"{gate:9s} {beta_max:5.1f} {str(corr):>5s} | {m['simt_W']:9.2e} {m['mma_W']:9.2e} {m['simt_U']:9.2e} "
              f"{m['mma_U']:9.2e} | {'':28s} {m['simt_W_f32']:9.2e} {m['mma_W_f32']:9.2e} {m['simt_U_f32']:9.2e} "
              f"{m['mma_U_f32']:9.2e}")
