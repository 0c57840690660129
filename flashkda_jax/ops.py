"""``kda``: the public op. Validation (``_inputs``), dispatch to an implementation, and the
``jax.custom_vjp`` around the FFI kernels (``flashkda_fwd`` / ``flashkda_bwd``).

What the forward saves for the backward: its inputs (q, k, v, g, beta, the gate parameters, the slot map
and the initial state: (2·H·K + HV·(V + K + 1))·itemsize bytes per token plus the states) and, with the CUDA
kernels, the bf16 start state of every chunk (K·V·2 / 64 bytes per token and value head: 512 for K = V = 128)
and the prep kernel's outputs (Qg, Kd, W, U, A_qk in bf16 and the chunk decays: (4K + 64)·2 bytes plus
4K / 64, ~1.2 KB at K = 128), which the forward computes anyway; the backward then skips its states pass and
its prep. Its workspace then holds neither, so the peak memory of a training step does not grow.
``FLASHKDA_SAVE_RESIDUALS=0`` (read at trace time) makes the backward recompute them instead.
``kda(..., checkpoint_slices=n)`` saves nothing per token at all: the op runs as n sequence slices and the backward
recomputes slice by slice (:mod:`flashkda_jax.slicing`), trading time for a peak of one slice's intermediates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flashkda_jax import _capabilities as _caps
from flashkda_jax import _dispatch
from flashkda_jax import _ffi
from flashkda_jax import _inputs
from flashkda_jax import _workspace
from flashkda_jax import sharding as _sharding
from flashkda_jax import slicing as _slicing

IMPLEMENTATIONS = _dispatch.IMPLEMENTATIONS


def _gpu_visible() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def available_implementations() -> tuple[str, ...]:
    """The implementations this install can run here: a subset of ``("cuda", "cpu", "xla")``."""
    out = []
    if _ffi.extension_has_cuda() and _caps.CUDA_FWD_READY and _gpu_visible():
        out.append("cuda")
    if _ffi.has_extension():
        out.append("cpu")
    out.append("xla")
    return tuple(out)


def _cuda_supports(core, opts) -> str | None:
    """None when the CUDA forward kernel takes this problem, else the reason it does not."""
    K, V = core.q.shape[-1], core.v.shape[-1]
    if not _ffi.extension_has_cuda():
        return "this install of flashkda_jax was built without CUDA"
    if not _caps.CUDA_FWD_READY:
        return "the CUDA forward kernel is not available in this build"
    if (K, V) not in _caps.CUDA_FWD_HEAD_DIMS:
        return f"head dims K={K}, V={V} are not supported by the CUDA kernel (supported: {sorted(_caps.CUDA_FWD_HEAD_DIMS)})"
    if jnp.dtype(core.q.dtype).name not in _caps.CUDA_FWD_DTYPES:
        return f"dtype {core.q.dtype} is not supported by the CUDA kernel"
    return None


def _select(implementation, core, opts) -> str:
    return _dispatch.select("kda", implementation, jax.default_backend(), lambda: _cuda_supports(core, opts))


# ----------------------------------------------------------------------------------------------------
# FFI calls.
# ----------------------------------------------------------------------------------------------------

def _sizes(q, v, opts):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    return dict(B=B, T=T, H=H, HV=HV, K=K, V=V, S=opts.num_slots)


def _state_struct(q, v, opts, present: bool):
    cdt = _inputs.compute_dtype(q.dtype)
    if not present:
        return jax.ShapeDtypeStruct((0,), cdt)
    B, HV, K, V = q.shape[0], v.shape[2], q.shape[3], v.shape[3]
    kv = (V, K) if opts.state_vk else (K, V)
    return jax.ShapeDtypeStruct((B, opts.num_slots, HV) + kv, cdt)


def _empty_state(q):
    return jnp.zeros((0,), _inputs.compute_dtype(q.dtype))


def _saved_types(q, v, opts, present: bool):
    """Result types of the forward's seven chunk_states / saved_* results (empty when not saved)."""
    B, T, HV, K, V = q.shape[0], q.shape[1], v.shape[2], q.shape[3], v.shape[3]
    return tuple(jax.ShapeDtypeStruct(shape if present else (0,), jnp.dtype(dt))
                 for shape, dt in _workspace.saved_structs(B, T, HV, K, V, opts.num_slots))


def _ffi_forward_saving(args, opts, impl):
    """The flashkda_fwd call -> (o, final state or None, saved or None); saved = (chunk states, Qg, Kd, W, U,
    A_qk, gamma), what the CUDA backward would recompute, only with opts.save_residuals."""
    q, k, v, g, beta, a_log, dt_bias, slot, init = args
    sizes = _sizes(q, v, opts)
    ws = _workspace.fwd_workspace_bytes(impl, opts=opts, prep_external=opts.save_residuals, dtype=q.dtype,
                                        **sizes)
    out_types = ((jax.ShapeDtypeStruct(v.shape, v.dtype), _state_struct(q, v, opts, opts.return_final_state))
                 + _saved_types(q, v, opts, opts.save_residuals) + (jax.ShapeDtypeStruct((ws,), jnp.uint8),))
    outs = jax.ffi.ffi_call(_ffi.FWD_TARGET, out_types, vmap_method="broadcast_all")(
        q, k, v, g, beta, a_log, dt_bias, slot, _empty_state(q) if init is None else init, **opts.ffi_attrs())
    o, fin, saved = outs[0], outs[1], tuple(outs[2:9])
    return o, (fin if opts.return_final_state else None), (saved if opts.save_residuals else None)


def _ffi_forward(args, opts, impl):
    return _ffi_forward_saving(args, opts, impl)[:2]


def _ffi_backward_call(args, do, dfin, opts, impl, grad_types, saved=None):
    """The flashkda_bwd call with the given result types of the 7 input gradients -> (those 7, dinit). saved:
    the forward's saved results (_ffi_forward_saving), or None (the backward recomputes them)."""
    q, k, v, g, beta, a_log, dt_bias, slot, init = args
    if saved is None:
        saved = tuple(jnp.zeros(t.shape, t.dtype) for t in _saved_types(q, v, opts, False))
    # (the chunk states and the prep outputs may come alone: an empty operand is recomputed)
    sizes = _sizes(q, v, opts)
    window = _workspace.bwd_window(impl, T=sizes["T"], opts=opts)
    ws = _workspace.bwd_workspace_bytes(impl, opts=opts, states_given=saved[0].size > 0, prep_given=saved[1].size > 0,
                                        window=window, **sizes)
    out_types = tuple(grad_types) + (_state_struct(q, v, opts, init is not None),
                                     jax.ShapeDtypeStruct((ws,), jnp.uint8))
    if dfin is None:
        dfin = _empty_state(q)
    inputs = (q, k, v, g, beta, a_log, dt_bias, slot, _empty_state(q) if init is None else init,
              do.astype(v.dtype), dfin.astype(_inputs.compute_dtype(q.dtype)))
    outs = jax.ffi.ffi_call(_ffi.BWD_TARGET, out_types, vmap_method="broadcast_all",
                            input_output_aliases=_residual_aliases(len(inputs), saved, out_types))(
        *inputs, *saved, **opts.ffi_attrs(), bwd_window=np.int64(window))
    return outs[:8]


# The backward's results that may take the memory of the saved residual they replace, {index in the saved results
# (chunk_states, Qg, Kd, W, U, A_qk, gamma: _workspace.saved_structs): result index}: dq <- Qg, dk <- Kd, dv <- U,
# dg <- W. The CUDA kernels read Qg / Kd only before grad2 writes dq / dk (reverse pass, grad1), and grad2 reads
# an item's W | U rows before it writes that item's dv / dg; PadZero's zeros go to padding tokens, whose rows no
# kernel reads.
_RESULT_OF_SAVED = {1: 0, 2: 1, 4: 2, 3: 3}


def _residual_aliases(first: int, saved, out_types) -> dict:
    """input_output_aliases of the backward call, whose saved results are operands first, first + 1, ...: each
    saved residual whose shape and dtype match the gradient that replaces it (H == HV for dq / dk; bf16 inputs),
    so that the backward's peak holds one of the two. XLA copies a residual that is still live elsewhere, so this
    never changes results."""
    if len(saved) < 5 or saved[1].size == 0:
        return {}
    return {first + i: r for i, r in _RESULT_OF_SAVED.items()
            if saved[i].shape == out_types[r].shape and saved[i].dtype == out_types[r].dtype}


def _grad_types(args):
    """Result types of the backward's 7 input gradients: like q, k, v, g, beta; f32 for the gate parameters."""
    f32 = jnp.float32
    return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args[:5]) + tuple(
        jax.ShapeDtypeStruct(x.shape, f32) for x in args[5:7])


def _ffi_backward(args, do, dfin, opts, impl, saved=None):
    init = args[8]
    dq, dk, dv, dg, dbeta, da, ddt, dinit = _ffi_backward_call(args, do, dfin, opts, impl, _grad_types(args), saved)
    return dq, dk, dv, dg, dbeta, da, ddt, (dinit if init is not None else None)


def _ffi_backward_state(args, do, dfin, opts, impl):
    """Only dinitial_state of the backward (its state-only mode: empty input-gradient results; on CUDA only
    the reverse pass runs). Needs an initial state. Part of the FFI contract (docs/ffi.md); the library itself no
    longer calls it (context parallelism gets that gradient from run 2's outputs, flashkda_jax.sharding)."""
    empty = tuple(jax.ShapeDtypeStruct((0,), x.dtype) for x in args[:5])
    empty += (jax.ShapeDtypeStruct((0,), jnp.float32),) * 2
    return _ffi_backward_call(args, do, dfin, opts, impl, empty)[7]


def _backward_impl(impl: str, q, v) -> str:
    if impl != "cuda":
        return impl
    K, V = q.shape[-1], v.shape[-1]
    if _caps.CUDA_BWD_READY and (K, V) in _caps.CUDA_BWD_HEAD_DIMS:
        return "cuda"
    _dispatch.warn_once("flashkda_jax.kda: no CUDA backward kernel for this problem yet; the gradient runs the "
               "pure-JAX chunked backward on the GPU (slow)")
    return "xla"


def run_core(core: _inputs.CoreInputs, opts: _inputs.KdaOptions, impl: str):
    """The core op on canonical inputs with the chosen implementation -> (o, final_state or None).

    Partitionable under jit (batch, heads, sequence): see :mod:`flashkda_jax.sharding`.
    """
    return _sharding.core(core, opts, impl)


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None, max_segments=None,
        cu_seqlens=None, return_final_state=False, qk_l2norm=False, beta_sigmoid=False,
        allow_neg_eigval=False, gate="precomputed", A_log=None, dt_bias=None, lower_bound=None,
        state_layout="kv", implementation=None, context_parallel_axis=None, checkpoint_slices=None):
    """Kimi Delta Attention over whole sequences (chunked prefill / training).

    Args:
      q, k: ``[B, T, H, K]``. v: ``[B, T, HV, V]`` (HV a multiple of H: GVA). g: ``[B, T, HV, K]``, the
        log-decay (``gate="precomputed"``, values <= 0) or the raw gate input of the in-kernel gate.
        beta: ``[B, T, HV]`` (raw logits when ``beta_sigmoid``). bf16, fp16 or fp32 (fp64 on CPU/XLA);
        g and beta are read in the dtype of q/k/v. On the GPU, bf16 / fp16 take the chunked tensor-core
        kernels; the forward runs fp32 inputs through a float32 recurrence on the CUDA cores (accurate to fp32
        rounding, slower: docs/ffi.md), so cast to bf16 for speed.
      scale: query scale, default ``K ** -0.5``.
      initial_state: fp32 ``[B, HV, K, V]``; with ``segment_ids`` ``[B, max_segments, HV, K, V]``; with
        ``cu_seqlens`` ``[N, HV, K, V]``. ``state_layout="vk"`` swaps the last two axes.
      segment_ids: int32 ``[B, T]``; a new sequence starts wherever the id changes, id 0 is padding
        (zero output, no state change, zero gradients). State entry s of a row is its s-th sequence.
      max_segments: static number of state slots per row with ``segment_ids`` (needed with states).
        Sequences past it start from zero and keep no final state.
      cu_seqlens: int ``[N+1]`` sequence boundaries along T (B must be 1), as in fla/FlashKDA.
      return_final_state: also return the state after each sequence.
      qk_l2norm, beta_sigmoid, allow_neg_eigval: fused pre-processing (DESIGN §2).
      gate: "precomputed", "softplus" (``-exp(A_log) * softplus(g + dt_bias)``) or "bounded"
        (``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))``; A_log optional).
      implementation: None (CUDA on GPU, C++ on CPU, else pure JAX), "cuda", "cpu" or "xla".
      context_parallel_axis: a mesh axis name (or tuple of names): shard the sequence axis T over it
        (context parallelism; needs a mesh in context, e.g. ``jax.set_mesh(mesh)``, and T divisible by
        the axis size). Sharding T of the inputs by other means does the same; see
        :mod:`flashkda_jax.sharding`.
      checkpoint_slices: a static int n >= 1, or None. Run the op as n slices of the sequence chained through
        their states, keeping for the backward only the state entering each slice (no per-token residuals),
        and run the backward slice by slice from the inputs: a training step's peak memory then holds one
        slice's intermediates instead of the whole sequence's, at the cost of recomputation (time and memory
        figures: the README's Memory section). For long sequences where memory, not time, is the limit; see
        :mod:`flashkda_jax.slicing`. Not with ``context_parallel_axis``.

    Returns:
      ``(o, final_state)``: o ``[B, T, HV, V]`` in v's dtype; final_state as initial_state, or None.
    """
    core, opts = _inputs.prepare(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
        max_segments=max_segments, cu_seqlens=cu_seqlens, return_final_state=return_final_state,
        qk_l2norm=qk_l2norm, beta_sigmoid=beta_sigmoid, allow_neg_eigval=allow_neg_eigval, gate=gate,
        A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound, state_layout=state_layout)
    impl = _select(implementation, core, opts)
    if checkpoint_slices is not None:
        if not _inputs.is_positive_int(checkpoint_slices):
            raise ValueError(f"flashkda_jax.kda: checkpoint_slices must be a positive Python int, got "
                             f"{checkpoint_slices!r}")
        if context_parallel_axis is not None:
            raise ValueError("flashkda_jax.kda: checkpoint_slices and context_parallel_axis cannot be combined "
                             "(each device's slice already bounds its memory)")
        o, fin = _slicing.core(core, opts, impl, int(checkpoint_slices))
        return o, _inputs.restore_final_state(fin, opts)
    if context_parallel_axis is not None:
        core, record = _sharding.constrain_context_parallel(core, context_parallel_axis)
        opts = dataclasses.replace(opts, cp_record=record)
    o, fin = run_core(core, opts, impl)
    return o, _inputs.restore_final_state(fin, opts)
