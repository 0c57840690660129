"""The CUDA backward (flashkda_bwd on GPU) stage by stage: its workspace read back and compared with the float64
model of tests/test_bwd_algorithm.py (chunked_backward(stages=...)), so that one GPU run tells which stage is
wrong. One test function per stage, in the order the handler runs them (cutlass/kda_bwd_cuda.cu):

  stage1 plan     counters, chunk / sequence lists (compacted with atomics: compared as sets), seq_start,
                  seq_end, zero dv / dg / dbeta at padding (PadZero)
  stage2 prep     Qg, Kd, W, U, A_qk rows (bf16), gamma (f32)
  stage3 states   chunk start states (hs)
  stage4 reverse  dS_next of every chunk but the last (dh), dinitial_state
  stage5 grad1    dgamma, dA_qk rows (sa), dW | dU (swu, bf16; only with the precomputed gate: grad2 overwrites
                  it with d(gate input) otherwise). grad1's dQg / dKd are overwritten by grad2 (not checked here)
  stage6 grad2    effective dq / dk per value head (sqg / skd; without GVA the outputs dq / dk, which grad2
                  then writes itself), d(gate input) and d a_log summed over each chunk at its first token (sdgr: swu's
                  bytes as f32; sda), outputs dv, dg, dbeta
  stage7 finish   outputs dq, dk (group sum, scale, l2norm; zeros at padding: PadZero's without GVA)
  stage8 reduce   da_log_partial, ddt_bias_partial

A later stage's failure with every earlier stage passing points at that stage's kernel. The FFI target is called
directly (no custom_vjp) so that its u8 workspace result comes back; _workspace.cuda_bwd_workspace_layout gives
each region's offset. The CPU tests check the layout and run every stage check on a workspace encoded from the
model itself (so that the harness is known to work before the GPU run).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kda_testing import requires_cuda_kernels
from test_bwd_algorithm import chunked_backward

from flashkda_jax import _inputs as I
from flashkda_jax import _workspace as W

gpu = requires_cuda_kernels()  # on the GPU tests only: the layout / harness tests run on CPU

C = 64
TOL = 2e-2  # relative (Frobenius) error of every compared region: bf16 operands
BLOCK_TOL = 4e-2  # the same per block (chunk of tokens, or state / gamma index): a bug local to some chunks
NAMES = ("q", "k", "v", "g", "beta")

# ----------------------------------------------------------------------------------------------------
# Problems (K = V = 64).
# ----------------------------------------------------------------------------------------------------

_RAGGED = [0] * 3 + [1] * 100 + [2] * 64 + [0] * 5 + [3] * 1 + [4] * 70 + [0] * 17  # T = 260
PROBLEMS = {
    # one dense sequence, 3 chunks (last partial), states; precomputed gate: swu keeps grad1's dW | dU
    "dense": dict(seed=1, B=1, T=130, H=2, HV=2, gate="precomputed", states=True),
    # one ragged row: leading / inner / trailing padding, a 100-token sequence (partial last chunk), a full
    # 64-token one (gamma by slot), a length-1 one, 4 sequences for S = 3 slots (the last keeps no state);
    # GVA 2, bounded gate with A_log
    "ragged": dict(seed=2, B=1, T=260, H=1, HV=2, gate="bounded", states=True, seg=[_RAGGED], S=3),
    # two rows, softplus gate, no l2norm / sigmoid (unit-norm keys, beta in (0, 1)), states
    "rows2": dict(seed=3, B=2, T=70, H=1, HV=1, gate="softplus", states=True, l2=False, sig=False),
}


def _problem(name):
    """-> core, opts, do (v's dtype), dfin (core form [B, S, HV, K, V] f32 or None)."""
    pr = dict(PROBLEMS[name])
    B, T, H, HV, K = pr["B"], pr["T"], pr["H"], pr["HV"], 64
    l2, sig = pr.get("l2", True), pr.get("sig", True)
    ks = jax.random.split(jax.random.PRNGKey(pr["seed"]), 10)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, HV, K), jnp.float32)
    beta = jax.random.normal(ks[4], (B, T, HV), jnp.float32)
    if not l2:
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    if not sig:
        beta = jax.nn.sigmoid(beta)
    kw = dict(qk_l2norm=l2, beta_sigmoid=sig)
    # Mild decays (median gamma 0.2-0.9 per chunk, see test_harness_accepts_model_workspace) so that the states
    # carry across chunks and every term of the recurrences matters; strong gates: tests/test_cuda_bwd.py.
    if pr["gate"] == "precomputed":
        g = -jnp.exp(jax.random.normal(ks[3], (B, T, HV, K)) - 5.0)
    else:
        g = jax.random.normal(ks[3], (B, T, HV, K)) + (-6.0 if pr["gate"] == "bounded" else -4.0)
        kw.update(gate=pr["gate"], A_log=jax.random.normal(ks[5], (HV,)) * 0.5 - (0.0 if pr["gate"] == "bounded" else 1.0),
                  dt_bias=jax.random.normal(ks[6], (HV, K)) * 0.5)
        if pr["gate"] == "bounded":
            kw["lower_bound"] = -5.0
    bf = lambda x: x.astype(jnp.bfloat16)
    seg = pr.get("seg")
    S = pr.get("S", 1) if seg is not None else 1
    init = None
    if pr["states"]:
        shape = (B, S, HV, K, K) if seg is not None else (B, HV, K, K)
        init = 0.5 * jax.random.normal(ks[7], shape, jnp.float32)
    if seg is not None:
        kw.update(segment_ids=jnp.asarray(np.array(seg, np.int32)), max_segments=S)
    core, opts = I.prepare(bf(q), bf(k), bf(v), bf(g), bf(beta), initial_state=init,
                           return_final_state=pr["states"], **kw)
    do = bf(jax.random.normal(ks[8], (B, T, HV, K), jnp.float32))
    dfin = 0.5 * jax.random.normal(ks[9], (B, S, HV, K, K), jnp.float32) if pr["states"] else None
    return core, opts, do, dfin


def _f64(x):
    return None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@functools.lru_cache(maxsize=None)
def _model(name):
    """-> (stages, grads) of the float64 model on the exact (bf16-rounded) inputs of the problem."""
    core, opts, do, dfin = _problem(name)
    stages = {}
    grads = chunked_backward(
        _f64(core.q), _f64(core.k), _f64(core.v), _f64(core.g), _f64(core.beta), _f64(core.a_log),
        _f64(core.dt_bias), np.asarray(core.slot), _f64(core.initial_state), _f64(do), _f64(dfin),
        scale=opts.scale, gate=opts.gate, lower_bound=opts.lower_bound, use_a_log=opts.use_a_log,
        qk_l2norm=opts.qk_l2norm, beta_sigmoid=opts.beta_sigmoid, allow_neg_eigval=opts.allow_neg_eigval, C=C,
        stages=stages)
    return stages, grads


# ----------------------------------------------------------------------------------------------------
# The workspace, decoded.
# ----------------------------------------------------------------------------------------------------

def _dims(name):
    core, opts, do, dfin = _problem(name)
    B, T, H, K = core.q.shape
    HV, V = core.v.shape[2], core.v.shape[3]
    S_out = 0 if dfin is None else dfin.shape[1]  # the handler lays the workspace out with dfinal_state's slots
    return B, T, HV, K, V, S_out


def _spec(B, T, HV, K, V, S_out):
    """Region -> (dtype, shape) of what the kernels store there (kda_fwd_common.cuh, kda_bwd_common.cuh)."""
    NW = -(-T // C)
    NG = NW + S_out
    bf16, f32, i32 = jnp.bfloat16, np.float32, np.int32
    st = bf16 if W.cuda_bwd_states_bf16() else f32  # chunk states (flashkda::bwd::StatesInBf16)
    return dict(
        qg=(bf16, (B, T, HV, K)), kd=(bf16, (B, T, HV, K)), w=(bf16, (B, T, HV, K)), u=(bf16, (B, T, HV, V)),
        aqk=(bf16, (B, T, HV, 2 * C)), gamma=(f32, (B, NG, HV, K)),  # aqk: A_qk rows | T rows
        seq_start=(i32, (B, T)), seq_end=(i32, (B, T)), chunks=(i32, (B * T, 4)), counters=(i32, (16,)),
        hs=(st, (B, NW + 1, HV, K, V)), dh=(st, (B, NW + 1, HV, K, V)), dgam=(f32, (B, NG, HV, K)),
        sqg=(f32, (B, T, HV, K)), skd=(f32, (B, T, HV, K)), swu=(bf16, (B, T, HV, K + V)),
        sa=(f32, (B, T, HV, C)), sda=(f32, (B, T, HV)), seqs=(i32, (B * T, 4)))


def _arrays(B, T, HV, K, V, S_out):
    """Name -> (region, dtype, shape): every region of _spec, plus the views of regions that grad2 rewrites in
    another type (sdgr: swu's bytes as f32, kda_bwd_common.cuh sDgr; K == V)."""
    out = {n: (n, dt, shape) for n, (dt, shape) in _spec(B, T, HV, K, V, S_out).items()}
    if K == V:
        out["sdgr"] = ("swu", np.float32, (B, T, HV, K))
    return out


def decode_workspace(ws, B, T, HV, K, V, S_out):
    """u8 workspace -> {region or view: array} (float regions as float64, int regions as int64)."""
    ws = np.asarray(ws, np.uint8)
    lay = W.cuda_bwd_workspace_layout(B, T, HV, K, V, S_out)
    assert ws.size >= W.cuda_bwd_workspace_bytes(B, T, HV, K, V, S_out)
    out = {}
    for name, (region, dt, shape) in _arrays(B, T, HV, K, V, S_out).items():
        off, nbytes = lay[region]
        assert nbytes == int(np.prod(shape)) * np.dtype(dt).itemsize, f"layout of {name}: {nbytes} bytes"
        x = np.frombuffer(ws[off:off + nbytes].tobytes(), dtype=dt).reshape(shape)
        out[name] = x.astype(np.int64) if dt == np.int32 else x.astype(np.float64)
    return out


def encode_workspace(regions, B, T, HV, K, V, S_out, rng):
    """The inverse of decode_workspace (CPU harness test): NaN / -1 entries become garbage."""
    lay = W.cuda_bwd_workspace_layout(B, T, HV, K, V, S_out)
    ws = rng.integers(0, 256, W.cuda_bwd_workspace_bytes(B, T, HV, K, V, S_out)).astype(np.uint8)
    for name, (region, dt, shape) in _arrays(B, T, HV, K, V, S_out).items():
        if name not in regions:
            continue
        x = np.array(regions[name], np.float64)
        x = np.where(np.isnan(x), 12345.0, x).astype(np.float32).astype(dt).reshape(shape)
        off, nbytes = lay[region]
        ws[off:off + nbytes] = np.frombuffer(x.tobytes(), np.uint8)
    return ws


# ----------------------------------------------------------------------------------------------------
# Comparisons.
# ----------------------------------------------------------------------------------------------------

def _rel(g, r):
    den = np.linalg.norm(r)
    return np.linalg.norm(g - r) / (den if den > 0 else 1.0)


def _cmp(what, got, ref, tol=TOL, blocks=()):
    """Relative error over the entries where ref is finite (what the kernels write), and over each block (an index
    into the arrays) -> failure string or None."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return f"{what}: shape {got.shape} != {ref.shape}"
    m = np.isfinite(ref)
    if not m.any():
        return None
    g, r = got[m], ref[m]
    if not np.all(np.isfinite(g)):
        idx = np.argwhere(m & ~np.isfinite(got))[0]
        return f"{what}: {np.sum(~np.isfinite(g))} non-finite entries (first at {tuple(idx)})"
    den = np.linalg.norm(r)
    err = _rel(g, r)
    worst, wb = 0.0, None
    for blk in blocks:
        mb = m[blk]
        if mb.any():
            gb, rb = got[blk][mb], ref[blk][mb]
            # floor: a tenth of the block's share of the region's norm (blocks of tiny values, e.g. gamma
            # underflowing to 0 in f32 under strong decay, are compared in absolute terms)
            e = np.linalg.norm(gb - rb) / max(np.linalg.norm(rb), 0.1 * den * np.sqrt(rb.size / r.size), 1e-30)
            if e > worst:
                worst, wb = e, blk
    if err <= tol and worst <= BLOCK_TOL:
        return None
    if err <= tol:
        return f"{what}: rel err {err:.3e}, but {worst:.3e} > {BLOCK_TOL:g} in block {_fmt(wb)}"
    with np.errstate(all="ignore"):  # entries outside m are whatever the workspace held
        d = np.where(m, np.abs(np.where(m, got, 0.0) - np.where(m, ref, 0.0)), -1.0)
    idx = np.unravel_index(np.argmax(d), d.shape)
    rms = den / np.sqrt(r.size) if den > 0 else 1.0
    nbad = int(np.sum(np.abs(g - r) > 0.1 * rms))
    return (f"{what}: rel err {err:.3e} > {tol:g}; {nbad}/{r.size} entries off by > 0.1 rms; worst at {tuple(idx)}: "
            f"got {got[idx]:.4g}, want {ref[idx]:.4g}")


def _chunk_start_sums(st, x):
    """Per-token x [B, T, ...] -> its sums over each chunk of the model at the chunk's first token, NaN elsewhere
    (what grad2 leaves for the gate reduction: kda_bwd_common.cuh, sDgr / sDa)."""
    x = np.asarray(x, np.float64)
    out = np.full(x.shape, np.nan)
    for (b, cs, se, _) in st["chunks"]:
        out[b, cs] = x[b, cs:min(cs + C, se)].sum(axis=0)
    return out


def _fmt(blk):
    return "[" + ", ".join(f"{x.start}:{x.stop}" if isinstance(x, slice) else str(x) for x in blk) + "]"


def _blocks(st, kind):
    """Blocks of the model's chunks: token rows of each chunk ("tok"), or the indices of hs / dh ("state") and
    of gamma / dgam ("gamma") that hold a value."""
    if kind == "tok":
        return [(b, slice(cs, min(cs + C, se))) for (b, cs, se, sl) in st["chunks"]]
    arr = st["hs"] if kind == "state" else st["gamma"]
    B, N = arr.shape[:2]
    return [(b, i) for b in range(B) for i in range(N) if np.isfinite(arr[b, i]).any()]


def _cmp_padding_zero(what, got, slot):
    pad = np.asarray(slot) < 0
    x = np.asarray(got, np.float64)[pad]
    return None if np.all(x == 0) else f"{what}: {int(np.sum(x != 0))} nonzero entries at padding tokens"


def _entries(lst, n):
    return sorted(tuple(int(a) for a in row) for row in lst[:max(int(n), 0)])


def stage_failures(stage, name, ws, outs, opts=None):
    """Failure strings of one stage: ws = decode_workspace(...), outs = the FFI results (q, k, v, g, beta,
    A_log [B, HV], dt_bias [B, HV, K], initial_state) as float arrays."""
    st, ref = _model(name)
    core, opts, do, dfin = _problem(name)
    slot = np.asarray(core.slot)
    tb = _blocks(st, "tok")
    F = []
    add = lambda f: F.append(f) if f else None
    if stage == "plan":
        cnt = ws["counters"]
        if cnt[0] != len(st["chunks"]):
            F.append(f"counters[0] (chunks) = {cnt[0]}, want {len(st['chunks'])}")
        if cnt[1] != len(st["seqs"]):
            F.append(f"counters[1] (sequences) = {cnt[1]}, want {len(st['seqs'])}")
        if np.any(cnt[2:4] != 0) or np.any(cnt[7:] != 0):
            F.append(f"counters[2:4], [7:] = {cnt[2:4].tolist()}, {cnt[7:].tolist()}, want zeros")
        # Slot 6: the bounded prep's item counter (cutlass/kda_fwd_prep_bounded.cu; 0 where the general prep ran).
        # Every CTA takes items until one index past the last, so it ends at the item count, chunks x HV.
        n_items = len(st["chunks"]) * _dims(name)[2]
        if int(cnt[6]) not in (0, n_items):
            F.append(f"counters[6] (bounded prep items taken) = {int(cnt[6])}, want 0 or {n_items}")
        # The reverse pass's column block, picked on the device (slot 5; 0 when FLASHKDA_BWD_RECUR_BV forces one
        # or the first-version pass runs), and its item counter (slot 4): every CTA of the picked launch takes
        # items until one past the last, so it ends above the item count by at most the grid.
        pick, work = int(cnt[5]), int(cnt[4])
        V, HV = _dims(name)[4], _dims(name)[2]
        if pick == 0:
            if work != 0:
                F.append(f"counters[4] (reverse items taken) = {work} without a picked column block")
        elif pick not in (16, 32, 64) or V % pick:
            F.append(f"counters[5] (reverse column block) = {pick}, not a block of V = {V}")
        else:
            items = len(st["seqs"]) * HV * (V // pick)
            if not items < work <= items + 4096:
                F.append(f"counters[4] (reverse items taken) = {work}, want ({items}, {items} + grid]")
        want = sorted(st["chunks"])
        got = _entries(ws["chunks"], min(cnt[0], len(ws["chunks"])))
        if got != want:
            F.append(f"chunk list (as a set): missing {sorted(set(want) - set(got))[:4]}, "
                     f"extra {sorted(set(got) - set(want))[:4]}, {len(got)} vs {len(want)} entries")
        want = sorted(st["seqs"])
        got = _entries(ws["seqs"], min(cnt[1], len(ws["seqs"])))
        if got != want:
            F.append(f"sequence list (as a set): missing {sorted(set(want) - set(got))[:4]}, "
                     f"extra {sorted(set(got) - set(want))[:4]}")
        bad = np.argwhere(ws["seq_start"] != st["seq_start"])
        if len(bad):
            F.append(f"seq_start: {len(bad)} wrong, first at {tuple(bad[0])}: got "
                     f"{ws['seq_start'][tuple(bad[0])]}, want {st['seq_start'][tuple(bad[0])]}")
        m = st["seq_end"] >= 0
        bad = np.argwhere(m & (ws["seq_end"] != st["seq_end"]))
        if len(bad):
            F.append(f"seq_end (at sequence starts): {len(bad)} wrong, first at {tuple(bad[0])}")
        for n in ("v", "g", "beta"):
            add(_cmp_padding_zero(f"d{n} (PadZero)", outs[n], slot))
    elif stage == "prep":
        for n in ("qg", "kd", "w", "u"):
            add(_cmp(n, ws[n], st[n], blocks=tb))
        add(_cmp("aqk (A_qk rows)", ws["aqk"][..., :C], st["aqk"][..., :C], blocks=tb))
        add(_cmp("aqk (T rows, kAqkPitch)", ws["aqk"][..., C:], st["aqk"][..., C:], blocks=tb))
        add(_cmp("gamma", ws["gamma"], st["gamma"], blocks=_blocks(st, "gamma")))
    elif stage == "states":
        add(_cmp("hs (chunk start states)", ws["hs"], st["hs"], blocks=_blocks(st, "state")))
    elif stage == "reverse":
        add(_cmp("dh (dS_next per chunk)", ws["dh"], st["dh"], blocks=_blocks(st, "state")))
        if ref["initial_state"] is not None:
            add(_cmp("dinitial_state", outs["initial_state"], ref["initial_state"]))
    elif stage == "grad1":
        add(_cmp("dgam", ws["dgam"], st["dgam"], blocks=_blocks(st, "gamma")))
        add(_cmp("sa (dA_qk rows)", ws["sa"], st["dAqk"], blocks=tb))
        if opts.gate == "precomputed":
            K = st["dW"].shape[-1]
            add(_cmp("swu (dW)", ws["swu"][..., :K], st["dW"], blocks=tb))
            add(_cmp("swu (dU)", ws["swu"][..., K:], st["dU"], blocks=tb))
    elif stage == "grad2":
        if core.q.shape[2] == core.v.shape[2]:
            # no GVA: grad2 writes dq / dk itself (FinishInGrad2), sqg / skd keep grad1's values
            for n in ("q", "k"):
                add(_cmp(f"d{n}", outs[n], ref[n], blocks=tb))
        else:
            add(_cmp("sqg (dq per value head)", ws["sqg"], st["dq_eff"], blocks=tb))
            add(_cmp("skd (dk per value head)", ws["skd"], st["dk_eff"], blocks=tb))
        if opts.gate != "precomputed":
            add(_cmp("sdgr (d gate input per chunk)", ws["sdgr"], _chunk_start_sums(st, st["dg_in"]), blocks=tb))
            add(_cmp("sda (d a_log per chunk)", ws["sda"], _chunk_start_sums(st, st["da_tok"]), blocks=tb))
        for n in ("v", "g", "beta"):
            add(_cmp(f"d{n}", outs[n], ref[n], blocks=tb))
    elif stage == "finish":
        for n in ("q", "k"):
            add(_cmp(f"d{n}", outs[n], ref[n], blocks=tb))
            add(_cmp_padding_zero(f"d{n}", outs[n], slot))
    elif stage == "reduce":
        add(_cmp("da_log_partial", outs["A_log"], ref["A_log"]))
        add(_cmp("ddt_bias_partial", outs["dt_bias"], ref["dt_bias"]))
    else:
        raise ValueError(stage)
    return F


STAGES = ("plan", "prep", "states", "reverse", "grad1", "grad2", "finish", "reduce")

# ----------------------------------------------------------------------------------------------------
# The GPU run (once per problem).
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _gpu(name):
    """-> (decoded workspace, outputs) of one call of the CUDA backward FFI target."""
    from flashkda_jax import _ffi

    core, opts, do, dfin = _problem(name)
    B, T, H, K = core.q.shape
    HV, V = core.v.shape[2], core.v.shape[3]
    a_rows = jnp.broadcast_to(core.a_log, (B, HV))  # per batch row, as flashkda_jax.sharding passes them
    dt_rows = jnp.broadcast_to(core.dt_bias, (B, HV, K))
    f32 = jnp.float32
    init = core.initial_state
    ws_bytes = W.cuda_bwd_workspace_bytes(B, T, HV, K, V, opts.num_slots)  # unwindowed: the layout read back below
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (core.q, core.k, core.v, core.g, core.beta))
    out_types += (jax.ShapeDtypeStruct((B, HV), f32), jax.ShapeDtypeStruct((B, HV, K), f32),
                  jax.ShapeDtypeStruct(init.shape if init is not None else (0,), f32),
                  jax.ShapeDtypeStruct((ws_bytes,), jnp.uint8))
    call = jax.ffi.ffi_call(_ffi.BWD_TARGET, out_types, vmap_method="broadcast_all")
    empty = jnp.zeros((0,), f32)
    fn = jax.jit(lambda *a: call(*a, **opts.ffi_attrs(), bwd_window=np.int64(0)))
    res = fn(core.q, core.k, core.v, core.g, core.beta, a_rows, dt_rows, core.slot,
             init if init is not None else empty, do, dfin if dfin is not None else empty,
             *[jnp.zeros((0,), jnp.bfloat16)] * 6, jnp.zeros((0,), f32))
    res = jax.block_until_ready(res)
    outs = {n: np.asarray(jnp.asarray(x, f32), np.float64)
            for n, x in zip(NAMES + ("A_log", "dt_bias", "initial_state"), res[:8])}
    if init is None:
        outs["initial_state"] = None
    ws = decode_workspace(np.asarray(res[8]), *_dims(name))
    return ws, outs


def _check(stage, name):
    ws, outs = _gpu(name)
    fails = stage_failures(stage, name, ws, outs)
    assert not fails, f"[{name}] stage {stage}: " + " | ".join(fails)


# One function per stage, in the handler's order: `pytest -v` lists the first broken one first.
@gpu
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_stage1_plan(name):
    _check("plan", name)


@gpu
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_stage2_prep(name):
    _check("prep", name)


@gpu
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_stage3_states(name):
    _check("states", name)


@gpu
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_stage4_reverse(name):
    _check("reverse", name)


@gpu
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_stage5_grad1(name):
    _check("grad1", name)


@gpu
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_stage6_grad2(name):
    _check("grad2", name)


@gpu
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_stage7_finish(name):
    _check("finish", name)


@gpu
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_stage8_reduce(name):
    _check("reduce", name)


# ----------------------------------------------------------------------------------------------------
# CPU: the layout and the harness itself.
# ----------------------------------------------------------------------------------------------------

# Totals of the sizes before the layouts got names (hard-coded from that code; the backward's grew by the
# gate reduction's per-tile sums "gred" in session 3). The backward's are those of f32 chunk states (the first
# versions); the defaults store them in bf16 (session 5): _BWD_BF16_STATES. (4, 4096, 8, 64, 64, 0)'s forward
# total follows ChooseSeglen, whose cost model changed in session 9 (8 segments; 94765312 bytes before).
_TOTALS = {  # (B, T, HV, K, V, S): (bwd bytes, fwd bytes, fwd bytes no_split)
    (1, 130, 2, 64, 64, 1): (779520, 177152, 177152),
    (1, 260, 2, 64, 64, 3): (1425152, 352768, 352768),
    (2, 70, 2, 64, 64, 1): (951552, 190976, 190976),
    (2, 200, 4, 128, 128, 0): (10857728, 1882624, 1882624),
    (3, 1, 1, 64, 64, 2): (210688, 6400, 6400),
    (1, 8192, 16, 128, 128, 4): (727851264, 180846848, 152535296),
    (4, 4096, 8, 64, 64, 0): (323100928, 99483904, 85328128),
    (2, 1000, 3, 256, 256, 5): (93170944, 13297664, 13297664),
    (0, 0, 0, 64, 64, 0): (256, 256, 256),
}
_BWD_BF16_STATES = {
    (1, 130, 2, 64, 64, 1): 648448,
    (1, 260, 2, 64, 64, 3): 1228544,
    (2, 70, 2, 64, 64, 1): 754944,
    (2, 200, 4, 128, 128, 0): 8236288,
    (3, 1, 1, 64, 64, 2): 112384,
    (1, 8192, 16, 128, 128, 4): 592584960,
    (4, 4096, 8, 64, 64, 0): 289022208,
    (2, 1000, 3, 256, 256, 5): 66432256,
    (0, 0, 0, 64, 64, 0): 256,
}

_FWD_ORDER = ("qg", "kd", "w", "u", "aqk", "gamma", "hp", "sstart", "seq_start", "seq_end", "chunks", "segs",
              "multi", "counters")
_BWD_ORDER = ("hs", "dh", "dgam", "sqg", "skd", "swu", "sa", "sda", "seqs", "gred", "bnd", "wlists")


def _bf16_scratch_saving(B, T, HV, K, V, S):
    """Bytes the backward's workspace lost in session 7, when dW (f32 "sw") and dU (f32 "su") became one bf16
    region "swu" (each region is padded to 256 bytes)."""
    pad = lambda n: -(-n // 256) * 256
    tok = B * T * HV
    return pad(tok * K * 4) + pad(tok * V * 4) - pad(tok * (K + V) * 2)


def _aqk_t_rows_growth(B, T, HV, K, V, S):
    """Bytes the prep region "aqk" (in both layouts) gained in session 10, when each A_qk row (C bf16) got the
    same row of the WY solve's T after it (kAqkPitch = 2 C)."""
    pad = lambda n: -(-n // 256) * 256
    tok = B * T * HV
    return pad(tok * 2 * C * 2) - pad(tok * C * 2)


@pytest.mark.parametrize("shape", sorted(_TOTALS))
@pytest.mark.parametrize("states", ["bf16", "f32_recur_v1", "f32_grad1_simt"])
def test_workspace_totals_unchanged(shape, states, monkeypatch):
    """The unwindowed totals (bwd_window 0, the default of these functions); test_workspace_windows covers the
    windows."""
    monkeypatch.delenv("FLASHKDA_BWD_RECUR", raising=False)
    monkeypatch.delenv("FLASHKDA_BWD_GRAD1", raising=False)
    if states == "f32_recur_v1":
        monkeypatch.setenv("FLASHKDA_BWD_RECUR", "v1")
    elif states == "f32_grad1_simt":
        monkeypatch.setenv("FLASHKDA_BWD_GRAD1", "simt")
    bwd, fwd, fwd_ns = _TOTALS[shape]
    assert W.cuda_bwd_states_bf16() == (states == "bf16")
    grown = _aqk_t_rows_growth(*shape)
    assert W.cuda_bwd_workspace_bytes(*shape) == ((_BWD_BF16_STATES[shape] if states == "bf16" else bwd)
                                                  - _bf16_scratch_saving(*shape) + grown)
    assert W.cuda_fwd_workspace_bytes(*shape) == fwd + grown
    assert W.cuda_fwd_workspace_bytes(*shape, no_split=True) == fwd_ns + grown


@pytest.mark.parametrize("T, HV, one_seq, env, want", [
    (32768, 16, True, None, 4096),    # b1-t32k-h16: 8 windows of 4096 tokens
    (32768, 16, False, None, 0),      # packed sequences: no windows by default
    (8192, 64, True, None, 0),        # T <= 8192: none
    (8256, 96, True, None, 4096),     # 3 windows, the last of 64 tokens
    (1 << 20, 16, True, None, 4096),
    (32768, 16, True, "0", 0),
    (1100, 2, False, "128", 128),      # forced, with packed sequences too
    (100, 2, True, "128", 0),          # a window past T: none
])
def test_workspace_windows(T, HV, one_seq, env, want, monkeypatch):
    """The backward's token windows (the bwd_window attribute) and the regions they shrink: the per-token scratch
    to one window's rows (window + 63) and dH to window / 64 + 1 chunk states per batch row, plus two f32 boundary
    states per (batch row, value head) and the window's work lists; everything else as unwindowed. Linear in B
    (vmap)."""
    for name in ("FLASHKDA_BWD_RECUR", "FLASHKDA_BWD_GRAD1", "FLASHKDA_BWD_WINDOW"):
        monkeypatch.delenv(name, raising=False)
    if env is not None:
        monkeypatch.setenv("FLASHKDA_BWD_WINDOW", env)
    window = W.cuda_bwd_window(T, one_seq)
    assert window == want
    length, count = W.cuda_bwd_windows(T, window)
    assert count == (1 if want == 0 else -(-T // want))
    K = V = 64
    for B in (1, 3):
        lay = W.cuda_bwd_workspace_layout(B, T, HV, K, V, 1, True, True, window)
        full = W.cuda_bwd_workspace_layout(B, T, HV, K, V, 1, True, True)
        rows = T if count == 1 else min(length + 63, T)
        assert lay["sqg"][1] == B * rows * HV * K * 4 and lay["sa"][1] == B * rows * HV * 64 * 4
        assert lay["swu"][1] == B * rows * HV * (K + V) * 2 and lay["sda"][1] == B * rows * HV * 4
        nw = -(-T // 64) + 1 if count == 1 else length // 64 + 1
        assert lay["dh"][1] == B * nw * HV * K * V * 2
        assert lay["bnd"][1] == (2 * B * HV * K * V * 4 if count > 1 else 0)
        assert lay["wlists"][1] == (8 * B * T if count > 1 else 0)
        for name in ("hs", "dgam", "seqs", "gred") + _FWD_ORDER:
            assert lay[name][1] == full[name][1], name
    one = W.cuda_bwd_workspace_bytes(1, T, HV, K, V, 1, True, True, window)
    assert W.cuda_bwd_workspace_bytes(4, T, HV, K, V, 1, True, True, window) <= 4 * one


def test_workspace_windows_env(monkeypatch):
    """A bad FLASHKDA_BWD_WINDOW fails at trace time; the first-version kernels (f32 states) are never windowed
    (the handler rejects a window with them)."""
    monkeypatch.delenv("FLASHKDA_BWD_RECUR", raising=False)
    monkeypatch.delenv("FLASHKDA_BWD_GRAD1", raising=False)
    for bad in ("100", "-64", "x"):
        monkeypatch.setenv("FLASHKDA_BWD_WINDOW", bad)
        with pytest.raises(ValueError, match="FLASHKDA_BWD_WINDOW"):
            W.cuda_bwd_window(1100, True)
    monkeypatch.setenv("FLASHKDA_BWD_WINDOW", "128")
    assert W.cuda_bwd_window(1100, True) == 128
    monkeypatch.setenv("FLASHKDA_BWD_RECUR", "v1")
    assert W.cuda_bwd_window(1100, True) == 0


@pytest.mark.parametrize("shape", sorted(_TOTALS))
def test_workspace_layout(shape):
    """Regions in the order of the C++ Layout fields, 256-byte aligned, disjoint, inside the total; the backward
    embeds the forward's no-split layout first."""
    lay = W.cuda_bwd_workspace_layout(*shape)
    assert tuple(lay) == _FWD_ORDER + _BWD_ORDER
    end = 0
    for name, (off, n) in lay.items():
        assert off % 256 == 0 and off >= end, name
        end = off + n
    assert end <= W.cuda_bwd_workspace_bytes(*shape)
    assert W.cuda_bwd_workspace_bytes(*shape) - end < 256
    fl = W.cuda_fwd_workspace_layout(*shape, no_split=True)
    assert {k: lay[k] for k in _FWD_ORDER} == fl
    assert lay["hs"][0] == W.cuda_fwd_workspace_bytes(*shape, no_split=True)


@pytest.mark.parametrize("shape", sorted(_TOTALS))
def test_workspace_without_saved_blocks(shape, monkeypatch):
    """With the forward's saved results as operands the backward's workspace has no states block (with
    states_given) and no prep blocks (with prep_given): exactly those blocks (256-byte padded) less, every other
    region the same size; the saved results hold at least what those blocks held. The forward's workspace with
    prep_external likewise drops its prep blocks."""
    monkeypatch.delenv("FLASHKDA_BWD_RECUR", raising=False)
    monkeypatch.delenv("FLASHKDA_BWD_GRAD1", raising=False)
    B, T, HV, K, V, S = shape
    pad = lambda n: -(-n // 256) * 256
    states = 2 * int(np.prod(W.chunk_states_shape(B, T, HV, K, V)))
    prep_names = ("qg", "kd", "w", "u", "aqk", "gamma")
    full = W.cuda_bwd_workspace_layout(*shape)
    for sg, pg in ((True, False), (False, True), (True, True)):
        given = W.cuda_bwd_workspace_layout(*shape, states_given=sg, prep_given=pg)
        dropped = (("hs",) if sg else ()) + (prep_names if pg else ())
        assert all(given[k][1] == 0 for k in dropped)
        assert all(given[k][1] == full[k][1] for k in full if k not in dropped)
        less = sum(pad(full[k][1]) for k in dropped)
        assert W.cuda_bwd_workspace_bytes(*shape) - W.cuda_bwd_workspace_bytes(*shape, sg, pg) == less
    assert full["hs"][1] == states
    if K == V:
        sizes = [int(np.prod(shp)) * np.dtype(dt).itemsize for shp, dt in W.saved_structs(B, T, HV, K, V, S)]
        assert sizes == [states] + [full[k][1] for k in prep_names]
    fl = W.cuda_fwd_workspace_layout(*shape)
    fe = W.cuda_fwd_workspace_layout(*shape, prep_external=True)
    assert all(fe[k][1] == 0 for k in prep_names) and all(fe[k][1] == fl[k][1] for k in fl if k not in prep_names)


def _fake_run(name, rng):
    """Workspace and outputs as a correct kernel would leave them, from the model (bf16 where the kernels are)."""
    st, ref = _model(name)
    core, opts, do, dfin = _problem(name)
    dims = _dims(name)
    B, T = dims[0], dims[1]
    reg = {n: st[n] for n in ("qg", "kd", "w", "u", "aqk", "gamma", "hs", "dh", "dgam", "seq_start")}
    reg.update(seq_end=np.where(st["seq_end"] >= 0, st["seq_end"], -7), sa=st["dAqk"],
               sqg=st["dq_eff"], skd=st["dk_eff"], sda=_chunk_start_sums(st, st["da_tok"]))
    if opts.gate == "precomputed":
        reg["swu"] = np.concatenate([st["dW"], st["dU"]], axis=-1)
    else:
        reg["sdgr"] = _chunk_start_sums(st, st["dg_in"])
    for n, key in (("chunks", "chunks"), ("seqs", "seqs")):
        lst = np.array(st[key], np.int64)[rng.permutation(len(st[key]))]  # any order
        reg[n] = np.concatenate([lst, rng.integers(-5, 5, (B * T - len(lst), 4))], 0)
    reg["counters"] = np.array([len(st["chunks"]), len(st["seqs"])] + [0] * 14)
    ws = decode_workspace(encode_workspace(reg, *dims, rng), *dims)
    rd = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    outs = {n: rd(ref[n]) for n in NAMES}
    outs.update(A_log=ref["A_log"].astype(np.float32), dt_bias=ref["dt_bias"].astype(np.float32),
                initial_state=None if ref["initial_state"] is None else ref["initial_state"].astype(np.float32))
    return ws, outs


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_harness_accepts_model_workspace(name):
    """Every stage check passes on the model's own results written in the kernels' layout and dtypes (so a GPU
    failure is the kernel's), and the problems exercise what they are meant to."""
    ws, outs = _fake_run(name, np.random.default_rng(0))
    for stage in STAGES:
        assert stage_failures(stage, name, ws, outs) == [], stage
    st, ref = _model(name)
    core = _problem(name)[0]
    assert np.isfinite(st["hs"]).any() and np.isfinite(st["dh"]).any()  # multi-chunk sequences
    gam = st["gamma"][np.isfinite(st["gamma"])]
    assert 0.2 < np.median(gam) < 0.9, np.median(gam)  # decays that matter, states that last
    assert np.all(np.isfinite(st["dq_eff"][np.asarray(core.slot) >= 0]))
    gated = _problem(name)[1].gate != "precomputed"
    for n in ("q", "k", "v", "g", "beta") + (("A_log", "dt_bias") if gated else ()):
        assert np.linalg.norm(ref[n]) > 0, n


def test_harness_detects_broken_stages():
    """Corrupting one region fails that stage only."""
    name = "ragged"
    rng = np.random.default_rng(1)
    cases = {
        "plan": lambda ws, o: ws["chunks"].__setitem__((0, 1), ws["chunks"][0, 1] + 1),
        "prep": lambda ws, o: ws["w"].__setitem__((0, 50), ws["w"][0, 50] * 3),  # one token: its chunk's block
        "states": lambda ws, o: ws["hs"].__setitem__((0, 2, 1), ws["hs"][0, 2, 1] * 0.5),
        "reverse": lambda ws, o: ws["dh"].__setitem__((0, 4), ws["dh"][0, 4] + 1),
        "grad1": lambda ws, o: ws["sa"].__setitem__((0, slice(3, 67)), 0.0),
        "grad2": lambda ws, o: ws["skd"].__setitem__((0, slice(103, 167), 0), 0.0),
        "finish": lambda ws, o: o["q"].__setitem__((0, slice(0, 100)), 0.0),
        "reduce": lambda ws, o: o["dt_bias"].__setitem__(0, o["dt_bias"][0] * 2),
    }
    for broken, corrupt in cases.items():
        ws, outs = _fake_run(name, rng)
        corrupt(ws, outs)
        failed = [s for s in STAGES if stage_failures(s, name, ws, outs)]
        assert failed == [broken], (broken, failed)
