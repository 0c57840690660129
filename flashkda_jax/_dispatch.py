"""Choosing an implementation (shared by ``kda`` and ``kda_decode``)."""

from __future__ import annotations

import warnings
from typing import Callable, Optional

from flashkda_jax import _ffi

IMPLEMENTATIONS = ("cuda", "cpu", "xla")

_WARNED: set[str] = set()


def warn_once(msg: str) -> None:
    """Falling back is allowed, but never silently: it is slower."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def select(op: str, implementation: Optional[str], platform: str,
           cuda_unsupported: Callable[[], Optional[str]]) -> str:
    """The implementation to run: the one asked for (with a clear error when it cannot run here), else
    CUDA on a GPU (pure JAX, with a warning, where the kernel lacks the problem), C++ on a CPU, else pure JAX.

    ``cuda_unsupported()`` returns None when the CUDA kernel takes the problem, else the reason it does not.
    """
    def err(msg):
        return ValueError(f"flashkda_jax.{op}: {msg}")

    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise err(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "xla":
        return "xla"
    if implementation == "cpu":
        if not _ffi.has_extension():
            raise err(f"implementation='cpu' needs the compiled extension ({_ffi.extension_import_error()})")
        return "cpu"
    if implementation == "cuda":
        why = cuda_unsupported()
        if why is not None:
            raise err(f"implementation='cuda': {why}")
        return "cuda"
    if platform in ("gpu", "cuda"):
        why = cuda_unsupported()
        if why is None:
            return "cuda"
        warn_once(f"flashkda_jax.{op}: using the pure-JAX implementation on the GPU because {why}")
        return "xla"
    if platform == "cpu" and _ffi.has_extension():
        return "cpu"
    return "xla"
