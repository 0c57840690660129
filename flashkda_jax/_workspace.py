"""Workspace sizes (bytes) of the FFI ops, per platform. Handlers get it as their last (u8) result, so that
they never allocate and stay CUDA-graph safe. Must be linear in B (vmap multiplies the buffer by the
batch of the vmapped axis)."""

from __future__ import annotations


def fwd_workspace_bytes(platform: str, *, B: int, T: int, H: int, HV: int, K: int, V: int, S: int, opts) -> int:
    return 0


def bwd_workspace_bytes(platform: str, *, B: int, T: int, H: int, HV: int, K: int, V: int, S: int, opts) -> int:
    return 0
