"""mHC hybrid model: Megatron-Core HybridModel keys, exact reference math, fused GPU kernels."""

from mhc_model.config import HybridConfig
from mhc_model.init import exact_enable_
from mhc_model.model import HybridModel

__all__ = ["HybridConfig", "HybridModel", "exact_enable_"]
__version__ = "0.1.0"
