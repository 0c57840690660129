"""Sharded KDA: the core op under ``jax.jit`` with a ``Mesh`` + ``NamedSharding``, and context parallelism.

How ``kda`` partitions
----------------------

:func:`core` (what :func:`flashkda_jax.ops.run_core` calls) wraps the core op of every implementation
(the CUDA / CPU FFI kernels and the pure-JAX chunked program) in a ``jax.custom_vjp`` whose forward and
backward are each one :class:`jax.experimental.custom_partitioning.custom_partitioning` op with a Shardy
sharding rule. Every operand is per batch row (``A_log``/``dt_bias`` are broadcast to ``[B, ...]``), so

- the batch axis ``b`` may be sharded: each device runs its rows, no communication;
- the head axis may be sharded (tensor parallel): q/k heads ``h`` and value heads ``hv = (h r)``
  (``r = HV / H``, the GVA group) are one compound factor, so a device holds q/k head block j together
  with the value heads that read it; no communication;
- the sequence axis ``t`` may be sharded (context parallel, see below): only small per-device state maps
  travel;
- the head dims ``k``, ``v``, the state-slot axis ``s`` and the GVA group ``r`` are never split
  (``need_replication``).

Gradients of ``A_log``/``dt_bias`` come back per row and are summed over rows by the transpose of the
broadcast (an all-reduce of ``[HV]``/``[HV, K]`` over data-parallel devices, as for any parameter).

Nothing changes in user code: ``jax.jit(loss)`` with inputs placed by ``NamedSharding`` partitions. On one
device, and inside ``shard_map`` (all mesh axes manual), the op lowers to its plain per-device body (its
operands and results cast to the same varying manual axes, so replicated A_log / dt_bias get their
gradients summed over devices by the transpose of that cast). vmap
folds the mapped axes into the batch axis (``custom_vmap``), as the FFI call's ``broadcast_all`` does.

Context parallelism
-------------------

When ``t`` is sharded over mesh axes (say ``"cp"``, n devices), device i holds tokens
``[i·T/n, (i+1)·T/n)``. Per head, the state of a sequence after a slice is an affine map of its state
before it, ``X ↦ P·X + H`` with ``P = ∏ (I − β k kᵀ) Diag(exp g)`` (K×K). Each device

1. runs its slice with a zero carried state (state of the sequence that crosses the boundary into it):
   ``H_i``, the state of the sequence crossing into the next device;
2. runs the same recurrence with ``v = 0`` from the identity (a K×K "state"): ``P_i``, kept only when
   the whole slice belongs to the sequence coming from the previous device (a sequence boundary inside
   the slice resets the dependence: ``P_i = 0``). Runs 1 and 2 are one forward of V + K columns
   (``[v | 0]`` from ``[init | I]``) where the implementation takes those head dims, else two;
3. all-gathers the small ``(P_j, H_j)`` over the cp axes and composes them in order,
   ``X_j = P_j X_{j-1} + H_j``, to get its true incoming state ``X_{i-1}``;
4. forms its true outputs without a third run: the state is affine in the carried state,
   ``S_t = P_t X_{i-1} + H_t``, so ``o_t = o⁰_t + (q_tᵀ P_t) X_{i-1}`` where ``o⁰`` are run 1's outputs and
   ``q_tᵀ P_t`` run 2's (zero off the continuing sequence); the continuing sequence's final state gains
   ``P_end X_{i-1}`` likewise.

Sequence boundaries come from the global slot map (segment ids / cu_seqlens); the sequence continuing
from the previous device and the one running into the next device get two extra local state slots, so
any ``max_segments`` (even none) works. Final states of sequences ending on a device are summed over the
cp axes (each slot ends on exactly one device).

The backward (``_cp_bwd``) runs ONE full backward per device: with ``D_i`` the cotangent of device i's
outgoing state, device i's input gradients are the backward of its true run with ``D_i`` added to the
final-state cotangent of the sequence running into the next device; ``D`` comes from a reverse scan over
devices, ``D_{j-1} = L_j + P_jᵀ D_j``, where ``L_j`` is the gradient of device j's own outputs and final
states w.r.t. its incoming state: they see it only through ``(q_tᵀ P_t) X`` and ``P_end X``, so
``L_j = Σ_t (q_tᵀ P_t)ᵀ dO_t + P_endᵀ dfin``, one contraction of run 2's outputs with dO (no backward pass).
With ``kda(..., context_parallel_axis=...)`` the forward hands ``(X_{i-1}, P_i, P_end)`` and run 2's outputs to
the backward (a record laid along the sequence, ``KdaOptions.cp_record``, and ``o_map``); without it (T sharded
by other means) the backward reruns runs 1-2. Cost per device, on T/n tokens: forward one pass of V + K
columns (or two passes); backward one full backward, a [T x K] x [K x V] correction and a [K x T] x [T x V]
contraction.

Turn it on by sharding T of the inputs, or with ``kda(..., context_parallel_axis="cp")`` which places a
sharding constraint on T (needs a mesh in context: ``with jax.set_mesh(mesh):`` or
``with mesh:``; other axes stay as propagated).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flashkda_jax import _capabilities as _caps
from flashkda_jax import _inputs
from flashkda_jax import _workspace
from flashkda_jax import preprocess as _pre
from flashkda_jax import reference as _reference

__all__ = ["core", "constrain_context_parallel"]

_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------
# Per-device bodies (no partitioning): the core op of one implementation on local shapes.
#
# args = (q, k, v, g, beta, a_log [B, HV], dt_bias [B, HV, K], slot [B, T], init [B, S, HV, ., .] | None)
# ----------------------------------------------------------------------------------------------------

def _ops():
    from flashkda_jax import ops  # late: ops imports this module
    return ops


def _xla_fwd(args, opts):
    """Pure-JAX chunked core with per-row gate parameters (differentiable by jax AD)."""
    q, k, v, g, beta, a_rows, dt_rows, slot, init = args
    if opts.gate != "precomputed":
        cdt = _inputs.compute_dtype(q.dtype)
        g = jax.vmap(lambda gg, a, d: _pre.effective_gate(gg.astype(cdt), a.astype(cdt), d.astype(cdt), opts))(
            g, a_rows, dt_rows)
        opts = dataclasses.replace(opts, gate="precomputed", use_a_log=False)
    HV, K = v.shape[2], q.shape[3]
    core = _inputs.CoreInputs(q=q, k=k, v=v, g=g, beta=beta, a_log=jnp.zeros((HV,), jnp.float32),
                              dt_bias=jnp.zeros((HV, K), jnp.float32), slot=slot, initial_state=init)
    return _reference.chunked_core(core, opts)


def _core_fwd(args, opts, impl):
    if impl == "xla":
        return _xla_fwd(args, opts)
    return _ops()._ffi_forward(args, opts, impl)


def _xla_bwd(args, do, dfin, opts):
    q, k, v, g, beta, a, dt, slot, init = args

    def f(q, k, v, g, beta, a, dt, init):
        return _xla_fwd((q, k, v, g, beta, a, dt, slot, init), opts)

    _, vjp = jax.vjp(f, q, k, v, g, beta, a, dt, init)
    return vjp((do, dfin))


def _core_bwd(args, do, dfin, opts, impl, saved=None):
    """-> (dq, dk, dv, dg, dbeta, da_rows, ddt_rows, dinit | None). saved: the CUDA forward's saved results, or None."""
    ops = _ops()
    bimpl = impl if impl == "xla" else ops._backward_impl(impl, args[0], args[2])
    if bimpl == "xla":
        return tuple(_xla_bwd(args, do, dfin, opts))
    return tuple(ops._ffi_backward(args, do, dfin, opts, bimpl, saved))


def _saving_opts(args, opts, impl):
    """opts for the differentiated forward / backward pair: save_residuals where the CUDA forward can hand its
    chunk states and prep outputs to the CUDA backward (both kernels run, the default bf16 chunk states, no
    context parallelism, whose per-device runs are not the true ones, not the float32 forward, which has none) and
    FLASHKDA_SAVE_RESIDUALS is not 0."""
    q, v = args[0], args[2]
    K, V = q.shape[-1], v.shape[-1]
    ok = (impl == "cuda" and not opts.cp_record and not _workspace.cuda_fwd_runs_f32(q.dtype) and _caps.CUDA_BWD_READY
          and (K, V) in _caps.CUDA_BWD_HEAD_DIMS and _workspace.cuda_bwd_states_bf16()
          and os.environ.get("FLASHKDA_SAVE_RESIDUALS", "1") != "0")
    return dataclasses.replace(opts, save_residuals=True) if ok else opts


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _local_core(args, opts, impl):
    """The differentiable per-device core (used inside context parallelism)."""
    return _core_fwd(args, opts, impl)


def _local_core_fwd(args, opts, impl):
    return _core_fwd(args, opts, impl), args


def _local_core_bwd(opts, impl, args, cts):
    do, dfin = cts
    dq, dk, dv, dg, dbeta, da, ddt, dinit = _core_bwd(args, do, dfin, opts, impl)
    return ((dq, dk, dv, dg, dbeta, da, ddt, None, dinit),)


_local_core.defvjp(_local_core_fwd, _local_core_bwd)


def _diff_core(args, opts, impl):
    return _xla_fwd(args, opts) if impl == "xla" else _local_core(args, opts, impl)


# ----------------------------------------------------------------------------------------------------
# Context parallelism: the per-device program when T is sharded over `axes`.
# ----------------------------------------------------------------------------------------------------

def _cp_plan(slot, S, axes):
    """Integer bookkeeping of one device's slice (nothing differentiable)."""
    n = jax.lax.psum(1, axes)
    i = jax.lax.axis_index(axes)
    first, last = slot[:, 0], slot[:, -1]
    firsts = jax.lax.all_gather(first, axes)              # [n, B]
    lasts = jax.lax.all_gather(last, axes)
    prev_last = jnp.where(i > 0, lasts[jnp.maximum(i - 1, 0)], -1)
    next_first = jnp.where(i < n - 1, firsts[jnp.minimum(i + 1, n - 1)], -1)
    cont = (first >= 0) & (first == prev_last)             # [B] the first sequence comes from device i-1
    spans = cont & (last == first)                         # the whole slice is that sequence
    is_c = cont[:, None] & (slot == first[:, None])
    is_l = ~is_c & (last >= 0)[:, None] & (slot == last[:, None])
    # Local slots: 0..S-1 as given, S = the continuing sequence, S+1 = the trailing sequence, others
    # (past max_segments) shifted beyond so they start from zero and keep no state.
    lslot = jnp.where(is_c, S, jnp.where(is_l, S + 1, jnp.where(slot >= S, slot + 2, slot))).astype(jnp.int32)
    nxt = jnp.concatenate([slot[:, 1:], next_first[:, None]], axis=1)
    ends = (slot >= 0) & (slot != nxt)                     # global sequence ends inside this slice
    return dict(n=n, i=i, first=first, last=last, cont=cont, spans=spans, is_c=is_c, lslot=lslot, ends=ends)


def _cp_setup(fargs, plan, opts):
    """(base [B, S, HV, K, V], last_init [B, HV, K, V], local options) of this slice's local problem: its
    S + 2 local slots are the global ones, the sequence continuing from the previous device (slot S, from
    the carried state) and the sequence running into the next device (slot S + 1)."""
    q, k, v, g, beta, a, dt, init = fargs
    B, Tl, HV, V = v.shape
    K = q.shape[-1]
    cdt = _inputs.compute_dtype(q.dtype)
    S = opts.num_slots
    if init is not None:
        base = jnp.swapaxes(init, -1, -2) if opts.state_vk else init
        base = base.astype(cdt)
    else:
        base = jnp.zeros((B, S, HV, K, V), cdt)
    last = plan["last"]
    has_last_init = (last >= 0) & (last < S)
    if S > 0:
        last_init = jnp.take_along_axis(base, jnp.clip(last, 0, S - 1)[:, None, None, None, None], axis=1)[:, 0]
        last_init = last_init * has_last_init[:, None, None, None].astype(cdt)
    else:
        last_init = jnp.zeros((B, HV, K, V), cdt)
    lopts = dataclasses.replace(opts, num_slots=S + 2, return_final_state=True, state_layout="kv",
                                state_mode="segments")
    return base, last_init, lopts


def _cp_local_init(base, carry, last_init):
    return jnp.concatenate([base, carry[:, None], last_init[:, None]], axis=1)


def _cp_maps(fargs, plan, base, last_init, lopts, impl, axes):
    """Runs 1-2 and the composition of the maps: (X_{i-1}: the true state carried into this slice, P_i: this
    slice's linear map of it, (o0, fin0): the zero-carry run, (o_map, p_end): the map run's outputs and its
    final map)."""
    q, k, v, g, beta, a, dt, _ = fargs
    B, Tl, HV, V = v.shape
    K = q.shape[-1]
    cdt = base.dtype
    S = lopts.num_slots - 2
    lslot = plan["lslot"]
    zero = jnp.zeros((B, HV, K, V), cdt)
    init1 = _cp_local_init(base, zero, last_init)
    # 1. zero carried state: the state handed to the next device, from a zero incoming state; and 2. the linear
    # part for the sequence continuing from the previous device: v = 0 from the identity, whose outputs are
    # q_t^T P_t (P_t: the map up to token t), zero on the other sequences' tokens.
    if _merged_map_run(impl, K, V):
        # One run of V + K columns: [v | 0] from [init | identity on slot S, zero elsewhere]. The map columns
        # see no values (their U is 0) and start from zero on every other slot, so they stay zero there.
        vm = jnp.concatenate([v, jnp.zeros((B, Tl, HV, K), v.dtype)], axis=-1)
        eye_s = (jnp.arange(S + 2) == S).astype(cdt)[None, :, None, None, None] * jnp.eye(K, dtype=cdt)
        initm = jnp.concatenate([init1, jnp.broadcast_to(eye_s, (B, S + 2, HV, K, K))], axis=-1)
        om, finm = _diff_core((q, k, vm, g, beta, a, dt, lslot, initm), lopts, impl)
        o0, o_map, fin0, p_end = om[..., :V], om[..., V:], finm[..., :V], finm[:, S, ..., V:]
    else:
        o0, fin0 = _diff_core((q, k, v, g, beta, a, dt, lslot, init1), lopts, impl)
        popts = dataclasses.replace(lopts, num_slots=1)
        pslot = jnp.where(plan["is_c"], 0, -1).astype(jnp.int32)
        eye = jnp.broadcast_to(jnp.eye(K, dtype=cdt), (B, 1, HV, K, K))
        o_map, pfin = _diff_core((q, k, jnp.zeros((B, Tl, HV, K), v.dtype), g, beta, a, dt, pslot, eye), popts,
                                 impl)
        p_end = pfin[:, 0]
    spans = plan["spans"]
    h_out = jnp.where(spans[:, None, None, None], fin0[:, S], fin0[:, S + 1])
    p_map = _slice_map(p_end, plan)
    # 3. compose the maps of all devices in order: X_j = P_j X_{j-1} + H_j.
    ps = jax.lax.all_gather(p_map, axes)                    # [n, B, HV, K, K]
    hs = jax.lax.all_gather(h_out, axes)                    # [n, B, HV, K, V]

    def step(x, ph):
        p, h = ph
        return jnp.einsum("bhkl,bhlv->bhkv", p, x, precision=_HI) + h, x

    _, xs_in = jax.lax.scan(step, zero, (ps, hs))           # xs_in[j] = X_{j-1}
    carry = jax.lax.dynamic_index_in_dim(xs_in, plan["i"], axis=0, keepdims=False)
    carry = jnp.where(plan["cont"][:, None, None, None], carry, 0.0)
    return carry, p_map, (o0, fin0), (o_map, p_end)


def _slice_map(p_end, plan):
    """P_i, this slice's linear map of its incoming state: P_end where the continuing sequence spans the slice,
    else 0 (a sequence boundary inside the slice cuts the dependence)."""
    return jnp.where(plan["spans"][:, None, None, None], p_end, 0.0)


# Runs 1-2 as one forward of V + K columns (one prep, twice the recurrence columns) where the implementation
# takes those head dims; else two forwards. (A module switch so that the tests can take either path.)
MERGED_MAP_RUN = True


def _merged_map_run(impl, K, V):
    if not MERGED_MAP_RUN:
        return False
    if impl == "cuda":
        return (K, V + K) in _caps.CUDA_FWD_MAP_HEAD_DIMS
    return True


def _cp_true_run(zero_run, map_run, carry, S, impl):
    """4. this slice's true outputs and local final states from runs 1-2: the state is affine in the carried
    state X, S_t = P_t X + H_t, so o_t = o0_t + (q_t^T P_t) X on the continuing sequence's tokens (o_map is
    zero elsewhere, and X is zero where nothing continues), and that sequence's final state (slot S) gains
    P_end X."""
    (o0, fin0), (o_map, p_end) = zero_run, map_run
    cdt = carry.dtype
    # the carried state as a 2-byte operand with 2-byte outputs, as the forward kernel's own output products
    # (Qg S with S rounded to bf16) take it
    corr = _einsum_like(o_map, "bthk,bhkv->bthv", o_map, carry, cdt, impl)
    o = (o0.astype(cdt) + corr).astype(o0.dtype)
    fin = fin0.at[:, S].add(jnp.einsum("bhkl,bhlv->bhkv", p_end.astype(cdt), carry, precision=_HI))
    return o, fin


def _cp_finals(fin, slot, plan, S):
    """(final-state contributions [B, S, HV, K, V] of the global slots whose sequences end in this slice,
    which of them do) from the local run's final states."""
    hit = (slot[:, None, :] == jnp.arange(S)[None, :, None]) & plan["ends"][:, None, :]   # [B, S, Tl]
    holder = jnp.max(jnp.where(hit, plan["lslot"][:, None, :], -1), axis=-1)               # [B, S]
    has = holder >= 0
    contrib = jnp.take_along_axis(fin, jnp.clip(holder, 0, S + 1)[:, :, None, None, None], axis=1)
    contrib = jnp.where(has[:, :, None, None, None], contrib, 0.0)
    return contrib, has


def _cp_local(fargs, slot, plan, opts, impl, axes):
    """(o, (final-state contributions [B, S, HV, K, V] (kv), which) or None, (carry, (o_map, P_end))) of this
    device's slice."""
    base, last_init, lopts = _cp_setup(fargs, plan, opts)
    carry, _, zero_run, map_run = _cp_maps(fargs, plan, base, last_init, lopts, impl, axes)
    o, fin = _cp_true_run(zero_run, map_run, carry, opts.num_slots, impl)
    extra = _cp_finals(fin, slot, plan, opts.num_slots) if opts.return_final_state else None
    return o, extra, (carry, map_run)


# The context-parallel record: the forward's per-device (carry, P_end) handed to the backward, so that it need
# not rerun runs 1-2 (P_i is P_end where the continuing sequence spans the slice, else 0: _slice_map). A
# custom_partitioning result needs a global shape, so the record is laid along the sequence like q,
# [B, T, HV, R] f32: device i writes, per (row, head), carry (K x V), P_end (K x K) and the stamp (i + 1, n)
# into the first K (V + K) + 2 of its T/n x R values (R = opts.cp_record, chosen by
# constrain_context_parallel so that they fit). A record whose stamp does not match the backward's device
# layout poisons the gradients with NaN instead of being silently wrong. Run 2's outputs q_t^T P_t (o_map,
# [B, T, HV, K] in v's dtype) travel beside it as a second residual.

def _record_size(K, V):
    return K * V + K * K + 2


def record_width(T_local, K, V):
    """R: values per (token, head) of the context-parallel record for slices of T_local tokens."""
    return -(-_record_size(K, V) // T_local)


def _cp_record(carry, p_end, plan, n, Tl, R):
    B, HV, K, V = carry.shape
    stamp = jnp.broadcast_to(jnp.stack([plan["i"] + 1, jnp.int32(n)]).astype(jnp.float32), (B, HV, 2))
    flat = jnp.concatenate([carry.reshape(B, HV, K * V).astype(jnp.float32),
                            p_end.reshape(B, HV, K * K).astype(jnp.float32), stamp], axis=-1)
    flat = jnp.pad(flat, ((0, 0), (0, 0), (0, Tl * R - flat.shape[-1])))
    return jnp.swapaxes(flat.reshape(B, HV, Tl, R), 1, 2)          # [B, Tl, HV, R]


def _cp_unrecord(rec, plan, n, K, V, cdt):
    B, Tl, HV, R = rec.shape
    flat = jnp.swapaxes(rec, 1, 2).reshape(B, HV, Tl * R)
    carry = flat[..., :K * V].reshape(B, HV, K, V)
    p_end = flat[..., K * V:K * V + K * K].reshape(B, HV, K, K)
    stamp = flat[..., K * V + K * K:K * V + K * K + 2]
    ok = jnp.all(stamp[..., 0] == (plan["i"] + 1).astype(jnp.float32)) & jnp.all(stamp[..., 1] == n)
    poison = jnp.where(ok, 0.0, jnp.nan).astype(cdt)
    return carry.astype(cdt) + poison, p_end.astype(cdt) + poison


def _einsum_like(ref, spec, a, b, cdt, impl):
    """einsum(spec, a, b) in cdt: on the GPU with a 2-byte ref (the slice's outputs), both operands in ref's
    dtype on tensor cores with f32 accumulation; else in cdt at the highest precision."""
    if impl == "cuda" and ref.dtype in (jnp.bfloat16, jnp.float16):
        out = jnp.einsum(spec, a.astype(ref.dtype), b.astype(ref.dtype), preferred_element_type=jnp.float32)
        return out.astype(cdt)
    return jnp.einsum(spec, a.astype(cdt), b.astype(cdt), precision=_HI)


def _final_hits(slot, plan, S):
    """[B, S] bool: the sequence of global slot s ends in this slice."""
    hit = (slot[:, None, :] == jnp.arange(S)[None, :, None]) & plan["ends"][:, None, :]
    return jnp.any(hit, axis=-1)


def _to_layout(state_kv, opts):
    return jnp.swapaxes(state_kv, -1, -2) if opts.state_vk else state_kv


def _cp_fwd(args, opts, impl, axes, n):
    """-> (o, final state or None, record or None, o_map or None) of this device."""
    q, k, v, g, beta, a, dt, slot, init = args
    plan = _cp_plan(slot, opts.num_slots, axes)
    o, extra, (carry, (o_map, p_end)) = _cp_local((q, k, v, g, beta, a, dt, init), slot, plan, opts, impl, axes)
    rec = omap = None
    if opts.cp_record:
        rec, omap = _cp_record(carry, p_end, plan, n, q.shape[1], opts.cp_record), o_map
    if extra is None:
        return o, None, rec, omap
    contrib, has = extra
    reached = jax.lax.psum(has.astype(jnp.int32), axes) > 0
    fin = jax.lax.psum(contrib, axes)
    if init is not None:
        base = jnp.swapaxes(init, -1, -2) if opts.state_vk else init
        fin = jnp.where(reached[:, :, None, None, None], fin, base.astype(fin.dtype))
    return o, _to_layout(fin, opts), rec, omap


def _cp_bwd(args, do, dfin, rec, omap, opts, impl, axes, n):
    """Backward of the context-parallel program with one full backward per device.

    Device i's inputs reach the loss through its outputs and final states (its true run, given its incoming
    state X_{i-1}) and through its outgoing state X_i (the final state of its trailing local slot), which
    later devices consume. With D_i = dLoss/dX_i, the gradient of device i's inputs is the backward of its
    true run with D_i added to the trailing slot's final-state cotangent (runs 1-2 need no backward: their
    influence is exactly this term). D comes from a reverse scan over devices,
    D_{j-1} = L_j + P_j^T D_j, where L_j is the gradient of device j's local loss w.r.t. its incoming state X.
    The local loss sees X only through o_t = o0_t + (q_t^T P_t) X and the continuing sequence's final state
    fin0 + P_end X, so L_j = sum_t (q_t^T P_t)^T dO_t + P_end^T dfin: one contraction of run 2's outputs with
    dO, no backward pass. carry, P_i, P_end and o_map come from the forward (rec, omap) when it recorded them,
    else runs 1-2 are rebuilt."""
    q, k, v, g, beta, a, dt, slot, init = args
    S = opts.num_slots
    plan = _cp_plan(slot, S, axes)
    fargs = (q, k, v, g, beta, a, dt, init)
    base, last_init, lopts = _cp_setup(fargs, plan, opts)
    if rec is not None:
        carry, p_end = _cp_unrecord(rec, plan, n, q.shape[-1], v.shape[-1], base.dtype)
        p_map, o_map = _slice_map(p_end, plan), omap
    else:
        carry, p_map, _, (o_map, p_end) = _cp_maps(fargs, plan, base, last_init, lopts, impl, axes)
    largs = (q, k, v, g, beta, a, dt, plan["lslot"], _cp_local_init(base, carry, last_init))
    cdt = base.dtype
    zero_fin = jnp.zeros(base.shape[:1] + (S + 2,) + base.shape[2:], cdt)
    dfin_kv = None
    if opts.return_final_state:
        dfin_kv = (jnp.swapaxes(dfin, -1, -2) if opts.state_vk else dfin).astype(cdt)
        _, finals_vjp = jax.vjp(lambda f: _cp_finals(f, slot, plan, S)[0], zero_fin)
        (dfin_l,) = finals_vjp(dfin_kv)
    else:
        dfin_l = zero_fin
    # (a) this slice's local-loss gradient w.r.t. its incoming state (zero where nothing continues into it).
    ell = (_einsum_like(o_map, "bthk,bthv->bhkv", o_map, do, cdt, impl)
           + jnp.einsum("bhlk,bhlv->bhkv", p_end, dfin_l[:, S], precision=_HI))
    ell = jnp.where(plan["cont"][:, None, None, None], ell, 0.0)
    # (b) D_j for every device, last to first.
    ls = jax.lax.all_gather(ell, axes)                      # [n, B, HV, K, V]
    ps = jax.lax.all_gather(p_map, axes)                    # [n, B, HV, K, K]

    def step(d, lp):
        l_j, p_j = lp
        return l_j + jnp.einsum("bhkl,bhkv->bhlv", p_j, d, precision=_HI), d

    _, ds = jax.lax.scan(step, jnp.zeros_like(ell), (ls, ps), reverse=True)   # ds[j] = D_j
    d_out = jax.lax.dynamic_index_in_dim(ds, plan["i"], axis=0, keepdims=False)
    # (c) the one full backward, D_i on the trailing slot (S when the continuing sequence spans the slice).
    trailing = jnp.where(plan["spans"], S, S + 1)
    on_trailing = (jnp.arange(S + 2)[None, :] == trailing[:, None]).astype(cdt)   # [B, S + 2]
    dfin_l = dfin_l + on_trailing[:, :, None, None, None] * d_out[:, None]
    dq, dk, dv, dg, dbeta, da, ddt, dinit_l = _core_bwd(largs, do, dfin_l, lopts, impl)
    dinit = None
    if init is not None:  # the local initial states come from init (base, last_init); the carry is handled by D
        def local_init(init_):
            base_, last_, _ = _cp_setup(fargs[:-1] + (init_,), plan, opts)
            return _cp_local_init(base_, jnp.zeros_like(carry), last_)

        _, init_vjp = jax.vjp(local_init, init)
        (dinit,) = init_vjp(dinit_l.astype(cdt))
    # Inputs replicated over the cp axes: every device saw part of their use.
    da, ddt = jax.lax.psum((da, ddt), axes)
    if init is not None:
        dinit = jax.lax.psum(dinit, axes)
        if dfin_kv is not None:
            reached = jax.lax.psum(_final_hits(slot, plan, opts.num_slots).astype(jnp.int32), axes) > 0
            dinit = dinit + jnp.where(reached[:, :, None, None, None], 0.0, _to_layout(dfin_kv, opts)).astype(dinit.dtype)
    return dq, dk, dv, dg, dbeta, da, ddt, dinit


# ----------------------------------------------------------------------------------------------------
# Sharding rule and partitioning callbacks.
# ----------------------------------------------------------------------------------------------------

def _shape(t):
    from jax._src.lib.mlir import ir
    return tuple(ir.RankedTensorType(t).shape)


def _rule(num_args, has_init, has_ct_fin, H, HV, opts, backward):
    # opts.cp_record: the forward also returns the context-parallel record [B, T, HV, R] (laid like v, its
    # last axis "z" never split) and o_map [B, T, HV, K]; the backward takes both as its last operands.
    hv = "h" if H == HV else "(h r)"
    st = f"b s {hv} d k" if opts.state_vk else f"b s {hv} k d"
    q = "b t h k"
    v = f"b t {hv} d"
    g = f"b t {hv} k"
    beta = f"b t {hv}"
    a = f"b {hv}"
    dt = f"b {hv} k"
    rec = [f"b t {hv} z", f"b t {hv} k"] if opts.cp_record else []  # the record, o_map
    # opts.save_residuals: the forward also returns what the backward would recompute (the backward's last
    # operands): chunk states [B, NW + 1, HV, K, V], Qg, Kd, W, U [B, T, HV, K], A_qk [B, T, HV, 64], gamma
    # [B, NW + S, HV, K] (axes "n", "c", "m" never split).
    rec += [f"b n {hv} k d"] + [g] * 4 + [f"b t {hv} c", f"b m {hv} k"] if opts.save_residuals else []
    ins = [q, q, v, g, beta, a, dt, "b t"] + ([st] if has_init else [])
    if not backward:
        outs = [v] + ([st] if opts.return_final_state else []) + rec
    else:
        ins += [v] + ([st] if has_ct_fin else []) + rec
        outs = [q, q, v, g, beta, a, dt] + ([st] if has_init else [])
    assert len(ins) == num_args, (ins, num_args)
    rule = ", ".join(ins) + " -> " + ", ".join(outs)
    order = list(dict.fromkeys(rule.replace("(", " ").replace(")", " ").replace(",", " ").replace("->", " ").split()))
    # Shardy wants special factors in the order factors first appear in the rule.
    kw = dict(need_replication_factors=tuple(f for f in order if f in ("k", "d", "s", "r", "z", "n", "c", "m")))
    if H != HV:
        kw["r"] = HV // H
    return rule, kw


def _fwd_rule(opts, impl, mesh, operand_types, result_types):
    del impl, mesh, result_types
    H, HV = _shape(operand_types[0])[2], _shape(operand_types[2])[2]
    return _rule(len(operand_types), len(operand_types) == 9, False, H, HV, opts, backward=False)


def _bwd_rule(opts, impl, mesh, operand_types, result_types):
    del impl, mesh
    H, HV = _shape(operand_types[0])[2], _shape(operand_types[2])[2]
    has_init = len(result_types) == 8
    n_fixed = 8 + int(has_init) + 1 + 2 * int(bool(opts.cp_record)) + 7 * int(opts.save_residuals)
    return _rule(len(operand_types), has_init, len(operand_types) > n_fixed, H, HV, opts, backward=True)


def _entry_axes(spec, dim):
    if spec is None or dim >= len(spec) or spec[dim] is None:
        return ()
    e = spec[dim]
    return tuple(e) if isinstance(e, (tuple, list)) else (e,)


def _spec_of(x):
    s = getattr(x, "sharding", None)
    return getattr(s, "spec", None)


def _axes_size(mesh, axes):
    return int(math.prod(mesh.shape[a] for a in axes))


def _plan_shardings(mesh, arg_shapes, result_shape):
    """Decide the (b, t, h) mesh axes from the operands/results Shardy gave us."""
    args = arg_shapes[0]
    q, v = args[0], args[2]
    o = result_shape[0]
    B, T, H, _ = q.shape
    cands = [_spec_of(q), _spec_of(v), _spec_of(args[3]), _spec_of(o)]

    def pick(dim, size):
        for sp in cands:
            ax = _entry_axes(sp, dim)
            if ax:
                return ax if size % _axes_size(mesh, ax) == 0 else ()
        return ()

    b = pick(0, B)
    t = tuple(a for a in pick(1, T) if a not in b)
    if t and T % _axes_size(mesh, t):
        t = ()
    h = tuple(a for a in pick(2, H) if a not in b and a not in t)
    if h and H % _axes_size(mesh, h):
        h = ()
    return b, t, h


def _e(axes):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _specs(mesh, b, t, h):
    B, Tt, Hh = _e(b), _e(t), _e(h)
    ns = lambda *e: NamedSharding(mesh, P(*e))
    return dict(q=ns(B, Tt, Hh, None), beta=ns(B, Tt, Hh), a=ns(B, Hh), dt=ns(B, Hh, None),
                slot=ns(B, Tt), st=ns(B, None, Hh, None, None), g4=ns(B, None, Hh, None))


def _saved_shardings(sp):
    """Shardings of the forward's saved results (ops._ffi_forward_saving): chunk states, Qg, Kd, W, U, A_qk, gamma."""
    return (sp["st"],) + (sp["q"],) * 5 + (sp["g4"],)


def _arg_shardings(sp, args):
    init = args[8]
    return (sp["q"], sp["q"], sp["q"], sp["q"], sp["beta"], sp["a"], sp["dt"], sp["slot"],
            None if init is None else sp["st"])


def _fwd_partition(opts, impl, mesh, arg_shapes, result_shape):
    b, t, h = _plan_shardings(mesh, arg_shapes, result_shape)
    sp = _specs(mesh, b, t, h)
    args = arg_shapes[0]
    in_sh = (_arg_shardings(sp, args),)
    out_sh = (sp["q"], sp["st"] if result_shape[1] is not None else None) + \
        ((sp["q"], sp["q"]) if opts.cp_record else (None, None)) + \
        (_saved_shardings(sp) if opts.save_residuals else None,)

    def lower(args):
        if t:
            # Sequence-sharded without context_parallel_axis (save_residuals is never set with it): the per-device
            # runs are not the true ones, so the saved results are zeros (local shapes) the backward ignores.
            n = _axes_size(mesh, t)
            saved = None
            if opts.save_residuals:
                q, v = args[0], args[2]
                shapes = _workspace.saved_structs(q.shape[0], q.shape[1] * n, v.shape[2], q.shape[3], v.shape[3],
                                                  opts.num_slots)
                # per device: axis 1 divided by n where the sharding puts the sequence axes on it (the per-token
                # arrays; not the per-chunk ones)
                local = lambda shp, sh: shp[:1] + (shp[1] // n if sh.spec[1] is not None else shp[1],) + shp[2:]
                saved = tuple(jnp.zeros(local(shp, sh), jnp.dtype(dt))
                              for (shp, dt), sh in zip(shapes, _saved_shardings(sp)))
            return _cp_fwd(args, opts, impl, t, n) + (saved,)
        return _fwd_body(opts, impl, args)

    return mesh, lower, out_sh, in_sh


def _bwd_partition(opts, impl, mesh, arg_shapes, result_shape):
    args, do, dfin, rec, omap, saved = arg_shapes
    b, t, h = _plan_shardings(mesh, (args,), (do,))
    sp = _specs(mesh, b, t, h)
    in_sh = (_arg_shardings(sp, args), sp["q"], None if dfin is None else sp["st"], None if rec is None else sp["q"],
             None if omap is None else sp["q"], None if saved is None else _saved_shardings(sp))
    out_sh = (sp["q"], sp["q"], sp["q"], sp["q"], sp["beta"], sp["a"], sp["dt"],
              None if result_shape[7] is None else sp["st"])

    def lower(args, do, dfin, rec, omap, saved):
        if t:
            return _cp_bwd(args, do, dfin, rec, omap, opts, impl, t, _axes_size(mesh, t))
        return _core_bwd(args, do, dfin, opts, impl, saved)

    return mesh, lower, out_sh, in_sh


def _with_record(out, args, opts):
    """(o, fin) of an unpartitioned (or not sequence-sharded) forward, with an empty (all-zero, unstamped)
    context-parallel record and o_map when opts asks for them."""
    o, fin = out
    if not opts.cp_record:
        return o, fin, None, None
    q, v = args[0], args[2]
    return (o, fin, jnp.zeros(v.shape[:3] + (opts.cp_record,), jnp.float32),
            jnp.zeros(v.shape[:3] + (q.shape[-1],), v.dtype))


def _fwd_body(opts, impl, args):
    """-> (o, fin, record, o_map, saved): the last three None unless opts asks for them."""
    if opts.save_residuals:
        o, fin, saved = _ops()._ffi_forward_saving(args, opts, impl)
    else:
        (o, fin), saved = _core_fwd(args, opts, impl), None
    return _with_record((o, fin), args, opts) + (saved,)


def _bwd_body(opts, impl, args, do, dfin, rec, omap, saved):
    del rec, omap  # one device: no carried state
    return _core_bwd(args, do, dfin, opts, impl, saved)


_fwd_op = custom_partitioning(_fwd_body, static_argnums=(0, 1))
_fwd_op.def_partition(partition=_fwd_partition, sharding_rule=_fwd_rule)
_bwd_op = custom_partitioning(_bwd_body, static_argnums=(0, 1))
_bwd_op.def_partition(partition=_bwd_partition, sharding_rule=_bwd_rule)


# ----------------------------------------------------------------------------------------------------
# vmap: fold mapped axes into the batch axis (every operand is per row).
# ----------------------------------------------------------------------------------------------------

def _fold(x, batched, n):
    if x is None:
        return None
    if not batched:
        x = jnp.broadcast_to(x, (n,) + x.shape)
    return x.reshape((n * x.shape[1],) + x.shape[2:])


def _unfold(y, n):
    return None if y is None else y.reshape((n, y.shape[0] // n) + y.shape[1:])


def _inside_shard_map() -> bool:
    """True while tracing the body of a shard_map (mesh axes manual): the op is already per device there."""
    am = jax.sharding.get_abstract_mesh()
    return am is not None and not am.empty and bool(am.manual_axes)


@functools.lru_cache(maxsize=None)
def _vmappable(kind, opts, impl):
    op = _fwd_op if kind == "fwd" else _bwd_op
    body = _fwd_body if kind == "fwd" else _bwd_body

    def fn(*xs):
        if _inside_shard_map():
            # Per device already: no custom_partitioning. FFI results carry no varying axes; give them the
            # inputs' (core() made every input vary over the same axes).
            return _reference._vary_like(body(opts, impl, *xs), xs)
        return op(opts, impl, *xs)

    f = custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, *xs):
        flat, tree = jax.tree_util.tree_flatten(xs)
        flags = jax.tree_util.tree_leaves(in_batched)
        assert len(flags) == len(flat)
        folded = jax.tree_util.tree_unflatten(tree, [_fold(x, bt, axis_size) for x, bt in zip(flat, flags)])
        out = f(*folded)
        out = jax.tree_util.tree_map(lambda y: _unfold(y, axis_size), out)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return f


# ----------------------------------------------------------------------------------------------------
# The differentiable, partitionable core.
# ----------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sharded_core(args, opts, impl):
    return _vmappable("fwd", opts, impl)(args)[:2]


def _sharded_core_fwd(args, opts, impl):
    o, fin, rec, omap, saved = _vmappable("fwd", _saving_opts(args, opts, impl), impl)(args)
    return (o, fin), (args, rec, omap, saved)


def _sharded_core_bwd(opts, impl, res, cts):
    args, rec, omap, saved = res
    opts = _saving_opts(args, opts, impl)
    do, dfin = cts
    if not opts.return_final_state:
        dfin = None
    elif dfin is not None:
        dfin = dfin.astype(_inputs.compute_dtype(args[0].dtype))
    do = do.astype(args[2].dtype)
    dq, dk, dv, dg, dbeta, da, ddt, dinit = _vmappable("bwd", opts, impl)(args, do, dfin, rec, omap, saved)
    return ((dq, dk, dv, dg, dbeta, da, ddt, None, dinit),)


_sharded_core.defvjp(_sharded_core_fwd, _sharded_core_bwd)


def core_args(c: _inputs.CoreInputs) -> tuple:
    """The per-device bodies' args tuple of canonical inputs (A_log / dt_bias broadcast to rows)."""
    B = c.q.shape[0]
    a_rows = jnp.broadcast_to(c.a_log.astype(jnp.float32), (B,) + c.a_log.shape)
    dt_rows = jnp.broadcast_to(c.dt_bias.astype(jnp.float32), (B,) + c.dt_bias.shape)
    return (c.q, c.k, c.v, c.g, c.beta, a_rows, dt_rows, c.slot, c.initial_state)


def core(c: _inputs.CoreInputs, opts: _inputs.KdaOptions, impl: str):
    """The core op on canonical inputs, partitionable under jit -> (o, final_state or None)."""
    args = core_args(c)
    if _inside_shard_map():
        # Every operand varies over the same manual axes, so each cotangent matches its primal; the
        # transpose of this cast sums the gradients of replicated inputs (A_log, dt_bias) over devices.
        args = _reference._vary_like(args, args)
    o, fin = _sharded_core(args, opts, impl)
    return o, (fin if opts.return_final_state else None)


# ----------------------------------------------------------------------------------------------------
# context_parallel_axis
# ----------------------------------------------------------------------------------------------------

def _context_mesh():
    am = jax.sharding.get_abstract_mesh()
    if am is not None and not am.empty:
        return am
    from jax._src import mesh as mesh_lib
    pm = mesh_lib.thread_resources.env.physical_mesh
    return None if pm.empty else pm


def constrain_context_parallel(c: _inputs.CoreInputs, axis):
    """Shards the sequence axis of the canonical inputs over the mesh axis (or axes) ``axis`` -> (inputs,
    width of the context-parallel record: KdaOptions.cp_record, 0 on one device)."""
    mesh = _context_mesh()
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if mesh is None:
        raise ValueError("flashkda_jax.kda: context_parallel_axis needs a mesh in context "
                         "(`with jax.set_mesh(mesh):` or `with mesh:`)")
    for a in axes:
        if a not in mesh.axis_names:
            raise ValueError(f"flashkda_jax.kda: context_parallel_axis {a!r} is not an axis of the mesh "
                             f"{tuple(mesh.axis_names)}")
    n = int(math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in axes))
    T = c.q.shape[1]
    if T % n:
        raise ValueError(f"flashkda_jax.kda: context parallelism over {axes} ({n} devices) needs T divisible "
                         f"by {n}, got T={T}")
    if n == 1:
        return c, 0
    U = P.UNCONSTRAINED
    ax = _e(axes)
    wsc = jax.lax.with_sharding_constraint
    seq = lambda x: wsc(x, P(*((U, ax) + (U,) * (x.ndim - 2))))
    c = dataclasses.replace(c, q=seq(c.q), k=seq(c.k), v=seq(c.v), g=seq(c.g), beta=seq(c.beta),
                            slot=seq(c.slot))
    return c, record_width(T // n, c.q.shape[-1], c.v.shape[-1])
