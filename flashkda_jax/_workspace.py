"""Workspace sizes (bytes) of the FFI ops, per platform. Handlers get it as their last (u8) result, so that
they never allocate and stay CUDA-graph safe. Must be linear in B (vmap multiplies the buffer by the
batch of the vmapped axis).

The CUDA forward layout mirrors ``flashkda::fwd::MakeLayout`` in ``cutlass/kda_fwd_common.cuh``; keep both
in sync (the handler checks that the buffer it gets is large enough). Its per-row size never grows with B
(more rows only lengthen the segments sequences are split into), so ``bytes(n * B) <= n * bytes(B)``.
"""

from __future__ import annotations

# Constants of cutlass/kda_fwd_common.cuh.
_CHUNK = 64
_SEG_MIN_CHUNKS = 8
_SMS = 132


def _align256(x: int) -> int:
    return (x + 255) // 256 * 256


def _block_v(K: int) -> int:
    return 32 if K >= 256 else 64


def cuda_fwd_seglen(B: int, T: int, HV: int, K: int, V: int) -> int:
    """Chunks per segment that the CUDA forward splits long sequences into (ChooseSeglen)."""
    nw = -(-T // _CHUNK)
    chains = B * HV * (V // _block_v(K))
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
        slots = 2 * _SMS if K <= 128 else _SMS
        rounds = -(-items3 // slots) + -(-items1 // slots)
        cost = rounds * (ln + 2)
        if best_cost < 0 or cost < best_cost:
            best_cost, best_len = cost, (ln if ns > 1 else nw)
    return best_len


def cuda_fwd_workspace_bytes(B: int, T: int, HV: int, K: int, V: int, S: int, no_split: bool = False) -> int:
    """Mirrors ``flashkda::fwd::MakeLayout`` (no_split: one segment per sequence, as the backward uses it)."""
    nw = -(-T // _CHUNK)
    ng = nw + S
    seglen = max(nw, 1) if no_split else cuda_fwd_seglen(B, T, HV, K, V)
    split = seglen < nw
    lseg = seglen * _CHUNK
    nsplit = (-(-T // lseg) + 1) if split else 0
    tok = B * T * HV
    sizes = [
        tok * K * 2,               # Qg
        tok * K * 2,               # Kd
        tok * K * 2,               # W
        tok * V * 2,               # U
        tok * _CHUNK * 2,          # A_qk rows
        B * ng * HV * K * 4,       # gamma per chunk
        B * nsplit * HV * K * (V + K) * 4,  # segment maps [H | P]
        B * nsplit * HV * K * V * 4,        # segment start states
        B * T * 4,                 # sequence start per token
        B * T * 4,                 # sequence end per start
        B * T * 16,                # chunk list
        B * T * 16,                # segment list
        B * T * 16,                # split-sequence list
        64,                        # counters
    ]
    return sum(_align256(s) for s in sizes)


def fwd_workspace_bytes(platform: str, *, B: int, T: int, H: int, HV: int, K: int, V: int, S: int, opts) -> int:
    if platform == "cuda":
        return cuda_fwd_workspace_bytes(B, T, HV, K, V, S)
    return 0


def cuda_bwd_workspace_bytes(B: int, T: int, HV: int, K: int, V: int, S: int) -> int:
    """Mirrors ``flashkda::bwd::MakeLayout`` in ``cutlass/kda_bwd_common.cuh`` (S: dfinal_state slots, or an
    upper bound of them: the size only grows with S)."""
    nw = -(-T // _CHUNK)
    tok = B * T * HV
    states = B * (nw + 1) * HV * K * V * 4
    sizes = [
        states,                    # chunk start states (f32)
        states,                    # their gradients (f32)
        B * (nw + S) * HV * K * 4, # dgamma per chunk
        tok * K * 4,               # dQg, then dq (effective)
        tok * K * 4,               # dKd, then dk (effective)
        tok * K * 4,               # dW, then d(gate input)
        tok * V * 4,               # dU
        tok * _CHUNK * 4,          # dA_qk rows
        tok * 4,                   # d a_log per token
        B * T * 16,                # sequence list
    ]
    return cuda_fwd_workspace_bytes(B, T, HV, K, V, S, no_split=True) + sum(_align256(s) for s in sizes)


def bwd_workspace_bytes(platform: str, *, B: int, T: int, H: int, HV: int, K: int, V: int, S: int, opts) -> int:
    if platform == "cuda":
        return cuda_bwd_workspace_bytes(B, T, HV, K, V, S)
    return 0
