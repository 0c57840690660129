"""Loads the compiled extension and registers its FFI handlers with XLA (once, at import)."""

from __future__ import annotations

import jax

try:  # The extension is optional: without it only the "xla" implementation runs.
    from flashkda_jax import _flashkda  # type: ignore[attr-defined]
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    _flashkda = None
    _IMPORT_ERROR: Exception | None = e
else:
    _IMPORT_ERROR = None

FWD_TARGET = "flashkda_fwd"
BWD_TARGET = "flashkda_bwd"
DECODE_TARGET = "flashkda_decode"

_REGISTERED: dict[str, set[str]] = {}


def _register() -> None:
    if _flashkda is None:
        return
    for name, platforms in _flashkda.registrations().items():
        for platform, capsule in platforms.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
            _REGISTERED.setdefault(name, set()).add(platform.lower())


_register()


def has_extension() -> bool:
    return _flashkda is not None


def extension_has_cuda() -> bool:
    return bool(_flashkda is not None and _flashkda.with_cuda)


def extension_import_error() -> Exception | None:
    return _IMPORT_ERROR
