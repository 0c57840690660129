"""The CUDA forward kernel (flashkda_fwd on GPU) against the fp32 oracle. Skipped without a GPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_testing import chunk_crossing_segments, cuda_kernels_present, gpu_visible, rel_err, random_state, requires_cuda_kernels, run_child

pytestmark = requires_cuda_kernels()

if gpu_visible():
    import flashkda_jax as F
    from flashkda_jax import _capabilities as _caps
    from flashkda_jax import _ffi
    from flashkda_jax import reference as R

    if cuda_kernels_present():
        _caps.CUDA_FWD_READY = True  # this file tests the kernel itself

BF16_TOL = 5e-3
# float32 inputs run the float32 recurrence (cutlass/kda_fwd_f32.cu): float32 rounding only, against DESIGN §5's
# 2e-3 for the GPU. A bar 20x under that still fails on any bf16 / tf32 operand (those give 1e-3 to 5e-3).
FP32_TOL = 1e-4


def _inputs(seed, B, T, H, HV, K, V, dtype, gate="bounded", strong=False):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, HV, V), jnp.float32)
    beta = jax.random.normal(ks[4], (B, T, HV), jnp.float32)
    kw = dict(qk_l2norm=True, beta_sigmoid=True)
    if gate == "precomputed":
        g = -jnp.exp(jax.random.normal(ks[3], (B, T, HV, K)) - 2.0)
        if strong:
            g = g * 1e4
    else:
        g = jax.random.normal(ks[3], (B, T, HV, K)) * (30.0 if strong else 1.0)
        kw["gate"] = gate
        kw["A_log"] = jax.random.normal(ks[5], (HV,)) * 0.5 + (3.0 if strong else -1.0)
        kw["dt_bias"] = jax.random.normal(ks[6], (HV, K)) * 0.5
        if gate == "bounded":
            kw["lower_bound"] = -5.0
    c = lambda x: x.astype(dtype)
    return (c(q), c(k), c(v), c(g), c(beta)), kw


def _run(args, impl, **kw):
    return jax.jit(lambda *a: F.kda(*a, implementation=impl, **kw))(*args)


def _ref(args, **kw):
    return jax.jit(lambda *a: R.kda_recurrent(*[x.astype(jnp.float32) for x in a], **kw))(*args)


def _tol(out):
    """The oracle tolerance of a result (o, final state) by o's dtype."""
    return FP32_TOL if out[0].dtype == jnp.float32 else BF16_TOL


def _check(out, ref, tol, what=""):
    o, fin = out
    ro, rfin = ref
    assert np.all(np.isfinite(np.asarray(o, np.float32))), what
    e = rel_err(o, ro)
    assert e <= tol, f"{what} o rel err {e}"
    if rfin is not None:
        ef = rel_err(fin, rfin)
        assert ef <= tol, f"{what} final state rel err {ef}"


@pytest.mark.parametrize("gate", ["precomputed", "softplus", "bounded"])
@pytest.mark.parametrize("KV", [64, 128])
def test_gates_gva_states(gate, KV):
    B, T, H, HV = 2, 200, 2, 4
    args, kw = _inputs(1, B, T, H, HV, KV, KV, jnp.bfloat16, gate)
    init = random_state(3, (B, HV, KV, KV))
    kw.update(initial_state=init, return_final_state=True)
    _check(_run(args, "cuda", **kw), _ref(args, **kw), BF16_TOL, f"{gate} K={KV}")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_dtypes(dtype):
    B, T, H, HV, K = 1, 150, 2, 2, 128
    args, kw = _inputs(2, B, T, H, HV, K, K, dtype, "softplus")
    kw.update(return_final_state=True, allow_neg_eigval=True, scale=0.2)
    out = _run(args, "cuda", **kw)
    assert out[0].dtype == dtype
    _check(out, _ref(args, **kw), FP32_TOL if dtype == jnp.float32 else BF16_TOL, str(dtype))


def test_head_dim_256():
    B, T, H, HV, K = 1, 130, 1, 2, 256
    args, kw = _inputs(4, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    kw.update(initial_state=random_state(5, (B, HV, K, K)), return_final_state=True)
    _check(_run(args, "cuda", **kw), _ref(args, **kw), BF16_TOL, "K=256")


def test_state_layout_vk_no_l2norm():
    B, T, H, HV, K = 2, 96, 2, 2, 64
    args, kw = _inputs(6, B, T, H, HV, K, K, jnp.bfloat16, "precomputed")
    q, k, v, g, beta = args
    # unit-norm keys without in-kernel l2norm (the delta rule is stable for |k| = 1, beta in (0, 1)).
    kf = k.astype(jnp.float32)
    k = (kf / jnp.linalg.norm(kf, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    args = (q, k, v, g, beta)
    kw.update(qk_l2norm=False, state_layout="vk", initial_state=random_state(7, (B, HV, K, K)),
              return_final_state=True)
    _check(_run(args, "cuda", **kw), _ref(args, **kw), BF16_TOL, "vk")


def test_strong_gates_finite():
    for gate in ("precomputed", "softplus"):
        B, T, H, HV, K = 1, 140, 1, 2, 128
        args, kw = _inputs(8, B, T, H, HV, K, K, jnp.bfloat16, gate, strong=True)
        kw.update(initial_state=random_state(9, (B, HV, K, K)), return_final_state=True)
        _check(_run(args, "cuda", **kw), _ref(args, **kw), BF16_TOL, f"strong {gate}")


def test_segment_ids_ragged():
    B, T, H, HV, K = 2, 400, 1, 2, 128
    args, kw = _inputs(10, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    seg = jnp.asarray(chunk_crossing_segments(B, T, 11))
    S = 6  # fewer slots than sequences: later sequences start from zero and keep no state
    kw.update(segment_ids=seg, max_segments=S, initial_state=random_state(12, (B, S, HV, K, K)),
              return_final_state=True)
    out = _run(args, "cuda", **kw)
    ref = _ref(args, **kw)
    _check(out, ref, BF16_TOL, "segments")
    pad = np.asarray(seg) == 0
    assert np.all(np.asarray(out[0], np.float32)[pad] == 0.0)


def test_cu_seqlens_with_empty_sequence():
    T, H, HV, K = 300, 2, 2, 64
    args, kw = _inputs(13, 1, T, H, HV, K, K, jnp.bfloat16, "softplus")
    cu = jnp.asarray([0, 70, 70, 71, 200, 290], jnp.int32)  # empty, length-1, tail padding
    N = cu.shape[0] - 1
    kw.update(cu_seqlens=cu, initial_state=random_state(14, (N, HV, K, K)), return_final_state=True)
    _check(_run(args, "cuda", **kw), _ref(args, **kw), BF16_TOL, "cu_seqlens")


@pytest.mark.parametrize("gate", ["precomputed", "softplus", "bounded"])
@pytest.mark.parametrize("K", [64, 128, 256])
def test_float32_recurrence(gate, K):
    # float32 inputs in every option at once: GVA, in-kernel gates and beta, segments (more sequences than slots:
    # the later ones start from zero and keep no state), both state layouts, T not a multiple of the kernel's
    # token chunk (4096 / K), the negative-eigenvalue beta with the softplus gate.
    B, T, H, HV = 2, 211, 1, 2
    args, kw = _inputs(50 + K, B, T, H, HV, K, K, jnp.float32, gate)
    seg = jnp.asarray(chunk_crossing_segments(B, T, 51))
    S = 3
    kw.update(segment_ids=seg, max_segments=S, initial_state=random_state(52, (B, S, HV, K, K)),
              return_final_state=True, state_layout="vk" if K == 64 else "kv", allow_neg_eigval=gate == "softplus")
    out = _run(args, "cuda", **kw)
    assert out[0].dtype == jnp.float32
    _check(out, _ref(args, **kw), FP32_TOL, f"float32 {gate} K={K}")
    assert np.all(np.asarray(out[0])[np.asarray(seg) == 0] == 0.0)


@pytest.mark.parametrize("K, HV", [(64, 72), (128, 36), (256, 12)])
def test_float32_recurrence_wide_grid(K, HV):
    # Enough (row, head, column block) CTAs to fill an H100 / H200 with several columns per lane: the float32
    # kernel's other instantiation (LaunchFwdF32: 4 columns per lane, 2 at K = 256; the small cases above take 1).
    B, T, H = 2, 75, HV // 4
    args, kw = _inputs(60 + K, B, T, H, HV, K, K, jnp.float32, "softplus")
    seg = jnp.asarray(chunk_crossing_segments(B, T, 61))
    S = 2
    kw.update(segment_ids=seg, max_segments=S, initial_state=random_state(62, (B, S, HV, K, K)),
              return_final_state=True, state_layout="vk" if K == 128 else "kv")
    _check(_run(args, "cuda", **kw), _ref(args, **kw), FP32_TOL, f"float32 wide K={K}")


def test_float32_strong_gates_cu_seqlens_plain():
    # Gates far past any bound (decays to e^-80 and below), cu_seqlens with an empty and a one-token sequence, and
    # the plain options (no l2norm, no beta sigmoid: unit-norm keys, beta in (0, 1)).
    T, H, HV, K = 300, 2, 2, 128
    for gate in ("precomputed", "softplus"):
        args, kw = _inputs(53, 1, T, H, HV, K, K, jnp.float32, gate, strong=True)
        cu = jnp.asarray([0, 70, 70, 71, 200, 290], jnp.int32)
        kw.update(cu_seqlens=cu, initial_state=random_state(54, (5, HV, K, K)), return_final_state=True)
        _check(_run(args, "cuda", **kw), _ref(args, **kw), FP32_TOL, f"float32 strong {gate}")
    q, k, v, g, beta = _inputs(55, 2, 97, H, HV, K, K, jnp.float32, "precomputed")[0]
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    args = (q, k, v, g, jax.nn.sigmoid(beta))
    kw = dict(initial_state=random_state(56, (2, HV, K, K)), return_final_state=True, scale=0.3)
    _check(_run(args, "cuda", **kw), _ref(args, **kw), FP32_TOL, "float32 plain")


@pytest.mark.parametrize("with_state", [False, True])
def test_float32_every_output_written(with_state):
    # As test_every_output_written, on the float32 recurrence (its own kernel, and final states copied first).
    B, T, H, HV, K = 2, 300, 1, 2, 64
    args, kw = _inputs(57, B, T, H, HV, K, K, jnp.float32, "bounded")
    seg = np.zeros((B, T), np.int32)
    seg[0, :100], seg[0, 100:230], seg[0, 230:] = 1, 2, 3
    seg[1, 5:180] = 1
    S = 5
    kw.update(segment_ids=jnp.asarray(seg), max_segments=S, return_final_state=True)
    if with_state:
        kw["initial_state"] = random_state(58, (B, S, HV, K, K))
    f = jax.jit(lambda *a: F.kda(*a, implementation="cuda", **kw))
    first = f(*args)
    _poison_allocator()
    out = f(*args)
    _check(out, _ref(args, **kw), FP32_TOL, f"float32 poisoned outputs, initial state: {with_state}")
    fin = np.asarray(out[1])
    want = np.asarray(kw["initial_state"]) if with_state else np.zeros_like(fin)
    assert np.array_equal(fin[0, 3:], want[0, 3:]) and np.array_equal(fin[1, 1:], want[1, 1:])
    assert np.all(np.asarray(out[0])[seg == 0] == 0.0)
    assert np.array_equal(np.asarray(out[0]), np.asarray(first[0])), "float32 recurrence: bits differ between runs"
    assert np.array_equal(fin, np.asarray(first[1]))


def _poison_allocator(nbytes=64 << 20, pieces=64):
    """Fill memory the allocator will hand out again with NaN: any output element a kernel leaves unwritten then
    reads as NaN (jax's allocator reuses freed blocks of this process)."""
    junk = [jnp.full((nbytes // pieces // 4,), jnp.nan, jnp.float32) for _ in range(pieces)]
    jax.block_until_ready(junk)
    del junk


@pytest.mark.parametrize("with_state", [False, True])
def test_every_output_written(with_state):
    # Poisoned outputs: o and every final state, including the slots that own no token (more slots than a row has
    # sequences: their final state is the initial state, or zeros without one, written without the recurrence).
    B, T, H, HV, K = 2, 300, 1, 2, 128
    args, kw = _inputs(43, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    seg = np.zeros((B, T), np.int32)
    seg[0, :100], seg[0, 100:230], seg[0, 230:] = 1, 2, 3   # 3 sequences
    seg[1, 5:180] = 1                                       # 1 sequence, padding around it
    S = 5
    kw.update(segment_ids=jnp.asarray(seg), max_segments=S, return_final_state=True)
    if with_state:
        kw["initial_state"] = random_state(44, (B, S, HV, K, K))
    f = jax.jit(lambda *a: F.kda(*a, implementation="cuda", **kw))
    jax.block_until_ready(f(*args))  # compiled, so that the next call allocates only its buffers
    _poison_allocator()
    out = f(*args)
    ref = _ref(args, **kw)
    assert np.all(np.isfinite(np.asarray(out[1]))), "an unwritten final state"
    _check(out, ref, BF16_TOL, f"poisoned outputs, initial state: {with_state}")
    fin = np.asarray(out[1])
    want = np.asarray(kw["initial_state"]) if with_state else np.zeros_like(fin)
    assert np.array_equal(fin[0, 3:], want[0, 3:]) and np.array_equal(fin[1, 1:], want[1, 1:])
    assert np.all(np.asarray(out[0], np.float32)[seg == 0] == 0.0)


@pytest.mark.parametrize("K", [64, 128])
def test_long_sequence_split(K):
    # Few (B x HV) chains: the kernel splits the sequence into segments and composes their maps.
    B, T, H, HV = 1, 3000, 1, 2
    args, kw = _inputs(15, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    kw.update(initial_state=random_state(16, (B, HV, K, K)), return_final_state=True)
    _check(_run(args, "cuda", **kw), _ref(args, **kw), BF16_TOL, "split")


@pytest.mark.parametrize("T, gate", [(330, "bounded"), (2048, "softplus")])
def test_full_width_recurrence(T, gate):
    # K = 128 with B x HV >= 64 chains: the recurrence runs over all 128 value columns on 16 warps (BlockV in
    # cutlass/kda_fwd_common.cuh; the other tests have fewer chains). T = 2048 also splits the sequence into
    # segments: phase 1 over the V + K map columns at that width, then the composition.
    from flashkda_jax import _workspace

    B, H, HV, K = 1, 16, 64, 128
    assert _workspace._block_v(K, B, HV) == 128
    assert (_workspace.cuda_fwd_seglen(B, T, HV, K, K) < T // 64) == (T == 2048)
    args, kw = _inputs(41, B, T, H, HV, K, K, jnp.bfloat16, gate)
    kw.update(initial_state=random_state(42, (B, HV, K, K)), return_final_state=True)
    _check(_run(args, "cuda", **kw), _ref(args, **kw), BF16_TOL, f"full width, T = {T}")


@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("T", [130, 3000])
def test_map_columns_v_is_2k(K, T, monkeypatch):
    # V = 2 K: the FFI takes it for context parallelism's combined run (values | map columns; not kda()'s
    # public head dims, so the capability is widened here). Split (T = 3000) and unsplit, with states.
    monkeypatch.setattr(_caps, "CUDA_FWD_HEAD_DIMS", _caps.CUDA_FWD_HEAD_DIMS | _caps.CUDA_FWD_MAP_HEAD_DIMS)
    B, H, HV = 1, 1, 2
    args, kw = _inputs(21, B, T, H, HV, K, 2 * K, jnp.bfloat16, "bounded")
    kw.update(initial_state=random_state(22, (B, HV, K, 2 * K)), return_final_state=True)
    _check(_run(args, "cuda", **kw), _ref(args, **kw), BF16_TOL, f"V = 2K, T = {T}")


def test_split_varlen_and_deterministic():
    T, H, HV, K = 2500, 1, 1, 128
    args, kw = _inputs(17, 1, T, H, HV, K, K, jnp.bfloat16, "bounded")
    cu = jnp.asarray([0, 1100, 1105, 2400], jnp.int32)
    kw.update(cu_seqlens=cu, initial_state=random_state(18, (3, HV, K, K)), return_final_state=True)
    out1 = _run(args, "cuda", **kw)
    out2 = _run(args, "cuda", **kw)
    _check(out1, _ref(args, **kw), BF16_TOL, "split varlen")
    assert np.array_equal(np.asarray(out1[0], np.float32), np.asarray(out2[0], np.float32))
    assert np.array_equal(np.asarray(out1[1]), np.asarray(out2[1]))


def test_short_and_vmap():
    B, T, H, HV, K = 3, 1, 1, 2, 64
    args, kw = _inputs(19, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    kw.update(return_final_state=True)
    # T=1: o is beta (q.k) v per (row, head): 6 scalars carry all of the bf16 rounding, so the measure is
    # noisy; 1e-2 still catches any wrong term.
    _check(_run(args, "cuda", **kw), _ref(args, **kw), 1e-2, "T=1")
    # vmap over an extra leading axis of every operand.
    args, kw = _inputs(20, 2, 70, 1, 1, K, K, jnp.bfloat16, "bounded")
    stacked = tuple(jnp.stack([a, a[::-1]]) for a in args)
    f = jax.jit(jax.vmap(lambda *a: F.kda(*a, implementation="cuda", **kw)[0]))
    out = f(*stacked)
    for i in range(2):
        ref = _ref(tuple(s[i] for s in stacked), **kw)[0]
        assert rel_err(out[i], ref) <= BF16_TOL


_SOLVE_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax.numpy as jnp
import numpy as np
import test_cuda_fwd as t
from kda_testing import random_state

def case(name, seed, B, T, H, HV, K, gate, strong=False, **extra):
    args, kw = t._inputs(seed, B, T, H, HV, K, K, jnp.bfloat16, gate, strong)
    kw.update(return_final_state=True, **extra)
    if "cu_seqlens" not in extra:
        kw["initial_state"] = random_state(seed + 1, (B, HV, K, K))
    out = t._run(args, "cuda", **kw)
    t._check(out, t._ref(args, **kw), t.BF16_TOL, "simt solve " + name)
    print("ok", name, flush=True)
    return out

out = case("bounded K=128", 1, 2, 200, 2, 4, 128, "bounded")
np.save(sys.argv[2], np.asarray(out[0], np.float32))
case("softplus K=64", 2, 2, 200, 2, 4, 64, "softplus")
case("precomputed K=128", 3, 1, 150, 1, 2, 128, "precomputed")
case("bounded K=256", 4, 1, 130, 1, 2, 256, "bounded")
case("strong softplus K=128", 8, 1, 140, 1, 2, 128, "softplus", strong=True)
case("cu_seqlens K=64", 13, 1, 300, 2, 2, 64, "softplus", cu_seqlens=jnp.asarray([0, 70, 70, 71, 200, 290], jnp.int32))
case("split K=128", 15, 1, 3000, 1, 2, 128, "bounded")
"""


def test_simt_solve_env(tmp_path):
    # The prep kernel's WY solve: tensor cores by default for bf16 / fp16 inputs (this process), the SIMT
    # substitution under FLASHKDA_FWD_SOLVE=simt (read once per process at the first launch). A fresh process
    # runs the forward with the SIMT solve against the oracle at the usual tolerance; its first output must
    # differ from this process's in some bits, or the switch did nothing.
    import os

    out, saved = run_child(_SOLVE_CHILD, tmp_path, "simt_o.npy", env={"FLASHKDA_FWD_SOLVE": "simt"},
                           what="simt solve run", timeout=900)
    assert out.count("ok ") == 7, out
    args, kw = _inputs(1, 2, 200, 2, 4, 128, 128, jnp.bfloat16, "bounded")
    kw.update(initial_state=random_state(2, (2, 4, 128, 128)), return_final_state=True)
    if os.environ.get("FLASHKDA_FWD_SOLVE") is None:  # this process runs the default (mma for bf16)
        default = np.asarray(_run(args, "cuda", **kw)[0], np.float32)
        assert not np.array_equal(default, np.load(saved)), "FLASHKDA_FWD_SOLVE=simt gave the default solve's bits"


_PREP_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax.numpy as jnp
import numpy as np
import test_cuda_fwd as t

outs = {}
for name, K, lb in (("k128", 128, -5.0), ("k64", 64, -5.0), ("lb9", 128, -9.0)):
    args, kw = t._inputs(31, 2, 200, 2, 4, K, K, jnp.bfloat16, "bounded")
    kw.update(lower_bound=lb, return_final_state=True)
    out = t._run(args, "cuda", **kw)
    t._check(out, t._ref(args, **kw), t.BF16_TOL, "general prep " + name)
    outs[name] = np.asarray(out[0], np.float32)
np.savez(sys.argv[2], **outs)
"""


def test_bounded_prep_against_general(tmp_path):
    # gate="bounded" with lower_bound >= -8 (K in {64, 128}, 2-byte inputs) takes the bounded prep
    # (cutlass/kda_fwd_prep_bounded.cu) in this process; a fresh process with FLASHKDA_FWD_PREP=general runs the
    # general one. Both must meet the oracle's tolerance; their outputs must differ in some bits (or the switch
    # did nothing), and be bit-identical where the bounded prep does not apply (lower_bound -9).
    import os

    if os.environ.get("FLASHKDA_FWD_PREP") is not None:
        pytest.skip("FLASHKDA_FWD_PREP is set in this process")
    _, saved = run_child(_PREP_CHILD, tmp_path, "general.npz", env={"FLASHKDA_FWD_PREP": "general"},
                         what="general prep run", timeout=900)
    general = np.load(saved)
    for name, K, lb in (("k128", 128, -5.0), ("k64", 64, -5.0), ("lb9", 128, -9.0)):
        args, kw = _inputs(31, 2, 200, 2, 4, K, K, jnp.bfloat16, "bounded")
        kw.update(lower_bound=lb, return_final_state=True)
        out = _run(args, "cuda", **kw)
        _check(out, _ref(args, **kw), BF16_TOL, "bounded prep " + name)
        o = np.asarray(out[0], np.float32)
        if lb < -8:
            assert np.array_equal(o, general[name]), f"{name}: lower_bound {lb} must take the general prep"
        else:
            assert not np.array_equal(o, general[name]), f"{name}: FLASHKDA_FWD_PREP=general changed nothing"


_CASES_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import test_cuda_fwd as t

outs = {}
for name, case in getattr(t, sys.argv[3])().items():
    out, ref = case()
    t._check(out, ref, t._tol(out), "child run " + name)
    outs[name] = np.asarray(out[0], np.float32)
    outs[name + "_final"] = np.asarray(out[1], np.float32)
np.savez(sys.argv[2], **outs)
"""


def _assert_same_bits_as_child(tmp_path, table, env, what):
    """Runs every case of ``table`` (the name of a function here returning {name: () -> (out, ref)}, out = (o,
    final state)) in this process and in a fresh one with ``env`` added (the kernel switches are read once per
    process): both meet the oracle's tolerance, and their outputs and final states are bit-identical."""
    _, saved = run_child(_CASES_CHILD, tmp_path, table + ".npz", table, env=env, what=what, timeout=900)
    other = np.load(saved)
    for name, case in globals()[table]().items():
        out, ref = case()
        _check(out, ref, _tol(out), f"{what}, this process: {name}")
        assert np.array_equal(np.asarray(out[0], np.float32), other[name]), f"{name}: outputs"
        assert np.array_equal(np.asarray(out[1], np.float32), other[name + "_final"]), f"{name}: final states"


# The recurrence's configurations with a wgmma step 1 (cutlass/kda_fwd_recur.cu): 128 columns on 16 warps
# (B x HV >= 64), with a split sequence (phase 1 over the map columns too), 64 columns on 8 warps at K = 128 and 64.
_STEP1_CASES = {"k128_full": (1, 200, 16, 64, 128), "k128_full_split": (1, 2048, 16, 64, 128),
                "k128_64cols": (1, 200, 2, 4, 128), "k64": (2, 3000, 1, 2, 64)}


def _step1_case(name):
    B, T, H, HV, K = _STEP1_CASES[name]
    args, kw = _inputs(51, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    kw.update(initial_state=random_state(52, (B, HV, K, K)), return_final_state=True)
    return _run(args, "cuda", **kw), _ref(args, **kw)


def _step1_cases():
    return {name: functools.partial(_step1_case, name) for name in _STEP1_CASES}


def test_recur_step1_mma_env(tmp_path):
    # Step 1 of the forward recurrence (R = U - W S, O = Qg S) runs on wgmma by default for K in {64, 128}; a fresh
    # process with FLASHKDA_FWD_RECUR_STEP1=mma runs it on mma.sync. Both must meet the oracle's tolerance, and give
    # the same bits: the same bf16 products summed over the same k-steps in the same order (an H100 gives identical
    # outputs and final states), so any slip in the wgmma operands' layouts shows here.
    import os

    if os.environ.get("FLASHKDA_FWD_RECUR_STEP1") is not None:
        pytest.skip("FLASHKDA_FWD_RECUR_STEP1 is set in this process")
    _assert_same_bits_as_child(tmp_path, "_step1_cases", {"FLASHKDA_FWD_RECUR_STEP1": "mma"}, "mma.sync step 1 run")


# Configurations where the prep and the recurrence overlap (cutlass/kda_fwd_overlap.h: gate "bounded" with
# lower_bound >= -8, bf16). Phase 3 after the prep (one segment per sequence): 96 heads of 128 columns (96 of the SMs
# freed early, the chunk list over three plan tiles), two rows over two tiles each (the list's tile-major order),
# 64-column CTAs two per SM, and a varlen batch at K = 64. Phase 1 after the prep (split sequences): 64 chains of 128
# columns in two segments, and K = 64 rows split into several. (B, T, H, HV, K, cu_seqlens)
_OVERLAP_CASES = {"h96": (1, 2100, 8, 96, 128, None), "b2_tiles": (2, 1100, 4, 48, 128, None),
                  "b2_64cols": (2, 500, 4, 16, 128, None), "varlen_k64": (1, 700, 2, 8, 64, (0, 70, 71, 300, 700)),
                  "split_k128": (1, 2048, 16, 64, 128, None), "split_k64": (2, 3000, 1, 2, 64, None)}


def _overlap_case(name):
    B, T, H, HV, K, cu = _OVERLAP_CASES[name]
    args, kw = _inputs(61, B, T, H, HV, K, K, jnp.bfloat16, "bounded")
    if cu is None:
        kw.update(initial_state=random_state(62, (B, HV, K, K)), return_final_state=True)
    else:
        kw.update(cu_seqlens=jnp.asarray(cu, jnp.int32), return_final_state=True)
    return _run(args, "cuda", **kw), _ref(args, **kw)


def _overlap_cases():
    return {name: functools.partial(_overlap_case, name) for name in _OVERLAP_CASES}


@pytest.mark.parametrize("child_env", [{"FLASHKDA_FWD_OVERLAP": "0"},
                                       {"FLASHKDA_FWD_OVERLAP_TAIL": "1000", "FLASHKDA_FWD_OVERLAP_TAIL1": "1000"}],
                         ids=["sequential", "chase_every_chunk"])
def test_prep_recurrence_overlap_env(tmp_path, child_env):
    # By default the recurrence kernel after the bounded prep runs beside its last items and waits per chunk for it;
    # a fresh process runs either the kernels one after the other (FLASHKDA_FWD_OVERLAP=0), or the overlap with the
    # prep's CTAs on the recurrence's SMs stopping at once (a tail share of 1000 x (SMs - R) / R >= 1), so that the
    # recurrence starts with the prep and waits at nearly every chunk. The item order and the overlap change no
    # arithmetic: outputs and final states must be bit-identical to this process's, and meet the oracle's tolerance.
    import os

    if any(os.environ.get(n) is not None
           for n in ("FLASHKDA_FWD_OVERLAP", "FLASHKDA_FWD_OVERLAP_TAIL", "FLASHKDA_FWD_OVERLAP_TAIL1")):
        pytest.skip("an overlap switch is set in this process")
    _assert_same_bits_as_child(tmp_path, "_overlap_cases", child_env, f"overlap run {child_env}")


# XLA flags that put every custom call into a CUDA graph (command buffer), however short the sequence.
_GRAPH_FLAGS = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
_GRAPH_SEEDS = (71, 72)
_graph_fns = {}


def _graph_case(seed, dtype):
    # One jitted call (compiled once per dtype) replayed with new segment ids of the same shape; B x HV = 64 chains
    # of 128 columns, one segment per sequence: with bf16 the prep / recurrence overlap applies; float32 takes its
    # own recurrence (4 columns per lane at this width).
    B, T, H, HV, K, S = 2, 600, 4, 32, 128, 8
    args, kw = _inputs(70, B, T, H, HV, K, K, dtype, "bounded")
    kw.update(max_segments=S, initial_state=random_state(73, (B, S, HV, K, K)), return_final_state=True)
    name = jnp.dtype(dtype).name
    if name not in _graph_fns:
        _graph_fns[name] = jax.jit(lambda seg, *a: F.kda(*a, segment_ids=seg, implementation="cuda", **kw))
    seg = jnp.asarray(chunk_crossing_segments(B, T, seed))
    return _graph_fns[name](seg, *args), _ref(args, segment_ids=seg, **kw)


def _graph_cases():
    return {f"{jnp.dtype(dt).name}_segments{seed}": functools.partial(_graph_case, seed, dt)
            for dt in (jnp.bfloat16, jnp.float32) for seed in _GRAPH_SEEDS}


def test_overlap_under_command_buffers(tmp_path):
    # The handler is declared compatible with XLA's command buffers; its launches (the recurrence as the prep's
    # programmatic dependent included, and the float32 path's state copy and kernel) must work when captured into a
    # CUDA graph and replayed with new segment ids.
    # A fresh process forces command buffers for custom calls; its results must meet the oracle's tolerance and equal
    # this process's (no forced graphs) bit for bit.
    import os

    if "xla_gpu_enable_command_buffer" in os.environ.get("XLA_FLAGS", ""):
        pytest.skip("XLA_FLAGS already sets command buffers in this process")
    flags = (os.environ.get("XLA_FLAGS", "") + " " + _GRAPH_FLAGS).strip()
    _assert_same_bits_as_child(tmp_path, "_graph_cases", {"XLA_FLAGS": flags}, "command-buffer run")
