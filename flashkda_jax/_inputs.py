"""Trace-time validation of ``kda`` arguments and their canonical form shared by every implementation.

Every implementation (CUDA, CPU FFI, pure JAX) computes the same *core* op on canonical inputs:

- ``q, k`` ``[B, T, H, K]``, ``v`` ``[B, T, HV, V]``, ``g`` ``[B, T, HV, K]`` (raw gate input), ``beta``
  ``[B, T, HV]`` (raw), all in one float dtype;
- ``a_log`` ``[HV]`` and ``dt_bias`` ``[HV, K]`` in float32 (zeros where the gate has none);
- ``slot`` ``[B, T]`` int32 (see :mod:`flashkda_jax.segments`);
- ``initial_state`` ``[B, S, HV, K, V]`` (``[B, S, HV, V, K]`` for ``state_layout="vk"``) or None.

The core returns ``o`` ``[B, T, HV, V]`` and, when asked, the final state in the same layout as the
initial one; :func:`restore_final_state` maps it back to the shape the caller uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from flashkda_jax import segments as _segments

GATE_MODES = {"precomputed": 0, "softplus": 1, "bounded": 2}
STATE_LAYOUTS = ("kv", "vk")
_FLOATS = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


@dataclasses.dataclass(frozen=True)
class KdaOptions:
    """Static (hashable) options of one ``kda`` call, after validation."""

    scale: float
    gate: str = "precomputed"
    lower_bound: float = -5.0
    use_a_log: bool = False
    qk_l2norm: bool = False
    beta_sigmoid: bool = False
    allow_neg_eigval: bool = False
    state_layout: str = "kv"
    return_final_state: bool = False
    num_slots: int = 0  # S: state slots per row (0 = states not used)
    state_mode: str = "dense"  # "dense" [B,HV,K,V], "segments" [B,S,...], "cu_seqlens" [N,...]
    # Context parallelism requested (kda's context_parallel_axis): width R of the record [B, T, HV, R] that the
    # forward hands its backward (flashkda_jax.sharding); 0 = none (the backward rebuilds what it needs).
    cp_record: int = 0
    # The CUDA forward also returns its chunk states and prep outputs for the CUDA backward, which then skips its
    # states pass and its prep (set by the differentiated path only, flashkda_jax.sharding._saving_opts).
    save_residuals: bool = False

    @property
    def gate_mode(self) -> int:
        return GATE_MODES[self.gate]

    @property
    def state_vk(self) -> bool:
        return self.state_layout == "vk"

    def ffi_attrs(self) -> dict:
        """The attributes every FFI op takes (FLASHKDA_BIND_OPTIONS in cpp/kda_problem.h)."""
        return dict(scale=np.float64(self.scale), gate_mode=np.int32(self.gate_mode),
                    lower_bound=np.float64(self.lower_bound), use_a_log=bool(self.use_a_log),
                    qk_l2norm=bool(self.qk_l2norm), beta_sigmoid=bool(self.beta_sigmoid),
                    allow_neg_eigval=bool(self.allow_neg_eigval), state_vk=bool(self.state_vk))


@dataclasses.dataclass(frozen=True)
class CoreInputs:
    q: Any
    k: Any
    v: Any
    g: Any
    beta: Any
    a_log: Any
    dt_bias: Any
    slot: Any
    initial_state: Optional[Any]


def is_positive_int(x) -> bool:
    """A static count (max_segments, checkpoint_slices): a Python / NumPy int >= 1, not a bool."""
    return not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, np.integer)) and x >= 1


def _err(msg: str) -> ValueError:
    return ValueError(f"flashkda_jax.kda: {msg}")


def _check_float(name: str, x) -> None:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"flashkda_jax.kda: {name} must be an array, got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _FLOATS]:
        raise TypeError(f"flashkda_jax.kda: {name} must be bf16, fp16, fp32 or fp64, got {x.dtype}")


def compute_dtype(dtype) -> jnp.dtype:
    """Accumulation / state dtype for an input dtype: float64 stays float64, everything else float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def prepare(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None, max_segments=None,
            cu_seqlens=None, return_final_state=False, qk_l2norm=False, beta_sigmoid=False,
            allow_neg_eigval=False, gate="precomputed", A_log=None, dt_bias=None, lower_bound=None,
            state_layout="kv") -> tuple[CoreInputs, KdaOptions]:
    """Validates the public arguments (raising clear errors at trace time) and canonicalises them."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _check_float(name, x)
    if q.ndim != 4:
        raise _err(f"q must be [B, T, H, K], got shape {q.shape}")
    if k.shape != q.shape:
        raise _err(f"k must have q's shape {q.shape}, got {k.shape}")
    B, T, H, K = q.shape
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise _err(f"v must be [B, T, HV, V] with B={B}, T={T}, got {v.shape}")
    HV, V = v.shape[2], v.shape[3]
    if H == 0 or HV % H != 0:
        raise _err(f"the number of value heads HV={HV} must be a multiple of the q/k heads H={H}")
    if K == 0 or V == 0:
        raise _err("head dimensions must be positive")
    if g.shape != (B, T, HV, K):
        raise _err(f"g must be [B, T, HV, K] = {(B, T, HV, K)}, got {g.shape}")
    if beta.shape != (B, T, HV):
        raise _err(f"beta must be [B, T, HV] = {(B, T, HV)}, got {beta.shape}")
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    cdt = compute_dtype(dtype)

    if gate not in GATE_MODES:
        raise _err(f"gate must be one of {sorted(GATE_MODES)}, got {gate!r}")
    if state_layout not in STATE_LAYOUTS:
        raise _err(f"state_layout must be 'kv' or 'vk', got {state_layout!r}")
    if gate == "precomputed":
        if A_log is not None or dt_bias is not None:
            raise _err("A_log/dt_bias are only used by gate='softplus' or 'bounded'; "
                       "with gate='precomputed', g is already the log-decay")
        if lower_bound is not None:
            raise _err("lower_bound is only used by gate='bounded'")
    if gate == "softplus":
        if A_log is None:
            raise _err("gate='softplus' needs A_log [HV]")
        if lower_bound is not None:
            raise _err("lower_bound is only used by gate='bounded'")
    lb = -5.0
    if gate == "bounded":
        if lower_bound is None:
            raise _err("gate='bounded' needs lower_bound (a negative float, -5 is usual)")
        try:
            lb = float(lower_bound)
        except TypeError as e:
            raise _err("lower_bound must be a static Python float") from e
        if not lb < 0:
            raise _err(f"lower_bound must be negative, got {lb}")
    if allow_neg_eigval and not beta_sigmoid:
        raise _err("allow_neg_eigval scales the in-kernel sigmoid of beta: it needs beta_sigmoid=True")

    if A_log is not None:
        _check_float("A_log", A_log)
        if A_log.shape != (HV,):
            raise _err(f"A_log must be [HV] = ({HV},), got {A_log.shape}")
        a_log = A_log.astype(jnp.float32)
    else:
        a_log = jnp.zeros((HV,), jnp.float32)
    if dt_bias is not None:
        _check_float("dt_bias", dt_bias)
        if dt_bias.shape == (HV * K,):
            dt_bias = dt_bias.reshape(HV, K)
        if dt_bias.shape != (HV, K):
            raise _err(f"dt_bias must be [HV, K] = {(HV, K)} or [HV*K], got {dt_bias.shape}")
        dtb = dt_bias.astype(jnp.float32)
    else:
        dtb = jnp.zeros((HV, K), jnp.float32)

    if scale is None:
        scale = K ** -0.5
    try:
        scale = float(scale)
    except TypeError as e:
        raise _err("scale must be a static Python float") from e

    # Ragged batches.
    if segment_ids is not None and cu_seqlens is not None:
        raise _err("pass segment_ids or cu_seqlens, not both")
    wants_states = initial_state is not None or return_final_state
    if cu_seqlens is not None:
        if B != 1:
            raise _err(f"cu_seqlens needs B == 1 (sequences packed along T), got B={B}")
        if not hasattr(cu_seqlens, "dtype") or cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
            raise _err("cu_seqlens must be a 1-D integer array [N+1]")
        if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
            raise _err(f"cu_seqlens must be integer, got {cu_seqlens.dtype}")
        if max_segments is not None:
            raise _err("max_segments is for segment_ids; with cu_seqlens there are N = len(cu_seqlens) - 1 states")
        slot = _segments.slots_from_cu_seqlens(cu_seqlens, T)
        num_slots = cu_seqlens.shape[0] - 1 if wants_states else 0
        state_mode = "cu_seqlens"
        state_shape = (num_slots, HV)
    elif segment_ids is not None:
        if not hasattr(segment_ids, "dtype") or segment_ids.shape != (B, T):
            raise _err(f"segment_ids must be [B, T] = {(B, T)}, got {getattr(segment_ids, 'shape', None)}")
        if jnp.dtype(segment_ids.dtype) != jnp.int32:
            raise _err(f"segment_ids must be int32, got {segment_ids.dtype}")
        if wants_states and max_segments is None:
            raise _err("with segment_ids, initial_state / return_final_state need max_segments "
                       "(the static number of state slots per row)")
        if max_segments is not None and not is_positive_int(max_segments):
            raise _err(f"max_segments must be a positive Python int, got {max_segments!r}")
        slot = _segments.slots_from_segment_ids(segment_ids)
        num_slots = int(max_segments) if wants_states else 0
        state_mode = "segments"
        state_shape = (B, num_slots, HV)
    else:
        if max_segments is not None:
            raise _err("max_segments needs segment_ids")
        slot = jnp.zeros((B, T), jnp.int32)
        num_slots = 1 if wants_states else 0
        state_mode = "dense"
        state_shape = (B, HV)

    kv = (K, V) if state_layout == "kv" else (V, K)
    init = None
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        want = tuple(state_shape) + kv
        if initial_state.shape != want:
            raise _err(f"initial_state must be {want} (state_layout={state_layout!r}), got {initial_state.shape}")
        init = initial_state.astype(cdt)
        if state_mode == "dense":
            init = init[:, None]
        elif state_mode == "cu_seqlens":
            init = init[None]

    opts = KdaOptions(scale=scale, gate=gate, lower_bound=lb, use_a_log=A_log is not None,
                      qk_l2norm=bool(qk_l2norm), beta_sigmoid=bool(beta_sigmoid),
                      allow_neg_eigval=bool(allow_neg_eigval), state_layout=state_layout,
                      return_final_state=bool(return_final_state), num_slots=num_slots,
                      state_mode=state_mode)
    core = CoreInputs(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype), g=g.astype(dtype),
                      beta=beta.astype(dtype), a_log=a_log, dt_bias=dtb, slot=slot, initial_state=init)
    return core, opts


def restore_final_state(final_state, opts: KdaOptions):
    """Core ``[B, S, HV, ., .]`` final state -> the caller's shape (None when not asked for)."""
    if not opts.return_final_state or final_state is None:
        return None
    if opts.state_mode == "dense":
        return final_state[:, 0]
    if opts.state_mode == "cu_seqlens":
        return final_state[0]
    return final_state
