// The per-element AdamW update, written once for the host (g++) and the device (nvcc).
//
// Same operations, in the same order and with the same roundings, as torch.optim.AdamW's single-tensor
// path and kernels/reference.py (see madd below for the fused multiply-adds):
//   p = p * decay;  m = lerp(m, g, 1 - beta1);  v = v * beta2 + (1 - beta2) * g * g;
//   p = p + (-step_size * m) / (sqrt(v) / bc2_sqrt + eps)
// Storage dtypes are converted to fp32 on load and rounded to nearest even on store.
// No torch headers: the kernels see raw pointers only.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LF_HD __host__ __device__ __forceinline__
#else
#define LF_HD inline __attribute__((always_inline))
#endif

namespace lisa_fused {

// dtype codes shared with the Python wrapper (kernels/native.py).
enum DType : int { kNone = -1, kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Columns of the per-segment table, as in kernels/contract.py. Tables have kNumCols or kNumColsLean
// columns (the row stride is passed with the table).
enum Col : int { kStepSize = 0, kDecay = 1, kBc2Sqrt = 2, kEnabled = 3, kParamId = 4, kStep = 5 };
constexpr int kNumCols = 4;
constexpr int kNumColsLean = 6;
// Columns of the int64 segment (pointer) table, as kernels/contract.py SEG_*: the segment's offset into
// the packed state, its numel, and the addresses of its own param, grad and low-precision copy (0: none).
enum SegCol : int { kSegOffset = 0, kSegNumel = 1, kSegParam = 2, kSegGrad = 3, kSegLowp = 4 };
constexpr int kNumSegCols = 5;

// Lean-state modes, codes shared with kernels/quant.py (FORMAT_CODE, MASTER_CODE).
enum MomentFormat : int { kMomFp32 = 0, kMomBf16 = 1, kMom8bit = 2, kMom4bit = 3 };
enum MasterMode : int { kMasterFp32 = 0, kMasterKahan = 1, kMasterStochastic = 2 };
// Stochastic-rounding lanes (quant.LANE_*): one bit stream per stored quantity.
enum SrLane : uint32_t { kLaneParam = 0, kLaneExpAvg = 1, kLaneExpAvgSq = 2 };

// Launch-wide scalars, computed on the host in double and rounded once to fp32.
struct Hyper {
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
};

// Per-segment scalars, one row of the table.
struct SegScalars {
  float step_size;
  float decay;
  float bc2_sqrt;
};

LF_HD uint32_t f32_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
#endif
}

LF_HD float f32_from_bits(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// bf16 <-> fp32 on raw bits. fp32 -> bf16 rounds to nearest even and keeps NaN a (quiet) NaN,
// bit for bit what torch's `.to(torch.bfloat16)` produces.
LF_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

LF_HD uint16_t f32_to_bf16(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // the hardware conversion (cvt.rn.bf16.f32: IEEE round to nearest even, subnormals kept), NaN as below
  return x != x ? static_cast<uint16_t>(0x7fc0u) : __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
  const uint32_t u = f32_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
#endif
}

// fp16 <-> fp32. On the device the hardware conversions (round to nearest even); on the host the same
// rounding on the bits, written with selects only so that the CPU loops still vectorize.
LF_HD float f16_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;                                        // exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;                       // rebias 15 -> 127
  const uint32_t inf_nan = 0x7f800000u | ((em & 0x3ffu) << 13);
  const float sub = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f;  // em * 2^-24
  const uint32_t subnormal = f32_bits(sub);
  const uint32_t bits = em >= 0x7c00u ? inf_nan : (em < 0x400u ? subnormal : normal);
  return f32_from_bits(sign | bits);
#endif
}

LF_HD uint16_t f32_to_f16(float x) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(x));
#else
  const uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal half: drop 13 mantissa bits with round to nearest even, rebias the exponent 127 -> 15
  const uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  // |x| < 2^-14: adding 0.5 puts the half-subnormal unit 2^-24 in the last fp32 mantissa bit, and the
  // fp32 addition itself rounds to nearest even; 0x3f000000 is the bit pattern of 0.5
  const uint32_t subnormal = f32_bits(f32_from_bits(a) + 0.5f) - 0x3f000000u;
  const uint32_t bits = a > 0x7f800000u   ? 0x7e00u                          // nan
                        : a >= 0x477ff000u ? 0x7c00u                          // rounds to inf (>= 65520)
                        : a >= 0x38800000u ? normal
                                           : subnormal;
  return static_cast<uint16_t>(sign | bits);
#endif
}

// Storage traits: Load(ptr element) -> fp32, Store(fp32) -> storage element.
template <int D> struct Storage;
template <> struct Storage<kFloat32> {
  using T = float;
  static LF_HD float load(float x) { return x; }
  static LF_HD float store(float x) { return x; }
};
template <> struct Storage<kBFloat16> {
  using T = uint16_t;
  static LF_HD float load(uint16_t x) { return bf16_to_f32(x); }
  static LF_HD uint16_t store(float x) { return f32_to_bf16(x); }
};
template <> struct Storage<kFloat16> {
  using T = uint16_t;
  static LF_HD float load(uint16_t x) { return f16_to_f32(x); }
  static LF_HD uint16_t store(float x) { return f32_to_f16(x); }
};

// a * b, never contracted into an FMA with a later addition (the CUDA code is built with --fmad=false and
// the host code with -ffp-contract=off, so plain `a * b + c` is not contracted either; this spells it out
// where the order matters).
LF_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// a * b + c. kFused: rounded once (an FMA), as torch's CPU kernels compute lerp and addcmul where the CPU
// has FMA (its AVX2/AVX-512 builds) and as GPUs do; otherwise rounded twice, as torch's kernels for
// CPUs without FMA do.
template <bool kFused>
LF_HD float madd(float a, float b, float c) {
  if constexpr (kFused) {
    return fmaf(a, b, c);
  } else {
    return mul_rn(a, b) + c;
  }
}

// One AdamW element update in fp32. `small_weight` is (1 - beta1) < 0.5, the branch torch's lerp takes
// (uniform over a launch).
template <bool kFused>
LF_HD void adamw_element(float& p, float& m, float& v, float g, const SegScalars& s, const Hyper& h,
                         bool small_weight) {
  p = mul_rn(p, s.decay);  // rounded on its own, as torch's p.mul_(decay)
  const float w = h.one_minus_beta1;
  const float d = g - m;
  // lerp(m, g, w): w * d + m, or (w - 1) * d + g. On the device the (uniform) weight picks the operands
  // and one FMA runs; on the host both forms stay, which the compiler unswitches out of the loop.
#ifdef __CUDA_ARCH__
  m = madd<kFused>(small_weight ? w : w - 1.0f, d, small_weight ? m : g);
#else
  m = small_weight ? madd<kFused>(w, d, m) : madd<kFused>(w - 1.0f, d, g);
#endif
  v = madd<kFused>(h.one_minus_beta2 * g, g, v * h.beta2);                  // addcmul
  const float denom = sqrtf(v) / s.bc2_sqrt + h.eps;
  p = p + (-s.step_size * m) / denom;
}

// ------------------------------------------------------------------ stochastic rounding (quant.py)
// The one definition of the SR bits; kernels/quant.py (torch) and the Triton kernel mirror it exactly.
constexpr uint32_t kGolden = 0x9E3779B9u;

// Bijective 32-bit finalizer (hash-prospector's low-bias constants).
LF_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0xD35A2D97u;
  x ^= x >> 15;
  return x;
}

// Per (segment, step, lane) key; computed once per segment.
LF_HD uint32_t segment_key(uint32_t seed, uint32_t param_id, uint32_t step, uint32_t lane) {
  uint32_t k = mix32(seed ^ kGolden);
  k = mix32(k ^ param_id);
  k = mix32(k ^ step);
  return mix32(k + lane);
}

// 32 random bits for element `index` (within the parameter) under `key`.
LF_HD uint32_t sr_bits(uint32_t key, uint32_t index) { return mix32(key + index * kGolden); }

// fp32 -> bf16 with stochastic rounding: add the top 16 random bits to the fp32 pattern, truncate.
LF_HD uint16_t f32_to_bf16_sr(float x, uint32_t bits) {
  const uint32_t u = f32_bits(x);
  const uint32_t r = (u + (bits >> 16)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r);
}

// ------------------------------------------------------------------ block-wise quantization (quant.py)
// The shared table (quant.kernel_table): fp32 [4][256] rows m-map, m-midpoints, v-map, v-midpoints,
// unused midpoint entries +inf.
constexpr int kQTableRow = 256;

// Number of midpoints below xn (the code of the nearest map value): a branchless binary search over
// 2^kBits - 1 sorted fp32 midpoints. Equals torch.searchsorted(mid, xn, right=False).
template <int kBits>
LF_HD uint32_t nearest_code(float xn, const float* mid) {
  uint32_t pos = 0;
#ifdef __CUDACC__
#pragma unroll
#endif
  for (uint32_t step = 1u << (kBits - 1); step > 0; step >>= 1) {
    // a mask, not a branch: the comparisons are data dependent (a branch mispredicts half the time)
    pos += step & (0u - static_cast<uint32_t>(mid[pos + step - 1] < xn));
  }
  return pos;
}

// x / absmax as the quantizer sees it (0 for an all-zero block). |result| <= 1, or NaN. On the device
// the division runs either way (by 1 for a zero block), so that nvcc does not branch around it.
LF_HD float normalize(float x, float absmax) {
#ifdef __CUDA_ARCH__
  const float q = x / (absmax == 0.0f ? 1.0f : absmax);
  return absmax == 0.0f ? 0.0f : q;
#else
  return absmax == 0.0f ? 0.0f : x / absmax;
#endif
}

// ------------------------------------------------------------------ the same code in O(1) (kernels use these)
// nearest_code reads kBits midpoints one after the other. The kernels find the same count with one
// table read and one comparison: the fp32 pattern of |x| is cut into buckets by its exponent and top
// mantissa bits, fine enough that no bucket holds two midpoints; a byte table gives each bucket the
// code of its smallest value (`base`), and code = base + (mid[base] < x), since the only midpoint that
// can lie between that value and x is mid[base]. Equal to nearest_code for every x the quantizer passes,
// i.e. every fp32 in [-1, 1] and NaN (the table construction below is the proof; a check of all 2^32
// patterns found no difference there; tests/test_lean_kernels.py checks every midpoint and bucket edge
// +-ulps and a sweep of [-1, 1]). |x| > 1 falls on "beyond" and may get another code.
// Layout: bucket j = (bits(|x|) >> shift) - first, clamped to [0, count]: entry 0 holds every |x| below
// the bucket of the smallest midpoint, count - 1 is the bucket of 1.0, and `count` ("beyond": NaN, as
// |x / absmax| <= 1 otherwise) has base 0, i.e. code 0 for NaN as nearest_code gives. Signed maps: the
// entries of x < 0 follow, same buckets of |x|. Unsigned maps (every midpoint > 0) index by the raw
// pattern, so any x < 0 (and -0.0) lands on "beyond": code 0, also as nearest_code.
struct CodeBuckets {
  uint32_t shift;   // bucket = bits(|x|) >> shift: 23 - shift mantissa bits kept
  uint32_t first;   // the bucket of the smallest |midpoint|
  uint32_t count;   // buckets first .. bits(1.0f) >> shift, then "beyond"
  bool is_signed;
  LF_HD constexpr uint32_t side() const { return count + 1; }
  LF_HD constexpr uint32_t entries() const { return is_signed ? 2 * side() : side(); }
};
// quant.py's maps: 8-bit m (signed dynamic) 6 mantissa bits, 8-bit v (unsigned dynamic) 7, 4-bit m
// (signed dynamic, 3 exponent bits) 2; the smallest |midpoint| is 2.75e-7, 1.625e-7 and 2.75e-3. The
// 4-bit v map (k / 16) needs no table: code_linear16. kernels/triton_lean.py uses the same buckets.
constexpr CodeBuckets kBuckets8bitM{17, 6729, 1400, true};
constexpr CodeBuckets kBuckets8bitV{16, 13358, 2899, false};
constexpr CodeBuckets kBuckets4bitM{21, 473, 36, true};

LF_HD uint32_t bucket_of(float x, const CodeBuckets b) {
  const uint32_t u = f32_bits(x);
  const int32_t j = static_cast<int32_t>((b.is_signed ? u & 0x7fffffffu : u) >> b.shift) - static_cast<int32_t>(b.first);
  const uint32_t k = static_cast<uint32_t>(j < 0 ? 0 : (j > static_cast<int32_t>(b.count) ? static_cast<int32_t>(b.count) : j));
  return b.is_signed ? k + (u >> 31) * b.side() : k;
}

// Table entry e: nearest_code of the bucket's smallest value (positive side: its lowest pattern, entry 0:
// +0; negative side: minus its highest pattern), 0 for "beyond".
template <int kBits>
LF_HD uint8_t bucket_base(uint32_t e, const CodeBuckets b, const float* mid) {
  const uint32_t j = e % b.side();
  if (j == b.count) return 0;
  const float lowest = e < b.side() ? (j == 0 ? 0.0f : f32_from_bits((b.first + j) << b.shift))
                                    : -f32_from_bits(((b.first + j + 1) << b.shift) - 1u);
  return static_cast<uint8_t>(nearest_code<kBits>(lowest, mid));
}

LF_HD uint32_t code_by_bucket(float x, const uint8_t* base, const float* mid, const CodeBuckets b) {
  const uint32_t c = base[bucket_of(x, b)];
  return c + (mid[c] < x ? 1u : 0u);
}

// The 4-bit v map is k / 16, k = 1..16: its fp32 midpoints are (2j + 3) / 32, j = 0..14 (tests check
// it), so the count of those below x is clamp(ceil(16 x - 1.5), 0, 15), where 16 x - 1.5 is exact for
// 16 x >= 0.75 and below -0.75 otherwise. NaN -> 0, as nearest_code.
LF_HD uint32_t code_linear16(float x) {
#ifdef __CUDA_ARCH__
  return min(__float2uint_ru(fmaf(x, 16.0f, -1.5f)), 15u);  // saturating: < 0 and NaN give 0
#else
  return static_cast<uint32_t>(fminf(fmaxf(ceilf(x * 16.0f - 1.5f), 0.0f), 15.0f));
#endif
}

// The four maps of the kernel table (rows 1 and 3 hold the midpoints of m and v).
enum CodeMap : int { kCode8bitM = 0, kCode8bitV = 1, kCode4bitM = 2, kCode4bitV = 3 };
template <int kMap> struct CodeMapTraits;
template <> struct CodeMapTraits<kCode8bitM> { static constexpr int kBits = 8; static constexpr CodeBuckets kB = kBuckets8bitM; };
template <> struct CodeMapTraits<kCode8bitV> { static constexpr int kBits = 8; static constexpr CodeBuckets kB = kBuckets8bitV; };
template <> struct CodeMapTraits<kCode4bitM> { static constexpr int kBits = 4; static constexpr CodeBuckets kB = kBuckets4bitM; };
template <> struct CodeMapTraits<kCode4bitV> { static constexpr int kBits = 4; static constexpr CodeBuckets kB{0, 0, 0, false}; };

// Bytes of the bucket table of map kMap (0: none; the CPU copy pads it by 3 for its 32-bit gathers).
template <int kMap>
LF_HD constexpr uint32_t code_table_bytes() { return kMap == kCode4bitV ? 0u : CodeMapTraits<kMap>::kB.entries(); }

// nearest_code<kBits>(xn, mid) of map kMap, through its bucket table `base` (or the closed form).
template <int kMap>
LF_HD uint32_t code_of(float xn, const uint8_t* base, const float* mid) {
  if constexpr (kMap == kCode4bitV) {
    return code_linear16(xn);
  } else {
    return code_by_bucket(xn, base, mid, CodeMapTraits<kMap>::kB);
  }
}

}  // namespace lisa_fused
