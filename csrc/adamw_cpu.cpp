// CPU AdamW over a segment table: OpenMP over the chunk table, one auto-vectorized loop per chunk. Each
// chunk's param / grad / low-precision pointers come from its segment's row (the model's own tensors,
// anywhere in memory), its state pointers from the packed buffers at the chunk's state index.
// The wheel must run on any x86-64, so the loop is compiled for the baseline ISA (SSE2, no FMA) and
// again for AVX2+FMA, picked at run time like torch picks its own CPU kernels: two divisions and a
// square root per element keep one core near its divider's limit, and 8-wide vectors run it about twice
// as fast in cache. Each copy rounds like torch's kernel for the same CPU (adamw_math.h, madd); built
// with -ffp-contract=off so that the compiler adds no FMA of its own.
#include <memory>
#include <mutex>
#include <stdexcept>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <string>
#include <vector>

#include "adamw.h"

namespace lisa_fused {
namespace {

// kSmall (which branch torch's lerp takes) is a template flag: a runtime one would have to be unswitched
// out of the loop by the compiler, which GCC stops doing for the larger fp16 loop bodies.
template <int GD, int LD, bool kScale, bool kSmall, bool kFused>
LF_HD void chunk_update(float* __restrict__ p, const typename Storage<GD>::T* __restrict__ g,
                        float* __restrict__ m, float* __restrict__ v, void* __restrict__ low_ptr,
                        int64_t n, const SegScalars s, const Hyper h, const float scale) {
  for (int64_t i = 0; i < n; ++i) {
    float gi = Storage<GD>::load(g[i]);
    if (kScale) gi = gi / scale;
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_element<kFused>(pi, mi, vi, gi, s, h, kSmall);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (LD != kNone) {
      static_cast<typename Storage<LD>::T* __restrict__>(low_ptr)[i] = Storage<LD>::store(pi);
    }
  }
}

// One chunk [begin, end) (state indices) of the segment whose segment-table row is `seg`; the
// instantiation is picked once per launch.
using ChunkFn = void (*)(const PackedArgs&, const int64_t* seg, int64_t begin, int64_t end, SegScalars s);

template <int GD, int LD, bool kScale, bool kSmall, bool kFused>
LF_HD void chunk_body(const PackedArgs& a, const int64_t* seg, int64_t begin, int64_t end, SegScalars s) {
  using GT = typename Storage<GD>::T;
  const float scale = kScale ? *reinterpret_cast<const float*>(a.grad_scale) : 1.0f;
  const int64_t local = begin - seg[kSegOffset];  // the chunk's first element within the segment's tensors
  void* low = nullptr;
  if constexpr (LD != kNone) low = reinterpret_cast<typename Storage<LD>::T*>(seg[kSegLowp]) + local;
  chunk_update<GD, LD, kScale, kSmall, kFused>(
      reinterpret_cast<float*>(seg[kSegParam]) + local, reinterpret_cast<const GT*>(seg[kSegGrad]) + local,
      reinterpret_cast<float*>(a.exp_avg) + begin, reinterpret_cast<float*>(a.exp_avg_sq) + begin, low,
      end - begin, s, a.hyper, scale);
}

template <int GD, int LD, bool kScale, bool kSmall>
void chunk_baseline(const PackedArgs& a, const int64_t* seg, int64_t begin, int64_t end, SegScalars s) {
  chunk_body<GD, LD, kScale, kSmall, false>(a, seg, begin, end, s);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LF_AVX2_COPY 1
template <int GD, int LD, bool kScale, bool kSmall>
__attribute__((target("avx2,fma"))) void chunk_avx2(const PackedArgs& a, const int64_t* seg, int64_t begin,
                                                    int64_t end, SegScalars s) {
  chunk_body<GD, LD, kScale, kSmall, true>(a, seg, begin, end, s);
}
#endif

bool use_avx2() {
#ifdef LF_AVX2_COPY
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <int GD, int LD, bool kScale, bool kSmall>
ChunkFn chunk() {
#ifdef LF_AVX2_COPY
  if (use_avx2()) return chunk_avx2<GD, LD, kScale, kSmall>;
#endif
  return chunk_baseline<GD, LD, kScale, kSmall>;
}

template <int GD, int LD>
ChunkFn pick_mode(bool scale, bool small) {
  if (scale) return small ? chunk<GD, LD, true, true>() : chunk<GD, LD, true, false>();
  return small ? chunk<GD, LD, false, true>() : chunk<GD, LD, false, false>();
}

template <int GD>
ChunkFn pick_lowp(int lowp, bool scale, bool small) {
  switch (lowp) {
    case kNone: return pick_mode<GD, kNone>(scale, small);
    case kBFloat16: return pick_mode<GD, kBFloat16>(scale, small);
    case kFloat16: return pick_mode<GD, kFloat16>(scale, small);
  }
  throw std::invalid_argument("param_lowp dtype code " + std::to_string(lowp) + " is not bfloat16/float16");
}


// ---------------------------------------------------------------------------------------- lean state
// Moment formats, master modes and grad_sumsq (kernels/contract.py). The chunk is walked in pieces of
// one quantization block (256 elements otherwise): load and dequantize into fp32 arrays, the same
// adamw_element as above, then requantize from the piece's absmax. Segment starts are multiples of
// ALIGN and chunk lengths multiples of it too, so every piece is exactly one block of one segment.
constexpr int kPiece = 256;

// Codes of n values of one block: the scalar code_of of adamw_math.h, and (AVX2 copy) the same lookup 8
// lanes at a time with gathers; for the 16-value 4-bit m map, 15 broadcast compares (faster here than
// gathers), the definition itself. Identical comparisons on identical fp32 inputs: identical codes.
template <int kMap>
LF_HD void block_codes(const float* x, float absmax, const uint8_t* base, const float* mid, uint8_t* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(code_of<kMap>(normalize(x[i], absmax), base, mid));
}

#ifdef LF_AVX2_COPY
template <int kMap>
__attribute__((target("avx2,fma"))) inline void block_codes_avx2(const float* x, float absmax, const uint8_t* base,
                                                                 const float* mid, uint8_t* out, int n) {
  const __m256 a = _mm256_set1_ps(absmax == 0.0f ? 1.0f : absmax);
  const __m256 keep = _mm256_castsi256_ps(_mm256_set1_epi32(absmax == 0.0f ? 0 : -1));  // 0/0 -> 0
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xn = _mm256_and_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), a), keep);
    __m256i code;
    if constexpr (kMap == kCode4bitM) {  // 15 midpoints: count those below xn (no gathers; the same count)
      code = _mm256_setzero_si256();
      for (int k = 0; k < 15; ++k) {  // + 1 where mid[k] < xn
        code = _mm256_sub_epi32(code, _mm256_castps_si256(_mm256_cmp_ps(_mm256_set1_ps(mid[k]), xn, _CMP_LT_OQ)));
      }
    } else if constexpr (kMap == kCode4bitV) {  // code_linear16; max(NaN, 0) is 0 with the NaN first
      const __m256 t = _mm256_ceil_ps(_mm256_sub_ps(_mm256_mul_ps(xn, _mm256_set1_ps(16.0f)), _mm256_set1_ps(1.5f)));
      code = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(t, _mm256_setzero_ps()), _mm256_set1_ps(15.0f)));
    } else {  // code_by_bucket
      constexpr CodeBuckets b = CodeMapTraits<kMap>::kB;
      const __m256i u = _mm256_castps_si256(xn);
      const __m256i mag = b.is_signed ? _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)) : u;
      __m256i j = _mm256_sub_epi32(_mm256_srli_epi32(mag, b.shift), _mm256_set1_epi32(static_cast<int>(b.first)));
      j = _mm256_min_epi32(_mm256_max_epi32(j, _mm256_setzero_si256()), _mm256_set1_epi32(static_cast<int>(b.count)));
      if (b.is_signed) j = _mm256_add_epi32(j, _mm256_and_si256(_mm256_srai_epi32(u, 31), _mm256_set1_epi32(b.side())));
      // 4 bytes from base + j (the table is padded by 3), the low one is the entry
      const __m256i c = _mm256_and_si256(_mm256_i32gather_epi32(reinterpret_cast<const int*>(base), j, 1),
                                         _mm256_set1_epi32(0xff));
      const __m256 lt = _mm256_cmp_ps(_mm256_i32gather_ps(mid, c, 4), xn, _CMP_LT_OQ);
      code = _mm256_sub_epi32(c, _mm256_castps_si256(lt));  // + 1 where mid[c] < xn
    }
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), code);
    for (int k = 0; k < 8; ++k) out[i + k] = static_cast<uint8_t>(lanes[k]);
  }
  block_codes<kMap>(x + i, absmax, base, mid, out + i, n - i);
}
#endif

template <int kMap, bool kFused>
LF_HD void codes_of(const float* x, float absmax, const uint8_t* base, const float* mid, uint8_t* out, int n) {
#ifdef LF_AVX2_COPY
  if constexpr (kFused) {
    block_codes_avx2<kMap>(x, absmax, base, mid, out, n);
    return;
  }
#endif
  block_codes<kMap>(x, absmax, base, mid, out, n);
}

// The bucket tables of one launch's format (adamw_math.h code_by_bucket), built from its midpoints.
struct CodeTables {
  uint8_t m[code_table_bytes<kCode8bitM>() + 3];
  uint8_t v[code_table_bytes<kCode8bitV>() + 3];
};

template <int kMap>
void build_code_table(uint8_t* out, const float* mid) {
  constexpr CodeBuckets b = CodeMapTraits<kMap>::kB;
  for (uint32_t e = 0; e < b.entries(); ++e) out[e] = bucket_base<CodeMapTraits<kMap>::kBits>(e, b, mid);
  out[b.entries()] = out[b.entries() + 1] = out[b.entries() + 2] = 0;
}

void build_code_tables(CodeTables& t, int moments, const float* qt) {
  if (moments == kMom8bit) {
    build_code_table<kCode8bitM>(t.m, qt + kQTableRow);
    build_code_table<kCode8bitV>(t.v, qt + 3 * kQTableRow);
  } else if (moments == kMom4bit) {
    build_code_table<kCode4bitM>(t.m, qt + kQTableRow);
  }
}

// The tables of a format's kernel table, built once per process (the 8-bit ones take ~45 us) and kept
// per (format, table contents): callers pass quant.kernel_table, the same 4 KB every launch.
const CodeTables& code_tables(int moments, const float* qt) {
  struct Entry {
    int moments;
    std::vector<float> qtable;
    std::unique_ptr<CodeTables> tables;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  const std::lock_guard<std::mutex> lock(mu);
  for (const Entry& e : cache) {
    if (e.moments == moments && memcmp(e.qtable.data(), qt, 4 * kQTableRow * sizeof(float)) == 0) return *e.tables;
  }
  auto tables = std::make_unique<CodeTables>();
  build_code_tables(*tables, moments, qt);
  cache.push_back(Entry{moments, std::vector<float>(qt, qt + 4 * kQTableRow), std::move(tables)});
  return *cache.back().tables;
}

struct LeanSeg {
  SegScalars s;
  int64_t offset;  // segment start in the packed state (SR indices and the tensors below are relative to it)
  uintptr_t param, grad, lowp;  // the segment's own tensors (element 0 at state index `offset`)
  uint32_t key_p, key_m, key_v;
  const CodeTables* codes;  // the launch's bucket tables (quantized formats)
};

template <bool kFused>
LF_HD float lean_piece(const PackedArgs& a, int64_t b, int64_t e, const LeanSeg& ls, bool small) {
  float P[kPiece], M[kPiece], V[kPiece], G[kPiece];
  const int n = static_cast<int>(e - b);
  const int64_t t = b - ls.offset;  // the piece's first element in the segment's own tensors
  // grad -> fp32, unscaled
  switch (a.grad_dtype) {
    case kFloat32: { auto g = reinterpret_cast<const float*>(ls.grad) + t; for (int i = 0; i < n; ++i) G[i] = g[i]; break; }
    case kBFloat16: { auto g = reinterpret_cast<const uint16_t*>(ls.grad) + t; for (int i = 0; i < n; ++i) G[i] = bf16_to_f32(g[i]); break; }
    default: { auto g = reinterpret_cast<const uint16_t*>(ls.grad) + t; for (int i = 0; i < n; ++i) G[i] = f16_to_f32(g[i]); break; }
  }
  if (a.grad_scale != 0) {
    const float scale = *reinterpret_cast<const float*>(a.grad_scale);
    for (int i = 0; i < n; ++i) G[i] = G[i] / scale;
  }
  float sumsq = 0.0f;
  if (a.grad_sumsq != 0) {
    // 8 interleaved partial sums (one vector register), combined in a fixed order: deterministic, and
    // the loop vectorizes without reassociation flags
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
      for (int k = 0; k < 8; ++k) acc[k] += G[i + k] * G[i + k];
    }
    for (; i < n; ++i) acc[i & 7] += G[i] * G[i];
    sumsq = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
  // param -> fp32 (kahan: p + compensation)
  if (a.master == kMasterFp32) {
    auto p = reinterpret_cast<const float*>(ls.param) + t;
    for (int i = 0; i < n; ++i) P[i] = p[i];
  } else {
    auto p = reinterpret_cast<const uint16_t*>(ls.param) + t;
    const bool bf = a.param_dtype == kBFloat16;
    for (int i = 0; i < n; ++i) P[i] = bf ? bf16_to_f32(p[i]) : f16_to_f32(p[i]);
    if (a.master == kMasterKahan) {
      auto c = reinterpret_cast<const uint16_t*>(a.compensation) + b;
      for (int i = 0; i < n; ++i) P[i] = P[i] + (bf ? bf16_to_f32(c[i]) : f16_to_f32(c[i]));
    }
  }
  // moments -> fp32
  const float* qt = reinterpret_cast<const float*>(a.qtable);
  switch (a.moments) {
    case kMomFp32: {
      auto m = reinterpret_cast<const float*>(a.exp_avg) + b, v = reinterpret_cast<const float*>(a.exp_avg_sq) + b;
      for (int i = 0; i < n; ++i) { M[i] = m[i]; V[i] = v[i]; }
      break;
    }
    case kMomBf16: {
      auto m = reinterpret_cast<const uint16_t*>(a.exp_avg) + b, v = reinterpret_cast<const uint16_t*>(a.exp_avg_sq) + b;
      for (int i = 0; i < n; ++i) { M[i] = bf16_to_f32(m[i]); V[i] = bf16_to_f32(v[i]); }
      break;
    }
    case kMom8bit: {
      auto m = reinterpret_cast<const uint8_t*>(a.exp_avg) + b, v = reinterpret_cast<const uint8_t*>(a.exp_avg_sq) + b;
      const float sm = reinterpret_cast<const float*>(a.exp_avg_scale)[b / 256];
      const float sv = reinterpret_cast<const float*>(a.exp_avg_sq_scale)[b / 256];
      for (int i = 0; i < n; ++i) { M[i] = qt[m[i]] * sm; V[i] = qt[2 * kQTableRow + v[i]] * sv; }
      break;
    }
    default: {  // 4bit, two codes per byte; b is even
      auto m = reinterpret_cast<const uint8_t*>(a.exp_avg) + b / 2, v = reinterpret_cast<const uint8_t*>(a.exp_avg_sq) + b / 2;
      const float sm = reinterpret_cast<const float*>(a.exp_avg_scale)[b / 128];
      const float sv = reinterpret_cast<const float*>(a.exp_avg_sq_scale)[b / 128];
      for (int i = 0; i < n; ++i) {
        const int shift = (i & 1) * 4;
        M[i] = qt[(m[i >> 1] >> shift) & 0xf] * sm;
        V[i] = qt[2 * kQTableRow + ((v[i >> 1] >> shift) & 0xf)] * sv;
      }
      break;
    }
  }
  const Hyper h = a.hyper;
  for (int i = 0; i < n; ++i) adamw_element<kFused>(P[i], M[i], V[i], G[i], ls.s, h, small);
  // store moments
  const uint32_t idx0 = static_cast<uint32_t>(t);
  switch (a.moments) {
    case kMomFp32: {
      auto m = reinterpret_cast<float*>(a.exp_avg) + b, v = reinterpret_cast<float*>(a.exp_avg_sq) + b;
      for (int i = 0; i < n; ++i) { m[i] = M[i]; v[i] = V[i]; }
      break;
    }
    case kMomBf16: {
      auto m = reinterpret_cast<uint16_t*>(a.exp_avg) + b, v = reinterpret_cast<uint16_t*>(a.exp_avg_sq) + b;
      for (int i = 0; i < n; ++i) {
        m[i] = f32_to_bf16_sr(M[i], sr_bits(ls.key_m, idx0 + i));
        v[i] = f32_to_bf16_sr(V[i], sr_bits(ls.key_v, idx0 + i));
      }
      break;
    }
    case kMom8bit:
    case kMom4bit: {
      const bool four = a.moments == kMom4bit;
      float am = 0.0f, av = 0.0f;
      for (int i = 0; i < n; ++i) { am = fmaxf(am, fabsf(M[i])); av = fmaxf(av, fabsf(V[i])); }
      const int64_t blk = b / (four ? 128 : 256);
      reinterpret_cast<float*>(a.exp_avg_scale)[blk] = am;
      reinterpret_cast<float*>(a.exp_avg_sq_scale)[blk] = av;
      uint8_t cm[kPiece], cv[kPiece];
      if (four) {
        codes_of<kCode4bitM, kFused>(M, am, ls.codes->m, qt + kQTableRow, cm, n);
        codes_of<kCode4bitV, kFused>(V, av, nullptr, qt + 3 * kQTableRow, cv, n);
        if (n & 1) { cm[n] = 0; cv[n] = 0; }  // an odd tail's high nibble is written as 0
        auto m = reinterpret_cast<uint8_t*>(a.exp_avg) + b / 2, v = reinterpret_cast<uint8_t*>(a.exp_avg_sq) + b / 2;
        for (int j = 0; j < (n + 1) / 2; ++j) {
          m[j] = static_cast<uint8_t>(cm[2 * j] | (cm[2 * j + 1] << 4));
          v[j] = static_cast<uint8_t>(cv[2 * j] | (cv[2 * j + 1] << 4));
        }
      } else {
        auto m = reinterpret_cast<uint8_t*>(a.exp_avg) + b, v = reinterpret_cast<uint8_t*>(a.exp_avg_sq) + b;
        codes_of<kCode8bitM, kFused>(M, am, ls.codes->m, qt + kQTableRow, m, n);
        codes_of<kCode8bitV, kFused>(V, av, ls.codes->v, qt + 3 * kQTableRow, v, n);
      }
      break;
    }
  }
  // store param
  if (a.master == kMasterFp32) {
    auto p = reinterpret_cast<float*>(ls.param) + t;
    for (int i = 0; i < n; ++i) p[i] = P[i];
    if (a.lowp_dtype != kNone) {
      auto low = reinterpret_cast<uint16_t*>(ls.lowp) + t;
      const bool bf = a.lowp_dtype == kBFloat16;
      for (int i = 0; i < n; ++i) low[i] = bf ? f32_to_bf16(P[i]) : f32_to_f16(P[i]);
    }
  } else if (a.master == kMasterKahan) {
    auto p = reinterpret_cast<uint16_t*>(ls.param) + t;
    auto c = reinterpret_cast<uint16_t*>(a.compensation) + b;
    if (a.param_dtype == kBFloat16) {
      for (int i = 0; i < n; ++i) { const uint16_t hi = f32_to_bf16(P[i]); p[i] = hi; c[i] = f32_to_bf16(P[i] - bf16_to_f32(hi)); }
    } else {
      for (int i = 0; i < n; ++i) { const uint16_t hi = f32_to_f16(P[i]); p[i] = hi; c[i] = f32_to_f16(P[i] - f16_to_f32(hi)); }
    }
  } else {
    auto p = reinterpret_cast<uint16_t*>(ls.param) + t;
    for (int i = 0; i < n; ++i) p[i] = f32_to_bf16_sr(P[i], sr_bits(ls.key_p, idx0 + i));
  }
  return sumsq;
}

using LeanFn = float (*)(const PackedArgs&, int64_t, int64_t, const LeanSeg&, bool);

template <bool kFused>
LF_HD float lean_chunk(const PackedArgs& a, int64_t begin, int64_t end, const LeanSeg& ls, bool small) {
  const int64_t piece = a.moments == kMom4bit ? 128 : kPiece;
  float sumsq = 0.0f;
  for (int64_t b = begin; b < end; b += piece) sumsq += lean_piece<kFused>(a, b, b + piece < end ? b + piece : end, ls, small);
  return sumsq;
}

float lean_chunk_baseline(const PackedArgs& a, int64_t b, int64_t e, const LeanSeg& ls, bool small) {
  return lean_chunk<false>(a, b, e, ls, small);
}
#ifdef LF_AVX2_COPY
__attribute__((target("avx2,fma"))) float lean_chunk_avx2(const PackedArgs& a, int64_t b, int64_t e,
                                                          const LeanSeg& ls, bool small) {
  return lean_chunk<true>(a, b, e, ls, small);
}
#endif

void lean_cpu(const PackedArgs& a, int num_threads) {
  if (a.moments < kMomFp32 || a.moments > kMom4bit) throw std::invalid_argument("moments code " + std::to_string(a.moments));
  if (a.master < kMasterFp32 || a.master > kMasterStochastic) throw std::invalid_argument("master code " + std::to_string(a.master));
  if (a.grad_dtype < kFloat32 || a.grad_dtype > kFloat16) throw std::invalid_argument("grad dtype code " + std::to_string(a.grad_dtype));
  if (a.master != kMasterFp32 && a.param_dtype != kBFloat16 && a.param_dtype != kFloat16) throw std::invalid_argument("param dtype code " + std::to_string(a.param_dtype));
  if ((a.moments == kMom8bit || a.moments == kMom4bit) && (a.qtable == 0 || a.exp_avg_scale == 0 || a.exp_avg_sq_scale == 0)) throw std::invalid_argument("quantized moments need qtable and both scale buffers");
  LeanFn fn = lean_chunk_baseline;
#ifdef LF_AVX2_COPY
  if (use_avx2()) fn = lean_chunk_avx2;
#endif
  const bool small = a.hyper.one_minus_beta1 < 0.5f;
  const int64_t* chunks = reinterpret_cast<const int64_t*>(a.chunks);
  const int64_t* segs = reinterpret_cast<const int64_t*>(a.segs);
  const double* table = reinterpret_cast<const double*>(a.table);
  const bool sr = a.n_cols >= kNumColsLean;
  const int64_t n_chunks = a.n_chunks;
  std::vector<float> partial(a.grad_sumsq != 0 ? n_chunks : 0, 0.0f);
  const CodeTables* codes = a.moments == kMom8bit || a.moments == kMom4bit
                                ? &code_tables(a.moments, reinterpret_cast<const float*>(a.qtable)) : nullptr;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads < 1 ? 1 : num_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t seg = chunks[3 * c];
    const double* row = table + seg * a.n_cols;
    if (row[kEnabled] == 0.0) continue;
    LeanSeg ls;
    ls.s.step_size = static_cast<float>(row[kStepSize]);
    ls.s.decay = static_cast<float>(row[kDecay]);
    ls.s.bc2_sqrt = static_cast<float>(row[kBc2Sqrt]);
    const int64_t* srow = segs + seg * kNumSegCols;
    ls.offset = srow[kSegOffset];
    ls.param = static_cast<uintptr_t>(srow[kSegParam]);
    ls.grad = static_cast<uintptr_t>(srow[kSegGrad]);
    ls.lowp = static_cast<uintptr_t>(srow[kSegLowp]);
    const uint32_t pid = sr ? static_cast<uint32_t>(row[kParamId]) : 0u, step = sr ? static_cast<uint32_t>(row[kStep]) : 0u;
    ls.key_p = segment_key(a.seed, pid, step, kLaneParam);
    ls.key_m = segment_key(a.seed, pid, step, kLaneExpAvg);
    ls.key_v = segment_key(a.seed, pid, step, kLaneExpAvgSq);
    ls.codes = codes;
    const float s = fn(a, chunks[3 * c + 1], chunks[3 * c + 2], ls, small);
    if (a.grad_sumsq != 0) partial[c] = s;
  }
  if (a.grad_sumsq != 0) {  // chunk order: deterministic whatever the thread schedule
    float* out = reinterpret_cast<float*>(a.grad_sumsq);
    for (int64_t c = 0; c < n_chunks; ++c) {
      if (table[chunks[3 * c] * a.n_cols + kEnabled] != 0.0) out[chunks[3 * c]] += partial[c];
    }
  }
}

}  // namespace

const char* cpu_kernel_isa() { return use_avx2() ? "avx2+fma" : "baseline"; }

void nearest_codes_cpu(const float* x, int64_t n, const float* qtable, int moments, int which, bool vectorized,
                       uint8_t* out) {
  if (moments != kMom8bit && moments != kMom4bit) throw std::invalid_argument("moments code " + std::to_string(moments) + " is not 8bit/4bit");
  if (which != 0 && which != 1) throw std::invalid_argument("which must be 0 (exp_avg) or 1 (exp_avg_sq), got " + std::to_string(which));
  const CodeTables& t = code_tables(moments, qtable);
  const float* mid = qtable + (which == 0 ? kQTableRow : 3 * kQTableRow);
  const uint8_t* base = which == 0 ? t.m : t.v;
  const bool avx2 = vectorized && use_avx2();
  for (int64_t i = 0; i < n; i += kPiece) {  // in pieces, as the kernel calls it
    const int len = static_cast<int>(n - i < kPiece ? n - i : kPiece);
    const int map = (moments == kMom8bit ? kCode8bitM : kCode4bitM) + which;
    switch (map) {
#ifdef LF_AVX2_COPY
#define LF_CODES(M) avx2 ? block_codes_avx2<M>(x + i, 1.0f, base, mid, out + i, len) : block_codes<M>(x + i, 1.0f, base, mid, out + i, len)
#else
#define LF_CODES(M) block_codes<M>(x + i, 1.0f, base, mid, out + i, len)
#endif
      case kCode8bitM: LF_CODES(kCode8bitM); break;
      case kCode8bitV: LF_CODES(kCode8bitV); break;
      case kCode4bitM: LF_CODES(kCode4bitM); break;
      default: LF_CODES(kCode4bitV); break;
#undef LF_CODES
    }
  }
}

// Every enabled chunk lies inside its segment and the segment has the pointers the launch reads: checked
// before any element is written (one pass over the chunk rows, ~1 ns each), so a bad table changes nothing.
static void check_segments(const PackedArgs& a) {
  const int64_t* chunks = reinterpret_cast<const int64_t*>(a.chunks);
  const int64_t* segs = reinterpret_cast<const int64_t*>(a.segs);
  const double* table = reinterpret_cast<const double*>(a.table);
  const bool want_lowp = a.lowp_dtype != kNone;
  for (int64_t c = 0; c < a.n_chunks; ++c) {
    const int64_t seg = chunks[3 * c], begin = chunks[3 * c + 1], end = chunks[3 * c + 2];
    if (seg < 0) throw std::invalid_argument("chunk " + std::to_string(c) + " names segment " + std::to_string(seg));
    if (table[seg * a.n_cols + kEnabled] == 0.0) continue;
    const int64_t* row = segs + seg * kNumSegCols;
    const std::string which = "segment " + std::to_string(seg);
    if (begin < row[kSegOffset] || end > row[kSegOffset] + row[kSegNumel] || begin > end) {
      throw std::invalid_argument("chunk [" + std::to_string(begin) + ", " + std::to_string(end) + ") is outside " +
                                  which + " (offset " + std::to_string(row[kSegOffset]) + ", numel " +
                                  std::to_string(row[kSegNumel]) + ")");
    }
    if (row[kSegParam] == 0) throw std::invalid_argument(which + " is enabled but its param pointer is null");
    if (row[kSegGrad] == 0) throw std::invalid_argument(which + " is enabled but its grad pointer is null");
    if ((row[kSegLowp] != 0) != want_lowp) {
      throw std::invalid_argument(which + (want_lowp ? " has no low-precision copy, but lowp_dtype is " + std::to_string(a.lowp_dtype)
                                                     : " has a low-precision copy, but lowp_dtype is none"));
    }
  }
}

void adamw_cpu(const PackedArgs& a, int num_threads) {
  check_segments(a);
  if (a.lean()) {
    lean_cpu(a, num_threads);
    return;
  }
  const bool scale = a.grad_scale != 0;
  const bool small = a.hyper.one_minus_beta1 < 0.5f;  // which branch torch's lerp takes
  ChunkFn fn;
  switch (a.grad_dtype) {
    case kFloat32: fn = pick_lowp<kFloat32>(a.lowp_dtype, scale, small); break;
    case kBFloat16: fn = pick_lowp<kBFloat16>(a.lowp_dtype, scale, small); break;
    case kFloat16: fn = pick_lowp<kFloat16>(a.lowp_dtype, scale, small); break;
    default:
      throw std::invalid_argument("grad dtype code " + std::to_string(a.grad_dtype) +
                                  " is not float32/bfloat16/float16");
  }
  const int64_t* chunks = reinterpret_cast<const int64_t*>(a.chunks);
  const double* table = reinterpret_cast<const double*>(a.table);
  const int64_t* segs = reinterpret_cast<const int64_t*>(a.segs);
  const int64_t n_chunks = a.n_chunks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads < 1 ? 1 : num_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const double* row = table + chunks[3 * c] * a.n_cols;
    if (row[kEnabled] == 0.0) continue;
    SegScalars s;
    s.step_size = static_cast<float>(row[kStepSize]);
    s.decay = static_cast<float>(row[kDecay]);
    s.bc2_sqrt = static_cast<float>(row[kBc2Sqrt]);
    fn(a, segs + chunks[3 * c] * kNumSegCols, chunks[3 * c + 1], chunks[3 * c + 2], s);
  }
}

}  // namespace lisa_fused
