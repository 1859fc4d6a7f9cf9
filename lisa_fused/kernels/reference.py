"""Pure-torch AdamW over a packed buffer: the test oracle and the fallback backend.

The operation order is exactly torch.optim.AdamW's single-tensor path (decoupled decay, lerp for the
first moment, addcmul for the second, sqrt(v)/sqrt(bc2) + eps), so FusedLISA on this backend reproduces
torch's AdamW to the last bit on CPU. Every native backend is checked against this function.
"""
from __future__ import annotations

import torch

from .contract import COL_BC2_SQRT, COL_DECAY, COL_ENABLED, COL_STEP_SIZE, Segments


def adamw_packed_reference_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    segments: Segments,
    hparams: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    param_lowp: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
) -> None:
    rows = hparams.tolist()
    ps, gs, ms, vs, lows = [], [], [], [], []
    step_sizes, decays, bc2s = [], [], []
    for (off, n), row in zip(segments.bounds, rows):
        if not row[COL_ENABLED]:
            continue
        sl = slice(off, off + n)
        ps.append(param[sl])
        g = grad[sl].float()
        if grad_scale is not None:
            g = g / grad_scale
        gs.append(g)
        ms.append(exp_avg[sl])
        vs.append(exp_avg_sq[sl])
        if param_lowp is not None:
            lows.append(param_lowp[sl])
        step_sizes.append(row[COL_STEP_SIZE])
        decays.append(row[COL_DECAY])
        bc2s.append(row[COL_BC2_SQRT])
    for p, g, m, v, step_size, decay, bc2_sqrt in zip(ps, gs, ms, vs, step_sizes, decays, bc2s):
        p.mul_(decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
    for low, p in zip(lows, ps):
        low.copy_(p)  # round to nearest even, as every backend must
