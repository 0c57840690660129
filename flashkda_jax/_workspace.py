"""Workspace sizes (bytes) of the FFI ops, per platform. Handlers get it as their last (u8) result, so that
they never allocate and stay CUDA-graph safe. Must be linear in B (vmap multiplies the buffer by the
batch of the vmapped axis).

The CUDA forward layout mirrors ``flashkda::fwd::MakeLayout`` in ``cutlass/kda_fwd_common.cuh``; keep both
in sync (the handler checks that the buffer it gets is large enough). Its per-row size never grows with B
(more rows only lengthen the segments sequences are split into), so ``bytes(n * B) <= n * bytes(B)``.
The CUDA backward layout mirrors ``flashkda::bwd::MakeLayout`` (``cutlass/kda_bwd_common.cuh``), which embeds
the forward's without splitting. ``cuda_*_workspace_layout`` name each region's byte offset and size (the
fields of the C++ ``Layout`` structs); tests/test_cuda_bwd_stages.py reads the backward's intermediates
back through them. Sizes are derived from the layouts: one list of regions per op.
"""

from __future__ import annotations

import os

import numpy as np

# Constants of cutlass/kda_fwd_common.cuh.
_CHUNK = 64
# Row pitch of the prep's A_qk output: A_qk row | T row (cutlass/kda_fwd_common.cuh: kAqkPitch).
_AQK_PITCH = 2 * _CHUNK
_SEG_MIN_CHUNKS = 8
_SMS = 132


def _align256(x: int) -> int:
    return (x + 255) // 256 * 256


def _block_v(K: int, B: int, HV: int) -> int:
    """The forward recurrence's column block (BlockV in cutlass/kda_fwd_common.cuh)."""
    return 32 if K >= 256 else (128 if K == 128 and B * HV >= 64 else 64)


def cuda_fwd_seglen(B: int, T: int, HV: int, K: int, V: int) -> int:
    """Chunks per segment that the CUDA forward splits long sequences into (ChooseSeglen)."""
    nw = -(-T // _CHUNK)
    bv = _block_v(K, B, HV)
    chains = B * HV * (V // bv)
    if chains <= 0 or nw <= _SEG_MIN_CHUNKS or K > 128:  # K = 256: never split (untuned)
        return max(nw, 1)
    best_len, best_cost = nw, -1
    for n in range(1, 65):
        ln = max(-(-nw // n), _SEG_MIN_CHUNKS)
        ns = -(-nw // ln)
        if n > 1 and ns < 2:
            break
        items3 = ns * chains
        items1 = chains + (ns - 2) * chains * 2 if ns > 1 else 0
        slots = (2 if K <= 128 and bv <= 64 else 1) * _SMS  # resident recurrence CTAs (RecurCtasPerSm)
        half_rounds = 2 * -(-items3 // slots) + -(-items1 // slots)  # a phase-1 round costs half
        cost = half_rounds * (ln + 2)
        if best_cost < 0 or cost < best_cost:
            best_cost, best_len = cost, (ln if ns > 1 else nw)
    return best_len


def _pack(regions, base: int = 0) -> tuple[dict, int]:
    """[(name, nbytes)] -> ({name: (offset, nbytes)}, end): consecutive regions, each padded to 256 bytes
    (the ``take`` lambda of the C++ layouts)."""
    out, off = {}, base
    for name, nbytes in regions:
        out[name] = (off, nbytes)
        off += _align256(nbytes)
    return out, off


def _cuda_fwd_regions(B: int, T: int, HV: int, K: int, V: int, S: int, no_split: bool,
                      prep_external: bool = False) -> list:
    nw = -(-T // _CHUNK)
    ng = nw + S
    seglen = max(nw, 1) if no_split else cuda_fwd_seglen(B, T, HV, K, V)
    split = seglen < nw
    lseg = seglen * _CHUNK
    nsplit = (-(-T // lseg) + 1) if split else 0
    tok = B * T * HV
    px = 0 if prep_external else 1  # prep_external: Qg .. gamma live in the saved_* buffers
    # Names are the fields of flashkda::fwd::Layout, in its order.
    return [
        ("qg", px * tok * K * 2),                 # Qg (bf16) [B, T, HV, K]
        ("kd", px * tok * K * 2),                 # Kd (bf16) [B, T, HV, K]
        ("w", px * tok * K * 2),                  # W (bf16) [B, T, HV, K]
        ("u", px * tok * V * 2),                  # U (bf16) [B, T, HV, V]
        ("aqk", px * tok * _AQK_PITCH * 2),       # A_qk rows | T rows (bf16) [B, T, HV, 2C]
        ("gamma", px * B * ng * HV * K * 4),      # gamma per chunk (f32) [B, NG, HV, K]
        ("hp", B * nsplit * HV * K * (V + K) * 4),  # segment maps [H | P]
        ("sstart", B * nsplit * HV * K * V * 4),  # segment start states
        ("seq_start", B * T * 4),                 # sequence start per token (i32) [B, T]
        ("seq_end", B * T * 4),                   # sequence end per start (i32) [B, T]
        ("chunks", B * T * 16),                   # chunk list (int4 b, t, seq_end, slot)
        ("segs", B * T * 16),                     # segment list
        ("multi", B * T * 16),                    # split-sequence list; unsplit: the overlap's ready counters
        ("counters", 64),                         # counters (i32 x 16)
    ]


def cuda_fwd_workspace_layout(B: int, T: int, HV: int, K: int, V: int, S: int, no_split: bool = False,
                              prep_external: bool = False) -> dict:
    """``{name: (byte offset, bytes)}`` of ``flashkda::fwd::MakeLayout`` (names: its ``Layout`` fields)."""
    return _pack(_cuda_fwd_regions(B, T, HV, K, V, S, no_split, prep_external))[0]


def cuda_fwd_workspace_bytes(B: int, T: int, HV: int, K: int, V: int, S: int, no_split: bool = False,
                             prep_external: bool = False) -> int:
    """Mirrors ``flashkda::fwd::MakeLayout`` (no_split: one segment per sequence, as the backward uses it;
    prep_external: the prep outputs go to the saved_* results, not the workspace)."""
    return _pack(_cuda_fwd_regions(B, T, HV, K, V, S, no_split, prep_external))[1]


def cuda_fwd_runs_f32(dtype) -> bool:
    """Whether the CUDA forward runs its float32 recurrence (cutlass/kda_fwd_f32.cu) for inputs of this dtype: it
    takes no workspace and saves no residuals for the backward."""
    return np.dtype(dtype) == np.dtype(np.float32)


def fwd_workspace_bytes(platform: str, *, B: int, T: int, H: int, HV: int, K: int, V: int, S: int, opts,
                        prep_external: bool = False, dtype=None) -> int:
    if platform != "cuda" or (dtype is not None and cuda_fwd_runs_f32(dtype)):
        return 0
    return cuda_fwd_workspace_bytes(B, T, HV, K, V, S, prep_external=prep_external)


_REDUCE_TILE = 64  # flashkda::bwd::kReduceTile


def cuda_bwd_states_bf16() -> bool:
    """Mirrors ``flashkda::bwd::StatesInBf16``: the default kernels keep the chunk states (hs, dh) in bf16; the
    first versions (``FLASHKDA_BWD_RECUR=v1`` or ``FLASHKDA_BWD_GRAD1=simt``, docs/ffi.md) keep f32. Both sides
    read the same environment (C++ at its first launch, this at trace time)."""
    return os.environ.get("FLASHKDA_BWD_RECUR") != "v1" and os.environ.get("FLASHKDA_BWD_GRAD1") != "simt"


# The CUDA backward's default token windows: 4096 tokens (64 chunks), for rows of one sequence longer than
# _WINDOW_MIN_T. Each window costs a few launches and the tails of its grad1 / grad2 (H100, session 12: +7% fwd+bwd
# time at b1-t32k-h16 with 8 windows, +9-10% with 8-12 windows of 704-1024 tokens at T = 8192, HV = 64-96).
_WINDOW_TOKENS = 4096
_WINDOW_MIN_T = 8192


def _forced_window() -> int | None:
    """``FLASHKDA_BWD_WINDOW`` (tokens per window, a multiple of 64; 0 = no windows), or None when unset."""
    raw = os.environ.get("FLASHKDA_BWD_WINDOW", "")
    if raw == "":
        return None
    try:
        v = int(raw)
    except ValueError:
        v = -1
    if v < 0 or v % _CHUNK:
        raise ValueError(f"FLASHKDA_BWD_WINDOW={raw!r}: expected a non-negative multiple of {_CHUNK} (tokens per "
                         "window of the CUDA backward; 0 = no windows)")
    return v


def cuda_bwd_window(T: int, one_sequence_per_row: bool) -> int:
    """Tokens per window of the CUDA backward (its ``bwd_window`` attribute; 0 = none). The stages after the
    states pass run one token window at a time, last first, so their per-token scratch and chunk-state gradients
    are one window's size (docs/ffi.md): the backward's peak falls from about 2.3x to 1.5x of the inputs, outputs
    and gradients at b1-t32k-h16, for about 7% more time. Windows serialise the reverse pass over the sequences of
    a row (each window waits for the later one), so by default they are used only with one sequence per row (no
    segment_ids / cu_seqlens) longer than 8192 tokens: windows of 4096 tokens. ``FLASHKDA_BWD_WINDOW`` overrides
    the choice. The first-version kernels (f32 states) are never windowed. For a given window the layout is
    linear in B (vmap)."""
    if not cuda_bwd_states_bf16():
        return 0
    forced = _forced_window()
    if forced is not None:
        return forced if forced < T else 0
    if not one_sequence_per_row or T <= _WINDOW_MIN_T:
        return 0
    return _WINDOW_TOKENS


def cuda_bwd_windows(T: int, window: int) -> tuple[int, int]:
    """(tokens per window, window count) for a ``bwd_window`` value; mirrors ``flashkda::bwd::MakeWindows``.
    Count 1: unwindowed."""
    if window <= 0 or window >= T:
        return T, 1
    return window, -(-T // window)


def _cuda_bwd_pack(B: int, T: int, HV: int, K: int, V: int, S: int,
                   states_given: bool = False, prep_given: bool = False, window: int = 0) -> tuple[dict, int]:
    fwd, off = _pack(_cuda_fwd_regions(B, T, HV, K, V, S, no_split=True, prep_external=prep_given))
    nw = -(-T // _CHUNK)
    length, count = cuda_bwd_windows(T, window)
    windowed = count > 1
    # Rows of the per-token scratch and chunk-state gradients: one window's (MakeWindows' rows, slots).
    wt = min(length + _CHUNK - 1, T) if windowed else T
    wnw = length // _CHUNK + 1 if windowed else nw + 1
    tok = B * wt * HV
    state = HV * K * V * (2 if cuda_bwd_states_bf16() else 4)
    # Names are the fields of flashkda::bwd::Layout, in its order (after the forward's, embedded first).
    bwd, off = _pack([
        ("hs", 0 if states_given else B * (nw + 1) * state),  # chunk start states (bf16, or f32) [B, NW + 1, HV, K, V]
        ("dh", B * wnw * state),           # their gradients (bf16, or f32) [B, wnw, HV, K, V] (window's)
        ("dgam", B * (nw + S) * HV * K * 4),  # dgamma per chunk (f32) [B, NG, HV, K]
        ("sqg", tok * K * 4),              # dQg, then dq (effective) (f32) [B, wt, HV, K]
        ("skd", tok * K * 4),              # dKd, then dk (effective)
        ("swu", tok * (K + V) * 2),        # dW | dU rows (bf16) [B, wt, HV, K + V], then d(gate input) (f32,
                                           # [B, wt, HV, K], gate != precomputed; K == V)
        ("sa", tok * _CHUNK * 4),          # dA_qk rows (f32) [B, wt, HV, C]
        ("sda", tok * 4),                  # d a_log per chunk at its first token (f32) [B, wt, HV]
        ("seqs", B * T * 16),              # sequence list (int4 b, start, end, slot)
        ("gred", B * HV * -(-T // _REDUCE_TILE) * (K + 1) * 4),  # per-tile gate-parameter sums (f32)
        ("bnd", 2 * B * HV * K * V * 4 if windowed else 0),  # windows' boundary dS (f32) [2, B, HV, K, V]
        ("wlists", 8 * B * T if windowed else 0),  # a window's chunk and sequence lists (int32) [2, B * T]
    ], off)
    return {**fwd, **bwd}, off


def cuda_bwd_workspace_layout(B: int, T: int, HV: int, K: int, V: int, S: int, states_given: bool = False,
                              prep_given: bool = False, window: int = 0) -> dict:
    """``{name: (byte offset, bytes)}`` of ``flashkda::bwd::MakeLayout``: the forward's regions
    (``fwd::MakeLayout(no_split=True)``, names of ``fwd::Layout``) then the backward's (names of
    ``bwd::Layout``). ``bytes`` is the region's size before the 256-byte padding. S must be the
    dfinal_state slots the handler sees (0 without dfinal_state): the offsets after ``gamma`` depend on it.
    states_given / prep_given: the forward's chunk_states / saved prep outputs come as operands (no ``hs`` /
    ``qg`` .. ``gamma`` regions; S is then the saved gamma's slots). window: the op's bwd_window (cuda_bwd_window)."""
    return _cuda_bwd_pack(B, T, HV, K, V, S, states_given, prep_given, window)[0]


def cuda_bwd_workspace_bytes(B: int, T: int, HV: int, K: int, V: int, S: int, states_given: bool = False,
                             prep_given: bool = False, window: int = 0) -> int:
    """Mirrors ``flashkda::bwd::MakeLayout`` in ``cutlass/kda_bwd_common.cuh`` (S: dfinal_state slots, or an
    upper bound of them: the size only grows with S; states_given: the forward's chunk_states are an operand)."""
    return _cuda_bwd_pack(B, T, HV, K, V, S, states_given, prep_given, window)[1]


def bwd_window(platform: str, *, T: int, opts) -> int:
    """The backward op's bwd_window attribute: cuda_bwd_window on CUDA (one sequence per row: state_mode
    "dense"), 0 on the CPU."""
    return cuda_bwd_window(T, opts.state_mode == "dense") if platform == "cuda" else 0


def bwd_workspace_bytes(platform: str, *, B: int, T: int, H: int, HV: int, K: int, V: int, S: int, opts,
                        states_given: bool = False, prep_given: bool = False, window: int = 0) -> int:
    """window: the op's bwd_window attribute (bwd_window)."""
    if platform == "cuda":
        return cuda_bwd_workspace_bytes(B, T, HV, K, V, S, states_given, prep_given, window)
    return 0


def saved_structs(B: int, T: int, HV: int, K: int, V: int, S: int) -> tuple:
    """(shape, dtype name) of the CUDA forward's seven saved results, in FFI order: chunk_states (bf16, see
    chunk_states_shape), saved_qg, saved_kd, saved_w, saved_u (bf16 [B, T, HV, K]), saved_aqk (bf16 [B, T, HV,
    128]: A_qk rows, then the rows of the WY solve's T) and saved_gamma (f32 [B, ceil(T / 64) + S, HV, K]; S: the
    op's state slots). K == V."""
    nw = -(-T // _CHUNK)
    tok = ((B, T, HV, K), "bfloat16")
    return ((chunk_states_shape(B, T, HV, K, V), "bfloat16"), tok, tok, tok, tok,
            ((B, T, HV, _AQK_PITCH), "bfloat16"), ((B, nw + S, HV, K), "float32"))


def chunk_states_shape(B: int, T: int, HV: int, K: int, V: int) -> tuple:
    """Shape of the CUDA forward's chunk_states result (bf16), the backward's Hs: ``[B, ceil(T / 64) + 1, HV, K,
    V]`` (index ceil(cs / 64) of a row holds the start state of the chunk at cs; index 0 is never written)."""
    return (B, -(-T // _CHUNK) + 1, HV, K, V)
