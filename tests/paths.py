"""Paths to the fixtures the tests use (all inside the repository, so CI needs nothing else)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A real checkpoint written by megatron-core 0.19.2 (copied from shared/fixtures-external;
# fixtures/external/SHA256SUMS pins it).
MEGATRON_FIXTURE = ROOT / "fixtures" / "external" / "megatron-core-0.19.2" / "hybrid_tp1"
NEMOTRON_H_TINY = ROOT / "fixtures" / "nemotron_h_tiny"
# One mHC site by DeepSeek TileKernels' torch references (fixtures/tilekernels/make.py).
TILEKERNELS_SITE = ROOT / "fixtures" / "external" / "tilekernels-36d9e45d" / "site_n4.safetensors"
