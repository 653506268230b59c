"""The installed version, from the distribution's metadata (``pyproject.toml`` is the one place
it is written). The distribution is ``mhc-hybrid`` (``mhc`` on PyPI is an unrelated project);
the import packages are ``mhc_model`` and ``mhc_convert``."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "mhc-hybrid"

try:
    __version__ = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
