"""Triton pieces of the lean kernel (triton_lean.py) that define formats rather than the update: the
nearest-code search (bucket tables built from quant.py's midpoints, the same buckets as csrc/adamw_math.h
CodeBuckets; the closed form of the 4-bit v map), code loads and stores in the tile layout, block scales and
absmax, and the bf16 bit patterns (stochastic rounding keyed like quant.sr_bits, round to nearest even).
tests/test_lean_kernels.py checks every piece against quant.py and csrc bit for bit.
"""
from __future__ import annotations

import functools

import torch

from . import quant
from . import _tables
from .triton_adamw import triton

if triton is not None:
    import triton.language as tl

    from .triton_adamw import _load, _store

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
    return _tables.to_device(_code_tables_cpu(fmt), torch.device(device))


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
