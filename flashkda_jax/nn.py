"""Flax (linen) layers built on :func:`flashkda_jax.kda`.

:class:`KimiDeltaAttention` follows the structure and the parameter names of fla's
``fla.layers.KimiDeltaAttention`` (so that :mod:`flashkda_jax.convert` maps its checkpoints one to one):

==================  ===============================  ===========================================
this layer          shape                            fla (PyTorch) name, shape
==================  ===============================  ===========================================
q_proj/kernel       [hidden, H*K]                    q_proj.weight [H*K, hidden]
k_proj/kernel       [hidden, H*K]                    k_proj.weight
v_proj/kernel       [hidden, HV*Vd]                  v_proj.weight
q_conv1d/kernel     [W, H*K]   (+ bias [H*K])        q_conv1d.weight [H*K, 1, W] (+ .bias)
k_conv1d/kernel     [W, H*K]                         k_conv1d.weight
v_conv1d/kernel     [W, HV*Vd]                       v_conv1d.weight
f_proj/0/kernel     [hidden, Vd]                     f_proj.0.weight [Vd, hidden]
f_proj/1/kernel     [Vd, HV*K]                       f_proj.1.weight [HV*K, Vd]
b_proj/kernel       [hidden, HV]                     b_proj.weight [HV, hidden]
A_log               [HV]  (float32)                  A_log [HV]
dt_bias             [HV*K]  (float32)                dt_bias [HV*K]
g_proj/0/kernel     [hidden, Vd]                     g_proj.0.weight
g_proj/1/kernel     [Vd, HV*Vd], g_proj/1/bias       g_proj.1.weight, g_proj.1.bias
o_norm/scale        [Vd]                             o_norm.weight [Vd]
o_proj/kernel       [HV*Vd, hidden]                  o_proj.weight [hidden, HV*Vd]
==================  ===============================  ===========================================

(H = num_heads, K = head_dim, HV = num_v_heads, Vd = head_v_dim = head_dim * expand_v, W = conv_size.)

The forward pass: q, k, v = SiLU(causal depthwise conv(x W_q / W_k / W_v)); the gate input
``f_proj(x)`` and the beta logits ``b_proj(x)`` go to ``kda`` raw, with the gate
(``-exp(A_log) * softplus(g + dt_bias)``, or the bounded one), the q/k L2 normalisation and the beta
sigmoid done inside the kernel; the output is ``o_proj(RMSNorm(o) * scale * sigmoid(g_proj(x)))``
per value head.

Ragged (packed) batches: ``segment_ids`` ``[B, T]`` int32 as for ``kda`` — a new sequence starts
wherever the id changes along T, id 0 is padding. Neither the short convolution nor the recurrence mixes
tokens of different sequences; padding tokens get a zero output and move no state.

Sharding: every parameter carries logical axis names (``nn.with_logical_partitioning``): ``"embed"`` for
the model width, ``"heads"`` for every dim that flattens heads (H*K, HV*Vd, HV*K, HV), None for the small
ones (conv width, the low-rank Vd, the norm scale); the decode cache adds ``"batch"``. ``init`` therefore
returns ``nn.LogicallyPartitioned`` boxes: get mesh shardings with ``nn.logical_to_mesh_sharding(
nn.get_partition_spec(variables), mesh, rules)``, or plain arrays with ``nn.unbox``. ``apply`` takes
either. With ``context_parallel_axis`` set, the recurrence runs sequence-parallel over that mesh axis
(``flashkda_jax.kda``'s option of the same name) when the layer is called inside a mesh with T sharded.

Decoding: call with ``decode=True`` and a mutable ``cache`` collection. Each batch row is then one
sequence that continues the row's cache: the last ``conv_size - 1`` inputs of each short convolution and
the recurrent state ``[B, HV, K, Vd]`` (float32). Any number of new tokens per call (a prompt, then one
token at a time); ``segment_ids`` then only marks padding (0) — the non-padding tokens of a row, in order,
are the row's next tokens, wherever the padding is (left- or right-padded prompts both work). Calls with
at most ``DECODE_STEP_MAX_TOKENS`` new tokens and no ``segment_ids`` (the serving loop) run
:func:`flashkda_jax.kda_decode`'s fused step, an inference op (not differentiable on the kernel paths)::

    variables = layer.init(key, x_prompt, decode=True)        # params + zero cache for B rows
    y, upd = layer.apply(variables, x_prompt, decode=True, mutable=["cache"])
    variables = {"params": variables["params"], **upd}
    y_t, upd = layer.apply(variables, x_next, decode=True, mutable=["cache"])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flashkda_jax import decode as _decode
from flashkda_jax import ops as _ops
from flashkda_jax import segments as _segments

__all__ = ["KimiDeltaAttention", "init_a_log", "init_dt_bias", "short_conv", "gated_rms_norm"]

Dtype = Any
Initializer = Callable[..., jax.Array]

GATES = ("softplus", "bounded")

# Logical axis names of the parameters and the decode cache (``nn.with_logical_partitioning``); map them to
# mesh axes with ``nn.logical_axis_rules``. Every "heads" dim is a flattened (head, channel) dim, so sharding
# it n ways splits whole heads when n divides num_heads (GVA groups stay on one device).
EMBED, HEADS, BATCH = "embed", "heads", "batch"

# decode=True calls with at most this many new tokens per row (and no padding) use kda_decode's fused step.
DECODE_STEP_MAX_TOKENS = 8


def _err(msg: str) -> ValueError:
    return ValueError(f"flashkda_jax.nn.KimiDeltaAttention: {msg}")


# ----------------------------------------------------------------------------------------------------
# Initialisers (the distributions fla uses).
# ----------------------------------------------------------------------------------------------------

def init_a_log(key, shape, dtype=jnp.float32):
    """log(U(1, 16)) per value head: decay rates exp(A_log) spread over [1, 16]."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def init_dt_bias(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
    """softplus^{-1}(dt) with dt log-uniform in [dt_min, dt_max] (floored at dt_floor)."""
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _conv_kernel_init(key, shape, dtype=jnp.float32):
    """U(-1/sqrt(W), 1/sqrt(W)) for a depthwise kernel [W, D] (fan-in W), as PyTorch's Conv1d default."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


# ----------------------------------------------------------------------------------------------------
# Functional pieces.
# ----------------------------------------------------------------------------------------------------

def short_conv(x, kernel, bias=None, slot=None, activation=True):
    """Causal depthwise convolution over T with SiLU, never mixing sequences.

    x: ``[B, T, D]``; kernel ``[W, D]`` (``kernel[W-1]`` multiplies the current token); slot: ``[B, T]``
    int32 sequence slots (-1 = padding; see :mod:`flashkda_jax.segments`) or None for one sequence per row.
    Padding tokens get 0.
    """
    W = kernel.shape[0]
    T = x.shape[1]
    y = x * kernel[W - 1]
    for j in range(1, min(W, T + 1)):
        xs = jnp.pad(x[:, : T - j], ((0, 0), (j, 0), (0, 0)))
        contrib = xs * kernel[W - 1 - j]
        if slot is not None:
            ss = jnp.pad(slot[:, : T - j], ((0, 0), (j, 0)), constant_values=-2)
            contrib = jnp.where((ss == slot)[..., None], contrib, 0)
        y = y + contrib
    if bias is not None:
        y = y + bias
    if activation:
        y = jax.nn.silu(y)
    if slot is not None:
        y = jnp.where((slot >= 0)[..., None], y, 0)
    return y


def _short_conv_with_state(x, kernel, bias, state, n_valid, activation=True):
    """Short convolution continuing a cached window.

    x: ``[B, T, D]`` whose first ``n_valid[b]`` tokens are the row's new tokens (the rest is ignored);
    state: ``[B, W-1, D]``, the row's previous W-1 inputs (oldest first, zeros before the start).
    Returns ``(y [B, T, D], new_state [B, W-1, D])``.
    """
    W = kernel.shape[0]
    T = x.shape[1]
    ext = jnp.concatenate([state.astype(x.dtype), x], axis=1)          # [B, W-1+T, D]
    y = ext[:, W - 1:] * kernel[W - 1]
    for i in range(W - 1):
        y = y + ext[:, i: i + T] * kernel[i]
    if bias is not None:
        y = y + bias
    if activation:
        y = jax.nn.silu(y)
    if W > 1:
        idx = n_valid[:, None] + jnp.arange(W - 1)[None, :]             # [B, W-1]
        new_state = jnp.take_along_axis(ext, idx[..., None], axis=1)
    else:
        new_state = state
    return y, new_state.astype(state.dtype)


def gated_rms_norm(x, gate, scale, eps):
    """RMSNorm over the last axis, times ``scale``, times ``sigmoid(gate)``; computed in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    y = y * scale.astype(jnp.float32) * jax.nn.sigmoid(gate.astype(jnp.float32))
    return y.astype(x.dtype)


def _compact(x, mask):
    """Moves each row's unmasked tokens to the front, in order (the rest filled with zeros).

    x: ``[B, T, ...]``, mask ``[B, T]`` bool -> (compacted x, positions [B, T], n_valid [B]).
    """
    B, T = mask.shape
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
    n_valid = jnp.sum(mask.astype(jnp.int32), axis=1)
    tgt = jnp.where(mask, pos, T)                                        # masked tokens go to a dump row
    rows = jnp.arange(B)[:, None]
    buf = jnp.zeros((B, T + 1) + x.shape[2:], x.dtype).at[rows, tgt].set(x)
    return buf[:, :T], pos, n_valid


def _uncompact(y, pos, mask):
    """Inverse of :func:`_compact` (zeros where masked)."""
    g = jnp.take_along_axis(y, jnp.clip(pos, 0, None).reshape(pos.shape + (1,) * (y.ndim - 2)), axis=1)
    return jnp.where(mask.reshape(mask.shape + (1,) * (y.ndim - 2)), g, 0)


# ----------------------------------------------------------------------------------------------------
# The layer.
# ----------------------------------------------------------------------------------------------------

class _ShortConv(nn.Module):
    features: int
    kernel_size: int
    use_bias: bool
    dtype: Optional[Dtype]
    param_dtype: Dtype

    def setup(self):
        self.kernel = self.param("kernel", nn.with_logical_partitioning(_conv_kernel_init, (None, HEADS)),
                                 (self.kernel_size, self.features), self.param_dtype)
        if self.use_bias:
            self.bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (HEADS,)),
                                   (self.features,), self.param_dtype)

    def params_in(self, dtype):
        bias = self.bias.astype(dtype) if self.use_bias else None
        return self.kernel.astype(dtype), bias


class _LowRank(nn.Module):
    """Two linears in sequence (hidden -> rank -> features), named "0" and "1" like fla's nn.Sequential."""

    rank: int
    features: int
    use_bias: bool
    dtype: Optional[Dtype]
    param_dtype: Dtype
    kernel_init: Initializer

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.rank, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(self.kernel_init, (EMBED, None)), name="0")(x)
        return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.with_logical_partitioning(self.kernel_init, (None, HEADS)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (HEADS,)),
                        name="1")(x)


class _GatedRMSNorm(nn.Module):
    """fla's ``FusedRMSNormGated(activation="sigmoid")``: RMSNorm(x) * scale * sigmoid(gate)."""

    features: int
    eps: float
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, gate):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
                           (self.features,), self.param_dtype)
        return gated_rms_norm(x, gate, scale, self.eps)


class KimiDeltaAttention(nn.Module):
    """Kimi Delta Attention layer (fla's ``KimiDeltaAttention``, in Flax linen, on ``flashkda_jax.kda``).

    Attributes:
      hidden_size: model width; None takes it from the input.
      num_heads: q/k heads H. head_dim: K (the q/k head dim).
      num_v_heads: value heads HV (a multiple of H: GVA); None means H.
      expand_v: value head dim = head_dim * expand_v.
      use_short_conv, conv_size, conv_bias: the causal depthwise SiLU convolution on q, k, v.
      allow_neg_eigval: beta = 2 sigmoid(.) (negative eigenvalues of the transition).
      gate: "softplus" (``-exp(A_log) softplus(f + dt_bias)``, Kimi-Linear-48B) or "bounded"
        (``lower_bound * sigmoid(exp(A_log) (f + dt_bias))``, needs ``lower_bound`` < 0).
      lower_bound: the bound of the bounded gate (-5 is usual).
      norm_eps: epsilon of the output RMSNorm.
      dtype: computation dtype (None: from input and params). param_dtype: parameter dtype; A_log and
        dt_bias are always float32 (as in fla).
      kernel_init: initialiser of the linear layers.
      implementation: passed to ``flashkda_jax.kda`` (None picks the kernels).
      context_parallel_axis: mesh axis name (or names) the sequence axis is sharded over: the recurrence
        then runs context-parallel (``flashkda_jax.kda``'s option; not used with ``decode=True``).
      checkpoint_slices: ``flashkda_jax.kda``'s option of that name (None, or n sequence slices whose backward
        recomputes slice by slice: less memory for more time); not used with ``decode=True``.
    """

    hidden_size: Optional[int] = None
    num_heads: int = 16
    head_dim: int = 128
    num_v_heads: Optional[int] = None
    expand_v: float = 1.0
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    allow_neg_eigval: bool = False
    gate: str = "softplus"
    lower_bound: Optional[float] = None
    norm_eps: float = 1e-5
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    implementation: Optional[str] = None
    context_parallel_axis: Optional[Any] = None
    checkpoint_slices: Optional[int] = None

    # --- derived sizes ---------------------------------------------------------------------------
    @property
    def n_v_heads(self) -> int:
        return self.num_heads if self.num_v_heads is None else int(self.num_v_heads)

    @property
    def head_v_dim(self) -> int:
        return int(round(self.head_dim * self.expand_v))

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        return self.n_v_heads * self.head_v_dim

    def _validate(self):
        if not isinstance(self.num_heads, (int, np.integer)) or self.num_heads < 1:
            raise _err(f"num_heads must be a positive int, got {self.num_heads!r}")
        if not isinstance(self.head_dim, (int, np.integer)) or self.head_dim < 1:
            raise _err(f"head_dim must be a positive int, got {self.head_dim!r}")
        HV = self.n_v_heads
        if HV < 1 or HV % self.num_heads != 0:
            raise _err(f"num_v_heads={HV} must be a positive multiple of num_heads={self.num_heads} (GVA)")
        hv = self.head_dim * self.expand_v
        if self.expand_v <= 0 or not math.isclose(hv, round(hv), rel_tol=0, abs_tol=1e-6):
            raise _err(f"head_dim * expand_v = {self.head_dim} * {self.expand_v} = {hv} must be a positive integer")
        if self.gate not in GATES:
            raise _err(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.gate == "bounded":
            if self.lower_bound is None:
                raise _err("gate='bounded' needs lower_bound (a negative float, -5 is usual)")
            if not float(self.lower_bound) < 0:
                raise _err(f"lower_bound must be negative, got {self.lower_bound}")
        elif self.lower_bound is not None:
            raise _err("lower_bound is only used by gate='bounded' (set gate='bounded' to bound the decay)")
        if self.use_short_conv and (not isinstance(self.conv_size, (int, np.integer)) or self.conv_size < 1):
            raise _err(f"conv_size must be a positive int, got {self.conv_size!r}")
        if self.implementation is not None and self.implementation not in _ops.IMPLEMENTATIONS:
            raise _err(f"implementation must be None or one of {_ops.IMPLEMENTATIONS}, got {self.implementation!r}")

    def _dense(self, features, name, axes):
        return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.with_logical_partitioning(self.kernel_init, axes), name=name)

    @nn.compact
    def __call__(self, x, segment_ids=None, *, decode: bool = False):
        """x: ``[B, T, hidden]``; segment_ids: optional int32 ``[B, T]`` (0 = padding).

        ``decode=True`` reads and updates the ``cache`` collection (pass ``mutable=["cache"]``): each row
        continues its cached sequence. Returns ``[B, T, hidden]`` (zeros at padding).
        """
        self._validate()
        if not hasattr(x, "ndim") or x.ndim != 3:
            raise _err(f"x must be [B, T, hidden], got shape {getattr(x, 'shape', None)}")
        B, T, hidden = x.shape
        if self.hidden_size is not None and hidden != self.hidden_size:
            raise _err(f"x has hidden size {hidden}, the layer was built for hidden_size={self.hidden_size}")
        if segment_ids is not None:
            if not hasattr(segment_ids, "dtype") or tuple(segment_ids.shape) != (B, T):
                raise _err(f"segment_ids must be [B, T] = {(B, T)}, got {getattr(segment_ids, 'shape', None)}")
            if jnp.dtype(segment_ids.dtype) != jnp.int32:
                raise _err(f"segment_ids must be int32, got {segment_ids.dtype}")

        H, K, HV, Vd = self.num_heads, self.head_dim, self.n_v_heads, self.head_v_dim
        W = self.conv_size

        # Parameters, in fla's order and names.
        q_proj = self._dense(self.key_dim, "q_proj", (EMBED, HEADS))
        k_proj = self._dense(self.key_dim, "k_proj", (EMBED, HEADS))
        v_proj = self._dense(self.value_dim, "v_proj", (EMBED, HEADS))
        if self.use_short_conv:
            convs = [_ShortConv(d, W, self.conv_bias, self.dtype, self.param_dtype, name=n)
                     for d, n in ((self.key_dim, "q_conv1d"), (self.key_dim, "k_conv1d"), (self.value_dim, "v_conv1d"))]
        f_proj = _LowRank(Vd, HV * K, False, self.dtype, self.param_dtype, self.kernel_init, name="f_proj")
        b_proj = self._dense(HV, "b_proj", (EMBED, HEADS))
        if self.gate == "bounded":
            a_init = nn.initializers.zeros_init()
        else:
            a_init = init_a_log
        A_log = self.param("A_log", nn.with_logical_partitioning(a_init, (HEADS,)), (HV,), jnp.float32)
        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(init_dt_bias, (HEADS,)), (HV * K,), jnp.float32)
        g_proj = _LowRank(Vd, self.value_dim, True, self.dtype, self.param_dtype, self.kernel_init, name="g_proj")
        o_norm = _GatedRMSNorm(Vd, self.norm_eps, self.param_dtype, name="o_norm")
        o_proj = self._dense(hidden, "o_proj", (HEADS, EMBED))

        # Decode cache.
        if decode:
            cdtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)
            have_cache = self.has_variable("cache", "recurrent_state")
            if not have_cache and not self.is_initializing():
                raise _err("decode=True reads the 'cache' collection: create it with "
                           "layer.init(key, x, decode=True) (or jax.eval_shape of that, zero-filled) and call "
                           "layer.apply({'params': ..., 'cache': ...}, x, decode=True, mutable=['cache'])")
            conv_states = None
            if self.use_short_conv:
                conv_init = nn.with_logical_partitioning(jnp.zeros, (BATCH, None, HEADS))
                conv_states = [self.variable("cache", f"conv_state_{n}", conv_init, (B, W - 1, d), cdtype)
                               for n, d in (("q", self.key_dim), ("k", self.key_dim), ("v", self.value_dim))]
            rec = self.variable("cache", "recurrent_state",
                                nn.with_logical_partitioning(jnp.zeros, (BATCH, HEADS, None, None)),
                                (B, HV, K, Vd), jnp.float32)
            if have_cache and rec.value.shape[0] != B:
                raise _err(f"the cache holds {rec.value.shape[0]} rows, the input has B={B}")

        # Token layout: with decode, each row's non-padding tokens move to its front (one sequence per
        # row); otherwise tokens stay in place and segment ids separate the sequences.
        if decode:
            if segment_ids is not None:
                mask = segment_ids != 0
                x_in, pos, n_valid = _compact(x, mask)
                kda_seg = (jnp.arange(T)[None, :] < n_valid[:, None]).astype(jnp.int32)
            else:
                x_in, mask, pos, n_valid, kda_seg = x, None, None, jnp.full((B,), T, jnp.int32), None
            slot = None
        else:
            x_in = x
            slot, kda_seg = None, segment_ids
            if segment_ids is not None:
                slot = _segments.slots_from_segment_ids(segment_ids)
                # Padding inputs enter nothing (and get exactly zero gradient).
                x_in = jnp.where((segment_ids != 0)[..., None], x, 0)

        q, k, v = q_proj(x_in), k_proj(x_in), v_proj(x_in)
        if self.use_short_conv:
            outs = []
            for i, (conv, a) in enumerate(zip(convs, (q, k, v))):
                kern, bias = conv.params_in(a.dtype)
                if decode:
                    y, new_state = _short_conv_with_state(a, kern, bias, conv_states[i].value, n_valid)
                    if have_cache:
                        conv_states[i].value = new_state
                else:
                    y = short_conv(a, kern, bias, slot)
                outs.append(y)
            q, k, v = outs
        else:
            q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)

        g = f_proj(x_in)
        beta = b_proj(x_in)
        q = q.reshape(B, T, H, K)
        k = k.reshape(B, T, H, K)
        v = v.reshape(B, T, HV, Vd)
        g = g.reshape(B, T, HV, K)

        common = dict(qk_l2norm=True, beta_sigmoid=True, allow_neg_eigval=self.allow_neg_eigval,
                      gate=self.gate, A_log=A_log, dt_bias=dt_bias,
                      lower_bound=None if self.gate != "bounded" else float(self.lower_bound),
                      implementation=self.implementation)
        if decode:
            state = rec.value
            if kda_seg is None and T <= DECODE_STEP_MAX_TOKENS and q.dtype != jnp.float64:
                # A few new tokens per row and no padding (the serving loop): the fused decode step, which
                # reads and writes each state once. Longer prompts take the chunked kernel below.
                o, fin = _decode.kda_decode(q, k, v, g, beta, state, **common)
            elif kda_seg is not None:
                o, fin = _ops.kda(q, k, v, g, beta, segment_ids=kda_seg, max_segments=1,
                                  initial_state=state[:, None], return_final_state=True, **common)
                fin = fin[:, 0]
            else:
                o, fin = _ops.kda(q, k, v, g, beta, initial_state=state, return_final_state=True, **common)
            if have_cache:
                rec.value = fin.astype(jnp.float32)
        else:
            o, _ = _ops.kda(q, k, v, g, beta, segment_ids=kda_seg, context_parallel_axis=self.context_parallel_axis,
                            checkpoint_slices=self.checkpoint_slices, **common)

        gate_out = g_proj(x_in).reshape(B, T, HV, Vd)
        o = o_norm(o, gate_out)
        y = o_proj(o.reshape(B, T, HV * Vd))
        if decode and segment_ids is not None:
            y = _uncompact(y, pos, mask)
        elif segment_ids is not None:
            y = jnp.where((segment_ids != 0)[..., None], y, 0)
        return y
