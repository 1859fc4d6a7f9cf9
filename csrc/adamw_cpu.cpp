// CPU AdamW over a packed buffer: OpenMP over the chunk table, one auto-vectorized loop per chunk.
// The wheel must run on any x86-64, so the loop is compiled for the baseline ISA (SSE2, no FMA) and
// again for AVX2+FMA, picked at run time like torch picks its own CPU kernels: two divisions and a
// square root per element keep one core near its divider's limit, and 8-wide vectors run it about twice
// as fast in cache. Each copy rounds like torch's kernel for the same CPU (adamw_math.h, madd); built
// with -ffp-contract=off so that the compiler adds no FMA of its own.
#include <stdexcept>
#include <string>

#include "adamw.h"

namespace lisa_fused {
namespace {

// kSmall (which branch torch's lerp takes) is a template flag: a runtime one would have to be unswitched
// out of the loop by the compiler, which GCC stops doing for the larger fp16 loop bodies.
template <int GD, int LD, bool kScale, bool kSmall, bool kFused>
LF_HD void chunk_update(float* __restrict__ p, const typename Storage<GD>::T* __restrict__ g,
                        float* __restrict__ m, float* __restrict__ v, void* __restrict__ low_ptr,
                        int64_t begin, int64_t end, const SegScalars s, const Hyper h, const float scale) {
  for (int64_t i = begin; i < end; ++i) {
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

// One chunk [begin, end) of one segment; the instantiation is picked once per launch.
using ChunkFn = void (*)(const PackedArgs&, int64_t begin, int64_t end, SegScalars s);

template <int GD, int LD, bool kScale, bool kSmall, bool kFused>
LF_HD void chunk_body(const PackedArgs& a, int64_t begin, int64_t end, SegScalars s) {
  const float scale = kScale ? *reinterpret_cast<const float*>(a.grad_scale) : 1.0f;
  chunk_update<GD, LD, kScale, kSmall, kFused>(
      reinterpret_cast<float*>(a.param), reinterpret_cast<const typename Storage<GD>::T*>(a.grad),
      reinterpret_cast<float*>(a.exp_avg), reinterpret_cast<float*>(a.exp_avg_sq),
      reinterpret_cast<void*>(a.param_lowp), begin, end, s, a.hyper, scale);
}

template <int GD, int LD, bool kScale, bool kSmall>
void chunk_baseline(const PackedArgs& a, int64_t begin, int64_t end, SegScalars s) {
  chunk_body<GD, LD, kScale, kSmall, false>(a, begin, end, s);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LF_AVX2_COPY 1
template <int GD, int LD, bool kScale, bool kSmall>
__attribute__((target("avx2,fma"))) void chunk_avx2(const PackedArgs& a, int64_t begin, int64_t end, SegScalars s) {
  chunk_body<GD, LD, kScale, kSmall, true>(a, begin, end, s);
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

}  // namespace

const char* cpu_kernel_isa() { return use_avx2() ? "avx2+fma" : "baseline"; }

void adamw_cpu(const PackedArgs& a, int num_threads) {
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
  const int64_t n_chunks = a.n_chunks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads < 1 ? 1 : num_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const double* row = table + chunks[3 * c] * kNumCols;
    if (row[kEnabled] == 0.0) continue;
    SegScalars s;
    s.step_size = static_cast<float>(row[kStepSize]);
    s.decay = static_cast<float>(row[kDecay]);
    s.bc2_sqrt = static_cast<float>(row[kBc2Sqrt]);
    fn(a, chunks[3 * c + 1], chunks[3 * c + 2], s);
  }
}

}  // namespace lisa_fused
