"""Sequence slices with recomputation (``kda(..., checkpoint_slices=n)``): a training step whose peak memory
holds one slice's intermediates instead of the whole sequence's.

The op runs as ``n`` slices of the sequence axis, one after the other, chained through their states. The
forward keeps nothing per token for the backward: only, per slice and batch row, the state of the sequence
crossing into it (``[B, HV, K, V]`` f32 each). The backward walks the slices last to first and runs each
slice's backward from its raw inputs (the CUDA backward then recomputes the slice's chunk states and prep
outputs), so its workspace, its input slices and its gradient slices are a slice's size; the gradients are
written into the full-size results in place. Cost: the recomputation (the CUDA backward's states pass and
prep), the slice copies and shorter sequential passes: +30-55% fwd+bwd time at 4 slices on an H100 for a peak of
1.4-1.8x instead of 2.7x the inputs + outputs + gradients (the README's Memory section has the figures).

Slices and state slots. The core op sees per-token slots (``slot[b, t]``, -1 = padding, ``0 .. S - 1`` with a
state). A slice call gets S + 2 slots: the S real ones, slot S for the sequence crossing into the slice from the
previous one (initial state: the carried state X) and slot S + 1 for the one crossing out into the next slice
(initial state: its real slot's, or zero); stateless slots (>= S) move up by 2. Real slots start every slice
from the caller's initial states, so a slot's final state is taken from the slice where its sequence ends
(the others pass through). Padding, segment ids and cu_seqlens slice like any other token; slices are whole
chunks (multiples of 64 tokens) but for the last.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flashkda_jax import _inputs
from flashkda_jax import sharding as _sharding  # the per-slice op: vmappable, partitionable over batch and heads

_CHUNK = 64


def slice_length(T: int, n: int) -> int:
    """Tokens per slice for ``n`` slices of T tokens: whole 64-token chunks (the last slice may be shorter)."""
    chunks = -(-T // _CHUNK)
    return -(-chunks // n) * _CHUNK


class _Plan(NamedTuple):
    local: jax.Array    # [B, L] slots of the slice call (S: crossing in, S + 1: crossing out, stateless + 2)
    s_in: jax.Array     # [B] real slot of the sequence crossing in, -1 if none
    s_out: jax.Array    # [B] real slot of the sequence crossing out (not the one crossing in), -1 if none
    spans: jax.Array    # [B] the sequence crossing in also crosses out
    ends: jax.Array     # [B, S] real slot s ends in this slice under its own slot
    in_ends: jax.Array  # [B] the sequence crossing in ends here and has a real slot


def _plan(slot, start, L: int, S: int) -> _Plan:
    T = slot.shape[1]
    sl = lax.dynamic_slice_in_dim(slot, start, L, axis=1)
    prev = lax.dynamic_index_in_dim(slot, jnp.maximum(start - 1, 0), axis=1, keepdims=False)
    nxt = lax.dynamic_index_in_dim(slot, jnp.minimum(start + L, T - 1), axis=1, keepdims=False)
    prev = jnp.where(start > 0, prev, -1)
    nxt = jnp.where(start + L < T, nxt, -1)
    first, last = sl[:, 0], sl[:, -1]
    s_in = jnp.where((prev >= 0) & (first == prev), prev, -1)
    crosses_out = (last >= 0) & (nxt == last)
    spans = crosses_out & (s_in == last)
    s_out = jnp.where(crosses_out & ~spans, last, -1)
    is_in = (sl == s_in[:, None]) & (s_in >= 0)[:, None]
    is_out = (sl == s_out[:, None]) & (s_out >= 0)[:, None]
    local = jnp.where(is_in, S, jnp.where(is_out, S + 1, jnp.where(sl >= S, sl + 2, sl))).astype(jnp.int32)
    B = slot.shape[0]
    if S > 0:  # per row (vmap: gathers / scatters with a batch dimension, which partition without communication)
        own = (local >= 0) & (local < S)
        ends = jax.vmap(lambda loc, o: jnp.zeros((S,), bool).at[loc].max(o))(jnp.clip(local, 0, S - 1), own)
    else:
        ends = jnp.zeros((B, 0), bool)
    in_ends = (s_in >= 0) & (s_in < S) & ~spans
    return _Plan(local, s_in, s_out, spans, ends, in_ends)


def _bcast(mask, x):
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _assemble(init_full, X, p: _Plan):
    """(caller's initial states [B, S, HV, a, b], carried state [B, HV, a, b]) -> the slice's [B, S + 2, ...]."""
    S = init_full.shape[1]
    if S > 0:
        own = jax.vmap(lambda x, i: x[i])(init_full, jnp.clip(p.s_out, 0, S - 1))
        init_out = jnp.where(_bcast((p.s_out >= 0) & (p.s_out < S), own), own, 0)
    else:
        init_out = jnp.zeros_like(X)
    return jnp.concatenate([init_full, X[:, None], init_out[:, None]], axis=1)


def _disassemble(fin, F, p: _Plan):
    """(the slice's final states [B, S + 2, ...], running final states F [B, S, ...]) -> (F after the slice,
    the state of the sequence crossing into the next slice). Linear in (fin, F)."""
    S = F.shape[1]
    F_new = jnp.where(_bcast(p.ends, F), fin[:, :S], F)
    if S > 0:
        mask_in = (jnp.arange(S)[None, :] == p.s_in[:, None]) & p.in_ends[:, None]
        F_new = jnp.where(_bcast(mask_in, F_new), fin[:, S][:, None], F_new)
    crossing_out = jnp.where(_bcast(p.s_out >= 0, fin[:, S]), fin[:, S + 1], 0)
    X_new = jnp.where(_bcast(p.spans, fin[:, S]), fin[:, S], crossing_out)
    return F_new, X_new


def _slice_opts(opts: _inputs.KdaOptions) -> _inputs.KdaOptions:
    return dataclasses.replace(opts, num_slots=opts.num_slots + 2, return_final_state=True, state_mode="segments",
                               save_residuals=False, cp_record=0)


def _init_full(args, opts):
    q, v, init = args[0], args[2], args[8]
    if init is not None:
        return init
    B, HV, K, V = q.shape[0], v.shape[2], q.shape[3], v.shape[3]
    ab = (V, K) if opts.state_vk else (K, V)
    return jnp.zeros((B, opts.num_slots, HV) + ab, _inputs.compute_dtype(q.dtype))


def _slice_args(args, start, L, p: _Plan, init_p):
    q, k, v, g, beta, a, dt = args[:7]
    cut = lambda x: lax.dynamic_slice_in_dim(x, start, L, axis=1)
    return (cut(q), cut(k), cut(v), cut(g), cut(beta), a, dt, p.local, init_p)


def _bounds(T: int, n: int):
    """(slice length L, full slices m, tail length): slices [i L, (i + 1) L) for i < m, then [m L, T)."""
    L = min(slice_length(T, n), T)
    m = T // L
    return L, m, T - m * L


def _fwd_slice(args, init_full, opts, impl, start, L, F, X):
    S = opts.num_slots
    p = _plan(args[7], start, L, S)
    init_p = _assemble(init_full, X, p)
    o, fin = _sharding._vmappable("fwd", _slice_opts(opts), impl)(_slice_args(args, start, L, p, init_p))[:2]
    F, X = _disassemble(fin, F, p)
    return o, F, X


def _forward(args, opts, impl, n):
    """-> (o, final states F [B, S, ...]), X_in [slices, B, HV, a, b] (the states crossing into each slice)."""
    q, v = args[0], args[2]
    T = q.shape[1]
    L, m, tail = _bounds(T, n)
    init_full = _init_full(args, opts)
    F = init_full
    X = jnp.zeros((F.shape[0],) + F.shape[2:], F.dtype)
    xs = jnp.zeros((m + (tail > 0),) + X.shape, X.dtype)
    o = jnp.zeros(v.shape, v.dtype)

    def body(i, c):
        o, F, X, xs = c
        xs = xs.at[i].set(X)
        o_i, F, X = _fwd_slice(args, init_full, opts, impl, i * L, L, F, X)
        return lax.dynamic_update_slice_in_dim(o, o_i, i * L, axis=1), F, X, xs

    o, F, X, xs = lax.fori_loop(0, m, body, (o, F, X, xs))
    if tail:
        xs = xs.at[m].set(X)
        o_t, F, X = _fwd_slice(args, init_full, opts, impl, m * L, tail, F, X)
        o = lax.dynamic_update_slice_in_dim(o, o_t, m * L, axis=1)
    return (o, F), xs


def _bwd_slice(args, init_full, opts, impl, start, L, X, do, dF, dX, acc):
    """One slice's backward: its gradients go into the full-size accumulators acc; -> (dF, dX) before it."""
    S = opts.num_slots
    p = _plan(args[7], start, L, S)
    init_p = _assemble(init_full, X, p)
    fin_t = jax.ShapeDtypeStruct(init_p.shape, init_p.dtype)
    dfin_p, dF_prev = jax.linear_transpose(lambda fin, F: _disassemble(fin, F, p), fin_t,
                                           jax.ShapeDtypeStruct(init_full.shape, init_full.dtype))((dF, dX))
    do_i = lax.dynamic_slice_in_dim(do, start, L, axis=1)
    sargs = _slice_args(args, start, L, p, init_p)
    dq, dk, dv, dg, dbeta, da, ddt, dinit_p = _sharding._vmappable("bwd", _slice_opts(opts), impl)(
        sargs, do_i, dfin_p, None, None, None)
    dinit_full, dX_prev = jax.linear_transpose(lambda i0, x0: _assemble(i0, x0, p), init_full,
                                               jax.ShapeDtypeStruct(X.shape, X.dtype))(dinit_p)
    gq, gk, gv, gg, gb, ga, gdt, ginit = acc
    put = lambda full, part: lax.dynamic_update_slice_in_dim(full, part.astype(full.dtype), start, axis=1)
    acc = (put(gq, dq), put(gk, dk), put(gv, dv), put(gg, dg), put(gb, dbeta), ga + da, gdt + ddt,
           ginit + dinit_full)
    return dF_prev, dX_prev, acc


def _backward(args, xs, do, dF, opts, impl, n):
    q, k, v, g, beta, a, dt, slot, init = args
    T = q.shape[1]
    L, m, tail = _bounds(T, n)
    init_full = _init_full(args, opts)
    if dF is None:
        dF = jnp.zeros_like(init_full)
    dF = dF.astype(init_full.dtype)
    dX = jnp.zeros(xs.shape[1:], xs.dtype)
    do = do.astype(v.dtype)
    f32 = jnp.float32
    acc = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), jnp.zeros_like(g), jnp.zeros_like(beta),
           jnp.zeros(a.shape, f32), jnp.zeros(dt.shape, f32), jnp.zeros_like(init_full))
    if tail:
        dF, dX, acc = _bwd_slice(args, init_full, opts, impl, m * L, tail, xs[m], do, dF, dX, acc)

    def body(j, c):
        i = m - 1 - j
        return _bwd_slice(args, init_full, opts, impl, i * L, L, xs[i], do, *c)

    dF, dX, acc = lax.fori_loop(0, m, body, (dF, dX, acc))
    gq, gk, gv, gg, gb, ga, gdt, ginit = acc
    # Slots no sequence reaches pass their final state's cotangent through to their initial state.
    dinit = (ginit + dF) if init is not None else None
    return gq, gk, gv, gg, gb, ga, gdt, None, dinit


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _sliced(args, opts, impl, n):
    return _forward(args, opts, impl, n)[0]


def _sliced_fwd(args, opts, impl, n):
    out, xs = _forward(args, opts, impl, n)
    return out, (args, xs)


def _sliced_bwd(opts, impl, n, res, cts):
    args, xs = res
    do, dF = cts
    return (_backward(args, xs, do, dF if opts.return_final_state else None, opts, impl, n),)


_sliced.defvjp(_sliced_fwd, _sliced_bwd)


def core(c: _inputs.CoreInputs, opts: _inputs.KdaOptions, impl: str, n: int):
    """The core op as ``n`` sequence slices with recomputation -> (o, final_state [B, S, ...] or None)."""
    o, fin = _sliced(_sharding.core_args(c), opts, impl, n)
    return o, (fin if opts.return_final_state else None)
