"""Backend "triton", lean state (kernels/contract.py): bf16 / 8-bit / 4-bit moments, Kahan or stochastic
bf16 updates, grad_sumsq. The fp32 default stays on triton_adamw.py's kernel.

One program per chunk of the chunk table walks it in TILE-element tiles (masked; TILE a multiple of
every quantization block, chunk starts on contract.ALIGN). A tile is held as its even and odd elements
(two [TILE / 2] vectors): 4-bit codes pair up as (even, odd) in one byte without a shuffle, and a
block's absmax is the max over its rows of both halves. The element math is triton_adamw.adamw_element
(one Triton definition, shared with the fp32 kernel); the code maps (quant.kernel_table), the
nearest-code binary search and the stochastic-rounding hash are csrc/adamw_math.h's, written in Triton;
tests/test_lean_kernels.py checks the codes and bits against the reference.
"""
from __future__ import annotations

import contextlib

import torch

from . import quant
from ._tables import chunk_table, segment_table
from .contract import Segments, host_scalars
from .triton_adamw import _f32, _interpreted, triton, unavailable_reason

if triton is not None:
    import triton.language as tl

    from .triton_adamw import adamw_element

# (elements per chunk, TILE, num_warps): GPU as the fp32 kernel's chunks; the interpreter wants few, big
# programs.
_GPU_CONFIG = (1 << 16, 1024, 4)
_INTERPRETER_CONFIG = (1 << 20, 1 << 14, 4)


if triton is not None:

    @triton.jit
    def _mix32(x):
        """csrc/adamw_math.h mix32 on uint32 values."""
        x = x ^ (x >> 16)
        x = x * 0x21F0AAAD
        x = x ^ (x >> 15)
        x = x * 0xD35A2D97
        return x ^ (x >> 15)

    @triton.jit
    def _key(seed, pid, step, lane):
        k = _mix32(seed ^ 0x9E3779B9)
        k = _mix32(k ^ pid)
        k = _mix32(k ^ step)
        return _mix32(k + lane)

    @triton.jit
    def _sr_bf16_bits(x, key, idx):
        """fp32 -> bf16 bit pattern (as int16) with stochastic rounding keyed on (key, idx)."""
        r = _mix32(key + idx * 0x9E3779B9)
        u = x.to(tl.uint32, bitcast=True)
        out = (u + (r >> 16)) >> 16
        out = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, out)
        return out.to(tl.int32).to(tl.int16)

    @triton.jit
    def _rne_bf16_bits(x):
        u = x.to(tl.uint32, bitcast=True)
        out = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        out = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, out)
        return out.to(tl.int32).to(tl.int16)

    @triton.jit
    def _bf16_from_bits(b):
        return (b.to(tl.int32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_half(ptr, offs, mask, IS_BF16: tl.constexpr):
        """A 16-bit float buffer (bf16 passed as int16 bits, or fp16) -> fp32."""
        if IS_BF16:
            return _bf16_from_bits(tl.load(ptr + offs, mask=mask, other=0))
        return tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)

    @triton.jit
    def _load_moment(ptr, scale_ptr, qt_ptr, offs, mask, MOM: tl.constexpr, QB: tl.constexpr):
        if MOM == 0:
            return tl.load(ptr + offs, mask=mask, other=0.0)
        if MOM == 1:
            return _bf16_from_bits(tl.load(ptr + offs, mask=mask, other=0))
        if MOM == 2:
            code = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        else:
            byte = tl.load(ptr + offs // 2, mask=mask, other=0).to(tl.int32)
            code = (byte >> ((offs & 1) * 4).to(tl.int32)) & 0xF
        return tl.load(qt_ptr + code) * tl.load(scale_ptr + offs // QB, mask=mask, other=0.0)

    @triton.jit
    def _codes(x, absmax, mid_ptr, BITS: tl.constexpr):
        """Nearest-code binary search over the fp32 midpoints (csrc nearest_code), x: [R, C], absmax: [R]."""
        a = absmax[:, None]
        xn = tl.where(a == 0.0, 0.0, tl.div_rn(x, tl.where(a == 0.0, 1.0, a)))
        pos = tl.zeros(x.shape, dtype=tl.int32)
        for k in tl.static_range(BITS):
            step = 1 << (BITS - 1 - k)
            mid = tl.load(mid_ptr + pos + (step - 1))
            pos += tl.where(mid < xn, step, 0)
        return pos

    @triton.jit
    def _half(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, gscale_ptr, offs, end,
              seg_off, key_p, key_m, key_v, step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1,
              beta2, one_minus_beta2, eps,
              MOM: tl.constexpr, MASTER: tl.constexpr, PARAM_BF16: tl.constexpr, GRAD_KIND: tl.constexpr,
              LOWP: tl.constexpr, HAS_SCALE: tl.constexpr, QB: tl.constexpr):
        """Load, update and store everything but the quantized moments of the elements `offs`; returns the
        new (m, v), g and the mask (quantized moments need the whole tile's absmax first)."""
        mask = offs < end
        if GRAD_KIND == 0:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        else:
            g = _load_half(g_ptr, offs, mask, GRAD_KIND == 1)
        if HAS_SCALE:
            g = tl.div_rn(g, tl.load(gscale_ptr))
        if MASTER == 0:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        else:
            p = _load_half(p_ptr, offs, mask, PARAM_BF16)
            if MASTER == 1:
                p = p + _load_half(comp_ptr, offs, mask, PARAM_BF16)
        m = _load_moment(m_ptr, ms_ptr, qt_ptr, offs, mask, MOM, QB)
        v = _load_moment(v_ptr, vs_ptr, qt_ptr + 512, offs, mask, MOM, QB)
        p, m, v = adamw_element(p, m, v, g, step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1, beta2,
                           one_minus_beta2, eps)
        idx = (offs - seg_off).to(tl.uint32)
        if MOM == 0:
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
        if MOM == 1:
            tl.store(m_ptr + offs, _sr_bf16_bits(m, key_m, idx), mask=mask)
            tl.store(v_ptr + offs, _sr_bf16_bits(v, key_v, idx), mask=mask)
        if MASTER == 0:
            tl.store(p_ptr + offs, p, mask=mask)
            if LOWP == 1:
                tl.store(low_ptr + offs, _rne_bf16_bits(p), mask=mask)
            if LOWP == 2:
                tl.store(low_ptr + offs, p.to(tl.float16), mask=mask)
        if MASTER == 1:
            if PARAM_BF16:
                hi = _rne_bf16_bits(p)
                tl.store(p_ptr + offs, hi, mask=mask)
                tl.store(comp_ptr + offs, _rne_bf16_bits(p - _bf16_from_bits(hi)), mask=mask)
            else:
                hi = p.to(tl.float16)
                tl.store(p_ptr + offs, hi, mask=mask)
                tl.store(comp_ptr + offs, (p - hi.to(tl.float32)).to(tl.float16), mask=mask)
        if MASTER == 2:
            tl.store(p_ptr + offs, _sr_bf16_bits(p, key_p, idx), mask=mask)
        return m, v, g, mask

    @triton.jit(do_not_specialize=["seed", "n_cols"])
    def _adamw_lean_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, gscale_ptr, sumsq_ptr,
        chunks_ptr, table_ptr, bounds_ptr, seed, n_cols,
        lerp_small, lerp_w, lerp_w_minus_1, beta2, one_minus_beta2, eps,
        MOM: tl.constexpr, MASTER: tl.constexpr, PARAM_BF16: tl.constexpr, GRAD_KIND: tl.constexpr,
        LOWP: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SUMSQ: tl.constexpr, SR: tl.constexpr,
        QB: tl.constexpr, BITS: tl.constexpr, TILE: tl.constexpr,
    ):
        c = tl.program_id(0).to(tl.int64)
        seg = tl.load(chunks_ptr + 3 * c)
        begin = tl.load(chunks_ptr + 3 * c + 1)
        end = tl.load(chunks_ptr + 3 * c + 2)
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
        if enabled != 0.0:
            sumsq = 0.0
            start = begin
            while start < end:
                half = start + 2 * tl.arange(0, TILE // 2).to(tl.int64)
                me, ve, ge, mask_e = _half(
                    p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, gscale_ptr, half, end,
                    seg_off, key_p, key_m, key_v, step_size, decay, bc2_sqrt, lerp_small, lerp_w, lerp_w_minus_1,
                    beta2, one_minus_beta2, eps, MOM, MASTER, PARAM_BF16, GRAD_KIND, LOWP, HAS_SCALE, QB)
                mo, vo, go, mask_o = _half(
                    p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, comp_ptr, ms_ptr, vs_ptr, qt_ptr, gscale_ptr, half + 1,
                    end, seg_off, key_p, key_m, key_v, step_size, decay, bc2_sqrt, lerp_small, lerp_w,
                    lerp_w_minus_1, beta2, one_minus_beta2, eps, MOM, MASTER, PARAM_BF16, GRAD_KIND, LOWP,
                    HAS_SCALE, QB)
                if HAS_SUMSQ:
                    sumsq += tl.sum(ge * ge) + tl.sum(go * go)
                if MOM >= 2:
                    R: tl.constexpr = TILE // QB
                    me2 = tl.reshape(tl.where(mask_e, me, 0.0), (R, QB // 2))
                    mo2 = tl.reshape(tl.where(mask_o, mo, 0.0), (R, QB // 2))
                    ve2 = tl.reshape(tl.where(mask_e, ve, 0.0), (R, QB // 2))
                    vo2 = tl.reshape(tl.where(mask_o, vo, 0.0), (R, QB // 2))
                    am = tl.maximum(tl.max(tl.abs(me2), axis=1), tl.max(tl.abs(mo2), axis=1))
                    av = tl.maximum(tl.max(tl.abs(ve2), axis=1), tl.max(tl.abs(vo2), axis=1))
                    rows = start + QB * tl.arange(0, R).to(tl.int64)
                    tl.store(ms_ptr + rows // QB, am, mask=rows < end)
                    tl.store(vs_ptr + rows // QB, av, mask=rows < end)
                    cme = tl.reshape(_codes(me2, am, qt_ptr + 256, BITS), (TILE // 2,))
                    cmo = tl.reshape(_codes(mo2, am, qt_ptr + 256, BITS), (TILE // 2,))
                    cve = tl.reshape(_codes(ve2, av, qt_ptr + 768, BITS), (TILE // 2,))
                    cvo = tl.reshape(_codes(vo2, av, qt_ptr + 768, BITS), (TILE // 2,))
                    if MOM == 2:
                        tl.store(m_ptr + half, cme.to(tl.uint8), mask=mask_e)
                        tl.store(m_ptr + half + 1, cmo.to(tl.uint8), mask=mask_o)
                        tl.store(v_ptr + half, cve.to(tl.uint8), mask=mask_e)
                        tl.store(v_ptr + half + 1, cvo.to(tl.uint8), mask=mask_o)
                    else:  # even element low nibble, odd high; an odd tail's high nibble is 0
                        cmo = tl.where(mask_o, cmo, 0)
                        cvo = tl.where(mask_o, cvo, 0)
                        tl.store(m_ptr + half // 2, (cme | (cmo << 4)).to(tl.uint8), mask=mask_e)
                        tl.store(v_ptr + half // 2, (cve | (cvo << 4)).to(tl.uint8), mask=mask_e)
                start += TILE
            if HAS_SUMSQ:
                tl.atomic_add(sumsq_ptr + seg, sumsq)


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
    any_ = param  # a placeholder pointer for absent buffers (never dereferenced: constexpr flags)
    on_device = torch.cuda.device(param.device) if param.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _adamw_lean_kernel[(chunks.shape[0],)](
            _bits16(param), _bits16(grad), _bits16(exp_avg), _bits16(exp_avg_sq),
            _bits16(param_lowp) if param_lowp is not None else any_,
            _bits16(compensation) if compensation is not None else any_,
            exp_avg_scale if exp_avg_scale is not None else any_,
            exp_avg_sq_scale if exp_avg_sq_scale is not None else any_,
            qt, grad_scale if grad_scale is not None else any_,
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
            num_warps=num_warps, enable_fp_fusion=False,
        )
