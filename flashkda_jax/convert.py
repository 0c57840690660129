"""Checkpoint conversion between fla's ``KimiDeltaAttention`` (PyTorch) and
:class:`flashkda_jax.nn.KimiDeltaAttention` (Flax).

    from flashkda_jax import convert, nn
    sd = torch_layer.state_dict()                                  # or a dict of numpy arrays
    cfg = convert.infer_config(sd)                                 # hidden_size, num_heads, head_dim, ...
    layer = nn.KimiDeltaAttention(**cfg)
    variables = convert.from_fla(sd)                               # {"params": {...}}
    y = layer.apply(variables, x)
    sd2 = convert.to_fla(variables)                                # {name: numpy array}, fla's names/shapes
    torch_layer.load_state_dict({k: torch.from_numpy(v) for k, v in sd2.items()})

Values may be numpy arrays, JAX arrays, or anything with ``.numpy()`` (PyTorch tensors on any device and
in any dtype, bf16 included, are accepted). ``prefix`` selects one layer of a whole-model state dict
(e.g. ``"model.layers.3.attn."``). Mapping (PyTorch ``Linear.weight`` is ``[out, in]``, a Flax
``Dense`` kernel ``[in, out]``; fla's depthwise ``Conv1d.weight`` is ``[D, 1, W]``, ours ``[W, D]``)::

    {q,k,v,b,o}_proj.weight        <-> {q,k,v,b,o}_proj/kernel            (transposed)
    {f,g}_proj.{0,1}.weight        <-> {f,g}_proj/{0,1}/kernel            (transposed)
    g_proj.1.bias                  <-> g_proj/1/bias
    {q,k,v}_conv1d.weight [D,1,W]  <-> {q,k,v}_conv1d/kernel [W,D]
    {q,k,v}_conv1d.bias            <-> {q,k,v}_conv1d/bias                (conv_bias=True)
    A_log, dt_bias                 <-> A_log, dt_bias                     (float32)
    o_norm.weight                  <-> o_norm/scale
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax.core import meta as flax_meta

__all__ = ["from_fla", "to_fla", "infer_config", "fla_names"]

_LINEARS = {
    "q_proj": ("q_proj",), "k_proj": ("k_proj",), "v_proj": ("v_proj",),
    "f_proj.0": ("f_proj", "0"), "f_proj.1": ("f_proj", "1"),
    "b_proj": ("b_proj",),
    "g_proj.0": ("g_proj", "0"), "g_proj.1": ("g_proj", "1"),
    "o_proj": ("o_proj",),
}
_CONVS = ("q_conv1d", "k_conv1d", "v_conv1d")
_FP32 = ("A_log", "dt_bias")


def _err(msg: str) -> ValueError:
    return ValueError(f"flashkda_jax.convert: {msg}")


def _to_numpy(x) -> np.ndarray:
    """numpy view of a numpy/JAX array or a PyTorch tensor (any device; bf16 goes through float32)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch
        x = x.detach()
        if hasattr(x, "cpu"):
            x = x.cpu()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16",) or not hasattr(x, "numpy"):
            x = x.float()
        return x.numpy()
    if hasattr(x, "numpy") and not hasattr(x, "__array__"):
        return np.asarray(x.numpy())
    return np.asarray(x)


def _mapping(cfg: Mapping[str, Any]):
    """[(fla name, flax path, kind)] for a configuration; kind in linear/bias/conv/param/norm."""
    out = []
    for name, path in _LINEARS.items():
        out.append((f"{name}.weight", path + ("kernel",), "linear"))
        if name == "g_proj.1":
            out.append((f"{name}.bias", path + ("bias",), "bias"))
    if cfg.get("use_short_conv", True):
        for c in _CONVS:
            out.append((f"{c}.weight", (c, "kernel"), "conv"))
            if cfg.get("conv_bias", False):
                out.append((f"{c}.bias", (c, "bias"), "bias"))
    out.append(("A_log", ("A_log",), "param"))
    out.append(("dt_bias", ("dt_bias",), "param"))
    out.append(("o_norm.weight", ("o_norm", "scale"), "norm"))
    return out


def fla_names(cfg: Mapping[str, Any] | None = None) -> list[str]:
    """fla's parameter names for a layer configuration (default: short conv, no conv bias)."""
    return [n for n, _, _ in _mapping(cfg or {})]


def _expected_fla_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple]:
    hidden, H, K = cfg["hidden_size"], cfg["num_heads"], cfg["head_dim"]
    HV = cfg.get("num_v_heads") or H
    Vd = int(round(K * cfg.get("expand_v", 1.0)))
    W = cfg.get("conv_size", 4)
    s = {
        "q_proj.weight": (H * K, hidden), "k_proj.weight": (H * K, hidden), "v_proj.weight": (HV * Vd, hidden),
        "f_proj.0.weight": (Vd, hidden), "f_proj.1.weight": (HV * K, Vd), "b_proj.weight": (HV, hidden),
        "g_proj.0.weight": (Vd, hidden), "g_proj.1.weight": (HV * Vd, Vd), "g_proj.1.bias": (HV * Vd,),
        "o_proj.weight": (hidden, HV * Vd), "A_log": (HV,), "dt_bias": (HV * K,), "o_norm.weight": (Vd,),
    }
    for c, d in zip(_CONVS, (H * K, H * K, HV * Vd)):
        s[f"{c}.weight"] = (d, 1, W)
        s[f"{c}.bias"] = (d,)
    return s


def _strip(state_dict: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """The entries under prefix, prefix removed, as numpy arrays."""
    return {k[len(prefix):]: _to_numpy(v) for k, v in state_dict.items() if k.startswith(prefix)}


def _shape(x) -> tuple:
    return tuple(int(d) for d in x.shape)


def infer_config(state_dict: Mapping[str, Any], prefix: str = "") -> dict:
    """The :class:`~flashkda_jax.nn.KimiDeltaAttention` keyword arguments that a state dict's shapes imply:
    hidden_size, num_heads, head_dim, num_v_heads, expand_v, use_short_conv, conv_size, conv_bias.

    (Not recoverable from shapes, so not returned: gate / lower_bound, allow_neg_eigval, norm_eps.)
    """
    return _infer(_strip(state_dict, prefix), prefix)


def _infer(sd: Mapping[str, np.ndarray], prefix: str) -> dict:
    for need in ("q_proj.weight", "v_proj.weight", "A_log", "dt_bias", "o_norm.weight"):
        if need not in sd:
            raise _err(f"{prefix + need!r} is missing: not a KimiDeltaAttention state dict"
                       + (f" under prefix {prefix!r}" if prefix else " (pass prefix= for a whole-model state dict)"))
    key_dim, hidden = _shape(sd["q_proj.weight"])
    HV = _shape(sd["A_log"])[0]
    gate_dim = int(np.prod(_shape(sd["dt_bias"])))
    if HV == 0 or gate_dim % HV:
        raise _err(f"dt_bias has {gate_dim} entries, not a multiple of the {HV} value heads of A_log")
    K = gate_dim // HV
    if key_dim % K:
        raise _err(f"q_proj has {key_dim} outputs, not a multiple of head_dim={K}")
    H = key_dim // K
    Vd = _shape(sd["o_norm.weight"])[0]
    value_dim = _shape(sd["v_proj.weight"])[0]
    if value_dim != HV * Vd:
        raise _err(f"v_proj has {value_dim} outputs, expected num_v_heads * head_v_dim = {HV} * {Vd}")
    if "b_proj.weight" in sd and _shape(sd["b_proj.weight"])[0] != HV:
        raise _err(f"b_proj has {_shape(sd['b_proj.weight'])[0]} outputs but A_log has {HV} heads: this looks like "
                   "an older fla KimiDeltaAttention whose gate/beta were per q/k head (before native GVA); "
                   "only layers with num_v_heads == num_heads convert from that layout")
    use_conv = "q_conv1d.weight" in sd
    return dict(hidden_size=hidden, num_heads=H, head_dim=K, num_v_heads=HV, expand_v=Vd / K,
               use_short_conv=use_conv, conv_size=_shape(sd["q_conv1d.weight"])[-1] if use_conv else 4,
               conv_bias=use_conv and "q_conv1d.bias" in sd)


def from_fla(state_dict: Mapping[str, Any], *, prefix: str = "", dtype=None, strict: bool = True) -> dict:
    """fla ``KimiDeltaAttention`` state dict -> ``{"params": ...}`` for :class:`flashkda_jax.nn.KimiDeltaAttention`.

    dtype: dtype of the converted weights (default: as stored; A_log and dt_bias are always float32).
    strict: raise on names under ``prefix`` that the layer does not have (missing names always raise).
    """
    sd = _strip(state_dict, prefix)
    cfg = _infer(sd, prefix)
    want = _expected_fla_shapes(cfg)
    mapping = _mapping(cfg)
    names = {n for n, _, _ in mapping}
    missing = sorted(names - set(sd))
    if missing:
        raise _err(f"missing from the state dict: {[prefix + m for m in missing]}")
    extra = sorted(set(sd) - names)
    if strict and extra:
        raise _err(f"unexpected names in the state dict: {[prefix + e for e in extra]} (strict=False ignores them)")
    params: dict = {}
    for name, path, kind in mapping:
        a = sd[name]
        if _shape(a) != want[name] and not (name == "dt_bias" and int(np.prod(a.shape)) == int(np.prod(want[name]))):
            raise _err(f"{prefix + name} has shape {_shape(a)}, expected {want[name]} for {cfg}")
        if kind == "linear":
            a = a.T
        elif kind == "conv":
            a = a[:, 0, :].T
        elif name == "dt_bias":
            a = a.reshape(-1)
        if name in _FP32:
            a = a.astype(np.float32)
        elif dtype is not None:
            a = a.astype(dtype)
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(a)
    return {"params": params}


def to_fla(variables: Mapping[str, Any], *, prefix: str = "", dtype=None) -> dict[str, np.ndarray]:
    """:class:`flashkda_jax.nn.KimiDeltaAttention` params (``{"params": ...}`` or the bare params tree, boxed
    by ``init`` or unboxed) ->
    ``{name: numpy array}`` with fla's names and shapes (``prefix`` prepended to every name).

    dtype: dtype of the returned arrays (default: as stored; pass ``np.float32`` for ``torch.from_numpy``,
    which does not take numpy's bfloat16).
    """
    variables = flax_meta.unbox(variables)   # init's nn.LogicallyPartitioned boxes -> arrays
    params = variables["params"] if "params" in variables and "q_proj" not in variables else variables
    for need in ("q_proj", "A_log", "dt_bias", "o_norm"):
        if need not in params:
            raise _err(f"{need!r} is missing: not KimiDeltaAttention params")
    cfg = dict(use_short_conv="q_conv1d" in params, conv_bias="q_conv1d" in params and "bias" in params["q_conv1d"])
    mapping = _mapping(cfg)
    paths = {path for _, path, _ in mapping}

    def walk(node, path=()):
        if isinstance(node, Mapping):
            for k, v in node.items():
                yield from walk(v, path + (k,))
        else:
            yield path, node

    extra = [p for p, _ in walk(params) if p not in paths]
    if extra:
        raise _err(f"params the fla layer does not have: {['/'.join(p) for p in extra]}")
    out = {}
    for name, path, kind in mapping:
        node = params
        for p in path:
            if p not in node:
                raise _err(f"param {'/'.join(path)} is missing")
            node = node[p]
        a = _to_numpy(node)
        if kind == "linear":
            a = a.T
        elif kind == "conv":
            a = a.T[:, None, :]
        if name in _FP32:
            a = a.astype(np.float32)
        elif dtype is not None:
            a = a.astype(dtype)
        out[prefix + name] = np.ascontiguousarray(a)
    return out
