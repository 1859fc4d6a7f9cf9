"""Pure-torch AdamW over a segment list (contract.py): the test oracle and the fallback backend.

The operation order is exactly torch.optim.AdamW's single-tensor path (decoupled decay, lerp for the
first moment, addcmul for the second, sqrt(v)/sqrt(bc2) + eps), so FusedLISA on this backend reproduces
torch's AdamW to the last bit on CPU. Every native backend is checked against this function.

Lean formats (contract.py: moments "bf16"/"8bit"/"4bit", master_weights "kahan"/"stochastic", and the
grad_sumsq output) load the stored state into fp32 temporaries, run the same update ops, and store
through quant.py's quantizer and stochastic rounding: the definition the native kernels reproduce.
"""
from __future__ import annotations

import torch

from . import quant
from .contract import COL_BC2_SQRT, COL_DECAY, COL_ENABLED, COL_PARAM_ID, COL_STEP, COL_STEP_SIZE, Segments


def adamw_segments_reference_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    segments: Segments,
    hparams: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    lowps: list[torch.Tensor] | None = None,
    grad_scale: torch.Tensor | None = None,
    moments: str = "fp32",
    master_weights: str = "fp32",
    exp_avg_scale: torch.Tensor | None = None,
    exp_avg_sq_scale: torch.Tensor | None = None,
    compensation: torch.Tensor | None = None,
    seed: int = 0,
    grad_sumsq: torch.Tensor | None = None,
) -> None:
    """AdamW over every enabled segment, in place: params[s], grads[s] (and lowps[s]) are the segment's
    contiguous tensors, the state sits at segments.bounds[s] of the packed buffers. Buffers, shapes and
    dtypes per mode: contract.py (validated by kernels.adamw_segments_ before this runs); the fp32
    default takes the fast path below."""
    if moments != "fp32" or master_weights != "fp32" or grad_sumsq is not None:
        _lean(params, grads, exp_avg, exp_avg_sq, segments, hparams, beta1=beta1, beta2=beta2, eps=eps,
              lowps=lowps, grad_scale=grad_scale, moments=moments, master_weights=master_weights,
              exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale, compensation=compensation,
              seed=seed, grad_sumsq=grad_sumsq)
        return
    for s, ((off, n), row) in enumerate(zip(segments.bounds, hparams.tolist())):
        if not row[COL_ENABLED] or n == 0:
            continue
        p = params[s].view(-1)
        g = grads[s].view(-1).float()
        if grad_scale is not None:
            g = g / grad_scale
        _update(p, g, exp_avg[off:off + n], exp_avg_sq[off:off + n], row, beta1, beta2, eps)
        if lowps is not None:
            lowps[s].view(-1).copy_(p)  # round to nearest even, as every backend must


def adamw_packed_reference_(param, grad, exp_avg, exp_avg_sq, segments: Segments, hparams, *, param_lowp=None,
                            **kw) -> None:
    """The packed form (contract.py): one flat param / grad (/ param_lowp) buffer, segment s at its offset."""
    def cut(buf):
        return None if buf is None else [buf[off:off + n] for off, n in segments.bounds]

    adamw_segments_reference_(cut(param), cut(grad), exp_avg, exp_avg_sq, segments, hparams, lowps=cut(param_lowp),
                              **kw)


def _update(p, g, m, v, row, beta1, beta2, eps):
    """The fp32 AdamW ops of the fast path above, on one segment's (fp32) tensors, in place."""
    p.mul_(row[COL_DECAY])
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / row[COL_BC2_SQRT]).add_(eps)
    p.addcdiv_(m, denom, value=-row[COL_STEP_SIZE])


def _load_moment(buf, scale, fmt, which, off, n):
    if fmt == "fp32":
        return buf[off:off + n]  # updated in place
    if fmt == "bf16":
        return buf[off:off + n].float()
    blk = quant.BLOCK[fmt]
    codes = buf[off // 2:(off + n + 1) // 2] if fmt == "4bit" else buf[off:off + n]
    return quant.dequantize(codes, scale[off // blk:(off + n - 1) // blk + 1], fmt, which, n)


def _store_moment(x, buf, scale, fmt, which, off, n, sr):
    if fmt == "fp32":
        return
    if fmt == "bf16":
        buf[off:off + n] = quant.round_bf16_stochastic(x, sr())
        return
    blk = quant.BLOCK[fmt]
    nb = -(-n // blk)
    padded = torch.zeros(nb * blk, dtype=torch.float32, device=x.device)
    padded[:n] = x  # zero padding leaves each block's absmax as it is
    codes, s = quant.quantize(padded, fmt, which)
    if fmt == "4bit":
        codes = quant.pack(quant.unpack(codes, fmt)[:n], fmt)  # an odd tail's high nibble is written as 0
        buf[off // 2:off // 2 + codes.numel()] = codes
    else:
        buf[off:off + n] = codes[:n]
    scale[off // blk:off // blk + nb] = s


def _lean(params, grads, exp_avg, exp_avg_sq, segments, hparams, *, beta1, beta2, eps, lowps, grad_scale,
          moments, master_weights, exp_avg_scale, exp_avg_sq_scale, compensation, seed, grad_sumsq):
    """Every lean mode, one segment at a time (the oracle; speed is the native kernels' job)."""
    for s, ((off, n), row) in enumerate(zip(segments.bounds, hparams.tolist())):
        if not row[COL_ENABLED] or n == 0:
            continue
        sl = slice(off, off + n)
        param = params[s].view(-1)
        g = grads[s].view(-1).float()
        if grad_scale is not None:
            g = g / grad_scale
        if grad_sumsq is not None:
            grad_sumsq[s] += (g * g).sum()
        pid, step = (int(row[COL_PARAM_ID]), int(row[COL_STEP])) if len(row) > COL_STEP else (0, 0)
        idx = torch.arange(n, device=param.device, dtype=torch.int64)

        def sr(lane, pid=pid, step=step, idx=idx):
            return lambda: quant.sr_bits(seed, pid, step, idx, lane)

        if master_weights == "fp32":
            p = param
        elif master_weights == "kahan":
            p = param.float() + compensation[sl].float()
        else:
            p = param.float()
        m = _load_moment(exp_avg, exp_avg_scale, moments, "exp_avg", off, n)
        v = _load_moment(exp_avg_sq, exp_avg_sq_scale, moments, "exp_avg_sq", off, n)
        _update(p, g, m, v, row, beta1, beta2, eps)
        _store_moment(m, exp_avg, exp_avg_scale, moments, "exp_avg", off, n, sr(quant.LANE_EXP_AVG))
        _store_moment(v, exp_avg_sq, exp_avg_sq_scale, moments, "exp_avg_sq", off, n, sr(quant.LANE_EXP_AVG_SQ))
        if master_weights == "fp32":
            if lowps is not None:
                lowps[s].view(-1).copy_(p)
        elif master_weights == "kahan":
            hi = p.to(param.dtype)  # round to nearest even
            param.copy_(hi)
            compensation[sl] = (p - hi.float()).to(param.dtype)
        else:
            param.copy_(quant.round_bf16_stochastic(p, sr(quant.LANE_PARAM)()))
