"""Backend "triton", lean state (kernels/contract.py): bf16 / 8-bit / 4-bit moments, Kahan or stochastic
bf16 updates, grad_sumsq, over segments whose param / grad / lowp tensors sit at their own addresses (the
int64 pointer table, as triton_adamw.py's kernel reads it). The fp32 default stays on triton_adamw.py's
kernel.

One program per chunk of the chunk table walks it in tiles of TILE = 8 x 32 x num_warps elements, held
as [2, TILE / 8, 4]: thread t owns elements 8t..8t+7 as two runs of 4. Runs of 4, never more, are
contiguous in tensor order, so every stream, whatever its width, gets the same layout (fp32 as 128-bit
accesses, 16-bit as 64-bit, 8-bit codes as 32-bit, 4-bit as one 16-bit word per run) and nothing goes
through shared memory; a warp holds one 8-bit quantization block, half a warp a 4-bit one, so a block's
absmax is a max within threads and lanes. The packed state (moments, codes, scales, compensation) is
addressed by the state index (chunk starts are multiples of contract.ALIGN), the param / grad / lowp by
the segment's addresses + (start - offset) elements. Full tiles run unmasked where every address of the
chunk is 16-byte aligned (decided per program at run time, as in triton_adamw.py), the rest masked, in
tiles of TILE / 4 (fewer registers for the whole kernel; see the kernel). TILE is a multiple of 1024. The
element math is triton_adamw.adamw_element (one Triton definition, shared with the fp32 kernel); the
stochastic-rounding hash is csrc/adamw_math.h's. Codes as csrc/adamw_math.h code_of: one gather from a
bucket table (code_tables) and one comparison, or the closed form of the 4-bit v map; equal to the binary
search over the midpoints (tests/test_lean_kernels.py).
"""
from __future__ import annotations

import torch

from . import quant
from ._tables import chunk_table, offsets_aligned, pointer_table, segment_table
from .contract import ALIGN, Segments, host_scalars
from .triton_adamw import (GRAD_KIND, LOWP_KIND, _f32, _interpreted, launch_device, list_dtype, triton,
                           unavailable_reason)
from .triton_codes import BUCKETS, _bucket_table, code_tables  # noqa: F401  (tests read them from here)

if triton is not None:
    import triton.language as tl

    from .triton_adamw import (_N_SEG_COLS, _SEG_GRAD, _SEG_LOWP, _SEG_OFFSET, _SEG_PARAM, _load, _store, adamw_element,
                               segment_address, typed_pointer)
    from .triton_codes import (_M4, _M8, _M8_ENTRIES, _V8, _bf16_from_bits, _block_absmax, _block_scale, _codes,
                               _key, _load_codes, _load_half, _rne_bf16_bits, _runs, _sr_bf16_bits, _store_codes)

# (elements per chunk, TILE, num_warps): TILE = 8 x 32 x num_warps on a GPU (module docstring); the
# interpreter wants few, big programs (TILE any multiple of 1024: masked tiles of TILE / 4 start on
# multiples of 256, as the block scales and 4-bit words need).
_GPU_CONFIG = (1 << 16, 1024, 4)
_INTERPRETER_CONFIG = (1 << 20, 1 << 14, 4)

if triton is not None:

    @triton.jit
    def _tile(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, codes_ptr, start, end, scale,
              rel, key_p, key_m, key_v, step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1,
              beta2, one_minus_beta2, eps,
              MOM: tl.constexpr, MASTER: tl.constexpr, PARAM_BF16: tl.constexpr, GRAD_KIND: tl.constexpr,
              LOWP: tl.constexpr, HAS_SCALE: tl.constexpr, QB: tl.constexpr, BITS: tl.constexpr,
              TILE: tl.constexpr, MASKED: tl.constexpr):
        """The tile's elements [start, start + TILE) of the chunk (MASKED: those < end): load, update, store;
        returns g * g per element (0 where masked), which the kernel sums once per chunk. Every pointer is
        the chunk's first element (code byte, block scale) of its stream; `rel`: the chunk's first element
        within its segment (the stochastic-rounding index)."""
        local = _runs(TILE)[:, :, None] + tl.arange(0, 4)[None, None, :]  # [2, TILE / 8, 4], within the tile
        offs = start + local
        if GRAD_KIND == 0:
            g = _load(g_ptr, offs, end, MASKED)
        else:
            g = _load_half(g_ptr, offs, end, GRAD_KIND == 1, MASKED)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        if MASTER == 0:
            p = _load(p_ptr, offs, end, MASKED)
        else:
            p = _load_half(p_ptr, offs, end, PARAM_BF16, MASKED)
            if MASTER == 1:
                p = p + _load_half(comp_ptr, offs, end, PARAM_BF16, MASKED)
        if MOM == 0:
            m = _load(m_ptr, offs, end, MASKED)
            v = _load(v_ptr, offs, end, MASKED)
        elif MOM == 1:
            m = _bf16_from_bits(_load(m_ptr, offs, end, MASKED))
            v = _bf16_from_bits(_load(v_ptr, offs, end, MASKED))
        else:  # map[code] * scale of the element's block; elements past `end` get 0
            sm = _block_scale(ms_ptr, start, end, TILE, QB, MASKED)
            sv = _block_scale(vs_ptr, start, end, TILE, QB, MASKED)
            m = tl.load(qt_ptr + _load_codes(m_ptr, start, end, TILE, MOM, MASKED)) * sm
            cv = _load_codes(v_ptr, start, end, TILE, MOM, MASKED)
            if MOM == 2:
                v = tl.load(qt_ptr + 512 + cv) * sv
            else:  # the 4-bit v map is (code + 1) / 16 (exact; tests check the map), no gather
                v = tl.fma(cv.to(tl.float32), 0.0625, 0.0625) * sv
            if MASKED:
                m = tl.where(offs < end, m, 0.0)
                v = tl.where(offs < end, v, 0.0)
        p, m, v = adamw_element(p, m, v, g, step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1, beta2,
                                one_minus_beta2, eps)
        idx = (rel + start).to(tl.uint32) + local  # within the segment (< 2^32)
        if MOM == 0:
            _store(m_ptr, offs, m, end, MASKED)
            _store(v_ptr, offs, v, end, MASKED)
        elif MOM == 1:
            _store(m_ptr, offs, _sr_bf16_bits(m, key_m, idx), end, MASKED)
            _store(v_ptr, offs, _sr_bf16_bits(v, key_v, idx), end, MASKED)
        else:
            am = _block_absmax(m, TILE, QB)
            av = _block_absmax(v, TILE, QB)
            # the scale, stored by its block's first element, from one value per run of 4 (a store whose
            # operand has the one-per-run layout the store itself picks)
            runs = _runs(TILE)
            first = (runs % QB == 0) & (start + runs < end)
            tl.store(ms_ptr + (start // QB + runs // QB), tl.max(am, axis=2), mask=first)
            tl.store(vs_ptr + (start // QB + runs // QB), tl.max(av, axis=2), mask=first)
            if MOM == 2:
                cm = _codes(m, am, codes_ptr, _M8[0], _M8[1], _M8[2], _M8[3], False)
                cv = _codes(v, av, codes_ptr + _M8_ENTRIES, _V8[0], _V8[1], _V8[2], _V8[3], False)
            else:
                cm = _codes(m, am, codes_ptr, _M4[0], _M4[1], _M4[2], _M4[3], False)
                cv = _codes(v, av, codes_ptr, 0, 0, 0, False, True)
            _store_codes(m_ptr, cm, offs, start, end, TILE, MOM, MASKED)
            _store_codes(v_ptr, cv, offs, start, end, TILE, MOM, MASKED)
        if MASTER == 0:
            _store(p_ptr, offs, p, end, MASKED)
            if LOWP == 1:
                _store(low_ptr, offs, _rne_bf16_bits(p), end, MASKED)
            if LOWP == 2:
                _store(low_ptr, offs, p.to(tl.float16), end, MASKED)
        if MASTER == 1:
            if PARAM_BF16:
                hi = _rne_bf16_bits(p)
                _store(p_ptr, offs, hi, end, MASKED)
                _store(comp_ptr, offs, _rne_bf16_bits(p - _bf16_from_bits(hi)), end, MASKED)
            else:
                hi = p.to(tl.float16)
                _store(p_ptr, offs, hi, end, MASKED)
                _store(comp_ptr, offs, (p - hi.to(tl.float32)).to(tl.float16), end, MASKED)
        if MASTER == 2:
            _store(p_ptr, offs, _sr_bf16_bits(p, key_p, idx), end, MASKED)
        return g * g

    @triton.jit(do_not_specialize=["seed", "n_cols"])
    def _adamw_lean_kernel(
        segs_ptr, m_ptr, v_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, codes_ptr, gscale_ptr, sumsq_ptr,
        chunks_ptr, table_ptr, seed, n_cols,
        lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
        MOM: tl.constexpr, MASTER: tl.constexpr, PARAM_BF16: tl.constexpr, GRAD_KIND: tl.constexpr,
        LOWP: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SUMSQ: tl.constexpr, SR: tl.constexpr,
        QB: tl.constexpr, BITS: tl.constexpr, TILE: tl.constexpr,
    ):
        c = tl.program_id(0).to(tl.int64)
        seg = tl.load(chunks_ptr + 3 * c)
        begin = tl.multiple_of(tl.load(chunks_ptr + 3 * c + 1), 256)  # contract.ALIGN (the launcher checks)
        end = tl.load(chunks_ptr + 3 * c + 2)
        row = segs_ptr + _N_SEG_COLS * seg
        rel = begin - tl.load(row + _SEG_OFFSET)  # the chunk's first element within its segment
        n = (end - begin).to(tl.int32)  # a chunk has at most _GPU_CONFIG[0] elements
        # the segment's own tensors (param: fp32, bf16 bits or fp16 as triton_adamw.typed_pointer's kinds)
        P_KIND: tl.constexpr = 0 if MASTER == 0 else (1 if PARAM_BF16 else 2)
        p_addr = segment_address(row, _SEG_PARAM, rel, P_KIND)
        g_addr = segment_address(row, _SEG_GRAD, rel, GRAD_KIND)
        low_addr = p_addr
        if LOWP != 0:
            low_addr = segment_address(row, _SEG_LOWP, rel, LOWP)
        # the packed state at the chunk's state index
        if MOM == 3:
            m_c, v_c = m_ptr + begin // 2, v_ptr + begin // 2
        else:
            m_c, v_c = m_ptr + begin, v_ptr + begin
        comp_c, ms_c, vs_c = comp_ptr + begin, ms_ptr + begin // QB, vs_ptr + begin // QB
        state_addr = m_c.to(tl.int64) | v_c.to(tl.int64) | comp_c.to(tl.int64)
        row_hp = table_ptr + n_cols * seg
        step_size = tl.load(row_hp)
        decay = tl.load(row_hp + 1)
        bc2_sqrt = tl.load(row_hp + 2)
        enabled = tl.load(row_hp + 3)
        seed_u = seed.to(tl.uint32)
        pid = seed_u * 0
        stp = seed_u * 0
        if SR:
            pid = tl.load(row_hp + 4).to(tl.uint32)
            stp = tl.load(row_hp + 5).to(tl.uint32)
        key_p = _key(seed_u, pid, stp, 0)
        key_m = _key(seed_u, pid, stp, 1)
        key_v = _key(seed_u, pid, stp, 2)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(gscale_ptr)
        if enabled != 0.0:  # a disabled segment runs no tile (its grad address may be 0)
            # Full tiles unmasked where every address of the chunk is 16-byte aligned, on pointers rebuilt as
            # aligned (triton_adamw.typed_pointer), at offsets i * TILE (not carried, so their divisibility
            # stays known); masked tiles for the rest (a chunk's last tile, or every tile of another chunk).
            # Masked tiles are MTILE = TILE / 4 elements: their accesses of unknown alignment get a layout
            # of one element per thread, converted through shared memory, and at a quarter of the tile those
            # conversions need far fewer registers than at the full one (which set the whole kernel's count:
            # 86-154 per thread instead of 63-80 for the unmasked loop alone, Triton 3.9, sm_90).
            MTILE: tl.constexpr = TILE // 4
            sumsq = tl.zeros((2, TILE // 8, 4), dtype=tl.float32)  # per element, summed once at the end
            sumsq_m = tl.zeros((2, MTILE // 8, 4), dtype=tl.float32)
            i = 0
            if ((p_addr | g_addr | low_addr | state_addr) & 15) == 0:
                p_a, g_a = typed_pointer(p_addr, P_KIND, True), typed_pointer(g_addr, GRAD_KIND, True)
                low_a = typed_pointer(low_addr, LOWP, True)
                while (i + 1) * TILE <= n:
                    sumsq += _tile(p_a, g_a, m_c, v_c, low_a, comp_c, ms_c, vs_c, qt_ptr, codes_ptr,
                                   i * TILE, n, scale, rel, key_p, key_m, key_v, step_size, decay, bc2_sqrt,
                                   lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps, MOM, MASTER,
                                   PARAM_BF16, GRAD_KIND, LOWP, HAS_SCALE, QB, BITS, TILE, False)
                    i += 1
            start = i * TILE
            p_u, g_u = typed_pointer(p_addr, P_KIND, False), typed_pointer(g_addr, GRAD_KIND, False)
            low_u = typed_pointer(low_addr, LOWP, False)
            while start < n:
                sumsq_m += _tile(p_u, g_u, m_c, v_c, low_u, comp_c, ms_c, vs_c, qt_ptr, codes_ptr,
                               start, n, scale, rel, key_p, key_m, key_v, step_size, decay, bc2_sqrt,
                               lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps, MOM, MASTER,
                               PARAM_BF16, GRAD_KIND, LOWP, HAS_SCALE, QB, BITS, MTILE, True)
                start += MTILE
            if HAS_SUMSQ:
                tl.atomic_add(sumsq_ptr + seg, tl.sum(sumsq) + tl.sum(sumsq_m))


def _bits16(t):
    """bf16 buffers travel as int16 bit patterns (exact conversions in the interpreter too)."""
    return None if t is None else (t.view(torch.int16) if t.dtype == torch.bfloat16 else t)


def adamw_segments_lean_triton_(
    params, grads, exp_avg, exp_avg_sq, segments: Segments, hparams, *, beta1, beta2, eps, lowps=None,
    grad_scale=None, moments="fp32", master_weights="fp32", exp_avg_scale=None, exp_avg_sq_scale=None,
    compensation=None, seed=0, grad_sumsq=None,
) -> None:
    """The lean-state Triton kernel, one launch; same contract as adamw_segments_reference_ (contract.py):
    params[s] / grads[s] / lowps[s] the segments' contiguous tensors (grads[s] None where disabled), the
    packed state in `moments`' format with segment offsets multiples of contract.ALIGN (ValueError
    otherwise), hparams float64 [S, 4 or 6] on the host. RuntimeError when Triton cannot run on the
    state's device."""
    device = exp_avg.device
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' is not available: {reason}")
    if not offsets_aligned(segments):
        bad = next(off for off, _ in segments.bounds if off % ALIGN)
        raise ValueError(f"segment offset {bad} is not a multiple of ALIGN={ALIGN} (lean formats need it)")
    grad_dtype = list_dtype(grads)
    if grad_dtype is None:  # every segment disabled (an enabled one has its grad: contract.check_segments)
        return
    chunk, tile, num_warps = _INTERPRETER_CONFIG if _interpreted() else _GPU_CONFIG
    chunks = chunk_table(segments, chunk, device)
    if chunks.shape[0] == 0:
        return
    table = segment_table(hparams, device)
    pointers = pointer_table(segments, params, grads, lowps, device)
    one_minus_beta1, beta2_, one_minus_beta2, eps_ = host_scalars(beta1, beta2, eps)
    w = _f32(one_minus_beta1)
    quantized = moments in quant.BLOCK
    qt = quant.kernel_table(moments if quantized else "8bit", device)
    codes = code_tables(moments if quantized else "8bit", device)
    any_ = exp_avg  # a placeholder pointer for absent buffers (never dereferenced: constexpr flags)
    param_dtype = list_dtype(params)
    with launch_device(device):
        _adamw_lean_kernel[(chunks.shape[0],)](
            pointers, _bits16(exp_avg), _bits16(exp_avg_sq),
            _bits16(compensation) if compensation is not None else any_,
            exp_avg_scale if exp_avg_scale is not None else any_,
            exp_avg_sq_scale if exp_avg_sq_scale is not None else any_,
            qt, codes, grad_scale if grad_scale is not None else any_,
            grad_sumsq if grad_sumsq is not None else any_,
            chunks, table, int(seed), hparams.shape[1],
            int(w < 0.5), w, _f32(w - 1.0), beta2_, one_minus_beta2, eps_,
            MOM=quant.FORMAT_CODE[moments], MASTER=quant.MASTER_CODE[master_weights],
            PARAM_BF16=param_dtype == torch.bfloat16, GRAD_KIND=GRAD_KIND[grad_dtype],
            LOWP=LOWP_KIND[list_dtype(lowps)], HAS_SCALE=grad_scale is not None, HAS_SUMSQ=grad_sumsq is not None,
            SR=hparams.shape[1] >= 6,
            QB=quant.BLOCK.get(moments, 256), BITS=quant.BITS.get(moments, 8), TILE=tile,
            num_warps=num_warps, enable_fp_fusion=False,
        )
