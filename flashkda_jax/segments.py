"""Ragged batches: segment ids and cu_seqlens turned into per-token sequence slots, on device.

The kernels see one int32 array ``slot[b, t]``: the index (in order of appearance, from 0) of the
sequence token ``t`` of row ``b`` belongs to, or -1 for padding. A sequence starts wherever the slot
changes; nothing here reads device data back to the host, so it all works under jit and in CUDA graphs.
"""

from __future__ import annotations

import jax.numpy as jnp

_COMPARE_ALL_MAX_BOUNDARIES = 64  # cu_seqlens lengths up to which slots_from_cu_seqlens compares all pairs


def slots_from_segment_ids(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """``[..., T]`` segment ids (0 = padding) -> ``[..., T]`` int32 sequence slots (-1 = padding).

    A new sequence starts wherever the id changes along T (so ``1 1 0 1`` holds two sequences).
    """
    seg = segment_ids.astype(jnp.int32)
    prev = jnp.concatenate([jnp.zeros_like(seg[..., :1]), seg[..., :-1]], axis=-1)
    first = jnp.zeros(seg.shape, bool).at[..., 0].set(True)
    valid = seg != 0
    starts = valid & (first | (seg != prev))
    run = jnp.cumsum(starts.astype(jnp.int32), axis=-1) - 1
    return jnp.where(valid, run, -1).astype(jnp.int32)


def slots_from_cu_seqlens(cu_seqlens: jnp.ndarray, seq_len: int) -> jnp.ndarray:
    """``[N+1]`` cumulative sequence lengths -> ``[1, T]`` slots; tokens outside ``[cu[0], cu[N])`` are padding.

    Empty sequences own a slot but no token, so their final state is their initial state.
    """
    cu = cu_seqlens.astype(jnp.int32)
    t = jnp.arange(seq_len, dtype=jnp.int32)
    # Few boundaries (the usual case): one fused comparison of every token with every boundary. searchsorted's
    # default binary search is a loop of ~2 small kernels per halving step (~20 us on an H100 for 7 boundaries,
    # ~2% of a varlen forward).
    method = "compare_all" if cu.shape[0] <= _COMPARE_ALL_MAX_BOUNDARIES else "scan"
    idx = jnp.searchsorted(cu, t, side="right", method=method).astype(jnp.int32) - 1
    n = cu.shape[0] - 1
    valid = (idx >= 0) & (idx < n)
    return jnp.where(valid, idx, -1)[None, :]


def sequence_starts(slot: jnp.ndarray) -> jnp.ndarray:
    """Boolean ``[..., T]``: token t is the first token of its sequence."""
    prev = jnp.concatenate([jnp.full_like(slot[..., :1], -1), slot[..., :-1]], axis=-1)
    return (slot >= 0) & (slot != prev)


def sequence_ends(slot: jnp.ndarray) -> jnp.ndarray:
    """Boolean ``[..., T]``: token t is the last token of its sequence."""
    nxt = jnp.concatenate([slot[..., 1:], jnp.full_like(slot[..., :1], -1)], axis=-1)
    return (slot >= 0) & (slot != nxt)
