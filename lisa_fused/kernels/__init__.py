"""One entry point for the AdamW update over segments; the only place that knows which backend runs.

    adamw_segments_(params, grads, exp_avg, exp_avg_sq, segments, hparams,
                    beta1=..., beta2=..., eps=..., lowps=None, grad_scale=None, backend="cpu", ...)

params / grads / lowps are the segments' own tensors (the model's params and grads, or fp32 masters);
the optimizer state is packed, at each segment's offset (contract.py). `adamw_packed_` is the same update
with one flat param / grad buffer (params[s] = param[offset:offset + numel]), as the kernel tests use it.

Backends: "triton" (GPU, or CPU under TRITON_INTERPRET=1), "cuda" (CUDA C++ in lisa_fused._C), "cpu"
(C++ in lisa_fused._C), "torch" (kernels/reference.py, always available). Each implements
`adamw_segments_<backend>_(params, grads, exp_avg, exp_avg_sq, segments, hparams, *, beta1, beta2, eps,
lowps, grad_scale, moments, master_weights, exp_avg_scale, exp_avg_sq_scale, compensation, seed,
grad_sumsq)` on contiguous tensors; this module validates (contract.check_segments) and takes the slow
path for non-contiguous ones first. See contract.py for the math.
"""
from __future__ import annotations

import logging
import os

import torch

from .contract import ALIGN, COL_ENABLED, N_COLS, Segments, host_scalars  # noqa: F401  (re-exported)
from .reference import adamw_segments_reference_

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "cuda", "cpu", "torch")
# "auto" tries these in order for the buffers' device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else a sentence saying why not."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend in ("cpu", "cuda"):
        if backend != device.type:
            return f"backend '{backend}' runs on {backend} tensors, but the parameters are on {device}"
        from . import native

        return native.unavailable_reason(backend, device)
    if backend == "triton":
        from . import triton_adamw

        return triton_adamw.unavailable_reason(device)
    return f"unknown backend '{backend}'; choose one of {('auto',) + BACKENDS}"


_warned_fallbacks: set[tuple[str, str]] = set()


def _warn_fallback_once(device: torch.device, preferred: str, chosen: str, reason: str) -> None:
    """One WARNING per (device, reason): "auto" runs a slower backend than it would prefer."""
    key = (str(device), reason)
    if key in _warned_fallbacks:
        return
    _warned_fallbacks.add(key)
    logger.warning("backend='auto' on %s uses %r, not %r: %s", device, chosen, preferred, reason)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into the best available backend for `device`; raise if `backend` cannot run.

    "auto" prefers, on cuda: cuda, triton, torch; on cpu: cpu, torch. Each preferred backend it passes
    over is logged once per (device, reason) as a WARNING on the "lisa_fused.kernels" logger (e.g. the
    static CUDA 13 runtime of lisa_fused._C needs an NVIDIA driver >= 580). Raises ValueError for an
    unknown name, RuntimeError (with the reason) for an explicit backend that cannot run on `device`.
    """
    device = torch.device(device)
    if backend == "auto":
        skipped = []
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            reason = backend_unavailable_reason(name, device)
            if reason is None:
                break
            skipped.append((name, reason))
        else:
            name = "torch"
        for preferred, reason in skipped:
            _warn_fallback_once(device, preferred, name, reason)
        return name
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; choose one of {('auto',) + BACKENDS}")
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return backend


def check_buffers(param, grad, exp_avg, exp_avg_sq, segments, hparams, param_lowp=None, grad_scale=None):
    """Validate every tensor before a kernel sees a raw pointer; name the one that is wrong."""
    dev = param.device
    n = param.numel()
    named = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if param_lowp is not None:
        named["param_lowp"] = param_lowp
    for name, t in named.items():
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, expected {dev} (the device of param)")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} elements, expected {n} (param's numel)")
    for name in ("param", "exp_avg", "exp_avg_sq"):
        if named[name].dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {named[name].dtype}")
    if grad.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"grad must be float32, bfloat16 or float16, got {grad.dtype}")
    if param_lowp is not None and param_lowp.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"param_lowp must be bfloat16 or float16, got {param_lowp.dtype}")
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.device != dev or grad_scale.dtype != torch.float32):
        raise ValueError(
            f"grad_scale must be a 1-element float32 tensor on {dev}, "
            f"got {grad_scale.dtype} {tuple(grad_scale.shape)} on {grad_scale.device}"
        )
    if hparams.device.type != "cpu" or hparams.dtype != torch.float64 or tuple(hparams.shape) != (len(segments), N_COLS):
        raise ValueError(
            f"hparams must be a float64 CPU tensor of shape ({len(segments)}, {N_COLS}), "
            f"got {hparams.dtype} {tuple(hparams.shape)} on {hparams.device}"
        )
    for off, cnt in segments.bounds:
        if off + cnt > n:
            raise ValueError(f"segment (offset={off}, numel={cnt}) runs past the buffer end ({n})")


def _impl(backend: str, lean: bool):
    if backend == "torch":
        return adamw_segments_reference_
    if backend == "cpu":
        from .native import adamw_segments_cpu_

        return adamw_segments_cpu_
    if backend == "cuda":
        from .native import adamw_segments_cuda_

        return adamw_segments_cuda_
    if backend == "triton":
        if lean:  # lean state has its own Triton kernel; the fp32 one stays as it is
            from .triton_lean import adamw_segments_lean_triton_

            return adamw_segments_lean_triton_
        from .triton_adamw import adamw_segments_triton_

        return adamw_segments_triton_
    raise ValueError(f"Invalid backend: {backend!r}; choose one of {BACKENDS}")


def _contiguous(tensors):
    """(tensors with every non-contiguous entry replaced by a contiguous copy, [(index, original)])."""
    if tensors is None:
        return None, []
    out, copied = list(tensors), []
    for s, t in enumerate(out):
        if t is not None and not t.is_contiguous():
            copied.append((s, t))
            out[s] = t.contiguous()
    return out, copied


def adamw_segments_(
    params, grads, exp_avg, exp_avg_sq, segments: Segments, hparams, *,
    beta1: float, beta2: float, eps: float, lowps=None, grad_scale=None, backend: str = "torch",
    check: bool = True, moments: str = "fp32", master_weights: str = "fp32", exp_avg_scale=None,
    exp_avg_sq_scale=None, compensation=None, seed: int = 0, grad_sumsq=None,
) -> None:
    """AdamW over every enabled segment, in place, with `backend` (contract.py).

    params, grads, lowps: one tensor per segment (grads[s] None where the segment is disabled), on the
    packed state's device; updated where they live. exp_avg ... compensation: the packed state; hparams:
    the float64 [S, 4 or 6] host table. A non-contiguous param, grad or lowp is updated through a
    contiguous copy (written back after the launch). ValueError (check=True) naming the bad segment or
    buffer before any kernel runs."""
    if check:
        from .contract import check_segments

        check_segments(params, grads, lowps, exp_avg, exp_avg_sq, segments, hparams, moments=moments,
                       master_weights=master_weights, exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale,
                       compensation=compensation, seed=seed, grad_sumsq=grad_sumsq, grad_scale=grad_scale)
    if len(segments) == 0:
        return
    lean = moments != "fp32" or master_weights != "fp32" or grad_sumsq is not None
    if lean and hparams.shape[1] < 6 and (moments == "bf16" or master_weights == "stochastic"):
        # checked even with check=False: without the ids the SR bits would silently repeat every step
        raise ValueError(f"stochastic rounding (moments={moments!r}, master_weights={master_weights!r}) needs "
                         f"the 6-column hparams table (contract.COL_PARAM_ID, COL_STEP), got {tuple(hparams.shape)}")
    params, written_p = _contiguous(params)
    lowps, written_l = _contiguous(lowps)
    grads, _ = _contiguous(grads)
    extra = dict(moments=moments, master_weights=master_weights, exp_avg_scale=exp_avg_scale,
                 exp_avg_sq_scale=exp_avg_sq_scale, compensation=compensation, seed=seed, grad_sumsq=grad_sumsq)
    if not lean:
        hparams = hparams[:, :N_COLS].contiguous()  # the fp32 kernels read [S, N_COLS] tables
    _impl(backend, lean)(params, grads, exp_avg, exp_avg_sq, segments, hparams, beta1=beta1, beta2=beta2, eps=eps,
                         lowps=lowps, grad_scale=grad_scale, **extra)
    for s, orig in written_p:
        orig.copy_(params[s])
    for s, orig in written_l:
        orig.copy_(lowps[s])


def adamw_packed_(
    param, grad, exp_avg, exp_avg_sq, segments: Segments, hparams, *,
    beta1: float, beta2: float, eps: float, param_lowp=None, grad_scale=None, backend: str = "torch",
    check: bool = True, moments: str = "fp32", master_weights: str = "fp32", exp_avg_scale=None,
    exp_avg_sq_scale=None, compensation=None, seed: int = 0, grad_sumsq=None,
) -> None:
    """AdamW over every enabled segment of packed buffers, in place, with `backend`: the special case of
    adamw_segments_ where segment s's param, grad and param_lowp are [offset, offset + numel) of the flat
    `param`, `grad` and `param_lowp` (contract.py). Validated as packed buffers (check_buffers /
    contract.check_lean) when `check`."""
    lean = moments != "fp32" or master_weights != "fp32" or grad_sumsq is not None
    if check and lean:
        from .contract import check_lean

        check_lean(param, exp_avg, exp_avg_sq, segments, hparams, moments=moments, master_weights=master_weights,
                   exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale, compensation=compensation,
                   param_lowp=param_lowp, seed=seed, grad_sumsq=grad_sumsq, grad=grad, grad_scale=grad_scale)
    elif check:
        check_buffers(param, grad, exp_avg, exp_avg_sq, segments, hparams[:, :N_COLS], param_lowp, grad_scale)

    def cut(buf):
        return None if buf is None else [buf[off:off + n] for off, n in segments.bounds]

    adamw_segments_(cut(param), cut(grad), exp_avg, exp_avg_sq, segments, hparams, beta1=beta1, beta2=beta2,
                    eps=eps, lowps=cut(param_lowp), grad_scale=grad_scale, backend=backend, check=False,
                    moments=moments, master_weights=master_weights, exp_avg_scale=exp_avg_scale,
                    exp_avg_sq_scale=exp_avg_sq_scale, compensation=compensation, seed=seed, grad_sumsq=grad_sumsq)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
