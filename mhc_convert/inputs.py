"""Checks of what a user hands the converter, made before any work (no torch, no reads): paths
(remote URLs are refused by name, never mangled into ``s3:/...``), stream counts, regexes and
the compute device. Each failure is a ``UsageError`` (exit 2) whose one line says what to do.
The CLI and the Python API (``engine``, ``parity``) call the same functions."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mhc_convert.errors import UsageError

# scheme -> how to get such a checkpoint onto local disk
_REMOTE = {
    "hf": "download it first (`hf download REPO --local-dir DIR`)",
    "s3": "copy it locally first (`aws s3 cp --recursive URL DIR`)",
    "gs": "copy it locally first (`gcloud storage cp -r URL DIR`)",
    "gcs": "copy it locally first (`gcloud storage cp -r URL DIR`)",
    "az": "copy it locally first (`azcopy copy --recursive URL DIR`)",
    "abfs": "copy it locally first (`azcopy copy --recursive URL DIR`)",
    "abfss": "copy it locally first (`azcopy copy --recursive URL DIR`)",
    "hdfs": "copy it locally first (`hdfs dfs -get URL DIR`)",
    "http": "download it first (for a Hub repo: `hf download REPO --local-dir DIR`)",
    "https": "download it first (for a Hub repo: `hf download REPO --local-dir DIR`)",
}
# "s3://b/k" as typed, or as pathlib has already collapsed it ("s3:/b/k")
_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):/+(?P<rest>.*)$")
MIN_STREAMS = 2


def local_path(value: str | os.PathLike[str], *, role: str) -> Path:
    """``value`` as a local ``Path``; a remote URL (``s3://``, ``gs://``, ``hf://``,
    ``https://`` ...) is refused with the command that fetches it. ``role`` names the argument
    in the message ("source", "destination")."""
    text = os.fspath(value)
    m = _URL_RE.match(text)
    if m and m["scheme"].lower() in _REMOTE and not os.path.lexists(text):
        url = f"{m['scheme']}://{m['rest']}"
        todo = (f"{_REMOTE[m['scheme'].lower()]} and pass DIR" if role != "destination" else
                "write to a local directory and upload it afterwards")
        raise UsageError(f"{role} is a remote location ({m['scheme']}://); mhc-convert works on "
                         f"local directories: {todo}", path=url)
    return Path(text)


def existing(value: str | os.PathLike[str], *, role: str = "source") -> Path:
    """A local path that exists: the same code (2) and words for every command and the API."""
    path = local_path(value, role=role)
    if not os.path.lexists(path):
        raise UsageError("no such file or directory", path=path)
    return path


def existing_dir(value: str | os.PathLike[str], *, role: str) -> Path:
    path = existing(value, role=role)
    if not path.is_dir():
        raise UsageError("not a directory", path=path)
    return path


def check_streams(streams: int) -> None:
    if streams < MIN_STREAMS:
        raise UsageError(f"--streams must be at least {MIN_STREAMS} (mHC mixes n >= 2 residual "
                         f"streams), got {streams}")


def check_regex(pattern: str | None, *, option: str = "--passthrough") -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{option} {pattern!r} is not a valid regular expression: {e}") from None


def check_device(device: str) -> None:
    """``cpu`` always works; ``cuda`` (or ``cuda:N``) needs a CUDA build of torch and a visible
    GPU. Imports torch, so only the commands that compute call it."""
    if device == "cpu":
        return
    if not re.fullmatch(r"cuda(:[0-9]+)?", device):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise UsageError(f"--device {device}: CUDA is not available ({why}); use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
