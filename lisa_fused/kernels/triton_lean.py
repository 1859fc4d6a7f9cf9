"""Backend "triton", lean state (kernels/contract.py): bf16 / 8-bit / 4-bit moments, Kahan or stochastic
bf16 updates, grad_sumsq. The fp32 default stays on triton_adamw.py's kernel.

One program per chunk of the chunk table walks it in tiles of TILE = 8 x 32 x num_warps elements, held
as [2, TILE / 8, 4]: thread t owns elements 8t..8t+7 as two runs of 4. Runs of 4, never more, are
contiguous in tensor order, so every stream, whatever its width, gets the same layout (fp32 as 128-bit
accesses, 16-bit as 64-bit, 8-bit codes as 32-bit, 4-bit as one 16-bit word per run) and nothing goes
through shared memory; a warp holds one 8-bit quantization block, half a warp a 4-bit one, so a block's
absmax is a max within threads and lanes. Full tiles run unmasked when offsets and pointers are aligned
(chunk starts are multiples of contract.ALIGN), the rest masked. The element math is
triton_adamw.adamw_element (one Triton definition, shared with the fp32 kernel); the stochastic-rounding
hash is csrc/adamw_math.h's. Codes as csrc/adamw_math.h code_of: one gather from a bucket table
(code_tables) and one comparison, or the closed form of the 4-bit v map; equal to the binary search over
the midpoints (tests/test_lean_kernels.py).
"""
from __future__ import annotations

import contextlib

import torch

from . import quant
from ._tables import chunk_table, offsets_aligned, segment_table
from .contract import ALIGN, Segments, host_scalars
from .triton_adamw import _f32, _interpreted, triton, unavailable_reason
from .triton_codes import BUCKETS, _bucket_table, code_tables  # noqa: F401  (tests read them from here)

if triton is not None:
    import triton.language as tl

    from .triton_adamw import _load, _store, adamw_element
    from .triton_codes import (_M4, _M8, _M8_ENTRIES, _V8, _bf16_from_bits, _block_absmax, _block_scale, _codes,
                               _key, _load_codes, _load_half, _rne_bf16_bits, _runs, _sr_bf16_bits, _store_codes)

# (elements per chunk, TILE, num_warps): TILE = 8 x 32 x num_warps on a GPU (module docstring); the
# interpreter wants few, big programs (TILE any multiple of 256).
_GPU_CONFIG = (1 << 16, 1024, 4)
_INTERPRETER_CONFIG = (1 << 20, 1 << 14, 4)

if triton is not None:

    @triton.jit
    def _tile(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, codes_ptr, start, end, scale,
              seg_off, key_p, key_m, key_v, step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1,
              beta2, one_minus_beta2, eps,
              MOM: tl.constexpr, MASTER: tl.constexpr, PARAM_BF16: tl.constexpr, GRAD_KIND: tl.constexpr,
              LOWP: tl.constexpr, HAS_SCALE: tl.constexpr, QB: tl.constexpr, BITS: tl.constexpr,
              TILE: tl.constexpr, MASKED: tl.constexpr):
        """The tile's elements (MASKED: those < end): load, update, store; returns g * g per element (0 where
        masked), which the kernel sums once per chunk."""
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
        idx = (start - seg_off).to(tl.uint32) + local  # within the segment (< 2^32)
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
        p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, codes_ptr, gscale_ptr, sumsq_ptr,
        chunks_ptr, table_ptr, bounds_ptr, seed, n_cols,
        lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
        MOM: tl.constexpr, MASTER: tl.constexpr, PARAM_BF16: tl.constexpr, GRAD_KIND: tl.constexpr,
        LOWP: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SUMSQ: tl.constexpr, SR: tl.constexpr,
        QB: tl.constexpr, BITS: tl.constexpr, TILE: tl.constexpr, ALIGNMENT: tl.constexpr = 1,
    ):
        c = tl.program_id(0).to(tl.int64)
        seg = tl.load(chunks_ptr + 3 * c)
        begin = tl.load(chunks_ptr + 3 * c + 1)
        end = tl.load(chunks_ptr + 3 * c + 2)
        if ALIGNMENT > 1:
            begin = tl.multiple_of(begin, ALIGNMENT)  # chunk starts on a segment-offset boundary
        row = table_ptr + n_cols * seg
        step_size = tl.load(row)
        decay = tl.load(row + 1)
        bc2_sqrt = tl.load(row + 2)
        enabled = tl.load(row + 3)
        seg_off = tl.load(bounds_ptr + 2 * seg)
        seed_u = seed.to(tl.uint32)
        pid = seed_u * 0
        stp = seed_u * 0
        if SR:
            pid = tl.load(row + 4).to(tl.uint32)
            stp = tl.load(row + 5).to(tl.uint32)
        key_p = _key(seed_u, pid, stp, 0)
        key_m = _key(seed_u, pid, stp, 1)
        key_v = _key(seed_u, pid, stp, 2)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(gscale_ptr)
        if enabled != 0.0:
            # Full tiles unmasked where offsets and pointers are aligned (ALIGNMENT > 1), `start` recomputed
            # from `begin` so that its divisibility stays known (as in triton_adamw.py); masked tiles for
            # the rest (a chunk's last tile, or every tile of an unaligned call).
            sumsq = tl.zeros((2, TILE // 8, 4), dtype=tl.float32)  # per element, summed once at the end
            i = 0
            if ALIGNMENT > 1:
                while begin + (i + 1) * TILE <= end:
                    sumsq += _tile(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, codes_ptr,
                                   begin + i * TILE, end, scale, seg_off, key_p, key_m, key_v, step_size, decay, bc2_sqrt,
                                   lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps, MOM, MASTER,
                                   PARAM_BF16, GRAD_KIND, LOWP, HAS_SCALE, QB, BITS, TILE, False)
                    i += 1
            start = begin + i * TILE
            if ALIGNMENT > 1:  # at most one partial tile is left
                if start < end:
                    sumsq += _tile(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, codes_ptr,
                                   start, end, scale, seg_off, key_p, key_m, key_v, step_size, decay, bc2_sqrt,
                                   lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps, MOM, MASTER,
                                   PARAM_BF16, GRAD_KIND, LOWP, HAS_SCALE, QB, BITS, TILE, True)
            else:
                while start < end:
                    sumsq += _tile(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, codes_ptr,
                                   start, end, scale, seg_off, key_p, key_m, key_v, step_size, decay, bc2_sqrt,
                                   lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps, MOM, MASTER,
                                   PARAM_BF16, GRAD_KIND, LOWP, HAS_SCALE, QB, BITS, TILE, True)
                    start += TILE
            if HAS_SUMSQ:
                tl.atomic_add(sumsq_ptr + seg, tl.sum(sumsq))


def _bits16(t):
    """bf16 buffers travel as int16 bit patterns (exact conversions in the interpreter too)."""
    return None if t is None else (t.view(torch.int16) if t.dtype == torch.bfloat16 else t)


def adamw_lean_triton_(
    param, grad, exp_avg, exp_avg_sq, segments: Segments, hparams, *, beta1, beta2, eps, param_lowp=None,
    grad_scale=None, moments="fp32", master_weights="fp32", exp_avg_scale=None, exp_avg_sq_scale=None,
    compensation=None, seed=0, grad_sumsq=None,
) -> None:
    """The lean-state Triton kernel, one launch; same contract as adamw_packed_reference_."""
    reason = unavailable_reason(param.device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' is not available: {reason}")
    chunk, tile, num_warps = _INTERPRETER_CONFIG if _interpreted() else _GPU_CONFIG
    chunks = chunk_table(segments, chunk, param.device)
    if chunks.shape[0] == 0:
        return
    table = segment_table(hparams, param.device)
    key = ("bounds", str(param.device))
    if key not in segments.cache:
        segments.cache[key] = segments.tensor().to(param.device)
    one_minus_beta1, beta2_, one_minus_beta2, eps_ = host_scalars(beta1, beta2, eps)
    w = _f32(one_minus_beta1)
    quantized = moments in quant.BLOCK
    qt = quant.kernel_table(moments if quantized else "8bit", param.device)
    codes = code_tables(moments if quantized else "8bit", param.device)
    any_ = param  # a placeholder pointer for absent buffers (never dereferenced: constexpr flags)
    streams = (param, grad, exp_avg, exp_avg_sq, param_lowp, compensation)
    aligned = offsets_aligned(segments) and all(t.data_ptr() % 16 == 0 for t in streams if t is not None)
    on_device = torch.cuda.device(param.device) if param.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _adamw_lean_kernel[(chunks.shape[0],)](
            _bits16(param), _bits16(grad), _bits16(exp_avg), _bits16(exp_avg_sq),
            _bits16(param_lowp) if param_lowp is not None else any_,
            _bits16(compensation) if compensation is not None else any_,
            exp_avg_scale if exp_avg_scale is not None else any_,
            exp_avg_sq_scale if exp_avg_sq_scale is not None else any_,
            qt, codes, grad_scale if grad_scale is not None else any_,
            grad_sumsq if grad_sumsq is not None else any_,
            chunks, table, segments.cache[key], int(seed), hparams.shape[1],
            int(w < 0.5), w, _f32(w - 1.0), beta2_, one_minus_beta2, eps_,
            MOM=quant.FORMAT_CODE[moments], MASTER=quant.MASTER_CODE[master_weights],
            PARAM_BF16=param.dtype == torch.bfloat16,
            GRAD_KIND={torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[grad.dtype],
            LOWP=0 if param_lowp is None else (1 if param_lowp.dtype == torch.bfloat16 else 2),
            HAS_SCALE=grad_scale is not None, HAS_SUMSQ=grad_sumsq is not None,
            SR=hparams.shape[1] >= 6,
            QB=quant.BLOCK.get(moments, 256), BITS=quant.BITS.get(moments, 8), TILE=tile,
            ALIGNMENT=ALIGN if aligned else 1,
            num_warps=num_warps, enable_fp_fusion=False,
        )
