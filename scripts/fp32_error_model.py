"""CPU emulation of the CUDA chunked KDA forward (fp32 inputs) with a precision switch per rounding point: which
roundings make the GPU's fp32-input error (benchmarks/NOTES.md, session 16, "fp32 inputs").

    python3 scripts/fp32_error_model.py {table|sub|combo|final|minus|rec}

Arithmetic in float64; at each rounding point the value is rounded to the chosen format:
  'x' (exact), 'bf16', 'fp16', 'tf32' (10-bit mantissa, RNA), 'bf16x2' (hi + lo bf16 split).

Rounding points (keys of a config dict; missing = exact):
  in    raw q, k, v rounded before the prep (brief's (i))
  smem  q*scale (after l2norm), k (after l2norm), v as the prep stores them in shared memory (sQ/sK/sV; bf16 in
        kda_fwd_prep.cu for every input dtype -- not in the brief's list, but in the kernel)
  aop   the tensor-core operands of A_kk / A_qk: x_i exp(G_i - G_r), k_j exp(G_r - G_j) with the block reference
        rows of kda_fwd_prep.cu (A_kk is kept fp32 afterwards, A_qk then goes through 'Aqk')
  W U Qg Kd Aqk   prep outputs (brief's (a)-(e))
  S     the bf16 copy of the state used in W S and Qg S (f)
  R     R = U - W S rounded before A_qk R and Kd^T R (g); R_state: only the copy Kd^T R reads
  T     T = (I + A_kk)^-1 and the solve's right-hand sides rounded (tensor-core solve) (h)
"""
from __future__ import annotations

import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tests"))
sys.path.insert(0, _ROOT)

from flashkda_jax import _inputs as I  # noqa: E402
from flashkda_jax import preprocess as P  # noqa: E402
from flashkda_jax import reference as R  # noqa: E402
from kda_testing import make_problem, rel_err  # noqa: E402

C = 64
POINTS = ["in", "smem", "aop", "W", "U", "Qg", "Kd", "Aqk", "S", "R", "T"]


def rnd(x, mode):
    if mode in (None, "x"):
        return x
    if mode == "bf16":
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    if mode == "fp16":
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)
    if mode == "tf32":  # cvt.rna.tf32.f32: round half away from zero to 10 mantissa bits
        b = np.asarray(x, np.float32).view(np.uint32)
        b = (b + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
        return b.view(np.float32).astype(np.float64)
    if mode == "bf16x2":
        hi = rnd(x, "bf16")
        return hi + rnd(np.asarray(x, np.float64) - hi, "bf16")
    raise ValueError(mode)


def a_blocks(xa, kb, G, mode):
    """sum_c xa_i kb_j exp(G_i - G_j) for j <= i (zeros above), formed as in PrepKernel: 16x16 blocks (I, J <= I),
    operands xa_i exp(min(G_i - G_r, 80)) and kb_j exp(G_r - G_j) rounded with `mode`, r = last row of J
    (off-diagonal) or row 7 of the block (diagonal; rows 7 / 15 per column half where the block decays > e^80; exact
    pairwise decays where a half-block does)."""
    sh = xa.shape[:-2]
    out = np.zeros(sh + (C, C))
    for Ib in range(4):
        for Jb in range(Ib + 1):
            ri = slice(16 * Ib, 16 * Ib + 16)
            diag = Ib == Jb
            for n in range(2):
                cj = slice(16 * Jb + 8 * n, 16 * Jb + 8 * n + 8)
                if diag:
                    gb = G[..., 16 * Ib:16 * Ib + 16, :]
                    m = np.max(gb[..., 0, :] - gb[..., 15, :], axis=-1)  # [...]
                    split = m > 80.0
                    r = np.where(split & (n == 1), 16 * Ib + 15, 16 * Ib + 7)
                    Gr = np.take_along_axis(G, r[..., None, None].astype(int), axis=-2) if np.ndim(r) else G[..., r:r + 1, :]
                else:
                    Gr = G[..., 16 * Jb + 15:16 * Jb + 16, :]
                A = rnd(xa[..., ri, :] * np.exp(np.minimum(G[..., ri, :] - Gr, 80.0)), mode)
                Bm = rnd(kb[..., cj, :] * np.exp(Gr - G[..., cj, :]), mode)
                blk = np.einsum("...ik,...jk->...ij", A, Bm)
                if diag:  # exact pairwise where a half-block decays more than e^80 (slow path)
                    gb = G[..., 16 * Ib:16 * Ib + 16, :]
                    mh = np.max(np.maximum(gb[..., 0, :] - gb[..., 7, :], gb[..., 8, :] - gb[..., 15, :]), axis=-1)
                    slow = mh > 80.0
                    if np.any(slow):
                        d = G[..., ri, None, :] - G[..., None, cj, :]
                        ex = np.einsum("...ik,...jk,...ijk->...ij", xa[..., ri, :], kb[..., cj, :],
                                       np.exp(np.minimum(d, 0.0)))
                        blk = np.where(slow[..., None, None], ex, blk)
                out[..., ri, cj] = blk
    return np.tril(out)


def emulate(q, k, v, g, beta, cfg):
    """q, k, v, g, beta: effective inputs (numpy float64) [B, T, HV, F] / [B, T, HV]; cfg: point -> mode.
    Returns o [B, T, HV, V]. One sequence per row, zero initial state."""
    m = lambda p: cfg.get(p, cfg.get(p.split("_")[0], "x"))  # "smem_q" falls back to "smem"
    B, T, HV, K = q.shape
    V = v.shape[-1]
    N = -(-T // C)
    pad = N * C - T

    def ch(x):  # [B, T, HV, F] -> [B, HV, N, C, F]
        x = np.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((B, N, C) + x.shape[2:])
        return np.moveaxis(x, 3, 1)

    q, k, v, g = (ch(np.asarray(x, np.float64)) for x in (q, k, v, g))
    bt = ch(np.asarray(beta, np.float64)[..., None])[..., 0]  # [B, HV, N, C]
    q, k, v = rnd(q, m("smem_q")), rnd(k, m("smem_k")), rnd(v, m("smem_v"))
    G = np.cumsum(g, axis=-2)
    Gl = G[..., -1:, :]
    D = np.exp(np.minimum(G[..., :, None, :] - G[..., None, :, :], 0.0))
    Akk = np.einsum("...ik,...jk,...ijk->...ij", k, k, D) if m("aop_kk") == "x" else a_blocks(k, k, G, m("aop_kk"))
    Aqk = np.einsum("...ik,...jk,...ijk->...ij", q, k, D) if m("aop_qk") == "x" else a_blocks(q, k, G, m("aop_qk"))
    Akk = np.tril(Akk, -1) * bt[..., :, None]
    Aqk = np.tril(Aqk)
    eye = np.eye(C)
    Tinv = np.linalg.inv(eye + Akk)  # unit lower triangular: exact up to float64
    rw = bt[..., None] * np.exp(G) * k
    ru = bt[..., None] * v
    if m("T") != "x":
        Tinv, rw, ru = rnd(Tinv, m("T")), rnd(rw, m("T")), rnd(ru, m("T"))
    W = rnd(Tinv @ rw, m("W"))
    U = rnd(Tinv @ ru, m("U"))
    Qg = rnd(np.exp(G) * q, m("Qg"))
    Kd = rnd(np.exp(Gl - G) * k, m("Kd"))
    Aqk = rnd(Aqk, m("Aqk"))
    gam = np.exp(Gl[..., 0, :])  # [B, HV, N, K]
    S = np.zeros((B, HV, K, V))
    o = np.zeros((B, HV, N, C, V))
    for n in range(N):
        Sb = rnd(S, m("S"))
        Rx = U[:, :, n] - W[:, :, n] @ Sb
        Rr = rnd(Rx, m("R"))
        o[:, :, n] = Qg[:, :, n] @ Sb + Aqk[:, :, n] @ Rr
        Rs = rnd(Rx, m("R_state"))  # R as the state update reads it (falls back to "R")
        S = gam[:, :, n, :, None] * S + np.swapaxes(Kd[:, :, n], -1, -2) @ Rs
    o = np.moveaxis(o, 1, 3).reshape(B, N * C, HV, V)[:, :T]
    return o


# ------------------------------------------------------------------------------------------------- problems
def problem(name, T, K, seed=0):
    """-> (raw args (q, k, v, g, beta) fp32, kwargs of kda)."""
    if name == "pre2":  # brief: g = -exp(N(0,1) - 2), beta sigmoid, l2norm
        ks = jax.random.split(jax.random.PRNGKey(seed), 5)
        sh = (1, T, 2, K)
        q, k, v = (jax.random.normal(ks[i], sh, jnp.float32) for i in range(3))
        g = -jnp.exp(jax.random.normal(ks[3], sh) - 2.0)
        beta = jax.random.normal(ks[4], (1, T, 2), jnp.float32)
        return (q, k, v, g, beta), dict(qk_l2norm=True, beta_sigmoid=True)
    if name in ("pre1", "bounded", "softplus"):  # make_problem distributions, l2norm + beta sigmoid
        gate = "precomputed" if name == "pre1" else name
        args, kw = make_problem(seed, B=1, T=T, H=2, K=K, V=K, gate=gate)
        kw.update(qk_l2norm=True, beta_sigmoid=True)
        return args, kw
    if name == "test_lengths":  # test_forward_lengths_and_plain_options[T-cuda]
        (q, k, v, g, beta), kw = make_problem(11, B=1, T=T, H=2, K=64, V=64)
        beta = jax.nn.sigmoid(beta)
        return (q * 0.25, k * 0.25, v, g, beta), {}
    if name.startswith("test_vmap"):  # test_vmap_and_checkpoint[cuda], instance 0 / 1 of the stacked batch
        (q, k, v, g, beta), kw = make_problem(19, B=2, T=20, H=2, K=64, V=64, gate="softplus")
        kw.update(qk_l2norm=True, beta_sigmoid=True)
        if name.endswith("1"):
            q, k, v, g, beta = (x[::-1] * 0.5 for x in (q, k, v, g, beta))
        return (q, k, v, g, beta), kw
    raise ValueError(name)


def effective(args, kw):
    core, opts = I.prepare(*args, **kw)
    q, k, v, g, beta = P.effective_inputs(core, opts)
    return [np.asarray(x, np.float64) for x in (q, k, v, g, beta)]


class Case:
    def __init__(self, name, T, K, seed=0):
        self.name = f"{name} T={T} K={K}"
        self.args, self.kw = problem(name, T, K, seed)
        self.ref = np.asarray(R.kda_recurrent(*self.args, **self.kw)[0], np.float64)
        self.eff = effective(self.args, self.kw)
        rounded = [jnp.asarray(rnd(np.asarray(x), "bf16"), jnp.float32) for x in self.args[:3]]
        self.eff_in = effective(tuple(rounded) + tuple(self.args[3:]), self.kw)

    def err(self, cfg):
        eff = self.eff_in if cfg.get("in", "x") == "bf16" else self.eff
        return rel_err(emulate(*eff, cfg), self.ref)


BRIEF = {p: "bf16" for p in ["W", "U", "Qg", "Kd", "Aqk", "S", "R"]}  # (a)-(g)
KERNEL = dict(BRIEF, smem="bf16", aop="bf16")  # what kda_fwd_prep.cu + kda_fwd_recur.cu do for fp32 inputs


def configs():
    out = [("all exact", {}), ("brief (a)-(g)", BRIEF), ("kernel (a)-(g)+smem+aop", KERNEL)]
    for p in ["W", "U", "Qg", "Kd", "Aqk", "S", "R", "T", "in", "smem", "aop"]:
        out.append((f"only {p}", {p: "bf16"}))
    for p in KERNEL:
        out.append((f"kernel - {p}", {q: mo for q, mo in KERNEL.items() if q != p}))
    return out


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "quick"
    t0 = time.time()
    if which == "quick":
        cases = [Case("pre2", 200, 128)]
        for name, cfg in configs()[:3]:
            print(f"{cases[0].name:28s} {name:30s} {cases[0].err(cfg):.3e}", flush=True)
    print(f"[{time.time() - t0:.1f}s]") if which == "quick" else None


def table(cases, cfgs):
    print(f"{'config':34s}" + "".join(f"{c.name[:13]:>14s}" for c in cases))
    for name, cfg in cfgs:
        print(f"{name:34s}" + "".join(f"{c.err(cfg):14.2e}" for c in cases), flush=True)


CASES = {
    "main": lambda: [Case("pre2", 200, 128), Case("pre2", 1000, 128), Case("pre2", 200, 64), Case("pre1", 200, 128),
                     Case("bounded", 200, 128), Case("test_lengths", 1, 64), Case("test_lengths", 130, 64),
                     Case("test_vmap0", 20, 64), Case("test_vmap1", 20, 64)],
}

if __name__ == "__main__" and which == "table":
    import warnings
    warnings.filterwarnings("ignore")
    table(CASES["main"](), configs())
    print(f"[{time.time() - t0:.1f}s]") if which == "quick" else None


def sub_configs():
    out = []
    for p in ["smem_q", "smem_k", "smem_v", "aop_kk", "aop_qk"]:
        out.append((f"only {p}", {p: "bf16"}))
    for p in ["smem_q", "smem_k", "smem_v", "aop_kk", "aop_qk"]:
        out.append((f"kernel - {p}", dict(KERNEL, **{p: "x"})))
    return out


def raise_(pts, mode, base=KERNEL):
    return dict(base, **{p: mode for p in pts})


def combo_configs():
    out = []
    sets = {
        "U,R": ["U", "R"],
        "smem,aop": ["smem", "aop"],
        "smem,aop,Aqk": ["smem", "aop", "Aqk"],
        "smem,aop,U,R": ["smem", "aop", "U", "R"],
        "smem,aop,Aqk,U,R": ["smem", "aop", "Aqk", "U", "R"],
        "smem,aop,Aqk,U,R,Kd": ["smem", "aop", "Aqk", "U", "R", "Kd"],
        "smem_qk,aop,Aqk,U,R": ["smem_q", "smem_k", "aop", "Aqk", "U", "R"],
        "smem,aop_qk,Aqk,U,R": ["smem", "aop_qk", "Aqk", "U", "R"],
        "all (a)-(g)+smem+aop": list(KERNEL),
    }
    for nm, pts in sets.items():
        out.append((f"x    {nm}", raise_(pts, "x")))
    for nm in ["smem,aop,Aqk,U,R", "smem,aop,Aqk,U,R,Kd", "all (a)-(g)+smem+aop"]:
        for mode in ["fp16", "tf32", "bf16x2"]:
            out.append((f"{mode:6s} {nm}", raise_(sets[nm], mode)))
    # mixed practical variants
    out.append(("smem x, aop tf32, Aqk/U/R/Kd fp16", dict(KERNEL, smem="x", aop="tf32", Aqk="fp16", U="fp16", R="fp16",
                                                        Kd="fp16")))
    out.append(("smem fp16, aop tf32, Aqk/U/R/Kd fp16", dict(KERNEL, smem="fp16", aop="tf32", Aqk="fp16", U="fp16",
                                                           R="fp16", Kd="fp16")))
    out.append(("smem x, aop tf32, Aqk fp16, U x, R bf16x2", dict(KERNEL, smem="x", aop="tf32", Aqk="fp16", U="x",
                                                                R="bf16x2")))
    out.append(("smem fp16, aop fp16, Aqk/U/R/Kd fp16", dict(KERNEL, smem="fp16", aop="fp16", Aqk="fp16", U="fp16",
                                                           R="fp16", Kd="fp16")))
    return out


CASES["sub"] = lambda: [Case("pre2", 200, 128), Case("pre2", 1000, 128), Case("pre2", 200, 64), Case("bounded", 200, 128),
                        Case("test_lengths", 1, 64), Case("test_lengths", 130, 64), Case("test_vmap1", 20, 64)]

if __name__ == "__main__" and which in ("sub", "combo"):
    import warnings
    warnings.filterwarnings("ignore")
    table(CASES["sub"](), sub_configs() if which == "sub" else combo_configs())
    print(f"[{time.time() - t0:.1f}s]")


def final_configs():
    base = dict(KERNEL)
    A = dict(base, smem="x", aop_qk="bf16x2", Aqk="fp16", U="fp16", R="fp16", Kd="fp16")
    return [
        ("kernel now (all bf16)", base),
        ("A: smem x, aop_qk bf16x2, Aqk/U/R/Kd fp16", A),
        ("B: A with aop_qk tf32", dict(A, aop_qk="tf32")),
        ("C: A with smem_q/k fp16 (v x)", dict(A, smem_q="fp16", smem_k="fp16")),
        ("D: A with smem fp16 (q,k,v)", dict(A, smem="fp16")),
        ("E: A with U x (fp32)", dict(A, U="x")),
        ("F: A with Kd bf16, R bf16x2, Aqk bf16x2", dict(A, Kd="bf16", R="bf16x2", Aqk="bf16x2")),
        ("G: A with aop_kk bf16x2 too", dict(A, aop_kk="bf16x2")),
        ("H: A with smem_k bf16", dict(A, smem_k="bf16")),
        ("I: A with smem_v bf16", dict(A, smem_v="bf16")),
        ("J: A with aop_qk tf32, smem fp16", dict(A, aop_qk="tf32", smem="fp16")),
    ]


CASES["final"] = lambda: [Case("pre2", 200, 128), Case("pre2", 1000, 128), Case("pre2", 200, 64), Case("pre1", 200, 128),
                          Case("bounded", 200, 128), Case("softplus", 200, 128), Case("test_lengths", 1, 64),
                          Case("test_lengths", 2, 64), Case("test_lengths", 17, 64), Case("test_lengths", 130, 64),
                          Case("test_vmap0", 20, 64), Case("test_vmap1", 20, 64)]

if __name__ == "__main__" and which == "final":
    import warnings
    warnings.filterwarnings("ignore")
    table(CASES["final"](), final_configs())
    print(f"[{time.time() - t0:.1f}s]")


def minus_configs():
    A = final_configs()[1][1]
    return [("A", A)] + [(f"A, {p} back to bf16", dict(A, **{p: "bf16"}))
                         for p in ["smem_q", "aop_qk", "Aqk", "U", "R", "Kd"]] + [
        ("A, Kd bf16 + R_state bf16", dict(A, Kd="bf16", R_state="bf16")),
        ("A, U,R bf16x2 (Kd bf16, R_state bf16x2)", dict(A, Kd="bf16", U="bf16x2", R="bf16x2", Aqk="fp16"))]


if __name__ == "__main__" and which == "minus":
    import warnings
    warnings.filterwarnings("ignore")
    table(CASES["final"](), minus_configs())
    print(f"[{time.time() - t0:.1f}s]")


def rec_configs():
    M = dict(KERNEL, smem="x", aop_qk="bf16x2", Aqk="fp16", U="fp16", R="fp16", R_state="bf16")
    return [("M: minimal (rest bf16)", M),
            ("M with aop_qk tf32", dict(M, aop_qk="tf32")),
            ("M with smem q/k fp16", dict(M, smem_q="fp16", smem_k="fp16")),
            ("M with smem q/k fp16, aop_qk tf32", dict(M, smem_q="fp16", smem_k="fp16", aop_qk="tf32")),
            ("M with U fp32", dict(M, U="x"))]


if __name__ == "__main__" and which == "rec":
    import warnings
    warnings.filterwarnings("ignore")
    table(CASES["final"](), rec_configs())
    print(f"[{time.time() - t0:.1f}s]")
