"""``kda_decode``: a few new tokens per sequence against a recurrent state (or a pool of states), the
state updated in place.

One FFI target, ``flashkda_decode`` (CPU and CUDA handlers, ``cpp/kda_decode_binding.h``), whose state
operand is aliased to its new-state result. Under ``jax.jit(..., donate_argnums=...)`` with the state
donated, XLA updates the caller's buffer in place: the compiled program holds no copy of the pool. A
pure-JAX implementation (``"xla"``, the recurrence of :func:`flashkda_jax.reference.recurrent_core`)
runs everywhere else.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning

from flashkda_jax import _decode_sharding
from flashkda_jax import _dispatch
from flashkda_jax import _ffi
from flashkda_jax import _inputs
from flashkda_jax import reference as _reference

__all__ = ["kda_decode", "CUDA_DECODE_HEAD_DIMS"]

IMPLEMENTATIONS = _dispatch.IMPLEMENTATIONS
# Key head dims the CUDA decode kernel is compiled for (any V that is a multiple of 4).
CUDA_DECODE_HEAD_DIMS = (32, 64, 128, 256)
CUDA_DECODE_DTYPES = ("bfloat16", "float16", "float32")


def _err(msg: str) -> ValueError:
    return ValueError(f"flashkda_jax.kda_decode: {msg}")


def _prepare(q, k, v, g, beta, **kwargs):
    """The shared validation of ``kda`` (shapes, dtypes, gate options), with this op's name in errors."""
    try:
        return _inputs.prepare(q, k, v, g, beta, **kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e).replace("flashkda_jax.kda:", "flashkda_jax.kda_decode:")
        raise type(e)(msg) from None


def _check_state(state, state_indices, core, opts):
    """Validates the state (pool) and the indices; returns (state, indices or None)."""
    B, T, H, K = core.q.shape
    HV, V = core.v.shape[2], core.v.shape[3]
    cdt = _inputs.compute_dtype(core.q.dtype)
    if state is None or not hasattr(state, "shape") or not hasattr(state, "dtype"):
        raise TypeError("flashkda_jax.kda_decode: state must be an array [B, HV, K, V] (or a pool [P, HV, K, V])")
    if jnp.dtype(state.dtype) != cdt:
        raise TypeError(f"flashkda_jax.kda_decode: state must be {cdt.name} for {jnp.dtype(core.q.dtype).name} "
                        f"inputs (it is updated in place, so it is never cast), got {state.dtype}")
    kv = (V, K) if opts.state_vk else (K, V)
    if state.ndim != 4 or tuple(state.shape[1:]) != (HV,) + kv:
        lead = "P" if state_indices is not None else "B"
        raise _err(f"state must be [{lead}, HV, {'V, K' if opts.state_vk else 'K, V'}] = "
                   f"[{lead}, {HV}, {kv[0]}, {kv[1]}] (state_layout={opts.state_layout!r}), got {tuple(state.shape)}")
    if state_indices is None:
        if state.shape[0] != B:
            raise _err(f"without state_indices, state needs one entry per sequence: its first dim must be B={B}, "
                       f"got {state.shape[0]} (pass state_indices [B] to use a state pool)")
        return state, None
    if not hasattr(state_indices, "dtype") or not hasattr(state_indices, "shape"):
        raise TypeError("flashkda_jax.kda_decode: state_indices must be an int32 array [B]")
    if not jnp.issubdtype(state_indices.dtype, jnp.integer):
        raise TypeError(f"flashkda_jax.kda_decode: state_indices must be int32, got {state_indices.dtype}")
    if tuple(state_indices.shape) != (B,):
        raise _err(f"state_indices must be [B] = ({B},), got {tuple(state_indices.shape)}")
    if state.shape[0] >= 2 ** 31:
        raise _err("state pools are indexed with int32: at most 2**31 - 1 slots")
    return state, state_indices.astype(jnp.int32)


def _platform() -> str:
    dev = jax.config.jax_default_device
    if dev is not None:
        return dev if isinstance(dev, str) else dev.platform
    return jax.default_backend()


def _cuda_supports(core) -> str | None:
    K, V = core.q.shape[-1], core.v.shape[-1]
    if not _ffi.extension_has_cuda():
        return "this install of flashkda_jax was built without CUDA"
    if K not in CUDA_DECODE_HEAD_DIMS:
        return f"key head dim K={K} is not supported by the CUDA decode kernel (supported: {CUDA_DECODE_HEAD_DIMS})"
    if V % 4:
        return f"value head dim V={V} must be a multiple of 4 for the CUDA decode kernel"
    if jnp.dtype(core.q.dtype).name not in CUDA_DECODE_DTYPES:
        return f"dtype {core.q.dtype} is not supported by the CUDA decode kernel"
    return None


def _select(implementation, core) -> str:
    return _dispatch.select("kda_decode", implementation, _platform(), lambda: _cuda_supports(core))


def _decode_call(opts, has_idx, q, k, v, g, beta, a_log, dt_bias, *rest):
    """The FFI call on (per-device) arrays; rest = (indices, state) or (state,)."""
    idx, state = rest if has_idx else (jnp.zeros((0,), jnp.int32), rest[0])
    out_types = (jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype))
    call = jax.ffi.ffi_call(_ffi.DECODE_TARGET, out_types, vmap_method="broadcast_all",
                            input_output_aliases={8: 1})
    return call(q, k, v, g, beta, a_log, dt_bias, idx, state, **opts.ffi_attrs())


def _ffi_decode(core, state, indices, opts):
    args = (core.q, core.k, core.v, core.g, core.beta, core.a_log, core.dt_bias)
    args += (state,) if indices is None else (indices, state)
    return _decode_vmappable(opts, indices is not None)(*args)


def _decode_rule(opts, has_idx, mesh, operand_types, result_types):
    del mesh, result_types
    return _decode_sharding.rule(opts, has_idx, operand_types)


def _decode_partition(opts, has_idx, mesh, arg_shapes, result_shape):
    return _decode_sharding.partition(opts, has_idx, mesh, arg_shapes, result_shape,
                                      functools.partial(_decode_call, opts, has_idx))


# Partitionable under jit: batch (dense states) and heads (GVA groups together) split with no
# communication (flashkda_jax/_decode_sharding.py).
_decode_op = custom_partitioning(_decode_call, static_argnums=(0, 1))
_decode_op.def_partition(partition=_decode_partition, sharding_rule=_decode_rule)


@functools.lru_cache(maxsize=None)
def _decode_vmappable(opts, has_idx):
    """custom_partitioning has no batching rule: under vmap, the FFI call takes the mapped axes as its
    leading dims itself (broadcast_all), unpartitioned."""
    f = custom_vmap(lambda *xs: _decode_op(opts, has_idx, *xs))

    @f.def_vmap
    def rule(axis_size, in_batched, *xs):
        del axis_size
        axes = [0 if bt else None for bt in in_batched]
        out = jax.vmap(functools.partial(_decode_call, opts, has_idx), in_axes=axes)(*xs)
        return out, (True, True)

    return f


def _xla_decode(core, state, indices, opts):
    """The oracle's recurrence (reference.recurrent_core) on the gathered states, scattered back."""
    B = core.q.shape[0]
    if indices is None:
        start = state
        valid = None
    else:
        P = state.shape[0]
        valid = (indices >= 0) & (indices < P)
        start = state[jnp.clip(indices, 0, max(P - 1, 0))] if P > 0 else jnp.zeros((B,) + state.shape[1:], state.dtype)
    ropts = dataclasses.replace(opts, return_final_state=True, num_slots=1, state_mode="dense")
    rcore = dataclasses.replace(core, initial_state=start[:, None])
    o, fin = _reference.recurrent_core(rcore, ropts)
    fin = fin[:, 0].astype(state.dtype)
    if indices is None:
        return o, fin
    o = jnp.where(valid[:, None, None, None], o, jnp.zeros((), o.dtype))
    target = jnp.where(valid, indices, state.shape[0])  # out of range: dropped
    return o, state.at[target].set(fin, mode="drop")


def kda_decode(q, k, v, g, beta, state, *, state_indices=None, scale=None, qk_l2norm=False,
               beta_sigmoid=False, allow_neg_eigval=False, gate="precomputed", A_log=None, dt_bias=None,
               lower_bound=None, state_layout="kv", implementation=None):
    """Applies ``T_new`` new tokens per sequence to its recurrent state; returns ``(o, new_state)``.

    Args:
      q, k: ``[B, T_new, H, K]``; v: ``[B, T_new, HV, V]``; g: ``[B, T_new, HV, K]``; beta:
        ``[B, T_new, HV]`` (bf16, fp16, fp32; fp64 on the CPU and "xla" implementations). ``T_new`` is
        usually 1 (or a few, e.g. speculative tokens); they are applied in order.
      state: float32 (float64 for float64 inputs), ``[B, HV, K, V]`` (``[B, HV, V, K]`` with
        ``state_layout="vk"``), or a pool ``[P, HV, K, V]`` when ``state_indices`` is given. Never cast:
        pass it in the state dtype.
      state_indices: optional ``[B]`` int32: sequence b reads and writes pool entry ``state_indices[b]``.
        An index outside ``[0, P)`` (use -1 for an empty batch slot) leaves the pool untouched and gives
        ``o = 0`` for that sequence; nothing is read or written out of bounds. Valid indices must be
        distinct (two sequences updating one entry give an unspecified result).
      scale, qk_l2norm, beta_sigmoid, allow_neg_eigval, gate, A_log, dt_bias, lower_bound,
        state_layout: as :func:`flashkda_jax.kda` (DESIGN §2).
      implementation: None (CUDA kernel on a GPU, the C++ kernel on the CPU, pure JAX elsewhere or for
        shapes the CUDA kernel lacks), or "cuda", "cpu", "xla".

    Returns:
      ``o`` ``[B, T_new, HV, V]`` in v's dtype, and the new state with ``state``'s shape and dtype. The
      kernels update ``state``'s buffer in place through input/output aliasing: donate it
      (``jax.jit(f, donate_argnums=...)``) and no copy of the pool is made. Not differentiable on the
      kernel paths (inference op); the "xla" path is.
    """
    core, opts = _prepare(q, k, v, g, beta, scale=scale, qk_l2norm=qk_l2norm, beta_sigmoid=beta_sigmoid,
                          allow_neg_eigval=allow_neg_eigval, gate=gate, A_log=A_log, dt_bias=dt_bias,
                          lower_bound=lower_bound, state_layout=state_layout)
    state, indices = _check_state(state, state_indices, core, opts)
    impl = _select(implementation, core)
    if core.q.shape[1] == 0:  # no new tokens: nothing moves
        return jnp.zeros(core.v.shape, core.v.dtype), state
    if impl == "xla":
        return _xla_decode(core, state, indices, opts)
    return _ffi_decode(core, state, indices, opts)
