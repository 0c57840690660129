"""Sharding of ``kda_decode`` under ``jax.jit``: the Shardy rule and the partition callback of its
``custom_partitioning`` op (defined in :mod:`flashkda_jax.decode`).

- Heads are split with their GVA groups kept together (value heads ``(h r)``), in both state modes.
- Rows (batch) are split only with dense states ``[B, HV, K, V]`` (each device owns its rows' states).
  With a state pool ``[P, HV, K, V]`` + ``state_indices`` the rows stay whole: any row may name any pool
  slot, so a split pool (or replicas updated by different rows) could not stay consistent.
- Tokens, head dims and pool slots are never split.
Each device then runs the ordinary decode op on its block; nothing is communicated.
"""

from __future__ import annotations

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flashkda_jax import sharding as _sharding


def rule(opts, has_idx, operand_types):
    H = _sharding._shape(operand_types[0])[2]
    HV = _sharding._shape(operand_types[2])[2]
    hv = "h" if H == HV else "(h r)"
    rows = "p" if has_idx else "b"
    st = f"{rows} {hv} d k" if opts.state_vk else f"{rows} {hv} k d"
    ins = ["b t h k", "b t h k", f"b t {hv} d", f"b t {hv} k", f"b t {hv}", hv, f"{hv} k"]
    ins += (["b"] if has_idx else []) + [st]
    outs = [f"b t {hv} d", st]
    spec = ", ".join(ins) + " -> " + ", ".join(outs)
    order = list(dict.fromkeys(spec.replace("(", " ").replace(")", " ").replace(",", " ").replace("->", " ").split()))
    keep_whole = ("t", "k", "d", "r", "p") + (("b",) if has_idx else ())
    kw = dict(need_replication_factors=tuple(f for f in order if f in keep_whole))
    if H != HV:
        kw["r"] = HV // H
    return spec, kw


def partition(opts, has_idx, mesh, arg_shapes, result_shape, body):
    q, v = arg_shapes[0], arg_shapes[2]
    B, _, H, _ = q.shape
    HV = v.shape[2]
    cands = [_sharding._spec_of(q), _sharding._spec_of(v), _sharding._spec_of(result_shape[0])]

    def pick(dim, size, taken=()):
        for sp in cands:
            ax = tuple(a for a in _sharding._entry_axes(sp, dim) if a not in taken)
            if ax:
                n = _sharding._axes_size(mesh, ax)
                return ax if size % n == 0 and HV % n == 0 else ()
        return ()

    b = () if has_idx else pick(0, B)
    h = pick(2, H, taken=b)
    Bs, Hs = _sharding._e(b), _sharding._e(h)
    ns = lambda *e: NamedSharding(mesh, P(*e))
    x = ns(Bs, None, Hs, None)
    state = ns(None if has_idx else Bs, Hs, None, None)
    in_sh = (x, x, x, x, ns(Bs, None, Hs), ns(Hs), ns(Hs, None)) + ((ns(None),) if has_idx else ()) + (state,)
    return mesh, body, (x, state), in_sh
