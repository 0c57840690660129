"""Pure-JAX KDA: ``kda_recurrent`` (token-by-token lax.scan, the oracle) and ``kda_chunked`` (the
chunked WY form, the portable ``"xla"`` implementation).

Both take every option of :func:`flashkda_jax.kda` and return ``(o, final_state)`` (``final_state`` is
None unless ``return_final_state``). They accumulate in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flashkda_jax import _inputs
from flashkda_jax import preprocess as _pre
from flashkda_jax import segments as _segments

__all__ = ["kda_recurrent", "kda_chunked", "recurrent_core", "chunked_core"]

_HI = jax.lax.Precision.HIGHEST


def _varying_axes(x) -> set:
    """The manual mesh axes x varies over inside shard_map (empty elsewhere); jax spells it .vma or
    .manual_axis_type.varying depending on the version."""
    t = jax.typeof(x)
    if hasattr(t, "vma"):
        return set(t.vma)
    return set(getattr(getattr(t, "manual_axis_type", None), "varying", ()) or ())


def _vary_like(carry, *refs):
    """Inside shard_map a scan's carry must vary over the same manual mesh axes as the values its body
    mixes in: cast freshly made initial carries to the union of refs' varying axes (no-op elsewhere)."""
    axes = set()
    for r in jax.tree.leaves(refs):
        axes |= _varying_axes(r)
    if not axes:
        return carry

    def cast(x):
        missing = tuple(sorted(axes - _varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, carry)


def _to_kv(state, opts):
    return state if state is None or not opts.state_vk else jnp.swapaxes(state, -1, -2)


def _from_kv(state, opts):
    return state if state is None or not opts.state_vk else jnp.swapaxes(state, -1, -2)


def _slot_states(init, B, S, HV, K, V, cdt):
    """Initial states per slot, [B, S, HV, K, V] (zeros when none was given)."""
    if init is None:
        return jnp.zeros((B, S, HV, K, V), cdt)
    return init.astype(cdt)


def recurrent_core(core: _inputs.CoreInputs, opts: _inputs.KdaOptions):
    """The oracle on canonical inputs: one lax.scan step per token."""
    q, k, v, g, beta = _pre.effective_inputs(core, opts)
    cdt = q.dtype
    B, T, HV, K = q.shape
    V = v.shape[-1]
    S = max(opts.num_slots, 1)
    slot = core.slot
    starts = _segments.sequence_starts(slot)
    ends = _segments.sequence_ends(slot)
    init = _slot_states(_to_kv(core.initial_state, opts), B, S, HV, K, V, cdt)

    def step(carry, xs):
        state, finals = carry
        q_t, k_t, v_t, g_t, b_t, s_t, st_t, en_t = xs
        valid = s_t >= 0
        in_range = (s_t >= 0) & (s_t < opts.num_slots)
        fresh = init[jnp.arange(B), jnp.clip(s_t, 0, S - 1)] * in_range[:, None, None, None]
        state = jnp.where(st_t[:, None, None, None], fresh, state)
        decayed = jnp.exp(g_t)[..., None] * state  # [B, HV, K, V]
        pred = jnp.einsum("bhk,bhkv->bhv", k_t, decayed, precision=_HI)
        upd = decayed + b_t[..., None, None] * k_t[..., None] * (v_t - pred)[..., None, :]
        new_state = jnp.where(valid[:, None, None, None], upd, state)
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t, new_state, precision=_HI) * valid[:, None, None]
        if opts.return_final_state:
            write = (en_t & in_range)[:, None] & (jnp.arange(S)[None, :] == s_t[:, None])  # [B, S]
            finals = jnp.where(write[:, :, None, None, None], new_state[:, None], finals)
        return (new_state, finals), o_t

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    xs = tuple(map(tm, (q, k, v, g, beta, slot, starts, ends)))
    state0 = jnp.zeros((B, HV, K, V), cdt)
    finals0 = init if opts.return_final_state else jnp.zeros((0,), cdt)
    carry0 = _vary_like((state0, finals0), q, k, v, g, beta, slot, init)
    (_, finals), o = jax.lax.scan(step, carry0, xs)
    o = jnp.moveaxis(o, 0, 1).astype(core.v.dtype)
    return o, (_from_kv(finals, opts) if opts.return_final_state else None)


# ----------------------------------------------------------------------------------------------------
# Chunked WY form.
#
# Inside a chunk of C tokens, with G the in-chunk cumulative log-decay, every decay factor is formed as
# exp(G_i - G_j) for j <= i (never exp(-G)), so any gate <= 0 stays finite. Tokens of different sequences
# never interact (a same-sequence mask); a token whose sequence started before the chunk reads the
# carried state, one whose sequence starts inside it reads its slot's initial state.
# ----------------------------------------------------------------------------------------------------

def _inverse_by_substitution(a):
    """(I + a)^-1 for strictly lower-triangular a [..., C, C]: forward substitution in plain XLA ops."""
    C = a.shape[-1]
    eye = jnp.eye(C, dtype=a.dtype)

    def row(i, x):
        xi = eye[i] - jnp.einsum("...j,...jn->...n", a[..., i, :], x, precision=_HI)
        return x.at[..., i, :].set(xi)

    return jax.lax.fori_loop(0, C, row, _vary_like(jnp.zeros_like(a), a))


def _inverse_by_trsm(a):
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    return jax.scipy.linalg.solve_triangular(eye + a, jnp.broadcast_to(eye, a.shape), lower=True,
                                             unit_diagonal=True)


@jax.custom_jvp
def unit_lower_inverse(a):
    """(I + a)^-1 for a strictly lower-triangular a [..., C, C] (the upper part and diagonal are ignored).

    On CPU this is a forward substitution: jaxlib's LAPACK trsm splits its batch over the intra-op
    thread pool and blocks on it, which deadlocks when several thunks (or host devices) share a pool on
    a machine with few cores. Elsewhere it is the backend's triangular solve.
    """
    a = jnp.tril(a, -1)
    return jax.lax.platform_dependent(a, cpu=_inverse_by_substitution, default=_inverse_by_trsm)


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    x = unit_lower_inverse(a)
    dx = -jnp.einsum("...ij,...jk,...kl->...il", x, jnp.tril(da, -1), x, precision=_HI)
    return x, dx


def chunked_core(core: _inputs.CoreInputs, opts: _inputs.KdaOptions, chunk_size: int = 64):
    q, k, v, g, beta = _pre.effective_inputs(core, opts)
    cdt = q.dtype
    B, T, HV, K = q.shape
    V = v.shape[-1]
    S = max(opts.num_slots, 1)
    C = int(chunk_size)
    N = -(-T // C)
    pad = N * C - T
    slot = core.slot
    ends = _segments.sequence_ends(slot)
    if pad:
        padt = lambda x, fill=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        q, k, v, g, beta = map(padt, (q, k, v, g, beta))
        slot = padt(slot, -1)
        ends = padt(ends, False)
    init = _slot_states(_to_kv(core.initial_state, opts), B, S, HV, K, V, cdt)
    if opts.num_slots == 0:
        init = jnp.zeros((B, 1, HV, K, V), cdt)

    # [N, B, HV, C, ...] chunk-major, head-major.
    def chunks(x):
        x = x.reshape((B, N, C) + x.shape[2:])
        x = jnp.moveaxis(x, 1, 0)  # [N, B, C, HV, (F)]
        return jnp.moveaxis(x, 3, 2)

    qc, kc, vc, gc = (chunks(x) for x in (q, k, v, g))          # [N, B, HV, C, F]
    bc = jnp.moveaxis(beta.reshape(B, N, C, HV), 1, 0)           # [N, B, C, HV]
    bc = jnp.moveaxis(bc, 3, 2)                                  # [N, B, HV, C]
    sc = jnp.moveaxis(slot.reshape(B, N, C), 1, 0)               # [N, B, C]
    ec = jnp.moveaxis(ends.reshape(B, N, C), 1, 0)               # [N, B, C]

    tril = jnp.tril(jnp.ones((C, C), bool))
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    slots_range = jnp.arange(S)

    def body(carry, xs):
        state, carry_sid, finals = carry              # [B,HV,K,V], [B], [B,S,HV,K,V] or ()
        qx, kx, vx, gx, bx, sx, ex = xs
        valid = sx >= 0                                # [B, C]
        same = (sx[:, :, None] == sx[:, None, :]) & valid[:, :, None]   # [B, C, C]
        cont = valid & (sx == carry_sid[:, None])      # token continues the carried sequence
        # Decays are formed as exp(G_i - G_j) for j <= i (never exp(-G) on its own), so any gate <= 0 stays
        # finite. (A pairwise cumulative sum would also avoid the cancellation of two large cumulative
        # gates, but costs O(C) per pair on XLA; the loss only shows with gates near -1e3 per step.)
        ii = jnp.arange(C)
        # Padding gates are zeroed so that no gradient reaches them through cancelling differences.
        gx = jnp.where(valid[:, None, :, None], gx, 0.0)
        G = jnp.cumsum(gx, axis=-2)                    # [B, HV, C, K]
        diff = G[:, :, :, None, :] - G[:, :, None, :, :]            # [B, HV, C, C, K]
        m = (same & tril[None])[:, None, :, :, None]
        D = jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)
        # Reference point: the cumulative gate just before the token's sequence entered this chunk.
        first_in_chunk = valid & ~jnp.concatenate([jnp.zeros((B, 1), bool), sx[:, 1:] == sx[:, :-1]], 1)
        start_idx = jax.lax.cummax(jnp.where(first_in_chunk, ii[None], 0), axis=1)  # [B, C]
        Gprev = G - gx                                 # cumulative gate before token i
        Gref = jnp.take_along_axis(Gprev, start_idx[:, None, :, None], axis=2)  # [B, HV, C, K]
        Gref = jnp.where(cont[:, None, :, None], 0.0, Gref)
        gam = jnp.exp(G - Gref)                        # decay from the token's reference point, <= 1
        Akk = jnp.einsum("bhik,bhjk,bhijk->bhij", kx, kx, D, precision=_HI)
        Akk = Akk * bx[..., :, None] * strict[None, None]
        Aqk = jnp.einsum("bhik,bhjk,bhijk->bhij", qx, kx, D, precision=_HI)
        # M = (I + Akk)^-1 diag(beta);  W = M (gam * K), U = M V
        Tinv = unit_lower_inverse(Akk)
        W = jnp.einsum("bhij,bhjk->bhik", Tinv, bx[..., None] * gam * kx, precision=_HI)
        U = jnp.einsum("bhij,bhjv->bhiv", Tinv, bx[..., None] * vx, precision=_HI)
        # Per-token start state: carried state or the slot's initial state.
        in_range = valid & (sx < opts.num_slots)
        onehot = ((sx[..., None] == slots_range) & (in_range & ~cont)[..., None]).astype(cdt)  # [B, C, S]
        Qp = gam * qx - jnp.einsum("bhij,bhjk->bhik", Aqk, W, precision=_HI)
        Wp = W
        # o_i = Qp_i S0(i) + (Aqk U)_i
        o = jnp.einsum("bhij,bhjv->bhiv", Aqk, U, precision=_HI)
        o = o + jnp.einsum("bhik,bhkv->bhiv", Qp, state, precision=_HI) * cont[:, None, :, None]
        o = o + jnp.einsum("bhik,bis,bshkv->bhiv", Qp, onehot, init, precision=_HI)
        o = o * valid[:, None, :, None]

        def state_after(sel, S0):
            """State after the token selected by sel [B, R, C] (one-hot rows), from start states S0 [B,R,HV,K,V]."""
            Dsel = jnp.einsum("bri,bhijk->brhjk", sel, D, precision=_HI)                       # [B, R, HV, C, K]
            gsel = jnp.einsum("bri,bhik->brhk", sel, gam, precision=_HI)                       # [B, R, HV, K]
            resid = U[:, None] - jnp.einsum("bhjk,brhkv->brhjv", Wp, S0, precision=_HI)  # [B,R,HV,C,V]
            return gsel[..., None] * S0 + jnp.einsum("brhjk,bhjk,brhjv->brhkv", Dsel, kx, resid, precision=_HI)

        # Carry: the state after the chunk's last token (if it is not padding).
        last = jnp.zeros((B, 1, C), cdt).at[:, 0, C - 1].set(1.0)
        last_cont = cont[:, C - 1]
        last_slot = sx[:, C - 1]
        last_init = jnp.einsum("bs,bshkv->bhkv",
                               ((slots_range == last_slot[:, None]) & (last_slot < opts.num_slots)[:, None]).astype(cdt),
                               init)
        S0_last = jnp.where(last_cont[:, None, None, None], state, last_init)
        new_state = state_after(last, S0_last[:, None])[:, 0]
        new_sid = sx[:, C - 1]
        if opts.return_final_state:
            # Every sequence ending in this chunk writes its slot.
            sel = ((sx[:, None, :] == slots_range[None, :, None]) & (ex & in_range)[:, None, :]).astype(cdt)  # [B,S,C]
            has_end = jnp.sum(sel, axis=-1) > 0                                   # [B, S]
            sel_cont = jnp.einsum("bsi,bi->bs", sel, cont.astype(cdt)) > 0
            S0 = jnp.where(sel_cont[..., None, None, None], state[:, None], init)
            fin = state_after(sel, S0)
            finals = jnp.where(has_end[..., None, None, None], fin, finals)
        return (new_state, new_sid, finals), o

    body = jax.checkpoint(body)
    state0 = jnp.zeros((B, HV, K, V), cdt)
    sid0 = jnp.full((B,), -1, jnp.int32)
    finals0 = init if opts.return_final_state else jnp.zeros((0,), cdt)
    carry0 = _vary_like((state0, sid0, finals0), q, k, v, g, beta, slot, init)
    (_, _, finals), o = jax.lax.scan(body, carry0, (qc, kc, vc, gc, bc, sc, ec))
    # o: [N, B, HV, C, V] -> [B, T, HV, V]
    o = jnp.moveaxis(o, 0, 1)                 # [B, N, HV, C, V]
    o = jnp.moveaxis(o, 2, 3).reshape(B, N * C, HV, V)[:, :T]
    o = o.astype(core.v.dtype)
    return o, (_from_kv(finals, opts) if opts.return_final_state else None)


def _public(core_fn, q, k, v, g, beta, **kwargs):
    core, opts = _inputs.prepare(q, k, v, g, beta, **kwargs)
    o, fin = core_fn(core, opts)
    return o, _inputs.restore_final_state(fin, opts)


def kda_recurrent(q, k, v, g, beta, **kwargs):
    """Token-by-token KDA (the oracle). Keyword arguments as :func:`flashkda_jax.kda` (no ``implementation``)."""
    return _public(recurrent_core, q, k, v, g, beta, **kwargs)


def kda_chunked(q, k, v, g, beta, *, chunk_size: int = 64, **kwargs):
    """Chunked WY-form KDA in pure JAX (stable for any gate <= 0). Arguments as :func:`flashkda_jax.kda`."""
    return _public(functools.partial(chunked_core, chunk_size=chunk_size), q, k, v, g, beta, **kwargs)
