"""The one exception hierarchy of the project; the ``mhc-convert`` CLI maps it to exit codes
(DESIGN.md §6). It lives in ``mhc_model`` because the toggle core (``mhc_model.toggle``: the
planner, the disable verdict, the load shim) raises it; ``mhc_convert.errors`` re-exports it.

Every error carries the file (and key, where one applies) so the one-line message a user sees
names exactly what is wrong. Nothing else in the package decides exit codes.
"""

from __future__ import annotations

from pathlib import Path


class ConvertError(Exception):
    """Base class. ``exit_code`` is what the CLI returns for this error."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.key = key
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.key is not None:
            where.append(f"key '{self.key}'")
        prefix = ": ".join(where)
        msg = " ".join(self.message.split())  # always one line
        return f"{prefix}: {msg}" if prefix else msg


class UsageError(ConvertError):
    """Bad arguments or path aliasing (DST inside SRC, DST == SRC, symlink to SRC)."""

    exit_code = 2


class InvalidInputError(ConvertError):
    """The source checkpoint is malformed, hostile, or contradicts its config."""

    exit_code = 3


class AlreadyInLayoutError(ConvertError):
    """The source is already in the requested layout (enable on mHC-on, disable on mHC-off)."""

    exit_code = 4


class IOFailure(ConvertError):
    """ENOSPC, EACCES, a held lock, or another operating-system failure."""

    exit_code = 5


class VerificationError(ConvertError):
    """Parity or manifest verification failed, or a lossy disable was refused."""

    exit_code = 6


class ToggleError(VerificationError, RuntimeError):
    """Loading mHC parameters into an mHC-off model would change what the model computes."""


class MixedLayoutError(InvalidInputError, ToggleError):
    """Some layers are wrapped (inner_layer/hyper_connection) and some are not: no checkpoint
    of either layout looks like this. Invalid input for the converter, a ToggleError for
    ``load_state_dict``."""


class Interrupted(ConvertError):
    """SIGINT (Ctrl-C) during conversion; temp output has been removed. 130 = 128 + SIGINT,
    what a shell reports for a process that SIGINT killed."""

    exit_code = 130


class Terminated(Interrupted):
    """SIGTERM during conversion; temp output has been removed. 143 = 128 + SIGTERM."""

    exit_code = 143


class SigTerm(KeyboardInterrupt):
    """What the SIGTERM handler raises while an output is being written, so the same cleanup
    runs as for Ctrl-C; surfaces as ``Terminated``."""


EXIT_CODES = {
    "ok": 0,
    "usage": UsageError.exit_code,
    "invalid_input": InvalidInputError.exit_code,
    "already_in_layout": AlreadyInLayoutError.exit_code,
    "io": IOFailure.exit_code,
    "verification": VerificationError.exit_code,
    "interrupted": Interrupted.exit_code,
    "terminated": Terminated.exit_code,
}
