"""Rounding model of grad2's stage 5 on tensor cores (cutlass/kda_bwd_chunk.cu: Grad2DaMma, the default
Grad2Kernel<K, TIn, kFactored = true, .>) on the float64 model of tests/test_bwd_algorithm.py. CPU only.

Stage 5 forms dA = -strict_tril(dKb W^T + dVb U^T) (64 x 64 x (K + V)) from the f32 W | U (sX) and dKb | dVb (sY)
in smem. The first version sums in fp32 SIMT; the factored kernel uses mma.sync m16n8k8 with tf32 operands
(cvt.rna: 10 explicit mantissa bits, ties away from zero) and fp32 accumulation. This file replays grad2 as
tests/test_grad2_solve_model.py does (its grad2_replay, with the dA line swapped for the rounded product) and
bounds stage 5's share of every gradient's error: alone (everything else exact) within the same budget the solve
model grants the mma solve (1/4 of the GPU tolerances of tests/test_cuda_bwd.py, dA_log 1/2), and on top of the
default kernel's other roundings (grad2 v2 + mma solve) within that budget again. bf16 operands are reported too
(run as a script for the table): they are what the kernel would use with the bf16 m16n8k16 mma.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import test_grad2_solve_model as SM

f32, f64 = np.float32, np.float64
NAMES = SM.NAMES
_DA_LINE = "dA = -np.tril(dKb @ Wm.T + dVb @ Um.T, -1)"


def tf32(x):
    """cvt.rna.tf32.f32 of the f32 value of x (as float64)."""
    u = np.asarray(x, f64).astype(f32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x1000) & 0xFFFFE000).astype(np.uint32)
    return u.view(f32).astype(f64)


def bf16(x):
    return SM._bf16(x)


def _replay_with(rnd):
    """SM.grad2_replay with stage 5's operands rounded by rnd (f32 first: they are f32 in smem)."""
    src = inspect.getsource(SM.grad2_replay)
    assert src.count(_DA_LINE) == 1, "grad2_replay's dA line changed: update this model"
    new = src.replace(_DA_LINE, "dA = -np.tril(_RND(dKb) @ _RND(Wm).T + _RND(dVb) @ _RND(Um).T, -1)")
    env = dict(SM.__dict__)
    env["_RND"] = lambda x: rnd(SM._r32(x))
    exec(compile(new, SM.__file__, "exec"), env)
    return env["grad2_replay"]


def errors(args, kw):
    st = {}
    ref = SM.A.chunked_backward(*args, **kw, stages=st)
    out = {}
    variants = (
        ("base", SM.grad2_replay, SM.solve_exact, False),
        ("st5tf32", _replay_with(tf32), SM.solve_exact, False),
        ("st5bf16", _replay_with(bf16), SM.solve_exact, False),
        ("v2+mma", SM.grad2_replay, SM.solve_mma, True),
        ("v2+mma+tf32", _replay_with(tf32), SM.solve_mma, True),
        ("v2+mma+bf16", _replay_with(bf16), SM.solve_mma, True),
    )
    for name, rep, solve, v2 in variants:
        got = rep(args, kw, st, solve, v2)
        out[name] = {n: SM._rel(got[n], ref[n]) for n in NAMES}
    for n in NAMES:
        assert out["base"][n] < 1e-10, n
    return out


def test_tf32_rounding():
    x = np.array([1.0, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -12, -(1.0 + 2.0 ** -11), 3.0e-3], f64)
    r = tf32(x)
    assert r[0] == 1.0 and r[1] == 1.0 + 2.0 ** -10 and r[2] == 1.0 + 2.0 ** -10 and r[3] == -(1.0 + 2.0 ** -10)
    assert abs(r[4] / 3.0e-3 - 1.0) <= 2.0 ** -11


@pytest.mark.parametrize("case", SM.CASES, ids=[c[0] for c in SM.CASES])
def test_grad2_stage5_tf32_error_within_budget(case):
    name, pk = case
    e = errors(*SM.problem(**pk))
    for n in NAMES:
        assert e["st5tf32"][n] < SM.BOUND[n], f"{name} d{n}: stage 5 tf32 {e['st5tf32'][n]:.3e}"
        assert e["v2+mma+tf32"][n] < e["v2+mma"][n] + SM.BOUND[n], f"{name} d{n}: {e['v2+mma+tf32'][n]:.3e}"


if __name__ == "__main__":
    cols = ("st5tf32", "st5bf16", "v2+mma", "v2+mma+tf32", "v2+mma+bf16")
    print(f"{'case':28s} {'variant':12s} " + " ".join(f"{'d' + n:>9s}" for n in NAMES))
    for name, pk in SM.CASES:
        e = errors(*SM.problem(**pk))
        for var in cols:
            print(f"{name:28s} {var:12s} " + " ".join(f"{e[var][n]:9.2e}" for n in NAMES))
