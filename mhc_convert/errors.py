"""mhc-convert's errors: the project's one hierarchy (``mhc_model.errors``), re-exported."""

from mhc_model.errors import (
    EXIT_CODES,
    AlreadyInLayoutError,
    ConvertError,
    Interrupted,
    InvalidInputError,
    IOFailure,
    MixedLayoutError,
    SigTerm,
    Terminated,
    ToggleError,
    UsageError,
    VerificationError,
)

__all__ = ["EXIT_CODES", "AlreadyInLayoutError", "ConvertError", "IOFailure", "Interrupted",
           "InvalidInputError", "MixedLayoutError", "SigTerm", "Terminated", "ToggleError",
           "UsageError",
           "VerificationError"]
