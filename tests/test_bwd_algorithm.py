"""The chunked backward that the CUDA kernels implement (cutlass/kda_bwd_*.cu), as a float64 NumPy model,
checked against jax.grad of the token-recurrent oracle (reference.kda_recurrent, x64). CPU only.

The model mirrors the kernels stage by stage (cutlass/kda_bwd_common.cuh describes them):
  plan      sequences from the slot map; chunks of C tokens aligned to sequence starts (one sequence each)
  prep      per (chunk, value head): G = in-chunk inclusive cumsum of the effective log-decay,
            Qg = e^G q, Kd = e^(G_last - G) k, gamma = e^G_last, A_qk (lower incl. diagonal),
            B_kk (strictly lower, without beta), W | U = (I + diag(beta) B_kk)^-1 diag(beta) [e^G k | v]
  states    forward over the chunks of each sequence: start state of every chunk but the first
            (index ceil(cs / C) of the row); first chunks start from initial_state[slot] (or zeros)
  reverse   backward over the chunks: dS_next (gradient w.r.t. the state after the chunk) of every chunk
            but the last (stored at the index of the next chunk); last chunks take dfinal_state[slot] (or 0);
              dR = A_qk^T dO + Kd dS_next,  dS = Qg^T dO - W^T dR + diag(gamma) dS_next
            the first chunk's dS is dinitial_state[slot]
  grad1     per (chunk, head): R = U - W S, dR, dQg = dO S^T, dKd = R dS_next^T, dW = -dR S^T, dU = dR,
            dA_qk = tril(dO R^T), dgamma = rowsum(S * dS_next)
  grad2     per (chunk, head): back substitution (I + A)^T [dKb | dVb] = [dW | dU],
            dA = -strict_tril(dKb W^T + dVb U^T), dB = diag(beta) dA, dbeta = rowsum(dA * B) + ...,
            the decay products M_ij = sum_c x_ic y_jc exp(G_ic - G_jc) (j <= i only) give
            dx = (dM o E) y, dy = (dM o E)^T x, dG += x dx - y dy; elementwise terms of Qg, Kd, gamma, Kb, Vb;
            dg = reverse cumsum of dG inside the chunk; gate and beta-sigmoid chains
  finish    per (token, q/k head): sum over the value heads of the group (fixed order), scale, l2norm
  reduce    da_log / ddt_bias partials per batch row: sums over tokens in order
Every decay is exp(G_i - G_j) with j <= i (or e^G, e^(G_last - G), both <= 1): nothing like exp(-G).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

EPS = 1e-6


# ----------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------

def _softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _slots(seg):
    """segment ids [B, T] -> slots (order of appearance, -1 = padding), like segments.slots_from_segment_ids."""
    B, T = seg.shape
    out = -np.ones((B, T), np.int64)
    for b in range(B):
        n = -1
        for t in range(T):
            if seg[b, t] == 0:
                continue
            if t == 0 or seg[b, t] != seg[b, t - 1]:
                n += 1
            out[b, t] = n
    return out


def plan(slot, C):
    """Per row: list of sequences (start, end, slot) and, for each, its chunk starts."""
    B, T = slot.shape
    seqs = []
    for b in range(B):
        t = 0
        while t < T:
            if slot[b, t] < 0:
                t += 1
                continue
            s0 = t
            while t + 1 < T and slot[b, t + 1] == slot[b, s0]:
                t += 1
            t += 1
            seqs.append((b, s0, t, int(slot[b, s0]), list(range(s0, t, C))))
    return seqs


def decay_matrix(G, strict):
    """E_ij = exp(G_i - G_j) for j <= i (j < i when strict), else 0: [C, C, K]. G_i - G_j <= 0 there."""
    Cn = G.shape[0]
    i, j = np.meshgrid(np.arange(Cn), np.arange(Cn), indexing="ij")
    mask = (j < i) if strict else (j <= i)
    d = G[:, None, :] - G[None, :, :]
    return np.where(mask[..., None], np.exp(np.where(mask[..., None], d, -np.inf)), 0.0)


def decay_product(x, y, E):
    """M_ij = sum_c x_ic y_jc E_ijc."""
    return np.einsum("ic,jc,ijc->ij", x, y, E)


def decay_product_grad(dM, x, y, E):
    """-> dx, dy, dG of M = decay_product(x, y, E) with E_ijc = exp(G_ic - G_jc)."""
    dx = np.einsum("ij,jc,ijc->ic", dM, y, E)
    dy = np.einsum("ij,ic,ijc->jc", dM, x, E)
    return dx, dy, x * dx - y * dy


# The factored decay products of grad2 v2 (FLASHKDA_BWD_GRAD2=v2; the forward prep's A_kk / A_qk scheme until
# session 9, when the prep's diagonal blocks took one reference per 8-column half: test_prep_decay_model.py): the
# chunk splits into blocks of BS rows; block (I, J), J <= I, takes a reference row r and
#   M_IJ = Xr_I Yr_J^T,  Xr_ic = x_ic exp(G_ic - G_rc),  Yr_jc = y_jc exp(G_rc - G_jc)
# off-diagonal (J < I): r = last row of J, so both factors are <= 1; diagonal: r = row BS/2 - 1 of the block
# when the block's decay range max_c (G_first - G_last) <= FAST_RANGE (factors within e^+-80), else the exact
# pairwise exp(G_i - G_j). The gradients factor the same way, block by block:
#   dx_I += exp(G_I - G_r) o (dM_IJ Yr_J),  dy_J += exp(G_r - G_J) o (dM_IJ^T Xr_I),  dG = x o dx - y o dy
# (G_r cancels). dM must vanish where j > i (j >= i when strict): the fast diagonal path does not mask it.
FAST_RANGE = 80.0


def _blocks(Cn):
    bs = 16 if Cn % 16 == 0 else Cn
    return bs, Cn // bs


def _diag_fast(G, I, bs):
    return np.max(G[I * bs] - G[I * bs + bs - 1]) <= FAST_RANGE


def decay_product_factored(x, y, G, strict, stats=None):
    """decay_product(x, y, decay_matrix(G, strict)) by blocks (see above)."""
    Cn = G.shape[0]
    bs, nb = _blocks(Cn)
    M = np.zeros((Cn, Cn))
    for I in range(nb):
        ri = slice(I * bs, I * bs + bs)
        for J in range(I + 1):
            rj = slice(J * bs, J * bs + bs)
            if J < I or _diag_fast(G, I, bs):
                r = J * bs + bs - 1 if J < I else I * bs + bs // 2 - 1
                Xr = x[ri] * np.exp(G[ri] - G[r])
                Yr = y[rj] * np.exp(G[r] - G[rj])
                blk = Xr @ Yr.T
                if J == I:
                    blk = np.tril(blk, -1 if strict else 0)
            else:
                if stats is not None:
                    stats["exact"] = stats.get("exact", 0) + 1
                E = decay_matrix(G[ri], strict)
                blk = decay_product(x[ri], y[rj], E)
            M[ri, rj] = blk
    return M


def decay_product_grad_factored(dM, x, y, G, stats=None):
    """decay_product_grad(dM, x, y, E) of a dM that vanishes where E does, by blocks (see above)."""
    Cn = G.shape[0]
    bs, nb = _blocks(Cn)
    dx = np.zeros_like(x)
    dy = np.zeros_like(y)
    for I in range(nb):
        ri = slice(I * bs, I * bs + bs)
        for J in range(I + 1):
            rj = slice(J * bs, J * bs + bs)
            d = dM[ri, rj]
            if J < I or _diag_fast(G, I, bs):
                r = J * bs + bs - 1 if J < I else I * bs + bs // 2 - 1
                ei = np.exp(G[ri] - G[r])   # exp(G_i - G_r), i in I
                ej = np.exp(G[r] - G[rj])   # exp(G_r - G_j), j in J
                dx[ri] += ei * (d @ (y[rj] * ej))
                dy[rj] += ej * (d.T @ (x[ri] * ei))
            else:
                if stats is not None:
                    stats["exact"] = stats.get("exact", 0) + 1
                E = decay_matrix(G[ri], strict=False)  # dM masks the diagonal where strict
                a, b_, _ = decay_product_grad(d, x[ri], y[rj], E)
                dx[ri] += a
                dy[rj] += b_
    return dx, dy, x * dx - y * dy


# grad2's default since session 10 (Grad2Kernel's kTPrep, DecayGradV2's kRowScale): T comes from the forward's
# prep and 7a runs without B_kk. The kernel holds dA (not dB = diag(beta) dA) and folds the row scale s = beta in:
# the dx products take dA and scale their sums by s_i, the dy products take s_i x_i as their factor, and the
# unscaled dx sums D give d beta's B_kk term, sum_j dA_ij B_ij = sum_c x_ic D_ic (B_kk = decay_product(x, x)).
def decay_product_grad_factored_rowscale(dA, s, x, y, G, stats=None):
    """decay_product_grad_factored of dM = diag(s) dA, plus sum_j dA_ij M_ij per row -> (dx, dy, dG, dbM)."""
    D, _, _ = decay_product_grad_factored(dA, x, y, G, stats=stats)
    _, dy, _ = decay_product_grad_factored(s[:, None] * dA, x, y, G)
    dx = s[:, None] * D
    return dx, dy, x * dx - y * dy, np.sum(x * D, axis=1)


def prep_chunk(qe, ke, ve, ge, be):
    """Forward quantities of one chunk (rows = its L tokens)."""
    L = qe.shape[0]
    G = np.cumsum(ge, axis=0)
    E = decay_matrix(G, strict=False)
    Es = decay_matrix(G, strict=True)
    Aqk = decay_product(qe, ke, E)
    Bkk = decay_product(ke, ke, Es)
    A = be[:, None] * Bkk
    Mi = np.linalg.inv(np.eye(L) + A)  # the kernels solve by substitution; same result
    eG = np.exp(G)
    Kb = be[:, None] * eG * ke
    Vb = be[:, None] * ve
    W = Mi @ Kb
    U = Mi @ Vb
    gl = G[-1]
    return dict(G=G, E=E, Es=Es, Aqk=Aqk, Bkk=Bkk, A=A, T=Mi, W=W, U=U, Kb=Kb, Vb=Vb, eG=eG,
                Qg=eG * qe, Kd=np.exp(gl[None] - G) * ke, gamma=np.exp(gl))


def back_substitute(A, rhs):
    """Solves (I + A)^T y = rhs, A strictly lower: y_i = rhs_i - sum_{j > i} A_ji y_j (i from last)."""
    L = A.shape[0]
    y = np.array(rhs, dtype=np.float64)
    for i in range(L - 1, -1, -1):
        if i + 1 < L:
            y[i] -= A[i + 1:, i] @ y[i + 1:]
    return y


def _record_stages(st, *, slot, seqs, chunk_list, P, C, K, V, HV, gamma, Hs, dH, dgam, scratch, dqe, dke, dg,
                   da_tok):
    """What chunked_backward(stages=st) returns: the kernels' workspace contents (kda_bwd_common.cuh) once the
    backward is done, in their layout; NaN (float) or -1 (int) where the kernels write nothing.
      plan     seqs [(b, start, end, slot)] (seq_list), chunks [(b, chunk start, seq end, slot)] (chunk_list;
               the kernels compact both with atomics: compare as sets), seq_start [B, T] (running max of the
               sequence starts, also over padding; -1 before the first), seq_end [B, T] (at sequence starts)
      prep     qg, kd, w [B, T, HV, K], u [B, T, HV, V], aqk [B, T, HV, C] (row of the token in its chunk),
               gamma [B, NG, HV, K] (GammaIndex)
      states   hs [B, NW + 1, HV, K, V]: start state of every chunk but a sequence's first, at ceil(cs / C)
      reverse  dh [B, NW + 1, HV, K, V]: dS_next of every chunk but a sequence's last, at the next chunk's index
      grad1    dgam [B, NG, HV, K]; dQg, dKd, dW, dU [B, T, HV, .], dAqk [B, T, HV, C] (the f32 scratch as grad1
               leaves it; grad2 then overwrites sqg / skd, and sw when the gate is not precomputed)
      grad2    sqg = dq_eff, skd = dk_eff [B, T, HV, K] (w.r.t. the scaled, normalised, per-value-head q / k),
               sw = dg_in [B, T, HV, K] (d raw gate input; only gate != precomputed), sda = da_tok [B, T, HV]
    Valid tokens only (padding: NaN); workspace states are [K, V] whatever state_layout."""
    B, T = slot.shape
    valid = (np.asarray(slot) >= 0)
    tokmask = lambda x: np.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, np.nan)
    seq_start = -np.ones((B, T), np.int64)
    seq_end = -np.ones((B, T), np.int64)
    for (b, ss, se, sl, starts) in seqs:
        seq_end[b, ss] = se
    for b in range(B):
        run = -1
        for t in range(T):
            if valid[b, t] and (t == 0 or slot[b, t - 1] != slot[b, t]):
                run = t
            seq_start[b, t] = run
    # aqk: the prep's A_qk rows, then the rows of T = (I + A)^{-1} (unit lower triangular; kAqkPitch)
    prep = {n: np.full((B, T, HV, w), np.nan) for n, w in (("qg", K), ("kd", K), ("w", K), ("u", V), ("aqk", 2 * C))}
    for (b, cs, se, sl) in chunk_list:
        L = min(C, se - cs)
        for hv in range(HV):
            p = P[b, cs, hv]
            for n, key in (("qg", "Qg"), ("kd", "Kd"), ("w", "W"), ("u", "U"), ("aqk", "Aqk")):
                x = p[key][:L]
                prep[n][b, cs:cs + L, hv] = 0.0
                prep[n][b, cs:cs + L, hv, :x.shape[1]] = x
            prep["aqk"][b, cs:cs + L, hv, C:C + L] = p["T"][:L, :L]
    st.update(seqs=[(b, ss, se, sl) for (b, ss, se, sl, _) in seqs], chunks=list(chunk_list), seq_start=seq_start,
              seq_end=seq_end, gamma=gamma.copy(), hs=Hs.copy(), dh=dH.copy(), dgam=dgam.copy(),
              dq_eff=tokmask(dqe), dk_eff=tokmask(dke), dg_in=tokmask(dg), da_tok=tokmask(da_tok[..., None])[..., 0],
              **prep, **{n: x.copy() for n, x in scratch.items()})
    return st


def chunked_backward(q, k, v, g, beta, a_log, dt_bias, slot, init, do, dfin, *, scale, gate="precomputed",
                     lower_bound=-5.0, use_a_log=True, qk_l2norm=False, beta_sigmoid=False,
                     allow_neg_eigval=False, C=64, pad=True, stages=None, grad2="pairwise",
                     grad2_stats=None):
    """All inputs float64 NumPy. q, k [B,T,H,K]; v [B,T,HV,V]; g [B,T,HV,K] raw; beta [B,T,HV] raw;
    a_log [HV]; dt_bias [HV, K]; slot [B,T]; init [B,S,HV,K,V] or None; do [B,T,HV,V];
    dfin [B,S,HV,K,V] or None. Returns dq, dk, dv, dg, dbeta, da_log [B,HV], ddt [B,HV,K], dinit.
    pad: partial chunks padded to C rows with zeros (and workspace indices), as in the kernels.
    stages: a dict to fill with the intermediates the kernels leave in their workspace, in its layout and
    indexing (NaN where the kernels write nothing; see _record_stages) and the plan's lists.
    grad2: "pairwise" (the first grad2 kernel: every decay exp(G_i - G_j)), "factored" (grad2 v2: B_kk
    recomputed and all decay-product gradients by blocks, decay_product_factored; FLASHKDA_BWD_GRAD2_T=invert) or
    "factored_tprep" (the default since session 10: the forward's A, W, U and T, no B_kk; 7a by
    decay_product_grad_factored_rowscale);
    grad2_stats: a dict counting the factored path's exact diagonal blocks."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    grp = HV // H
    S_in = 0 if init is None else init.shape[1]
    S_out = 0 if dfin is None else dfin.shape[1]
    NW = -(-T // C)

    # ---- pre-processing (per token; the kernels recompute it where needed) ----
    def l2(x):
        return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + EPS)

    qn = l2(q) if qk_l2norm else q
    kn = l2(k) if qk_l2norm else k
    qe = np.repeat(qn, grp, axis=2) * scale
    ke = np.repeat(kn, grp, axis=2)
    if gate == "precomputed":
        ge = g
    else:
        x = g + dt_bias[None, None]
        A_ = np.exp(a_log)[None, None, :, None]
        if gate == "softplus":
            ge = -A_ * _softplus(x)
        else:
            z = A_ * x if use_a_log else x
            ge = lower_bound * _sigmoid(z)
    if beta_sigmoid:
        sb = _sigmoid(beta)
        be = sb * (2.0 if allow_neg_eigval else 1.0)
    else:
        be = beta

    seqs = plan(slot, C)

    # Workspace indices of the kernels: chunk start states / their gradients at ceil(cs / C) (chunks but a
    # sequence's first / last); gamma / dgamma (GammaIndex) of a full chunk at ceil(cs / C), of a sequence's
    # last chunk at NW + slot (only slots < S_out). Every index must have a single writer.
    NG = NW + S_out
    written = set()

    def once(name, b, idx):
        assert (name, b, idx) not in written, f"workspace collision: {name}[{b}, {idx}]"
        written.add((name, b, idx))

    def gamma_index(cs, se, sl):
        return -(-cs // C) if cs + C < se else (NW + sl if sl < S_out else -1)

    def padded(x, L):
        # pad=True: rows L..C-1 of a partial chunk hold zeros, as in the kernels' shared memory
        if not pad or x.shape[0] == C:
            return x
        return np.concatenate([x, np.zeros((C - x.shape[0],) + x.shape[1:])], axis=0)

    # ---- prep ----
    P = {}
    gam = np.full((B, NG, HV, K), np.nan)
    chunk_list = []
    for (b, ss, se, sl, starts) in seqs:
        for cs in starts:
            L = min(C, se - cs)
            gi = gamma_index(cs, se, sl)
            chunk_list.append((b, cs, se, sl))
            if gi >= 0:
                once("gamma", b, gi)
            for hv in range(HV):
                r = slice(cs, cs + L)
                P[b, cs, hv] = prep_chunk(*(padded(x[b, r, hv], L) for x in (qe, ke, v, ge, be)))
                if gi >= 0:
                    gam[b, gi, hv] = P[b, cs, hv]["gamma"]

    # ---- states (forward over chunks) ----
    Hs = np.full((B, NW + 1, HV, K, V), np.nan)  # NaN: never written (nor read)
    for (b, ss, se, sl, starts) in seqs:
        for hv in range(HV):
            Sst = init[b, sl, hv].copy() if (init is not None and sl < S_in) else np.zeros((K, V))
            for m, cs in enumerate(starts):
                if m >= 1:
                    if hv == 0:
                        once("Hs", b, -(-cs // C))
                    Hs[b, -(-cs // C), hv] = Sst
                if m + 1 < len(starts):
                    p = P[b, cs, hv]
                    R = p["U"] - p["W"] @ Sst
                    Sst = gam[b, gamma_index(cs, se, sl), hv][:, None] * Sst + p["Kd"].T @ R

    # ---- reverse over chunks ----
    dH = np.full((B, NW + 1, HV, K, V), np.nan)
    dinit = None if init is None else np.zeros_like(init)
    if dinit is not None:
        reached = np.zeros((B, S_in), bool)
        for (b, ss, se, sl, starts) in seqs:
            if sl < S_in:
                reached[b, sl] = True
        for b in range(B):
            for s in range(S_in):
                if not reached[b, s] and dfin is not None and s < S_out:
                    dinit[b, s] = dfin[b, s]
    for (b, ss, se, sl, starts) in seqs:
        for hv in range(HV):
            dS = dfin[b, sl, hv].copy() if (dfin is not None and sl < S_out) else np.zeros((K, V))
            for m in range(len(starts) - 1, -1, -1):
                cs = starts[m]
                if m + 1 < len(starts):
                    assert -(-starts[m + 1] // C) == (cs + 2 * C - 1) // C
                    if hv == 0:
                        once("dH", b, -(-starts[m + 1] // C))
                    dH[b, -(-starts[m + 1] // C), hv] = dS
                p = P[b, cs, hv]
                L = min(C, se - cs)
                dO = padded(do[b, cs:cs + L, hv], L)
                gi = gamma_index(cs, se, sl)
                gm = gam[b, gi, hv] if gi >= 0 else np.zeros(K)  # no slot: dS_next is 0 here
                dR = p["Aqk"].T @ dO + p["Kd"] @ dS
                dS = p["Qg"].T @ dO - p["W"].T @ dR + gm[:, None] * dS
            if dinit is not None and sl < S_in:
                dinit[b, sl, hv] = dS

    # ---- per-chunk gradients ----
    dqe = np.zeros_like(qe)
    dke = np.zeros_like(ke)
    dv = np.zeros_like(v)
    dge = np.zeros_like(ge)
    dbe = np.zeros_like(be)
    dgam = np.full((B, NG, HV, K), np.nan)
    scratch = {n: np.full((B, T, HV, w), np.nan) for n, w in (("dQg", K), ("dKd", K), ("dW", K), ("dU", V),
                                                              ("dAqk", C))}
    for (b, ss, se, sl, starts) in seqs:
        for m, cs in enumerate(starts):
            last = m + 1 == len(starts)
            gi = gamma_index(cs, se, sl)
            for hv in range(HV):
                p = P[b, cs, hv]
                L = min(C, se - cs)
                Lp = p["W"].shape[0]  # C when padded
                r = slice(cs, cs + L)
                if m == 0:
                    Sst = init[b, sl, hv] if (init is not None and sl < S_in) else np.zeros((K, V))
                else:
                    Sst = Hs[b, -(-cs // C), hv]
                if not last:
                    dSn = dH[b, -(-starts[m + 1] // C), hv]
                else:
                    dSn = dfin[b, sl, hv] if (dfin is not None and sl < S_out) else np.zeros((K, V))
                dO = padded(do[b, r, hv], L)
                # grad1 (rows >= L of its results are not stored: grad2 reads them as 0)
                R = p["U"] - p["W"] @ Sst
                dR = p["Aqk"].T @ dO + p["Kd"] @ dSn
                keep = (np.arange(Lp) < L)[:, None]
                dQg = np.where(keep, dO @ Sst.T, 0.0)
                dKd = np.where(keep, R @ dSn.T, 0.0)
                dW = np.where(keep, -dR @ Sst.T, 0.0)
                dU = np.where(keep, dR, 0.0)
                dAqk = np.where(keep, np.tril(dO @ R.T), 0.0)
                if gi >= 0:
                    dgam[b, gi, hv] = np.sum(Sst * dSn, axis=1)
                for n, x in (("dQg", dQg), ("dKd", dKd), ("dW", dW), ("dU", dU), ("dAqk", dAqk)):
                    scratch[n][b, r, hv, :x.shape[1]] = x[:L]
                    scratch[n][b, r, hv, x.shape[1]:] = 0.0  # dA_qk rows of an unpadded model: C columns
                # grad2
                G, eG = p["G"], p["eG"]
                kk, qq, vv = (padded(x[b, r, hv], L) for x in (ke, qe, v))
                bb = padded(be[b, r, hv], L)
                if grad2 == "factored":  # B_kk, then A, W, U recomputed from it (as the v2 kernel does)
                    Bkk = decay_product_factored(kk, kk, G, strict=True, stats=grad2_stats)
                    A = bb[:, None] * Bkk
                    Mi = np.linalg.inv(np.eye(Lp) + A)
                    Wm, Um = Mi @ p["Kb"], Mi @ p["Vb"]
                    dpg = lambda dM, x, y, E: decay_product_grad_factored(dM, x, y, G, stats=grad2_stats)
                elif grad2 == "factored_tprep":  # the forward's A (through T), W, U; no B_kk
                    Bkk, A, Wm, Um = None, p["A"], p["W"], p["U"]
                    dpg = lambda dM, x, y, E: decay_product_grad_factored(dM, x, y, G, stats=grad2_stats)
                else:
                    Bkk, A, Wm, Um = p["Bkk"], p["A"], p["W"], p["U"]
                    dpg = decay_product_grad
                dKb = back_substitute(A, dW)
                dVb = back_substitute(A, dU)
                dA = -np.tril(dKb @ Wm.T + dVb @ Um.T, -1)
                db = np.sum(dA * Bkk, axis=1) if Bkk is not None else np.zeros(Lp)
                dk = np.zeros((Lp, K))
                dq = np.zeros((Lp, K))
                dG = np.zeros((Lp, K))
                # Vb = beta v, Kb = beta e^G k
                dv[b, r, hv] = (bb[:, None] * dVb)[:L]
                db += np.sum(vv * dVb, axis=1) + np.sum(eG * kk * dKb, axis=1)
                dk += bb[:, None] * eG * dKb
                dG += p["Kb"] * dKb
                # B_kk = decay_product(k, k) strict, A_qk = decay_product(q, k)
                if Bkk is None:  # 7a with the row scale: dM = diag(beta) dA, and d beta's B_kk term
                    dx, dy, dg_, dbB = decay_product_grad_factored_rowscale(dA, bb, kk, kk, G, stats=grad2_stats)
                    db += dbB
                else:
                    dx, dy, dg_ = dpg(bb[:, None] * dA, kk, kk, p["Es"])
                dk += dx + dy
                dG += dg_
                dx, dy, dg_ = dpg(dAqk, qq, kk, p["E"])
                dq += dx
                dk += dy
                dG += dg_
                # Qg, Kd, gamma
                dq += eG * dQg
                dG += p["Qg"] * dQg
                dec = np.exp(G[-1][None] - G)
                dk += dec * dKd
                dG -= p["Kd"] * dKd
                # G_last = G of row L-1 (= row C-1 when padded: padded rows have g = 0)
                dG[L - 1] += np.sum(p["Kd"] * dKd, axis=0) + (gam[b, gi, hv] * dgam[b, gi, hv] if gi >= 0 else 0.0)
                # reverse cumsum inside the chunk (rows < L)
                dge[b, r, hv] = np.cumsum(dG[:L][::-1], axis=0)[::-1]
                dqe[b, r, hv] = dq[:L]
                dke[b, r, hv] = dk[:L]
                dbe[b, r, hv] = db[:L]

    # ---- gate, beta chains (per token and value head) ----
    da_log = np.zeros((B, HV))
    ddt = np.zeros((B, HV, K))
    if gate == "precomputed":
        dg = dge
        da_tok = np.zeros(dge.shape[:-1])
    else:
        x = g + dt_bias[None, None]
        Aexp = np.exp(a_log)[None, None, :, None]
        if gate == "softplus":
            dg = -Aexp * _sigmoid(x) * dge
            da_tok = np.sum(dge * ge, axis=-1)
        else:
            z = Aexp * x if use_a_log else x
            s_ = _sigmoid(z)
            dz = lower_bound * s_ * (1 - s_) * dge
            dg = Aexp * dz if use_a_log else dz
            da_tok = np.sum(dz * z, axis=-1) if use_a_log else np.zeros(dge.shape[:-1])
        valid = (slot >= 0)[:, :, None, None]
        dg = np.where(valid, dg, 0.0)
        for b in range(B):  # token order, like the reduce kernel
            for t in range(T):
                if slot[b, t] >= 0:
                    ddt[b] += dg[b, t]
                    da_log[b] += da_tok[b, t]
    if beta_sigmoid:
        dbeta = dbe * (2.0 if allow_neg_eigval else 1.0) * sb * (1 - sb)
    else:
        dbeta = dbe

    # ---- finish q, k: group sum, scale, l2norm ----
    dqn = dqe.reshape(B, T, H, grp, K).sum(3) * scale
    dkn = dke.reshape(B, T, H, grp, K).sum(3)

    def l2_bwd(x, dy):
        r = 1.0 / np.sqrt(np.sum(x * x, -1, keepdims=True) + EPS)
        y = x * r
        return r * (dy - y * np.sum(dy * y, -1, keepdims=True))

    dq = l2_bwd(q, dqn) if qk_l2norm else dqn
    dk = l2_bwd(k, dkn) if qk_l2norm else dkn
    if stages is not None:
        _record_stages(stages, slot=slot, seqs=seqs, chunk_list=chunk_list, P=P, C=C, K=K, V=V, HV=HV,
                       gamma=gam, Hs=Hs, dH=dH, dgam=dgam, scratch=scratch, dqe=dqe, dke=dke, dg=dg,
                       da_tok=da_tok)
    return dict(q=dq, k=dk, v=dv, g=dg, beta=dbeta, A_log=da_log, dt_bias=ddt, initial_state=dinit)


# ----------------------------------------------------------------------------------------------------
# The check against the oracle.
# ----------------------------------------------------------------------------------------------------

def _case(seed, B, T, H, HV, K, V, *, gate="precomputed", l2=False, sig=False, neg=False, seg=None, S=0,
          init=False, dfin=False, use_a_log=True, C=64, strong=False, grad2="pairwise", grad2_stats=None):
    from flashkda_jax import reference as R

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    if not l2:
        q, k = q / np.sqrt(K), k / np.sqrt(K)
    v = rng.standard_normal((B, T, HV, V))
    if gate == "precomputed":
        g = -np.exp(rng.standard_normal((B, T, HV, K)) - 1.5) * (1e3 if strong else 1.0)
    else:
        g = rng.standard_normal((B, T, HV, K))
    beta = rng.standard_normal((B, T, HV)) if sig else rng.uniform(0.1, 0.9, (B, T, HV))
    a_log = rng.standard_normal(HV) * 0.5 - 0.5
    dt_bias = rng.standard_normal((HV, K)) * 0.5
    scale = K ** -0.5
    do = rng.standard_normal((B, T, HV, V))
    slot = _slots(seg) if seg is not None else np.zeros((B, T), np.int64)
    nslots = S if S else 1
    st0 = rng.standard_normal((B, nslots, HV, K, V)) * 0.5 if init else None
    dfn = rng.standard_normal((B, nslots, HV, K, V)) if dfin else None

    kw = dict(scale=scale, qk_l2norm=l2, beta_sigmoid=sig, allow_neg_eigval=neg)
    if gate != "precomputed":
        kw.update(gate=gate, dt_bias=jnp.asarray(dt_bias))
        if gate == "softplus" or use_a_log:
            kw["A_log"] = jnp.asarray(a_log)
        if gate == "bounded":
            kw["lower_bound"] = -5.0
    if seg is not None:
        kw["segment_ids"] = jnp.asarray(seg, jnp.int32)
        kw["max_segments"] = nslots

    def loss(q_, k_, v_, g_, b_, st_, a_, d_):
        kk = dict(kw)
        if gate != "precomputed":
            kk["dt_bias"] = d_
            if "A_log" in kk:
                kk["A_log"] = a_
        if st_ is not None:
            st_in = st_ if seg is not None else st_[:, 0]
            kk["initial_state"] = st_in
        o, fin = R.kda_recurrent(q_, k_, v_, g_, b_, return_final_state=dfin, **kk)
        out = jnp.sum(o * do)
        if dfin:
            f = fin if seg is not None else fin[:, None]
            out = out + jnp.sum(f * dfn)
        return out

    with jax.enable_x64(True):
        args = [jnp.asarray(x) for x in (q, k, v, g, beta)]
        st = None if st0 is None else jnp.asarray(st0)
        argnums = (0, 1, 2, 3, 4, 6, 7) + ((5,) if st is not None else ())
        grads = jax.grad(loss, argnums=argnums)(*args, st, jnp.asarray(a_log), jnp.asarray(dt_bias))
        ref = {n: np.asarray(gr) for n, gr in zip(["q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state"],
                                                  grads)}
    out = chunked_backward(q, k, v, g, beta, a_log, dt_bias, slot, st0, do, dfn, scale=scale, gate=gate,
                           lower_bound=-5.0, use_a_log=use_a_log or gate == "softplus", qk_l2norm=l2,
                           beta_sigmoid=sig, allow_neg_eigval=neg, C=C, grad2=grad2, grad2_stats=grad2_stats)
    out["A_log"] = out["A_log"].sum(0)
    out["dt_bias"] = out["dt_bias"].sum(0)
    for name, r in ref.items():
        o = out[name]
        assert np.all(np.isfinite(o)), name
        den = np.linalg.norm(r)
        err = np.linalg.norm(o - r) / (den if den > 0 else 1.0)
        assert err < 1e-7, f"{name}: rel err {err:.3e}"
    if seg is not None:  # padding tokens get exactly zero gradients
        pad = np.asarray(seg) == 0
        for name in ("q", "k", "v", "g", "beta"):
            assert np.all(out[name][pad] == 0), name
    return out


CASES = {
    "t1": dict(B=1, T=1, H=1, HV=1, K=8, V=8),
    "t70": dict(B=2, T=70, H=1, HV=1, K=8, V=4),
    "t130_l2_sig": dict(B=1, T=130, H=1, HV=1, K=8, V=8, l2=True, sig=True),
    "gva_softplus": dict(B=1, T=45, H=2, HV=4, K=8, V=4, gate="softplus", l2=True, sig=True, C=16),
    "bounded_alog": dict(B=1, T=37, H=1, HV=2, K=8, V=8, gate="bounded", C=8, sig=True, neg=True),
    "bounded_no_alog": dict(B=1, T=21, H=1, HV=1, K=4, V=4, gate="bounded", use_a_log=False, C=8),
    "states": dict(B=2, T=40, H=1, HV=2, K=8, V=4, init=True, dfin=True, C=16),
    "strong_gate": dict(B=1, T=50, H=1, HV=1, K=8, V=4, strong=True, C=16, init=True, dfin=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_backward_matches_oracle(name):
    _case(0, **CASES[name])


def test_ragged_segments_padding_states():
    seg = np.array([[1, 1, 1, 0, 0, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 4, 4, 4, 4, 4, 0, 0, 5, 5,
                     5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5],
                    [0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
                     2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], np.int32)
    # Row 0: 5 sequences; row 1: 3 (id 1 twice: separate sequences). S = 4 < 5: the last one keeps no state.
    _case(1, B=2, T=50, H=1, HV=2, K=8, V=4, seg=seg, S=4, init=True, dfin=True, C=8, gate="softplus",
          l2=True, sig=True)


def test_segments_equal_separate_sequences():
    """Two sequences packed in one row give the gradients of the two run separately."""
    rng = np.random.default_rng(5)
    K = V = 4
    T1, T2 = 11, 19
    seg = np.array([[1] * T1 + [2] * T2], np.int32)
    q, k = rng.standard_normal((2, 1, T1 + T2, 1, K)) / 2
    v = rng.standard_normal((1, T1 + T2, 1, V))
    g = -np.exp(rng.standard_normal((1, T1 + T2, 1, K)) - 1)
    beta = rng.uniform(0.2, 0.8, (1, T1 + T2, 1))
    do = rng.standard_normal((1, T1 + T2, 1, V))
    z1, z2 = np.zeros(1), np.zeros((1, K))
    common = dict(scale=0.5, C=8)
    packed = chunked_backward(q, k, v, g, beta, z1, z2, _slots(seg), None, do, None, **common)
    for (a, e) in ((0, T1), (T1, T1 + T2)):
        sl = slice(a, e)
        one = chunked_backward(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], z1, z2,
                               np.zeros((1, e - a), np.int64), None, do[:, sl], None, **common)
        for n in ("q", "k", "v", "g", "beta"):
            np.testing.assert_allclose(packed[n][:, sl], one[n], rtol=1e-12, atol=1e-12)


def test_chunk_aligned_sequences_full_last_chunks():
    """Sequences starting on chunk boundaries, full last chunks (gamma / dgamma by slot), length-1 sequences at
    a chunk start, leading padding, more sequences than slots; GVA, bounded gate without A_log."""
    C = 8
    row0 = [1] * 8 + [2] * 16 + [3] + [0] * 7 + [4] * 9 + [5] * 7
    row1 = [0] * 3 + [1] + [2] * 20 + [3] * 24
    seg = np.array([row0, row1], np.int32)
    _case(2, B=2, T=48, H=2, HV=4, K=8, V=4, seg=seg, S=4, init=True, dfin=True, C=C, gate="bounded",
          use_a_log=False, sig=True, neg=True, l2=True)


# ----------------------------------------------------------------------------------------------------
# grad2 v2: the factored decay products equal the pairwise ones (float64).
# ----------------------------------------------------------------------------------------------------

def _close(a, b, what, tol=1e-10):
    a, b = np.asarray(a), np.asarray(b)
    den = np.linalg.norm(b)
    err = np.linalg.norm(a - b) / (den if den > 0 else 1.0)
    assert err <= tol, f"{what}: rel err {err:.3e}"


@pytest.mark.parametrize("grad2", ["factored", "factored_tprep"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_grad2_factored_equals_pairwise(name, grad2):
    st = {}
    a = _case(0, **CASES[name])
    b = _case(0, **CASES[name], grad2=grad2, grad2_stats=st)
    for n, x in a.items():
        if x is not None:
            _close(b[n], x, f"{name} d{n}")
    if name == "strong_gate":  # C = 16: one diagonal block per chunk, far beyond e^80: the exact path
        assert st.get("exact", 0) > 0


@pytest.mark.parametrize("grad2", ["factored", "factored_tprep"])
def test_grad2_factored_ragged_and_aligned(grad2):
    st = {}
    seg = np.array([[1] * 8 + [2] * 16 + [3] + [0] * 7 + [4] * 9 + [5] * 7,
                    [0] * 3 + [1] + [2] * 20 + [3] * 24], np.int32)
    kw = dict(B=2, T=48, H=2, HV=4, K=8, V=4, seg=seg, S=4, init=True, dfin=True, C=16, gate="bounded",
              use_a_log=False, sig=True, neg=True, l2=True)
    a = _case(2, **kw)
    b = _case(2, **kw, grad2=grad2, grad2_stats=st)
    for n, x in a.items():
        if x is not None:
            _close(b[n], x, f"d{n}")


@pytest.mark.parametrize("strong", [False, True])
def test_decay_products_factored_c64(strong):
    """C = 64 (4 x 4 blocks of 16), K = 32: mixed gates, some diagonal blocks beyond e^80 when strong, partial
    chunks (zero-padded rows with g = 0); B_kk (strict), A_qk and both gradients against the pairwise forms."""
    rng = np.random.default_rng(7)
    Cn, K = 64, 32
    for trial in range(4):
        L = (64, 40, 17, 1)[trial]
        x = np.zeros((Cn, K))
        y = np.zeros((Cn, K))
        g = np.zeros((Cn, K))
        x[:L] = rng.standard_normal((L, K))
        y[:L] = rng.standard_normal((L, K))
        g[:L] = -np.exp(rng.standard_normal((L, K)) - 1.5)
        if strong:  # strong decay on some rows of the first half: blocks 0-1 exact, 2-3 fast
            g[:min(L, 32):5] *= 300.0
        G = np.cumsum(g, axis=0)
        for strict in (True, False):
            st = {}
            E = decay_matrix(G, strict)
            M = decay_product(x, y, E)
            _close(decay_product_factored(x, y, G, strict, stats=st), M, f"M strict={strict} L={L}")
            dM = rng.standard_normal((Cn, Cn)) * (np.tril(np.ones((Cn, Cn)), -1 if strict else 0))
            ref = decay_product_grad(dM, x, y, E)
            got = decay_product_grad_factored(dM, x, y, G, stats=st)
            for n, a_, b_ in zip(("dx", "dy", "dG"), got, ref):
                _close(a_, b_, f"{n} strict={strict} L={L}")
            if strong and L == 64:
                assert st.get("exact", 0) == 4, st  # blocks 0 and 1 exact (product and gradient), 2 and 3 fast
            if not strong:
                assert st.get("exact", 0) == 0, st
