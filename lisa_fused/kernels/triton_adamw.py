"""Backend "triton": AdamW over segments (kernels/contract.py) as one Triton launch over the chunk table.

One program per chunk (a slice of one segment): it reads its (segment, start, end) row, the segment's
row of the int64 pointer table (_tables.pointer_table: state offset, numel and the addresses of the
segment's own param / grad / lowp tensors, cast to pointers as in Triton's grouped-GEMM tutorial) and
the segment's fp32 scalars, and loops over the chunk in BLOCK-element steps. The moments are packed
state, addressed by the state index; the param, grad and lowp of the chunk start at the segment's
addresses + (start - offset) elements. Whether a chunk may use 128-bit accesses is decided per program
at run time: when every address it touches is 16-byte aligned (and the state index a multiple of 4), the
full blocks run unmasked on pointers the compiler knows are aligned (v4 accesses), else, and for the
last partial block, the masked loop (scalar accesses, any address). Only layout and mode flags are
tl.constexpr (grad and lowp dtypes, grad_scale present, BLOCK); lr, betas, eps and the per-step
scalars are runtime values, so a schedule never recompiles. Addresses are 64-bit. Runs on CUDA tensors,
and on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1), where each program costs Python
time: chunks and blocks are large there.
"""
from __future__ import annotations

import contextlib
import os
import struct

import torch

from .contract import N_SEG_COLS, SEG_GRAD, SEG_LOWP, SEG_OFFSET, SEG_PARAM, Segments, host_scalars
from ._tables import chunk_table, pointer_table, segment_table

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
# storage dtype codes of the constexpr GRAD_KIND / LOWP flags (LOWP 0: no low-precision copy)
GRAD_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
LOWP_KIND = {None: 0, torch.bfloat16: 1, torch.float16: 2}


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

    # pointer-table columns (contract.py) as constants of the jit code
    _N_SEG_COLS = tl.constexpr(N_SEG_COLS)
    _SEG_OFFSET = tl.constexpr(SEG_OFFSET)
    _SEG_PARAM = tl.constexpr(SEG_PARAM)
    _SEG_GRAD = tl.constexpr(SEG_GRAD)
    _SEG_LOWP = tl.constexpr(SEG_LOWP)

    @triton.jit
    def _round_bf16_rne(x):
        """fp32 -> bf16 bit pattern (int16), rounding to nearest even on the bits (the interpreter's own
        cast truncates)."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)  # NaN stays a quiet NaN
        return rounded.to(tl.int32).to(tl.int16)

    @triton.jit
    def typed_pointer(addr, KIND: tl.constexpr, ALIGNED: tl.constexpr):
        """The int64 byte address `addr` as a pointer to KIND's storage (0 float32, 1 bf16 as int16 bits, 2
        float16, 3 uint8). ALIGNED: the caller checked addr % 16 == 0 at run time; the pointer is rebuilt
        from addr >> 4 and marked 16-byte aligned (tl.multiple_of marks the op that defines its value, here
        this path's own int_to_ptr of a value no other path uses; the axis analysis does not carry the
        shift's alignment through int_to_ptr by itself)."""
        if ALIGNED:
            addr = (addr >> 4) << 4
        if KIND == 0:
            ptr = addr.to(tl.pointer_type(tl.float32))
        elif KIND == 1:
            ptr = addr.to(tl.pointer_type(tl.int16))
        elif KIND == 2:
            ptr = addr.to(tl.pointer_type(tl.float16))
        else:
            ptr = addr.to(tl.pointer_type(tl.uint8))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        return ptr

    @triton.jit
    def segment_address(row, col, rel, KIND: tl.constexpr):
        """int64 address of element `rel` of the segment tensor in pointer-table column `col` of `row`
        (elements of KIND's storage: 4 bytes for 0, else 2)."""
        return tl.load(row + col) + rel * (4 if KIND == 0 else 2)

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
        p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, start, n, scale,
        step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
        GRAD_KIND: tl.constexpr, LOWP: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        """AdamW on the chunk's elements [start, start + BLOCK) (MASKED: and < n); every pointer is the
        chunk's first element of its stream."""
        offs = start + tl.arange(0, BLOCK)
        if GRAD_KIND == 1:  # bf16 bits (an int16 view) widened by hand: exact, also for subnormals in
            # the interpreter, whose own bf16 -> fp32 conversion is not
            g = (_load(g_ptr, offs, n, MASKED).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            g = _load(g_ptr, offs, n, MASKED).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        p = _load(p_ptr, offs, n, MASKED)
        m = _load(m_ptr, offs, n, MASKED)
        v = _load(v_ptr, offs, n, MASKED)
        p, m, v = adamw_element(p, m, v, g, step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1,
                                beta2, one_minus_beta2, eps)
        _store(p_ptr, offs, p, n, MASKED)
        _store(m_ptr, offs, m, n, MASKED)
        _store(v_ptr, offs, v, n, MASKED)
        if LOWP == 1:
            _store(low_ptr, offs, _round_bf16_rne(p), n, MASKED)
        elif LOWP == 2:
            _store(low_ptr, offs, p.to(tl.float16), n, MASKED)

    @triton.jit
    def _adamw_segments_kernel(
        segs_ptr, m_ptr, v_ptr, scale_ptr, chunks_ptr, table_ptr,
        lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
        GRAD_KIND: tl.constexpr, LOWP: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0).to(tl.int64)
        seg = tl.load(chunks_ptr + 3 * c)
        begin = tl.load(chunks_ptr + 3 * c + 1)
        end = tl.load(chunks_ptr + 3 * c + 2)
        row = segs_ptr + _N_SEG_COLS * seg
        rel = begin - tl.load(row + _SEG_OFFSET)  # the chunk's first element within its segment
        n = (end - begin).to(tl.int32)  # a chunk has at most _GPU_CONFIG[0] elements
        p_addr = segment_address(row, _SEG_PARAM, rel, 0)
        g_addr = segment_address(row, _SEG_GRAD, rel, GRAD_KIND)
        m_addr = m_ptr.to(tl.int64) + 4 * begin
        v_addr = v_ptr.to(tl.int64) + 4 * begin
        low_addr = p_addr
        if LOWP != 0:
            low_addr = segment_address(row, _SEG_LOWP, rel, LOWP)
        step_size = tl.load(table_ptr + 4 * seg)
        decay = tl.load(table_ptr + 4 * seg + 1)
        bc2_sqrt = tl.load(table_ptr + 4 * seg + 2)
        enabled = tl.load(table_ptr + 4 * seg + 3)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
        if enabled != 0.0:  # a disabled segment runs no iteration (its grad address may be 0)
            # Full blocks without a mask where every address of the chunk is 16-byte aligned: on pointers
            # rebuilt as aligned (typed_pointer) the loads and stores compile to 128-bit (v4) accesses; a
            # mask on `offs < n`, or an address of unknown alignment, splits them into scalar ones. While
            # loops on scalar conditions: Triton 3.6's interpreter holds loaded scalars as 1-element
            # arrays, which range() rejects. The offset is i * BLOCK (not carried), so its divisibility
            # stays known.
            i = 0
            if ((p_addr | g_addr | m_addr | v_addr | low_addr) & 15) == 0:
                p_a, g_a = typed_pointer(p_addr, 0, True), typed_pointer(g_addr, GRAD_KIND, True)
                m_a, v_a = typed_pointer(m_addr, 0, True), typed_pointer(v_addr, 0, True)
                low_a = typed_pointer(low_addr, LOWP, True)
                while (i + 1) * BLOCK <= n:
                    _update_block(
                        p_a, g_a, m_a, v_a, low_a, i * BLOCK, n, scale,
                        step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
                        GRAD_KIND, LOWP, HAS_SCALE, BLOCK, False,
                    )
                    i += 1
            # The rest (an aligned chunk's last partial block, every block of another chunk), masked, one
            # element per thread per access: blocks of BLOCK // 4, a shape of their own, so that the
            # compiler's layout for these accesses of unknown alignment (one element per thread, as a
            # store needs) is not widened to the aligned loop's (which would move the stores through
            # shared memory, with barriers).
            start = i * BLOCK
            p_u, g_u = typed_pointer(p_addr, 0, False), typed_pointer(g_addr, GRAD_KIND, False)
            m_u, v_u = m_ptr + begin, v_ptr + begin
            low_u = typed_pointer(low_addr, LOWP, False)
            while start < n:
                _update_block(
                    p_u, g_u, m_u, v_u, low_u, start, n, scale,
                    step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
                    GRAD_KIND, LOWP, HAS_SCALE, BLOCK // 4, True,
                )
                start += BLOCK // 4


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (x - 1.0 of an fp32 x in [0, 1] is exact in double first)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def launch_device(device: torch.device):
    """Triton launches on the current CUDA device, which may not be the buffers' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def list_dtype(tensors) -> torch.dtype | None:
    """The dtype of the first tensor in `tensors` (None for None or an all-None list)."""
    return next((t.dtype for t in tensors or () if t is not None), None)


def adamw_segments_triton_(
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
    exp_avg_scale=None,
    exp_avg_sq_scale=None,
    compensation=None,
    seed: int = 0,
    grad_sumsq=None,
) -> None:
    """The fp32-state Triton kernel, one launch; same contract as adamw_segments_reference_ (contract.py):
    params[s] float32, grads[s] float32 / bf16 / fp16 (None where disabled), lowps[s] bf16 / fp16, all
    contiguous (kernels.adamw_segments_ validates and copies non-contiguous ones first); exp_avg and
    exp_avg_sq float32 [N]; hparams float64 [S, 4] on the host. The lean modes (other moments or master
    weights, grad_sumsq) run triton_lean.adamw_segments_lean_triton_: ValueError here. RuntimeError when
    Triton cannot run on the state's device."""
    if moments != "fp32" or master_weights != "fp32" or grad_sumsq is not None or compensation is not None \
            or exp_avg_scale is not None or exp_avg_sq_scale is not None:
        raise ValueError(f"the fp32 Triton kernel runs moments='fp32', master_weights='fp32' without grad_sumsq, "
                         f"got moments={moments!r}, master_weights={master_weights!r}: use "
                         "triton_lean.adamw_segments_lean_triton_ (kernels.adamw_segments_ picks it)")
    device = exp_avg.device
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' is not available: {reason}")
    grad_dtype = list_dtype(grads)
    if grad_dtype is None:  # every segment disabled (an enabled one has its grad: contract.check_segments)
        return
    chunk, block, num_warps = _INTERPRETER_CONFIG if device.type == "cpu" else _GPU_CONFIG
    chunks = chunk_table(segments, chunk, device)
    if chunks.shape[0] == 0:
        return
    table = segment_table(hparams[:, :4], device)
    pointers = pointer_table(segments, params, grads, lowps, device)
    one_minus_beta1, beta2_, one_minus_beta2, eps_ = host_scalars(beta1, beta2, eps)
    # The lerp weight and weight - 1 as the fp32 values the C++/CUDA kernels compute (the interpreter
    # would do scalar arithmetic in fp64), and the branch as a runtime value.
    w = _f32(one_minus_beta1)
    with launch_device(device):
        _adamw_segments_kernel[(chunks.shape[0],)](
            pointers, exp_avg, exp_avg_sq, exp_avg if grad_scale is None else grad_scale, chunks, table,
            int(w < 0.5), w, _f32(w - 1.0), beta2_, one_minus_beta2, eps_,
            GRAD_KIND=GRAD_KIND[grad_dtype], LOWP=LOWP_KIND[list_dtype(lowps)], HAS_SCALE=grad_scale is not None,
            BLOCK=block, num_warps=num_warps,
            enable_fp_fusion=False,  # the FMAs torch has are explicit (tl.fma); no others, e.g. p * decay + ...
        )
