"""mhc-convert: move checkpoints between the mHC-off and mHC-on layouts, exactly and safely.

Python API mirroring the CLI (each returns a report object)::

    import mhc_convert
    mhc_convert.enable("ckpt", "ckpt-mhc", streams=4)
    mhc_convert.disable("ckpt-mhc", "ckpt-back")
    mhc_convert.inspect("ckpt-mhc", verify=True)
    mhc_convert.verify("ckpt", "ckpt-mhc", dtype="bf16")

Importing this package needs neither Triton nor CUDA, and not even torch: the functions and
errors are imported on first use (``mhc-convert --help`` starts in a fraction of a second).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mhc_convert.engine import disable, enable
    from mhc_convert.errors import (
        AlreadyInLayoutError,
        ConvertError,
        InvalidInputError,
        IOFailure,
        UsageError,
        VerificationError,
    )
    from mhc_convert.inspection import inspect
    from mhc_convert.parity import compare_checkpoints as verify
    from mhc_model.version import __version__

__all__ = [
    "AlreadyInLayoutError", "ConvertError", "IOFailure", "InvalidInputError", "UsageError",
    "VerificationError", "__version__", "disable", "enable", "inspect", "verify",
]
_ERRORS = {"AlreadyInLayoutError", "ConvertError", "IOFailure", "InvalidInputError",
           "UsageError", "VerificationError"}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # package metadata, read on first use
        from mhc_model.version import __version__

        return __version__
    if name in ("enable", "disable"):
        from mhc_convert import engine

        return getattr(engine, name)
    if name == "inspect":
        from mhc_convert.inspection import inspect

        return inspect
    if name == "verify":
        from mhc_convert.parity import compare_checkpoints

        return compare_checkpoints
    if name in _ERRORS:
        from mhc_convert import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'mhc_convert' has no attribute {name!r}")
