"""mhc-convert: move checkpoints between the mHC-off and mHC-on layouts, exactly and safely.

Python API mirroring the CLI (each returns a report object)::

    import mhc_convert
    mhc_convert.enable("ckpt", "ckpt-mhc", streams=4)
    mhc_convert.disable("ckpt-mhc", "ckpt-back")
    mhc_convert.inspect("ckpt-mhc", verify=True)

Importing this package needs neither Triton nor CUDA.
"""

from mhc_convert.engine import disable, enable, inspect
from mhc_convert.errors import (
    AlreadyInLayoutError,
    ConvertError,
    InvalidInputError,
    IOFailure,
    UsageError,
    VerificationError,
)
from mhc_convert.parity import compare_checkpoints as verify

__all__ = [
    "AlreadyInLayoutError", "ConvertError", "IOFailure", "InvalidInputError", "UsageError",
    "VerificationError", "disable", "enable", "inspect", "verify",
]
