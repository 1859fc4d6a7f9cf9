"""Lean optimizer-state formats: the one table of code maps, the stochastic-rounding hash, and the
pure-torch (de)quantizers that every backend must reproduce bit for bit.

Block-wise quantization (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
arXiv 2110.02861; Li et al. 2023, "Memory Efficient Optimizers with 4-bit States", arXiv 2309.01507):
a block of BLOCK consecutive elements of one segment shares one fp32 scale = max |x| over the block's
elements; each element stores the index (code) of the map value nearest to x / scale.

    format  block  exp_avg (m) map                        exp_avg_sq (v) map
    "8bit"  256    signed dynamic, 256 values (bnb)         unsigned dynamic, 256 values (bnb "udynamic")
    "4bit"  128    signed dynamic, 3 exponent bits, 16 v.   linear without zero: k/16, k = 1..16 (lpmm)

- Block 256 for 8-bit as bitsandbytes >= 0.44 (bnb#1365) and torchao (ao#927); 128 for 4-bit as the
  4-bit paper and torchao's AdamW4bit. The dynamic map is bnb's `create_dynamic_map` construction
  (rebuilt here, no padding: torchao's variant), sorted ascending; the 4-bit v map has no zero because a
  v quantized to 0 makes 1/sqrt(v) explode (Li et al. 2023, sec. 4.1). lpmm's rank-1 normalization of v
  is not used (torchao does not either): one absmax per block for both moments.
- Codes are indices into the *sorted* map (not bnb's code numbering). 8-bit: one uint8 per element.
  4-bit: two per byte, element 2j in the low nibble of byte j, element 2j+1 in the high nibble.
- Nearest value: code = number of midpoints < x / scale, where MIDPOINTS[k] = fp32((map[k]+map[k+1])/2);
  a value exactly on a midpoint takes the lower code. Native kernels count the same fp32
  midpoints (branchless binary search; the CPU's 4-bit loop compares all 15), so codes agree bit for bit. x / scale is an IEEE fp32 division;
  a block whose absmax is 0 stores scale 0 and code(0.0).
- Scales: one fp32 per block of the packed buffer, index = element offset // BLOCK. Segments start on
  contract.ALIGN (a multiple of every BLOCK), so no block holds two segments; the padding after a
  segment's last element is never read or written.

Stochastic rounding (SR) to bf16 keeps small updates alive in expectation (Zamirai et al. 2020,
arXiv 2010.06192): add 16 random bits to the low half of the fp32 pattern, then truncate. The bits come
from a counter-based hash of (seed, param id, step, element index within the param, lane), so every
backend and a resumed run draw the same bits with no RNG state; `sr_bits` is the definition, mirrored
in csrc/adamw_math.h (sr_bits) and kernels/triton_lean.py (_sr_bf16_bits).
"""
from __future__ import annotations

import functools

import torch

from . import _tables
from .contract import BLOCK, FORMATS, MASTER_WEIGHTS, codes_numel, n_blocks  # noqa: F401  (defined there)

BITS = {"8bit": 8, "4bit": 4}
# Format codes shared with csrc/adamw_math.h (MomentFormat / MasterMode).
FORMAT_CODE = {"fp32": 0, "bf16": 1, "8bit": 2, "4bit": 3}
MASTER_CODE = {"fp32": 0, "kahan": 1, "stochastic": 2}
# SR lanes: one independent bit stream per stored quantity.
LANE_PARAM, LANE_EXP_AVG, LANE_EXP_AVG_SQ = 0, 1, 2
# The CUDA/Triton segment table is fp32: param ids and steps must be integers below this.
MAX_TABLE_INT = 1 << 24


def _dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> list[float]:
    """bnb's dynamic map (Dettmers 2016, arXiv 1511.04561): per decade 10^(e - E + 1), e = 0..E-1, the
    midpoints of a linspace(0.1, 1) grid whose size doubles per decade, plus 0 and 1."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        b = torch.linspace(0.1, 1, n)
        means = (b[:-1] + b[1:]) / 2.0  # fp32 arithmetic, as bnb and torchao build it
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if extra > 0:
        b = torch.linspace(0.1, 1, extra + 1)
        means = (b[:-1] + b[1:]) / 2.0  # fp32 arithmetic, as bnb and torchao build it
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise AssertionError(f"dynamic map has {len(data)} values, expected {2 ** total_bits}")
    return sorted(data)


@functools.cache
def _maps() -> dict[tuple[str, str], torch.Tensor]:
    maps = {
        ("8bit", "exp_avg"): _dynamic_map(True, 7, 8),
        ("8bit", "exp_avg_sq"): _dynamic_map(False, 7, 8),
        ("4bit", "exp_avg"): _dynamic_map(True, 3, 4),
        ("4bit", "exp_avg_sq"): torch.linspace(0, 1, 17)[1:].tolist(),
    }
    out = {}
    for key, values in maps.items():
        t = torch.tensor(values, dtype=torch.float32)
        if not bool((t[1:] > t[:-1]).all()):
            raise AssertionError(f"code map {key} is not strictly increasing")
        out[key] = t
    return out


def code_map(fmt: str, which: str) -> torch.Tensor:
    """fp32 [2**bits] map values, ascending, for `fmt` in ("8bit", "4bit") and `which` in
    ("exp_avg", "exp_avg_sq"). A copy: the shared table itself is never handed out."""
    return _maps()[(fmt, which)].clone()


def midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """fp32 [K-1] decision thresholds (map[k] + map[k+1]) / 2, rounded once to fp32."""
    return ((qmap[:-1].double() + qmap[1:].double()) / 2).float()


@functools.cache
def _tables_cpu(fmt: str) -> torch.Tensor:
    """fp32 [4, 256]: rows m-map, m-midpoints, v-map, v-midpoints; unused tail entries are +inf (a
    midpoint never below any value, so the binary search can read 256 entries for either format)."""
    t = torch.full((4, 256), float("inf"), dtype=torch.float32)
    for r, which in ((0, "exp_avg"), (2, "exp_avg_sq")):
        q = _maps()[(fmt, which)]
        t[r, : q.numel()] = q
        t[r + 1, : q.numel() - 1] = midpoints(q)
    return t


def kernel_table(fmt: str, device) -> torch.Tensor:
    """The [4, 256] fp32 map/midpoint table of `fmt` on `device` (cached per device): the one table the
    C++, CUDA and Triton kernels read. Never modify it."""
    return _kernel_table(fmt, str(torch.device(device)))


@functools.cache
def _kernel_table(fmt: str, device: str) -> torch.Tensor:
    return _tables.to_device(_tables_cpu(fmt), torch.device(device))


@functools.cache
def _map_on(fmt: str, which: str, device: str) -> torch.Tensor:
    """The map of (fmt, which) on `device`, cached: quantize / dequantize copy it there once, not per call."""
    return _tables.to_device(_maps()[(fmt, which)], torch.device(device))


def state_buffers(numel: int, moments: str, master_weights: str, param_dtype: torch.dtype,
                  device) -> dict[str, torch.Tensor]:
    """Zeroed state buffers of one packed buffer of `numel` elements, keyed by the names adamw_packed_
    takes: exp_avg, exp_avg_sq (fp32 / bf16 [numel], or uint8 codes), exp_avg_scale and exp_avg_sq_scale
    (fp32 [n_blocks], quantized formats only), compensation (param_dtype [numel], "kahan" only). Zero
    codes with zero scales decode to 0 in every map. The param itself (fp32 master, or the model's
    bf16/fp16 storage) is the caller's."""
    if moments not in FORMATS:
        raise ValueError(f"Invalid moments format {moments!r}; choose one of {FORMATS}")
    if master_weights not in MASTER_WEIGHTS:
        raise ValueError(f"Invalid master_weights {master_weights!r}; choose one of {MASTER_WEIGHTS}")
    out = {}
    if moments in BLOCK:
        for name in ("exp_avg", "exp_avg_sq"):
            out[name] = torch.zeros(codes_numel(numel, moments), dtype=torch.uint8, device=device)
            out[name + "_scale"] = torch.zeros(n_blocks(numel, moments), dtype=torch.float32, device=device)
    else:
        dtype = torch.float32 if moments == "fp32" else torch.bfloat16
        out["exp_avg"] = torch.zeros(numel, dtype=dtype, device=device)
        out["exp_avg_sq"] = torch.zeros(numel, dtype=dtype, device=device)
    if master_weights == "kahan":
        out["compensation"] = torch.zeros(numel, dtype=param_dtype, device=device)
    return out


def state_bytes(numel: int, moments: str, master_weights: str, param_dtype: torch.dtype) -> dict[str, int]:
    """Bytes of state_buffers(...) by kind: {"moments", "scales", "compensation"} (no allocation)."""
    elt = torch.empty(0, dtype=param_dtype).element_size()
    if moments in BLOCK:
        mom, scales = 2 * codes_numel(numel, moments), 2 * 4 * n_blocks(numel, moments)
    else:
        mom, scales = 2 * numel * (4 if moments == "fp32" else 2), 0
    return {"moments": mom, "scales": scales, "compensation": numel * elt if master_weights == "kahan" else 0}


def quantize(x: torch.Tensor, fmt: str, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 x (1-D, numel a multiple of BLOCK[fmt]) -> (codes uint8 [numel] or [numel/2],
    scales fp32 [numel / BLOCK]). Every native kernel produces exactly these bits."""
    blk = BLOCK[fmt]
    xb = x.float().reshape(-1, blk)
    scale = xb.abs().amax(dim=1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    xn = torch.where(scale[:, None] == 0, torch.zeros_like(xb), xb / safe[:, None])
    q = _map_on(fmt, which, str(x.device))
    codes = torch.searchsorted(midpoints(q), xn.reshape(-1).contiguous(), right=False).to(torch.uint8)
    return pack(codes, fmt), scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: str, which: str, numel: int) -> torch.Tensor:
    """fp32 [numel] values map[code] * scale[block] of the first `numel` elements."""
    q = _map_on(fmt, which, str(codes.device))
    c = unpack(codes, fmt)[:numel].long()
    blk = torch.arange(numel, device=codes.device) // BLOCK[fmt]
    return q[c] * scales[blk]


def pack(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """uint8 codes one per element -> storage (4-bit: element 2j low nibble, 2j+1 high nibble of byte j)."""
    if fmt == "8bit":
        return codes
    c = codes
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    c = c.reshape(-1, 2)
    return (c[:, 0] | (c[:, 1] << 4)).contiguous()


def unpack(stored: torch.Tensor, fmt: str) -> torch.Tensor:
    """Storage -> uint8 codes, one per element (4-bit: 2 * stored.numel() codes)."""
    if fmt == "8bit":
        return stored
    return torch.stack([stored & 0xF, stored >> 4], dim=1).reshape(-1)


# ------------------------------------------------------------------------------ stochastic rounding
_M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX_C1, MIX_C2 = 0x21F0AAAD, 0xD35A2D97  # hash-prospector's low-bias 32-bit finalizer constants


def _mul32(x, c: int):
    """(x * c) mod 2**32 for int64 tensors/ints holding uint32 values, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & _M32


def mix32(x):
    """Bijective 32-bit integer finalizer (x ^= x>>16; x *= C1; x ^= x>>15; x *= C2; x ^= x>>15), on
    int64 tensors or Python ints holding uint32 values. csrc/adamw_math.h `mix32` is the same function."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_C2)
    return x ^ (x >> 15)


def segment_key(seed: int, param_id: int, step: int, lane: int) -> int:
    """Per (segment, step, lane) key: mix32(mix32(mix32(mix32(seed ^ GOLDEN) ^ param_id) ^ step) + lane)."""
    k = mix32((seed & _M32) ^ GOLDEN)
    k = mix32(k ^ param_id)
    k = mix32(k ^ step)
    return mix32((k + lane) & _M32)


def sr_bits(seed: int, param_id: int, step: int, index: torch.Tensor, lane: int) -> torch.Tensor:
    """int64 [n] uint32 random words for element indices `index` (int64, within the param, < 2**32):
    mix32(key + index * GOLDEN mod 2**32). SR uses the top 16 bits."""
    key = segment_key(seed, param_id, step, lane)
    return mix32((key + _mul32(index, GOLDEN)) & _M32)


def round_bf16_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """fp32 x -> bf16 with stochastic rounding: (bits(x) + (r >> 16)) with the low 16 bits dropped; the
    magnitude rounds away from zero with probability (low 16 bits of x) / 2**16. NaN -> bf16 NaN;
    a value within one bf16 ulp of the largest finite may round to inf."""
    u = x.float().view(torch.int32).long() & _M32
    r = (u + (bits >> 16)) >> 16
    r = torch.where(torch.isnan(x), torch.full_like(r, 0x7FC0), r & 0xFFFF)
    return bf16_from_bits(r)


def bf16_from_bits(r: torch.Tensor) -> torch.Tensor:
    """int64 tensor of uint16 bit patterns -> bf16 tensor with those bits."""
    return torch.where(r >= 0x8000, r - 0x10000, r).to(torch.int16).view(torch.bfloat16)
