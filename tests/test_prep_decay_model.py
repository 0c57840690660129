"""CPU model of the decay products of the CUDA forward's prep kernel (cutlass/kda_fwd_prep.cu, "A_kk / A_qk").

Per chunk, A_ij = sum_c x_ic y_jc exp(G_ic - G_jc) for j <= i (x = k or q, y = k; G the cumulative gate, not
increasing along the chunk). The kernel forms it on tensor cores by 16 x 16 blocks as bf16 factors
x_ic exp(G_ic - G_rc) and y_jc exp(G_rc - G_jc) around a reference row r, fp32 accumulation:

  off-diagonal block (I > J)   r = the last row of J: both factors <= 1;
  diagonal block               r = row 7 when the decay over its 16 rows stays within e^80 (the factors then
                               stay in fp32 / bf16 range); else ("split", since session 9) r = the last row of
                               each 8-column half (row 7 for columns 0-7, row 15 for 8-15) when the decay over
                               each 8-row half does; otherwise exact pairwise decays in fp32.

Before the split path, strong softplus gates sent many diagonal blocks down the slow exact path. This file
checks that the scheme gives the exact products to bf16 accuracy, never produces a non-finite value, and that
the split path keeps blocks on the tensor cores that one reference row could not.
"""

from __future__ import annotations

import numpy as np
import pytest

C, K, BS, FAST_RANGE = 64, 128, 16, 80.0


def bf16(x):
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def make_chunk(seed, a_log):
    """l2-normalised k, q and the cumulative softplus gate G = cumsum(-exp(a_log) softplus(x + dt_bias))."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((C, K))
    q = rng.standard_normal((C, K))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    raw = rng.standard_normal((C, K)) + 0.5 * rng.standard_normal(K)
    g = -np.exp(a_log) * np.logaddexp(0.0, raw)
    G = np.cumsum(g, axis=0).astype(np.float32)
    return bf16(k), bf16(q), G


def exact_products(x, y, G):
    """float64 A_ij = sum_c x_ic y_jc exp(G_ic - G_jc) for j <= i, zero above the diagonal."""
    G = G.astype(np.float64)
    D = G[:, None, :] - G[None, :, :]
    n = len(G)
    D[np.triu_indices(n, 1)] = -np.inf  # j > i: zero (their exp would overflow)
    return np.einsum("ic,jc,ijc->ij", x, y, np.exp(D))


def diag_fast(G, I, per_half):
    """Whether diagonal block I can take factors around one reference row (per_half=False) or one per 8-column
    half (True)."""
    b = I * BS
    if per_half:
        return max(np.max(G[b] - G[b + 7]), np.max(G[b + 8] - G[b + 15])) <= FAST_RANGE
    return np.max(G[b] - G[b + 15]) <= FAST_RANGE


def kernel_products(x, y, G):
    """The kernel's A (lower incl. diagonal) and the number of diagonal blocks on the fast path."""
    A = np.zeros((C, C), np.float32)
    nfast = 0
    with np.errstate(over="raise", invalid="raise"):
        for I in range(C // BS):
            ri = slice(I * BS, I * BS + BS)
            for J in range(I + 1):
                if J == I and not diag_fast(G, I, per_half=True):
                    A[ri, ri] = np.tril(exact_products(x[ri], y[ri], G[ri]))
                    continue
                nfast += J == I
                split = J == I and not diag_fast(G, I, per_half=False)
                for n in range(2):  # 8-column halves: the mma's n = 8 tiles
                    rj = slice(J * BS + 8 * n, J * BS + 8 * n + 8)
                    r = I * BS + (8 * n if split else 0) + 7 if J == I else J * BS + BS - 1
                    xr = bf16(x[ri] * np.exp(np.minimum(G[ri] - G[r], FAST_RANGE)))
                    yr = bf16(y[rj] * np.exp(G[r] - G[rj]))
                    assert np.all(np.isfinite(xr)) and np.all(np.isfinite(yr))
                    A[ri, rj] = (xr.astype(np.float64) @ yr.astype(np.float64).T).astype(np.float32)
    return np.tril(A), nfast


@pytest.mark.parametrize("a_log", [-1.0, 0.5, 1.5, 2.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_factored_products_match_exact(a_log, seed):
    k, q, G = make_chunk(seed, a_log)
    for x in (k, q):
        got, _ = kernel_products(x, k, G)
        want = exact_products(x, k, G)
        err = np.abs(got - want).max()
        # bf16 factors: ~2^-9 relative per factor over K = 128 terms of unit-norm rows (|A_ij| <= 1)
        assert err <= 1e-2, f"a_log={a_log}: max abs error {err:.3g}"


def test_split_diagonal_blocks_take_the_fast_path_more_often():
    """Strong softplus gates (a_log = 1.5-2.5, as at the far end of 64-96 heads with A_log ~ N(0, 0.5^2)):
    the per-half scheme keeps blocks on the tensor cores that one reference row sent to the exact path."""
    single = per_half = 0
    for seed in range(6):
        for a_log in (1.5, 2.0, 2.5):
            _, _, G = make_chunk(seed, a_log)
            for I in range(C // BS):
                single += diag_fast(G, I, per_half=False)
                per_half += diag_fast(G, I, per_half=True)
    assert per_half >= single
    assert per_half > single, (single, per_half)
