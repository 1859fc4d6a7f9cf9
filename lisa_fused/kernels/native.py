"""Backends "cpu" and "cuda": the C++ / CUDA kernels of lisa_fused._C (csrc/).

The extension takes raw pointers, so it is wrapped here as one torch custom op,
`torch.ops.lisa_fused.adamw_packed`, with a kernel per device type and a fake implementation: under
torch.compile the step goes through the op (which dynamo and AOTAutograd understand); in eager mode the
same kernel functions are called directly, skipping the dispatcher's ~70 us per call and its one-time
import of torch._dynamo. Tensors are validated by kernels.check_buffers before they get here; this
module only adds what the pointers need (chunk tables, dtype codes, the stream).
"""
from __future__ import annotations

import functools

import torch

from . import quant
from .contract import Segments, host_scalars
from ._tables import chunk_table, dtype_code, segment_table

try:
    from .. import _C
except ImportError as exc:  # not built: every use names the fix
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Elements per chunk (one OpenMP task on the CPU, one thread block on the GPU). Multiples of ALIGN.
CPU_CHUNK = 1 << 15
CUDA_CHUNK = 1 << 16

BUILD_HINT = (
    "build it with `pip install .` (`pip install -e .` when lisa_fused is imported from a source checkout); "
    "a CUDA toolkit at build time (CUDA_HOME, default /usr/local/cuda) adds the CUDA kernel"
)


def unavailable_reason(backend: str) -> str | None:
    """None when the native `backend` ("cpu" or "cuda") can run here, else a sentence saying why not."""
    if backend not in ("cpu", "cuda"):
        return f"unknown native backend {backend!r}; expected 'cpu' or 'cuda'"
    if _C is None:
        return f"the native extension lisa_fused._C is not built ({_IMPORT_ERROR}); {BUILD_HINT}"
    if backend == "cpu":
        return None
    if not _C.has_cuda():
        return (
            "lisa_fused._C was built without CUDA (no CUDA toolkit at build time, or LISA_FUSED_SKIP_CUDA=1); "
            "rebuild it with a CUDA toolkit to use backend 'cuda'"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    return _cuda_runtime_reason()


@functools.cache
def _cuda_runtime_reason() -> str | None:
    """What the extension's own (static) CUDA runtime says, asked once: e.g. a driver too old for it."""
    return _C.cuda_unavailable_reason()


def _require(backend: str):
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return _C


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _pointer_args(param, grad, exp_avg, exp_avg_sq, param_lowp, grad_scale, chunks, table, beta1, beta2, eps):
    one_minus_beta1, beta2_, one_minus_beta2, eps_ = host_scalars(beta1, beta2, eps)
    return dict(
        param=_ptr(param), grad=_ptr(grad), exp_avg=_ptr(exp_avg), exp_avg_sq=_ptr(exp_avg_sq),
        param_lowp=_ptr(param_lowp), grad_scale=_ptr(grad_scale), chunks=_ptr(chunks),
        n_chunks=chunks.shape[0], table=_ptr(table), grad_dtype=dtype_code(grad.dtype),
        lowp_dtype=dtype_code(None if param_lowp is None else param_lowp.dtype),
        one_minus_beta1=one_minus_beta1, beta2=beta2_, one_minus_beta2=one_minus_beta2, eps=eps_,
    )


def _lean_args(param, hparams, segments_bounds, moments, master_weights, exp_avg_scale, exp_avg_sq_scale,
               compensation, seed, grad_sumsq):
    """The `lean` dict of csrc/adamw.h PackedArgs fields (empty for the fp32 defaults)."""
    lean = {"n_cols": hparams.shape[1]}
    if moments == "fp32" and master_weights == "fp32" and grad_sumsq is None:
        return lean
    lean.update(
        moments=quant.FORMAT_CODE[moments], master=quant.MASTER_CODE[master_weights],
        param_dtype=dtype_code(param.dtype), exp_avg_scale=_ptr(exp_avg_scale),
        exp_avg_sq_scale=_ptr(exp_avg_sq_scale), compensation=_ptr(compensation),
        qtable=_ptr(quant.kernel_table(moments, param.device) if moments in quant.BLOCK else None),
        bounds=_ptr(segments_bounds), grad_sumsq=_ptr(grad_sumsq), seed=int(seed),
    )
    return lean


def _cpu_kernel(param, grad, exp_avg, exp_avg_sq, param_lowp, grad_scale, chunks, hparams, beta1, beta2, eps,
                moments="fp32", master_weights="fp32", exp_avg_scale=None, exp_avg_sq_scale=None,
                compensation=None, grad_sumsq=None, bounds=None, seed=0):
    C = _require("cpu")
    table = hparams.contiguous()  # float64, read as is by the CPU kernel
    C.adamw_cpu(
        **_pointer_args(param, grad, exp_avg, exp_avg_sq, param_lowp, grad_scale, chunks, table, beta1, beta2, eps),
        num_threads=torch.get_num_threads(),
        lean=_lean_args(param, table, bounds, moments, master_weights, exp_avg_scale, exp_avg_sq_scale,
                        compensation, seed, grad_sumsq),
    )


def _cuda_kernel(param, grad, exp_avg, exp_avg_sq, param_lowp, grad_scale, chunks, hparams, beta1, beta2, eps,
                 moments="fp32", master_weights="fp32", exp_avg_scale=None, exp_avg_sq_scale=None,
                 compensation=None, grad_sumsq=None, bounds=None, seed=0):
    C = _require("cuda")
    table = segment_table(hparams, param.device)
    device = param.device.index
    C.adamw_cuda(
        **_pointer_args(param, grad, exp_avg, exp_avg_sq, param_lowp, grad_scale, chunks, table, beta1, beta2, eps),
        device=device,
        stream=torch.cuda.current_stream(device).cuda_stream,
        lean=_lean_args(param, hparams, bounds, moments, master_weights, exp_avg_scale, exp_avg_sq_scale,
                        compensation, seed, grad_sumsq),
    )


_KERNELS = {"cpu": _cpu_kernel, "cuda": _cuda_kernel}


@torch.library.custom_op(
    "lisa_fused::adamw_packed",
    mutates_args=("param", "exp_avg", "exp_avg_sq", "param_lowp", "exp_avg_scale", "exp_avg_sq_scale",
                  "compensation", "grad_sumsq"),
    device_types=(),
)
def adamw_packed_op(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    param_lowp: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    chunks: torch.Tensor,
    hparams: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    moments: str = "fp32",
    master_weights: str = "fp32",
    exp_avg_scale: torch.Tensor | None = None,
    exp_avg_sq_scale: torch.Tensor | None = None,
    compensation: torch.Tensor | None = None,
    grad_sumsq: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
    seed: int = 0,
) -> None:
    """AdamW over the packed buffers. `chunks`: int64 [C, 3] on the buffers' device (_tables.chunk_table);
    `hparams`: the float64 [S, 4 or 6] host table of contract.py; lean arguments as contract.py, with
    `bounds` the int64 [S, 2] (offset, numel) table on the buffers' device (lean modes only)."""
    raise NotImplementedError(f"lisa_fused::adamw_packed has no kernel for {param.device.type} tensors")


adamw_packed_op.register_kernel("cpu")(_cpu_kernel)
adamw_packed_op.register_kernel("cuda")(_cuda_kernel)


@adamw_packed_op.register_fake
def _adamw_packed_fake(param, grad, exp_avg, exp_avg_sq, param_lowp, grad_scale, chunks, hparams, beta1, beta2, eps,
                       moments="fp32", master_weights="fp32", exp_avg_scale=None, exp_avg_sq_scale=None,
                       compensation=None, grad_sumsq=None, bounds=None, seed=0):
    return None


def _run(backend, chunk, param, grad, exp_avg, exp_avg_sq, segments, hparams, beta1, beta2, eps, param_lowp, grad_scale,
         **lean):
    _require(backend)
    # The optimizer may skip check_buffers (check=False); these two mistakes would hand the kernel
    # pointers of the wrong kind, so they are checked on every call.
    if param.device.type != backend:
        raise ValueError(f"backend {backend!r} runs on {backend} tensors, but param is on {param.device}")
    if hparams.dtype != torch.float64 or hparams.device.type != "cpu":
        raise ValueError(f"hparams must be a float64 CPU tensor, got {hparams.dtype} on {hparams.device}")
    chunks = chunk_table(segments, chunk, param.device)
    if chunks.shape[0] == 0:
        return
    args = (param, grad, exp_avg, exp_avg_sq, param_lowp, grad_scale, chunks, hparams, float(beta1), float(beta2), float(eps))
    if lean:  # lean state (contract.py): the kernel needs each segment's offset for its SR indices
        key = ("bounds", str(param.device))
        if key not in segments.cache:
            segments.cache[key] = segments.tensor().to(param.device)
        lean["bounds"] = segments.cache[key]
    if torch.compiler.is_compiling():
        adamw_packed_op(*args, **lean)
    else:
        _KERNELS[backend](*args, **lean)


def adamw_packed_cpu_(
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
    **lean,
) -> None:
    """The C++ CPU kernel (OpenMP over chunks); same contract as adamw_packed_reference_ (`lean`: its
    lean-state keywords, validated by contract.check_lean)."""
    _run("cpu", CPU_CHUNK, param, grad, exp_avg, exp_avg_sq, segments, hparams, beta1, beta2, eps, param_lowp, grad_scale,
         **lean)


def adamw_packed_cuda_(
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
    **lean,
) -> None:
    """The CUDA kernel, one launch on the current stream; same contract as adamw_packed_reference_ (`lean`:
    its lean-state keywords, validated by contract.check_lean)."""
    _run("cuda", CUDA_CHUNK, param, grad, exp_avg, exp_avg_sq, segments, hparams, beta1, beta2, eps, param_lowp, grad_scale,
         **lean)


def _gathered(packed_impl, params, grads, exp_avg, exp_avg_sq, segments, hparams, *, lowps=None, **kw):
    """TRANSITIONAL (replaced by the pointer-table kernels on branch kernels-native): run the packed kernel
    on packed copies of the segments' params / grads / lowps, then write the params back."""
    from .contract import state_numel

    n = state_numel(exp_avg, kw.get("moments", "fp32"))
    dev = exp_avg.device
    p0 = next(p for p in params)
    g0 = next((g for g in grads if g is not None), None)
    param = torch.zeros(n, dtype=p0.dtype, device=dev)
    grad = torch.zeros(n, dtype=p0.dtype if g0 is None else g0.dtype, device=dev)
    lowp = None if lowps is None else torch.zeros(n, dtype=lowps[0].dtype, device=dev)
    for s, (off, cnt) in enumerate(segments.bounds):
        param[off:off + cnt] = params[s].reshape(-1)
        if grads[s] is not None:
            grad[off:off + cnt] = grads[s].reshape(-1)
    packed_impl(param, grad, exp_avg, exp_avg_sq, segments, hparams, param_lowp=lowp, **kw)
    for s, (off, cnt) in enumerate(segments.bounds):
        params[s].view(-1).copy_(param[off:off + cnt])
        if lowps is not None:
            lowps[s].view(-1).copy_(lowp[off:off + cnt])


def adamw_segments_cpu_(params, grads, exp_avg, exp_avg_sq, segments, hparams, **kw) -> None:
    """TRANSITIONAL: see _gathered."""
    _gathered(adamw_packed_cpu_, params, grads, exp_avg, exp_avg_sq, segments, hparams, **kw)


def adamw_segments_cuda_(params, grads, exp_avg, exp_avg_sq, segments, hparams, **kw) -> None:
    """TRANSITIONAL: see _gathered."""
    _gathered(adamw_packed_cuda_, params, grads, exp_avg, exp_avg_sq, segments, hparams, **kw)
