"""Backends "cpu" and "cuda": the C++ / CUDA kernels of lisa_fused._C (csrc/), on the segment table.

A launch gets the segments' own tensors (params, grads, optional low-precision copies: the model's
tensors wherever they live) and the packed optimizer state (contract.py). The kernels read the segments'
addresses from the int64 pointer table of _tables.pointer_table (one row per segment: state offset,
numel, param, grad and lowp addresses), cached while the addresses stay, and walk the chunk table
(_tables.chunk_table: (segment, start, end) in state index space).

The extension takes raw pointers, so it is wrapped here as one torch custom op,
`torch.ops.lisa_fused.adamw_segments`, with a kernel per device type and a fake implementation: under
torch.compile the step goes through the op (which dynamo and AOTAutograd understand; the op builds the
pointer table from the tensors it is given, since functionalization may hand it copies); in eager mode
the same launch is made directly, skipping the dispatcher's ~70 us per call and its one-time import of
torch._dynamo. Tensors are validated by kernels.adamw_segments_ (contract.check_segments) before they get
here; this module only adds what the pointers need (tables, dtype codes, the stream), and the C++ side
checks that every enabled chunk lies inside its segment and has its pointers before it writes anything.
"""
from __future__ import annotations

import functools

import torch

from . import quant
from .contract import Segments, host_scalars
from ._tables import chunk_table, dtype_code, pointer_table, segment_table

try:
    from .. import _C
except ImportError as exc:  # not built: every use names the fix
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Elements per chunk (one OpenMP task on the CPU, one thread block on the GPU). Multiples of ALIGN.
CPU_CHUNK = 1 << 15
CUDA_CHUNK = 1 << 16
# CUDA chunks hold fewer elements than this: the lean kernel's offsets within a chunk are 32-bit, and a
# thread's first code bit (offset * bits per code) must fit (csrc/adamw.h kCudaMaxChunk, _C.CUDA_MAX_CHUNK).
CUDA_MAX_CHUNK = 1 << 27

BUILD_HINT = (
    "build it with `pip install .` (`pip install -e .` when lisa_fused is imported from a source checkout); "
    "a CUDA toolkit at build time (CUDA_HOME, default /usr/local/cuda) adds the CUDA kernel"
)


def unavailable_reason(backend: str, device: torch.device | None = None) -> str | None:
    """None when the native `backend` ("cpu" or "cuda") can run here (for "cuda": on `device`, default the
    current CUDA device), else a sentence saying why not."""
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
    reason = _cuda_runtime_reason()
    if reason is not None:
        return reason
    device = torch.device(device) if device is not None else torch.device("cuda")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_arch_reason(index)


@functools.cache
def _cuda_runtime_reason() -> str | None:
    """What the extension's own (static) CUDA runtime says, asked once: e.g. a driver too old for it."""
    return _C.cuda_unavailable_reason()


@functools.cache
def _device_arch_reason(index: int) -> str | None:
    """arch_reason for GPU `index` and this build, asked once per GPU (no context is created: torch reads
    the device's properties)."""
    archs = _C.cuda_archs() if hasattr(_C, "cuda_archs") else None
    if archs is None:
        return "lisa_fused._C does not say which GPU architectures it was built for (an old build); rebuild it"
    return arch_reason(torch.cuda.get_device_capability(index), f"{torch.cuda.get_device_name(index)} (cuda:{index})",
                       archs["sass"], archs["ptx"])


def arch_reason(capability: tuple[int, int], gpu: str, sass: list[int], ptx: int | None) -> str | None:
    """None when a build with machine code (SASS) for `sass` (e.g. [80, 90]) and PTX for `ptx` (e.g. 90, or
    None) has code a GPU of compute `capability` (major, minor) runs, else a sentence naming the GPU
    (`gpu`, e.g. "Tesla T4 (cuda:0)"), what the build holds and the fallback. Rules (CUDA C++
    Programming Guide, "Binary Compatibility" and "PTX Compatibility"): SASS for X.y runs on X.z for z >= y
    (sm_80 on sm_86 and sm_89, not on sm_90); PTX for X.y is compiled by the driver for X.y and every later
    architecture. Without this check a GPU below 8.0 (T4, V100) would fail its first step with
    cudaErrorNoKernelImageForDevice instead of running the Triton kernel."""
    major, minor = capability
    cc = 10 * major + minor
    if any(a // 10 == major and a <= cc for a in sass) or (ptx is not None and cc >= ptx):
        return None
    built = ", ".join([f"sm_{a}" for a in sass] + ([f"compute_{ptx} PTX"] if ptx is not None else []))
    return (f"lisa_fused._C has no code for the GPU {gpu}, compute capability {major}.{minor}: it was built for "
            f"{built or 'no architecture'}; backend='auto' runs the Triton kernel there instead (to run the CUDA "
            f"kernel, rebuild with LISA_FUSED_CUDA_ARCHS naming {major}{minor}, docs/build.md)")


def _require(backend: str, device: torch.device | None = None):
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return _C


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _first_dtype(tensors) -> torch.dtype | None:
    return next((t.dtype for t in tensors if t is not None), None) if tensors is not None else None


def _launch(backend, segs, chunks, hparams, exp_avg, exp_avg_sq, grad_scale, *, grad_dtype, lowp_dtype, param_dtype,
            beta1, beta2, eps, moments, master_weights, exp_avg_scale, exp_avg_sq_scale, compensation, grad_sumsq,
            seed):
    """One kernel launch: `segs` the int64 [S, N_SEG_COLS] pointer table and `chunks` the [C, 3] chunk table,
    both on the state's device; `hparams` the float64 [S, 4 or 6] host table."""
    C = _require(backend, exp_avg.device)
    one_minus_beta1, beta2_, one_minus_beta2, eps_ = host_scalars(beta1, beta2, eps)
    device = exp_avg.device
    lean = {"n_cols": hparams.shape[1]}
    if moments != "fp32" or master_weights != "fp32" or grad_sumsq is not None:
        lean.update(
            moments=quant.FORMAT_CODE[moments], master=quant.MASTER_CODE[master_weights],
            param_dtype=dtype_code(param_dtype), exp_avg_scale=_ptr(exp_avg_scale),
            exp_avg_sq_scale=_ptr(exp_avg_sq_scale), compensation=_ptr(compensation),
            qtable=_ptr(quant.kernel_table(moments, device) if moments in quant.BLOCK else None),
            grad_sumsq=_ptr(grad_sumsq), seed=int(seed),
        )
    # float64 host table for the CPU kernel (read as is); float32 on the device for CUDA (pinned, async)
    table = hparams.contiguous() if backend == "cpu" else segment_table(hparams, device)
    args = dict(
        segs=_ptr(segs), exp_avg=_ptr(exp_avg), exp_avg_sq=_ptr(exp_avg_sq), grad_scale=_ptr(grad_scale),
        chunks=_ptr(chunks), n_chunks=chunks.shape[0], table=_ptr(table), grad_dtype=dtype_code(grad_dtype or torch.float32),
        lowp_dtype=dtype_code(lowp_dtype), one_minus_beta1=one_minus_beta1, beta2=beta2_,
        one_minus_beta2=one_minus_beta2, eps=eps_, lean=lean,
    )
    if backend == "cpu":
        C.adamw_cpu(**args, num_threads=torch.get_num_threads())
    else:
        _call_cuda(C, args, device)


def _call_cuda(C, args: dict, device: torch.device) -> None:
    """The CUDA launch on `device`'s current stream, under torch's device guard: the extension launches on
    the calling thread's current device and never switches devices itself. torch's guard makes `device`
    current and, on exit, makes the previous device current again only if it has a context, so no
    launch creates a context on another GPU (csrc/adamw_cuda.cu adamw_cuda)."""
    with torch.cuda.device(device):
        C.adamw_cuda(**args, device=device.index, stream=torch.cuda.current_stream(device).cuda_stream)


def _op_kernel(params, grads, exp_avg, exp_avg_sq, lowps, grad_scale, chunks, bounds, hparams, beta1, beta2, eps,
               moments="fp32", master_weights="fp32", exp_avg_scale=None, exp_avg_sq_scale=None, compensation=None,
               grad_sumsq=None, seed=0):
    """The op's kernel (cpu and cuda): the pointer table of exactly these tensors, then the launch."""
    backend = exp_avg.device.type
    lows = list(lowps) if len(lowps) else None
    segments = Segments([tuple(r) for r in bounds.tolist()])  # fresh: the tensors may be functionalized copies
    segs = pointer_table(segments, params, grads, lows, exp_avg.device)
    _launch(backend, segs, chunks, hparams, exp_avg, exp_avg_sq, grad_scale, grad_dtype=_first_dtype(grads),
            lowp_dtype=_first_dtype(lows), param_dtype=_first_dtype(params), beta1=beta1, beta2=beta2, eps=eps,
            moments=moments, master_weights=master_weights, exp_avg_scale=exp_avg_scale,
            exp_avg_sq_scale=exp_avg_sq_scale, compensation=compensation, grad_sumsq=grad_sumsq, seed=seed)


@torch.library.custom_op(
    "lisa_fused::adamw_segments",
    mutates_args=("params", "exp_avg", "exp_avg_sq", "lowps", "exp_avg_scale", "exp_avg_sq_scale", "compensation",
                  "grad_sumsq"),
    device_types=(),
)
def adamw_segments_op(
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lowps: list[torch.Tensor],
    grad_scale: torch.Tensor | None,
    chunks: torch.Tensor,
    bounds: torch.Tensor,
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
    seed: int = 0,
) -> None:
    """AdamW over segments (contract.py), in place. params / grads (None: disabled segment) / lowps (empty
    list: none): one contiguous tensor per segment on the state's device; `chunks`: int64 [C, 3] on that
    device (_tables.chunk_table); `bounds`: the int64 [S, 2] (offset, numel) host table (Segments.tensor);
    `hparams`: the float64 [S, 4 or 6] host table; the packed state and lean arguments as contract.py."""
    raise NotImplementedError(f"lisa_fused::adamw_segments has no kernel for {exp_avg.device.type} tensors")


adamw_segments_op.register_kernel("cpu")(_op_kernel)
adamw_segments_op.register_kernel("cuda")(_op_kernel)


@adamw_segments_op.register_fake
def _adamw_segments_fake(params, grads, exp_avg, exp_avg_sq, lowps, grad_scale, chunks, bounds, hparams, beta1, beta2,
                         eps, moments="fp32", master_weights="fp32", exp_avg_scale=None, exp_avg_sq_scale=None,
                         compensation=None, grad_sumsq=None, seed=0):
    return None


def _check_device(backend: str, device: torch.device) -> None:
    if device.type != backend:
        raise ValueError(f"backend {backend!r} runs on {backend} tensors, but the packed state is on {device}")


def _run(backend, chunk, params, grads, exp_avg, exp_avg_sq, segments, hparams, *, beta1, beta2, eps, lowps=None,
         grad_scale=None, moments="fp32", master_weights="fp32", exp_avg_scale=None, exp_avg_sq_scale=None,
         compensation=None, seed=0, grad_sumsq=None):
    if backend == "cuda" and not 0 < chunk < CUDA_MAX_CHUNK:
        raise ValueError(f"CUDA chunks must hold 1 to {CUDA_MAX_CHUNK - 1} elements (the lean kernel's 32-bit "
                         f"offsets within a chunk, csrc/adamw.h kCudaMaxChunk), got {chunk}: lower CUDA_CHUNK")
    device = exp_avg.device
    _require(backend, device)
    # The optimizer may skip contract.check_segments (check=False); these mistakes would hand the kernel
    # pointers of the wrong kind, so they are checked on every call (once per list, not per tensor).
    _check_device(backend, device)
    if hparams.dtype != torch.float64 or hparams.device.type != "cpu":
        raise ValueError(f"hparams must be a float64 CPU tensor, got {hparams.dtype} on {hparams.device}")
    if not len(params) == len(grads) == len(segments) or (lowps is not None and len(lowps) != len(segments)):
        raise ValueError(f"params, grads and lowps need one entry per segment ({len(segments)}), got "
                         f"{len(params)}, {len(grads)}, {None if lowps is None else len(lowps)}")
    chunks = chunk_table(segments, chunk, device)
    if chunks.shape[0] == 0:
        return
    lean = dict(moments=moments, master_weights=master_weights, exp_avg_scale=exp_avg_scale,
                exp_avg_sq_scale=exp_avg_sq_scale, compensation=compensation, grad_sumsq=grad_sumsq, seed=seed)
    if torch.compiler.is_compiling():
        adamw_segments_op(list(params), list(grads), exp_avg, exp_avg_sq, list(lowps or ()), grad_scale, chunks,
                          segments.tensor(), hparams, float(beta1), float(beta2), float(eps), **lean)
        return
    segs = pointer_table(segments, params, grads, lowps, device)
    _launch(backend, segs, chunks, hparams, exp_avg, exp_avg_sq, grad_scale, grad_dtype=_first_dtype(grads),
            lowp_dtype=_first_dtype(lowps), param_dtype=_first_dtype(params), beta1=float(beta1),
            beta2=float(beta2), eps=float(eps), **lean)


def adamw_segments_cpu_(params, grads, exp_avg, exp_avg_sq, segments: Segments, hparams, *, beta1: float,
                        beta2: float, eps: float, lowps=None, grad_scale=None, moments: str = "fp32",
                        master_weights: str = "fp32", exp_avg_scale=None, exp_avg_sq_scale=None, compensation=None,
                        seed: int = 0, grad_sumsq=None) -> None:
    """The C++ CPU kernel (OpenMP over 32K-element chunks): AdamW over the segments' own contiguous CPU tensors
    `params` / `grads` / `lowps` with the packed state, in place; the contract and the keywords of
    reference.adamw_segments_reference_ (validated by kernels.adamw_segments_). Raises RuntimeError when
    lisa_fused._C is not built, ValueError for tensors on another device, a non-float64 or device hparams
    table, or a chunk whose segment lacks a pointer it needs (nothing is written then)."""
    _run("cpu", CPU_CHUNK, params, grads, exp_avg, exp_avg_sq, segments, hparams, beta1=beta1, beta2=beta2, eps=eps,
         lowps=lowps, grad_scale=grad_scale, moments=moments, master_weights=master_weights,
         exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale, compensation=compensation, seed=seed,
         grad_sumsq=grad_sumsq)


def adamw_segments_cuda_(params, grads, exp_avg, exp_avg_sq, segments: Segments, hparams, *, beta1: float,
                         beta2: float, eps: float, lowps=None, grad_scale=None, moments: str = "fp32",
                         master_weights: str = "fp32", exp_avg_scale=None, exp_avg_sq_scale=None, compensation=None,
                         seed: int = 0, grad_sumsq=None) -> None:
    """The CUDA kernel, one launch on the current stream of the state's device (64K-element chunks, one
    thread block each); same contract and errors as adamw_segments_cpu_. Never synchronizes: the tables
    reach the device through pinned memory (_tables.to_device)."""
    _run("cuda", CUDA_CHUNK, params, grads, exp_avg, exp_avg_sq, segments, hparams, beta1=beta1, beta2=beta2, eps=eps,
         lowps=lowps, grad_scale=grad_scale, moments=moments, master_weights=master_weights,
         exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale, compensation=compensation, seed=seed,
         grad_sumsq=grad_sumsq)
