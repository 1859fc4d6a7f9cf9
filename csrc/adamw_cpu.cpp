// CPU AdamW over a packed buffer: OpenMP over the chunk table, one auto-vectorized loop per chunk.
// The wheel must run on any x86-64, so the loop is compiled twice, for the baseline ISA and for AVX2,
// and the AVX2 copy is picked at run time when the CPU has it. Built with -ffp-contract=off, so both
// copies round identically.
#include <stdexcept>
#include <string>

#include "adamw.h"

namespace lisa_fused {
namespace {

template <int GD, int LD, bool kScale>
LF_HD void chunk_update(float* __restrict__ p, const typename Storage<GD>::T* __restrict__ g,
                        float* __restrict__ m, float* __restrict__ v, void* __restrict__ low_ptr,
                        int64_t begin, int64_t end, const SegScalars s, const Hyper h, const bool small,
                        const float scale) {
  for (int64_t i = begin; i < end; ++i) {
    float gi = Storage<GD>::load(g[i]);
    if (kScale) gi = gi / scale;
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_element(pi, mi, vi, gi, s, h, small);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (LD != kNone) {
      static_cast<typename Storage<LD>::T* __restrict__>(low_ptr)[i] = Storage<LD>::store(pi);
    }
  }
}

// One chunk [begin, end) of one segment, compiled once per ISA below.
using ChunkFn = void (*)(const PackedArgs&, int64_t begin, int64_t end, SegScalars s, bool small);

template <int GD, int LD, bool kScale>
LF_HD void chunk_body(const PackedArgs& a, int64_t begin, int64_t end, SegScalars s, bool small) {
  const float scale = kScale ? *reinterpret_cast<const float*>(a.grad_scale) : 1.0f;
  chunk_update<GD, LD, kScale>(reinterpret_cast<float*>(a.param),
                               reinterpret_cast<const typename Storage<GD>::T*>(a.grad),
                               reinterpret_cast<float*>(a.exp_avg), reinterpret_cast<float*>(a.exp_avg_sq),
                               reinterpret_cast<void*>(a.param_lowp), begin, end, s, a.hyper, small, scale);
}

template <int GD, int LD, bool kScale>
void chunk_baseline(const PackedArgs& a, int64_t begin, int64_t end, SegScalars s, bool small) {
  chunk_body<GD, LD, kScale>(a, begin, end, s, small);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LF_HAVE_AVX2_COPY 1
template <int GD, int LD, bool kScale>
__attribute__((target("avx2"))) void chunk_avx2(const PackedArgs& a, int64_t begin, int64_t end,
                                                SegScalars s, bool small) {
  chunk_body<GD, LD, kScale>(a, begin, end, s, small);
}
#endif

template <int GD, int LD, bool kScale>
ChunkFn pick_isa() {
#ifdef LF_HAVE_AVX2_COPY
  if (__builtin_cpu_supports("avx2")) return chunk_avx2<GD, LD, kScale>;
#endif
  return chunk_baseline<GD, LD, kScale>;
}

template <int GD, int LD>
ChunkFn pick_scale(bool scale) {
  return scale ? pick_isa<GD, LD, true>() : pick_isa<GD, LD, false>();
}

template <int GD>
ChunkFn pick_lowp(int lowp, bool scale) {
  switch (lowp) {
    case kNone: return pick_scale<GD, kNone>(scale);
    case kBFloat16: return pick_scale<GD, kBFloat16>(scale);
    case kFloat16: return pick_scale<GD, kFloat16>(scale);
  }
  throw std::invalid_argument("param_lowp dtype code " + std::to_string(lowp) + " is not bfloat16/float16");
}

}  // namespace

void adamw_cpu(const PackedArgs& a, int num_threads) {
  const bool scale = a.grad_scale != 0;
  ChunkFn fn;
  switch (a.grad_dtype) {
    case kFloat32: fn = pick_lowp<kFloat32>(a.lowp_dtype, scale); break;
    case kBFloat16: fn = pick_lowp<kBFloat16>(a.lowp_dtype, scale); break;
    case kFloat16: fn = pick_lowp<kFloat16>(a.lowp_dtype, scale); break;
    default:
      throw std::invalid_argument("grad dtype code " + std::to_string(a.grad_dtype) +
                                  " is not float32/bfloat16/float16");
  }
  const int64_t* chunks = reinterpret_cast<const int64_t*>(a.chunks);
  const double* table = reinterpret_cast<const double*>(a.table);
  const bool small = a.hyper.one_minus_beta1 < 0.5f;  // which branch torch's lerp takes
  const int64_t n_chunks = a.n_chunks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads < 1 ? 1 : num_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const double* row = table + chunks[3 * c] * kNumCols;
    if (row[kEnabled] == 0.0) continue;
    SegScalars s;
    s.step_size = static_cast<float>(row[kStepSize]);
    s.decay = static_cast<float>(row[kDecay]);
    s.bc2_sqrt = static_cast<float>(row[kBc2Sqrt]);
    fn(a, chunks[3 * c + 1], chunks[3 * c + 2], s, small);
  }
}

}  // namespace lisa_fused
