"""mHC hybrid model: Megatron-Core HybridModel keys, exact reference math, fused GPU kernels.

The public names are imported on first use, so ``import mhc_model`` (and the ``mhc-convert``
CLI's start-up) does not pay for torch until a model or config is touched."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mhc_model.config import HybridConfig
    from mhc_model.init import exact_enable_
    from mhc_model.model import HybridModel
    from mhc_model.version import __version__

__all__ = ["HybridConfig", "HybridModel", "__version__", "exact_enable_"]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # package metadata, read on first use
        from mhc_model.version import __version__

        return __version__
    if name == "HybridConfig":
        from mhc_model.config import HybridConfig

        return HybridConfig
    if name == "HybridModel":
        from mhc_model.model import HybridModel

        return HybridModel
    if name == "exact_enable_":
        from mhc_model.init import exact_enable_

        return exact_enable_
    raise AttributeError(f"module 'mhc_model' has no attribute {name!r}")
