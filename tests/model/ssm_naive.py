"""Float64 per-timestep references for the SSM tests, written independently of the package:
the Mamba2 SSD recurrence and the Gated DeltaNet delta rule, straight from the papers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_ssd(x, dt_raw, A, B, C, D, dt_bias, h0=None):
    """s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T ; y_t = s_t C_t + D x_t, one step at a time.
    x [b,s,h,p], dt_raw [b,s,h], A/D/dt_bias [h], B/C [b,s,g,n]; head i uses group i // (h/g)."""
    x, dt_raw, A, B, C, D, dt_bias = (t.double() for t in (x, dt_raw, A, B, C, D, dt_bias))
    b, s, h, p = x.shape
    g, n = B.shape[-2:]
    group_of_head = torch.arange(h) // (h // g)
    state = torch.zeros(b, h, p, n, dtype=torch.float64) if h0 is None else h0.double().clone()
    ys = []
    for t in range(s):
        dt = F.softplus(dt_raw[:, t] + dt_bias)  # [b, h]
        Bt, Ct = B[:, t, group_of_head], C[:, t, group_of_head]  # [b, h, n]
        state = torch.exp(dt * A)[..., None, None] * state + (
            dt[..., None, None] * x[:, t, :, :, None] * Bt[:, :, None, :]
        )
        ys.append((state * Ct[:, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1), state


def naive_gated_delta(q, k, v, g, beta, scale, S0=None):
    """Paper form, S: [dv, dk]:  S_t = S_{t-1} e^{g_t} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,
    o_t = S_t (scale q_t).  q/k [b,s,h,dk], v [b,s,h,dv], g/beta [b,s,h]."""
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    eye = torch.eye(dk, dtype=torch.float64)
    S = torch.zeros(b, h, dv, dk, dtype=torch.float64) if S0 is None else S0.double().clone()
    outs = []
    for t in range(s):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        transition = eye - bt * kt[..., :, None] * kt[..., None, :]  # [b, h, dk, dk]
        S = torch.exp(g[:, t])[..., None, None] * S @ transition + bt * (
            v[:, t, :, :, None] * kt[:, :, None, :]
        )
        outs.append((S @ (scale * q[:, t])[..., None]).squeeze(-1))
    return torch.stack(outs, dim=1), S


def assert_close64(actual, expected, tol=1e-4):
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol, f"max abs error {err:.3e} > {tol:.0e}"
