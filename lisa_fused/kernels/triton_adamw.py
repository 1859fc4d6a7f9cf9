"""Backend "triton": the packed AdamW as one Triton launch over the chunk table.

One program per chunk (a slice of one segment): it reads its (segment, start, end) row and the segment's
fp32 scalars from device tables and loops over the chunk in BLOCK-element steps. Only layout and mode
flags are tl.constexpr (bf16 grads, param_lowp present and its dtype, grad_scale present, offset alignment,
BLOCK; other grad dtypes are part of Triton's own signature specialization); lr, betas, eps and the
per-step scalars are runtime values, so a schedule never recompiles. A new mode is one more constexpr
flag of `_update_block`, passed by the kernel to both the unmasked main loop and the masked tail. Runs
on CUDA tensors, and on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1), where each program
costs Python time: chunks and blocks are large there.
"""
from __future__ import annotations

import contextlib
import os
import struct

import torch

from .contract import ALIGN, Segments, host_scalars
from ._tables import chunk_table, offsets_aligned, segment_table

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # triton is optional (not on every platform)
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# (elements per chunk, BLOCK, num_warps). On a GPU: 64K-element chunks and 4 elements per thread per
# block (BLOCK = 4 * 32 * num_warps), as torch's fused AdamW does (ILP 4): one 128-bit access per fp32
# stream, 64-bit for 16-bit ones, 40-46 registers, and one layout for every stream (8 elements per thread
# would give 16-bit streams a layout of their own and shared-memory conversions with barriers; see
# tests/test_ptx.py). In the interpreter, few programs with big blocks.
_GPU_CONFIG = (1 << 16, 1024, 8)
_INTERPRETER_CONFIG = (1 << 20, 1 << 14, 4)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device) -> str | None:
    """None when the Triton kernel can run on `device`, else a sentence saying why not."""
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR}); install it with `pip install triton`"
    device = torch.device(device)
    if device.type == "cuda":
        if _interpreted():
            return "TRITON_INTERPRET=1 is set, so Triton runs on CPU tensors only"
        if not torch.cuda.is_available():
            return "no CUDA device is available to torch"
        return None
    if device.type == "cpu":
        if _interpreted():
            return None
        return "Triton runs on CPU tensors only in its interpreter; set TRITON_INTERPRET=1 before importing triton"
    return f"Triton kernels run on cuda tensors (or cpu under TRITON_INTERPRET=1), not on {device.type}"


if triton is not None:

    @triton.jit
    def _round_bf16_rne(x):
        """fp32 -> bf16, rounding to nearest even on the bits (the interpreter's own cast truncates)."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)  # NaN stays a quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def adamw_element(p, m, v, g, step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1, beta2,
                      one_minus_beta2, eps):
        """The AdamW element update of csrc/adamw_math.h (adamw_element, FMAs where torch has them), in
        fp32; the one Triton definition, shared by this kernel and triton_lean.py's."""
        p = p * decay
        if lerp_small:  # torch's lerp: weight 1 - beta1 below 0.5 or not
            m = tl.fma(lerp_w, g - m, m)
        else:
            m = tl.fma(lerp_w_minus_1, g - m, g)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps  # IEEE sqrt and division, as in C++/CUDA
        p = p + tl.div_rn(-step_size * m, denom)
        return p, m, v

    @triton.jit
    def _load(ptr, offs, end, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(ptr + offs, mask=offs < end, other=0)
        return tl.load(ptr + offs)

    @triton.jit
    def _store(ptr, offs, value, end, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptr + offs, value, mask=offs < end)
        else:
            tl.store(ptr + offs, value)

    @triton.jit
    def _update_block(
        p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, start, end, scale,
        step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
        GRAD_BF16: tl.constexpr, HAS_LOWP: tl.constexpr, LOWP_BF16: tl.constexpr, HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr, MASKED: tl.constexpr,
    ):
        """AdamW on elements [start, start + BLOCK) (MASKED: and < end); start is int64."""
        offs = start + tl.arange(0, BLOCK)
        if GRAD_BF16:  # bf16 bits (an int16 view) widened by hand: exact, also for subnormals in
            # the interpreter, whose own bf16 -> fp32 conversion is not
            g = (_load(g_ptr, offs, end, MASKED).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            g = _load(g_ptr, offs, end, MASKED).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        p = _load(p_ptr, offs, end, MASKED)
        m = _load(m_ptr, offs, end, MASKED)
        v = _load(v_ptr, offs, end, MASKED)
        p, m, v = adamw_element(p, m, v, g, step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1,
                                beta2, one_minus_beta2, eps)
        _store(p_ptr, offs, p, end, MASKED)
        _store(m_ptr, offs, m, end, MASKED)
        _store(v_ptr, offs, v, end, MASKED)
        if HAS_LOWP:
            if LOWP_BF16:
                _store(low_ptr, offs, _round_bf16_rne(p), end, MASKED)
            else:
                _store(low_ptr, offs, p.to(tl.float16), end, MASKED)

    @triton.jit
    def _adamw_packed_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, scale_ptr, chunks_ptr, table_ptr,
        lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
        GRAD_BF16: tl.constexpr, HAS_LOWP: tl.constexpr, LOWP_BF16: tl.constexpr, HAS_SCALE: tl.constexpr,
        ALIGNMENT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0).to(tl.int64)
        seg = tl.load(chunks_ptr + 3 * c)
        begin = tl.load(chunks_ptr + 3 * c + 1)
        end = tl.load(chunks_ptr + 3 * c + 2)
        if ALIGNMENT > 1:
            begin = tl.multiple_of(begin, ALIGNMENT)  # chunk starts on a segment-offset boundary
        step_size = tl.load(table_ptr + 4 * seg)
        decay = tl.load(table_ptr + 4 * seg + 1)
        bc2_sqrt = tl.load(table_ptr + 4 * seg + 2)
        enabled = tl.load(table_ptr + 4 * seg + 3)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
        if enabled != 0.0:  # a disabled segment runs no iteration
            # Full blocks without a mask: with `start` a multiple of ALIGNMENT and the pointers 16-byte
            # aligned, the loads and stores compile to 128-bit (v4) accesses; a mask on `offs < end`, of
            # unknown divisibility, would split them into scalar ones. A while loop on a scalar condition:
            # Triton 3.6's interpreter holds loaded scalars as 1-element arrays, which range() rejects.
            # `start` is recomputed from `begin` (not carried), so its divisibility stays known (Triton
            # 3.6 drops a multiple_of hint on a loop-carried value); i * BLOCK < chunk size < 2^31.
            i = 0
            while begin + (i + 1) * BLOCK <= end:
                _update_block(
                    p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, begin + i * BLOCK, end, scale,
                    step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
                    GRAD_BF16, HAS_LOWP, LOWP_BF16, HAS_SCALE, BLOCK, False,
                )
                i += 1
            start = begin + i * BLOCK
            if start < end:  # one masked block for the rest
                _update_block(
                    p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, start, end, scale,
                    step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
                    GRAD_BF16, HAS_LOWP, LOWP_BF16, HAS_SCALE, BLOCK, True,
                )


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (x - 1.0 of an fp32 x in [0, 1] is exact in double first)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def adamw_packed_triton_(
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
    """The Triton kernel, one launch; same contract as adamw_packed_reference_."""
    reason = unavailable_reason(param.device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' is not available: {reason}")
    chunk, block, num_warps = _INTERPRETER_CONFIG if param.device.type == "cpu" else _GPU_CONFIG
    chunks = chunk_table(segments, chunk, param.device)
    if chunks.shape[0] == 0:
        return
    table = segment_table(hparams, param.device)
    one_minus_beta1, beta2_, one_minus_beta2, eps_ = host_scalars(beta1, beta2, eps)
    # The lerp weight and weight - 1 as the fp32 values the C++/CUDA kernels compute (the interpreter
    # would do scalar arithmetic in fp64), and the branch as a runtime value.
    w = _f32(one_minus_beta1)
    # Triton launches on the current CUDA device, which may not be the buffers' one.
    on_device = torch.cuda.device(param.device) if param.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _adamw_packed_kernel[(chunks.shape[0],)](
            param, grad.view(torch.int16) if grad.dtype == torch.bfloat16 else grad, exp_avg, exp_avg_sq,
            param if param_lowp is None else param_lowp,
            param if grad_scale is None else grad_scale,
            chunks, table,
            int(w < 0.5), w, _f32(w - 1.0), beta2_, one_minus_beta2, eps_,
            GRAD_BF16=grad.dtype == torch.bfloat16,
            HAS_LOWP=param_lowp is not None,
            LOWP_BF16=param_lowp is not None and param_lowp.dtype == torch.bfloat16,
            HAS_SCALE=grad_scale is not None,
            ALIGNMENT=ALIGN if offsets_aligned(segments) else 1,
            BLOCK=block,
            num_warps=num_warps,
            enable_fp_fusion=False,  # the FMAs torch has are explicit (tl.fma); no others, e.g. p * decay + ...
        )
