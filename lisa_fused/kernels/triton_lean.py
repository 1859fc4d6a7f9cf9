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
import functools

import torch

from . import quant
from ._tables import chunk_table, offsets_aligned, segment_table
from .contract import ALIGN, Segments, host_scalars
from .triton_adamw import _f32, _interpreted, triton, unavailable_reason

if triton is not None:
    import triton.language as tl

    from .triton_adamw import _load, _store, adamw_element

# (elements per chunk, TILE, num_warps): TILE = 8 x 32 x num_warps on a GPU (module docstring); the
# interpreter wants few, big programs (TILE any multiple of 256).
_GPU_CONFIG = (1 << 16, 1024, 4)
_INTERPRETER_CONFIG = (1 << 20, 1 << 14, 4)

# csrc/adamw_math.h CodeBuckets of each map: bucket = (bits(|x|) >> shift) - first, clamped to
# [0, count] ("count": beyond the bucket of 1.0, i.e. NaN); signed maps repeat the buckets for x < 0.
# The 4-bit v map (k / 16) needs no table (code_linear16).
BUCKETS = {("8bit", "exp_avg"): (17, 6729, 1400, True), ("8bit", "exp_avg_sq"): (16, 13358, 2899, False),
           ("4bit", "exp_avg"): (21, 473, 36, True)}
if triton is not None:  # the same numbers as constants of the jit code
    _M8 = tl.constexpr(BUCKETS[("8bit", "exp_avg")])
    _V8 = tl.constexpr(BUCKETS[("8bit", "exp_avg_sq")])
    _M4 = tl.constexpr(BUCKETS[("4bit", "exp_avg")])
    _M8_ENTRIES = tl.constexpr(2 * (BUCKETS[("8bit", "exp_avg")][2] + 1))  # where the 8-bit v table starts


def _bucket_table(fmt: str, which: str) -> torch.Tensor:
    """int64 [entries]: per bucket (csrc/adamw_math.h bucket_base) the code of its smallest value, `base`
    (0 for "beyond"), in the high 32 bits and the fp32 bits of midpoint[base] (+inf past the last) in the
    low 32: code(x) = base + (midpoint[base] < x) for every x in the bucket (at most one midpoint lies in
    a bucket; tests check it)."""
    shift, first, count, signed = BUCKETS[(fmt, which)]
    mid = quant.midpoints(quant.code_map(fmt, which))
    j = torch.arange(count + 1, dtype=torch.int64)
    pos = torch.where(j == 0, 0, (first + j) << shift).to(torch.int32).view(torch.float32)
    sides = [pos]
    if signed:  # x < 0: minus the bucket's largest magnitude
        sides.append(-((((first + j + 1) << shift) - 1).to(torch.int32).view(torch.float32)))
    lowest = torch.cat(sides)
    base = torch.searchsorted(mid, lowest, right=False)  # = nearest_code(lowest)
    base[j.repeat(len(sides)) == count] = 0
    thr = torch.cat([mid, torch.tensor([float("inf")])])[base]
    return (thr.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) | (base << 32)


@functools.cache
def _code_tables_cpu(fmt: str) -> torch.Tensor:
    """int64: the m map's bucket table, then the v map's (none for 4-bit v)."""
    return torch.cat([_bucket_table(fmt, w) for w in ("exp_avg", "exp_avg_sq") if (fmt, w) in BUCKETS])


def code_tables(fmt: str, device) -> torch.Tensor:
    """The bucket tables of format `fmt` ("8bit" / "4bit") on `device`, cached per device; never modify."""
    return _code_tables(fmt, str(torch.device(device)))


@functools.cache
def _code_tables(fmt: str, device: str) -> torch.Tensor:
    return _code_tables_cpu(fmt).to(device)


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
    def _load_half(ptr, offs, end, IS_BF16: tl.constexpr, MASKED: tl.constexpr):
        """A 16-bit float buffer (bf16 passed as int16 bits, or fp16) -> fp32."""
        if IS_BF16:
            return _bf16_from_bits(_load(ptr, offs, end, MASKED))
        return _load(ptr, offs, end, MASKED).to(tl.float32)

    @triton.jit
    def _runs(TILE: tl.constexpr):
        """uint32 [2, TILE / 8]: the offset in the tile of each run of 4 elements: thread t's two runs are
        8t..8t+3 and 8t+4..8t+7 (module docstring). Tiles start on a multiple of 256, so a run's word
        (4-bit) and block indices are the tile's (start // 4, start // QB) plus the run's own."""
        return (8 * tl.arange(0, TILE // 8)[None, :] + 4 * tl.arange(0, 2)[:, None]).to(tl.uint32)

    @triton.jit
    def _load_codes(ptr, start, end, TILE: tl.constexpr, MOM: tl.constexpr, MASKED: tl.constexpr):
        """The codes of the tile's elements as int32 [2, TILE / 8, 4]: a byte each (8-bit) or a nibble,
        element 2j in the low one of byte j (4-bit); unread ones 0. Full 4-bit tiles read one 16-bit word
        per run of 4, split into nibbles in element order, so the codes keep the tile's layout."""
        runs = _runs(TILE)
        if MOM == 2:
            return _load(ptr, start + (runs[:, :, None] + tl.arange(0, 4)[None, None, :]), end, MASKED).to(tl.int32)
        if MASKED:
            pairs = runs[:, :, None] + 2 * tl.arange(0, 2)[None, None, :]  # the even element of each byte
            byte = tl.load(ptr + (start // 2 + pairs // 2), mask=start + pairs < end, other=0).to(tl.int32)
            return tl.reshape(tl.join(byte & 0xF, byte >> 4), (2, TILE // 8, 4))
        w = tl.load(ptr.to(tl.pointer_type(tl.uint16)) + (start // 4 + runs // 4)).to(tl.int32)
        # join appends its axis last: [.., i, j] holds nibble 2i + j
        even = tl.join(w & 0xF, (w >> 8) & 0xF)
        odd = tl.join((w >> 4) & 0xF, (w >> 12) & 0xF)
        return tl.reshape(tl.join(even, odd), (2, TILE // 8, 4))

    @triton.jit
    def _store_codes(ptr, codes, offs, start, end, TILE: tl.constexpr, MOM: tl.constexpr, MASKED: tl.constexpr):
        if MOM == 2:
            _store(ptr, offs, codes.to(tl.uint8), end, MASKED)
            return
        runs = _runs(TILE)
        if MASKED:  # an odd tail's high nibble is 0: codes past `end` are zeroed
            lo, hi = tl.split(tl.reshape(tl.where(offs < end, codes, 0), (2, TILE // 8, 2, 2)))
            pairs = runs[:, :, None] + 2 * tl.arange(0, 2)[None, None, :]
            tl.store(ptr + (start // 2 + pairs // 2), (lo | (hi << 4)).to(tl.uint8), mask=start + pairs < end)
        else:  # the inverse of _load_codes: one 16-bit word per run of 4
            lo, hi = tl.split(tl.reshape(codes, (2, TILE // 8, 2, 2)))
            b0, b1 = tl.split(lo | (hi << 4))
            tl.store(ptr.to(tl.pointer_type(tl.uint16)) + (start // 4 + runs // 4), (b0 | (b1 << 8)).to(tl.uint16))

    @triton.jit
    def _block_scale(scale_ptr, start, end, TILE: tl.constexpr, QB: tl.constexpr, MASKED: tl.constexpr):
        """Each element's block scale, loaded once per run of 4 elements."""
        s = _load(scale_ptr, start // QB + _runs(TILE) // QB, (end + QB - 1) // QB, MASKED)
        return tl.broadcast_to(s[:, :, None], (2, TILE // 8, 4))

    @triton.jit
    def _block_absmax(x, TILE: tl.constexpr, QB: tl.constexpr):
        """max |x| over each element's quantization block, on every element: the tile as (2 runs, warps,
        blocks per warp, threads per block, 4); maxima within threads and lanes, no shared memory."""
        W: tl.constexpr = TILE // 256
        shape: tl.constexpr = (2, W, 256 // QB, QB // 8, 4)
        a = tl.max(tl.max(tl.max(tl.reshape(tl.abs(x), shape), axis=4), axis=3), axis=0)
        return tl.reshape(tl.broadcast_to(a[None, :, :, None, None], shape), (2, TILE // 8, 4))

    @triton.jit
    def _codes(x, absmax, table_ptr, SHIFT: tl.constexpr, FIRST: tl.constexpr, COUNT: tl.constexpr,
               SIGNED: tl.constexpr, LINEAR16: tl.constexpr):
        """csrc/adamw_math.h code_of(normalize(x, absmax)), elementwise (absmax: each element's block's)."""
        a = absmax
        xn = tl.where(a == 0.0, 0.0, tl.div_rn(x, tl.where(a == 0.0, 1.0, a)))
        if LINEAR16:  # code_linear16; NaN converts to 0 (PTX) or is clamped to 0 (the interpreter)
            c = tl.math.ceil(xn * 16.0 - 1.5).to(tl.int32)
            return tl.minimum(tl.maximum(c, 0), 15)
        u = xn.to(tl.uint32, bitcast=True)
        if SIGNED:
            j = ((u & 0x7FFFFFFF) >> SHIFT).to(tl.int32) - FIRST
        else:
            j = (u >> SHIFT).to(tl.int32) - FIRST
        j = tl.minimum(tl.maximum(j, 0), COUNT)
        if SIGNED:
            j += (u >> 31).to(tl.int32) * (COUNT + 1)
        e = tl.load(table_ptr + j)
        thr = (e & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        return (e >> 32).to(tl.int32) + (thr < xn).to(tl.int32)

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
