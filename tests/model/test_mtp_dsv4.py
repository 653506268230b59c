"""Exact enable through MTP on a DeepSeek-V4-like pattern (``C-W-/C-``: compressed and window
attention in the main stack, C in the one MTP depth; the pattern of Megatron dev's own
``dsv4_mtp_*`` fixtures), fp32 on CPU: main logits and MTP logits against the 1e-5 target.

The eps condition (why MTP logits are exact only up to RMSNorm's eps, ``test_mtp.py``): mHC-off
Megatron feeds depth 0 ``final_norm(x)``, mHC-on the streams ``x`` before it (dev
``hybrid_block.py`` ~1029-1053); with a uniform final-norm weight ``hnorm(final_norm(x))`` and
``hnorm(x)`` differ only through the eps in ``rms = sqrt(mean(x^2) + eps)``, by a relative
~ eps / (2 mean(x^2)) on the h half of the depth's input. So the MTP target holds when
eps / (2 mean(x^2)) (worst token) is far below the target relative to the logits: asserted
< 1e-8 at eps 1e-12 (measured 2.2e-9; MTP 1.2e-7, main 1.0e-7). At Megatron's default eps
1e-5 this tiny model (init std 0.02, worst-token mean(x^2) 2.3e-4: ratio 2.2e-2) misses:
MTP logits off 4.3e-3 (main still 1.2e-7), asserted as a miss, not hidden by a looser
tolerance. A trained model's residual scale (mean(x^2) >> 1) makes the ratio negligible.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mhc_model import HybridModel
from tests.model.helpers import tiny_config

PATTERN = "C-W-/C-"


def _models(norm_eps: float) -> tuple[HybridModel, HybridModel]:
    off_cfg = dataclasses.replace(tiny_config(PATTERN), norm_eps=norm_eps, init_std=0.02)
    torch.manual_seed(0)
    off = HybridModel(off_cfg).eval()
    on = HybridModel(off_cfg.with_mhc(enable_hyper_connections=True,
                                      mhc_output_contract="learned",
                                      mhc_convention="megatron_dev")).eval()
    on.load_state_dict(off.state_dict(), strict=True)  # the in-process exact enable
    return off, on


def _final_norm_input_ms(model: HybridModel, ids: torch.Tensor) -> float:
    seen = []
    hook = model.decoder.final_norm.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].pow(2).mean(-1).min().item()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return min(seen)


@pytest.mark.parametrize("norm_eps", [1e-12, 1e-5])
def test_exact_enable_dsv4_mtp_logits(norm_eps):
    off, on = _models(norm_eps)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        (a, am), (b, bm) = off.forward_mtp(ids), on.forward_mtp(ids)
    assert len(am) == len(bm) == 1
    main = (a - b).abs().max().item()
    mtp = (am[0] - bm[0]).abs().max().item()
    ratio = norm_eps / (2 * _final_norm_input_ms(off, ids))  # worst token
    print(f"{PATTERN} eps {norm_eps}: main {main:.3g}, MTP {mtp:.3g}, eps/(2 ms) {ratio:.3g}")
    assert main <= 1e-5
    if norm_eps < 1e-9:
        assert ratio < 1e-8 and mtp <= 1e-5
    else:  # Megatron's default eps on a tiny random model: the documented miss
        assert ratio > 1e-4 and mtp > 1e-5
