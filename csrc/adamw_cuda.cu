// CUDA AdamW over a segment table: one launch, one block per chunk of the chunk table.
//
// Each block reads its (segment, start, end) chunk row, the segment's row of the segment table (state
// offset, numel, and the addresses of the segment's own param, grad and low-precision copy: the model's
// tensors, wherever they live) and its fp32 scalars, and returns at once when the segment is disabled.
// Its base pointers are 64-bit: the segment's tensors from element (start - offset) on, the packed state
// from element start on; offsets within the chunk (< 2^31) are 32-bit. A block whose base pointers are all
// 16-byte aligned walks its chunk with 16-byte vector loads (4 fp32 grads or 8 bf16/fp16 grads per thread
// and step) and finishes with a scalar tail; a block with any misaligned pointer (a slice at an odd
// element offset, an FSDP2 shard, a DDP bucket view) takes the scalar loop for its whole chunk. Segment
// offsets in the packed state are multiples of contract.ALIGN (256 elements), so state pointers are
// aligned whenever the state buffers are.
//
// Roundings: built with --fmad=false (setup.py NVCC_FLAGS), so nvcc, ptxas and the driver's PTX JIT never
// contract a multiply and an add into an FMA: every FMA is an explicit fmaf (adamw_math.h madd, the
// grad_sumsq accumulation, code_linear16), the rest rounds as written, as the CPU kernel does
// (tests/test_kernel_cost.py checks the PTX of every kernel for a contractable pair).
#include <cuda_runtime.h>

#include <string>
#include <type_traits>
#include <vector>

#include "adamw.h"

namespace lisa_fused {
namespace {

constexpr int kThreads = 256;
// The lean kernel's offsets within a chunk are 32-bit, and a thread's first code bit o * kBitsPer (o <
// chunk + kLeanStep) must fit in an int: chunks stay below kCudaMaxChunk (adamw.h; kernels/native.py
// checks its chunk size against it).
static_assert((kCudaMaxChunk + kThreads * 8) * 8 <= 0x7fffffffLL, "o * kBitsPer overflows int32");

// A pointer read from the segment table (an address the host wrote as an integer), element `local` on.
// The table holds global-memory addresses (torch's CUDA allocations); saying so lets the compiler use
// global loads and stores (LDG/STG) rather than generic ones, as it does for pointer parameters.
template <typename T>
__device__ __forceinline__ T* table_ptr(int64_t addr, int64_t local) {
  T* p = reinterpret_cast<T*>(addr) + local;
  __builtin_assume(__isGlobal(p));
  return p;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* ptr, T (&out)[N]) {
  const auto pack = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = pack.v[k];
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* ptr, const T (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = in[k];
  *reinterpret_cast<Pack<T, N>*>(ptr) = pack;
}

// fp32 arrays move in 16-byte packs of 4; kVec (4 or 8) elements are kVec / 4 such packs.
template <int kVec>
__device__ __forceinline__ void load_f32(const float* ptr, float (&out)[kVec]) {
#pragma unroll
  for (int q = 0; q < kVec / 4; ++q) {
    float part[4];
    load_pack<float, 4>(ptr + 4 * q, part);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[4 * q + k] = part[k];
  }
}

template <int kVec>
__device__ __forceinline__ void store_f32(float* ptr, const float (&in)[kVec]) {
#pragma unroll
  for (int q = 0; q < kVec / 4; ++q) {
    float part[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) part[k] = in[4 * q + k];
    store_pack<float, 4>(ptr + 4 * q, part);
  }
}

// Register budgets: without a minimum of resident blocks ptxas aims at 64 registers here and spilled
// 4-12 B per thread, in the main loop, in the five instantiations with 16-bit grads and a bf16/fp16 copy
// or a grad_scale (sm_90, nvcc 13.0). A minimum of 3 blocks of 256 threads (at most 85 registers) lets it
// keep them in 64-66; 768 threads per SM still keep far more bytes in flight than the bandwidth needs
// (16-byte loads of 4 streams per thread). tests/test_kernel_cost.py checks every instantiation.
constexpr int kPackedMinBlocks = 3;

template <int GD, int LD, bool kScale>
__global__ void __launch_bounds__(kThreads, kPackedMinBlocks)
    adamw_packed_kernel(const int64_t* __restrict__ segs, float* __restrict__ exp_avg,
                        float* __restrict__ exp_avg_sq, const int64_t* __restrict__ chunks,
                        const float* __restrict__ table, const int n_cols, const float* __restrict__ grad_scale,
                        const Hyper h) {
  using GT = typename Storage<GD>::T;
  constexpr int kVec = 16 / sizeof(GT);  // 16-byte grad loads: 4 fp32 or 8 bf16/fp16
  const int64_t c = blockIdx.x;
  const int64_t seg = chunks[3 * c];
  const int64_t begin = chunks[3 * c + 1];
  const int len = static_cast<int>(chunks[3 * c + 2] - begin);  // <= the chunk size
  const float* row = table + seg * n_cols;
  if (row[kEnabled] == 0.0f) return;
  const int64_t* srow = segs + seg * kNumSegCols;
  const int64_t local = begin - srow[kSegOffset];  // the chunk's first element in the segment's tensors
  float* __restrict__ p = table_ptr<float>(srow[kSegParam], local);
  const GT* __restrict__ g = table_ptr<const GT>(srow[kSegGrad], local);
  float* __restrict__ m = exp_avg + begin;
  float* __restrict__ v = exp_avg_sq + begin;
  using LT = typename Storage<LD == kNone ? kBFloat16 : LD>::T;
  LT* __restrict__ low = nullptr;
  if constexpr (LD != kNone) low = table_ptr<LT>(srow[kSegLowp], local);
  SegScalars s;
  s.step_size = row[kStepSize];
  s.decay = row[kDecay];
  s.bc2_sqrt = row[kBc2Sqrt];
  const float scale = kScale ? *grad_scale : 1.0f;
  const bool small = h.one_minus_beta1 < 0.5f;

  auto update = [&](float& pi, float& mi, float& vi, float gi) {
    if (kScale) gi = gi / scale;
    adamw_element<true>(pi, mi, vi, gi, s, h, small);  // FMAs, as torch's GPU kernels
  };

  uintptr_t addr_bits = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) |
                        reinterpret_cast<uintptr_t>(m) | reinterpret_cast<uintptr_t>(v);
  if (LD != kNone) addr_bits |= reinterpret_cast<uintptr_t>(low);
  const int vec_end = addr_bits % 16 == 0 ? len / kVec * kVec : 0;

  for (int i = static_cast<int>(threadIdx.x) * kVec; i < vec_end; i += kThreads * kVec) {
    GT gv[kVec];
    float pv[kVec], mv[kVec], vv[kVec];
    load_pack<GT, kVec>(g + i, gv);
    load_f32<kVec>(p + i, pv);
    load_f32<kVec>(m + i, mv);
    load_f32<kVec>(v + i, vv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) update(pv[k], mv[k], vv[k], Storage<GD>::load(gv[k]));
    store_f32<kVec>(p + i, pv);
    store_f32<kVec>(m + i, mv);
    store_f32<kVec>(v + i, vv);
    if constexpr (LD != kNone) {
      LT lv[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) lv[k] = Storage<LD>::store(pv[k]);
      store_pack<LT, kVec>(low + i, lv);
    }
  }
  for (int i = vec_end + static_cast<int>(threadIdx.x); i < len; i += kThreads) {
    float pi = p[i], mi = m[i], vi = v[i];
    update(pi, mi, vi, Storage<GD>::load(g[i]));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (LD != kNone) low[i] = Storage<LD>::store(pi);
  }
}

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

template <int GD, int LD, bool kScale>
void launch(const PackedArgs& a, cudaStream_t stream) {
  adamw_packed_kernel<GD, LD, kScale><<<static_cast<unsigned>(a.n_chunks), kThreads, 0, stream>>>(
      reinterpret_cast<const int64_t*>(a.segs), reinterpret_cast<float*>(a.exp_avg),
      reinterpret_cast<float*>(a.exp_avg_sq), reinterpret_cast<const int64_t*>(a.chunks),
      reinterpret_cast<const float*>(a.table), a.n_cols, reinterpret_cast<const float*>(a.grad_scale), a.hyper);
}

template <int GD, int LD>
void launch_scale(const PackedArgs& a, cudaStream_t stream) {
  if (a.grad_scale != 0) {
    launch<GD, LD, true>(a, stream);
  } else {
    launch<GD, LD, false>(a, stream);
  }
}

template <int GD>
bool launch_lowp(const PackedArgs& a, cudaStream_t stream) {
  switch (a.lowp_dtype) {
    case kNone: launch_scale<GD, kNone>(a, stream); return true;
    case kBFloat16: launch_scale<GD, kBFloat16>(a, stream); return true;
    case kFloat16: launch_scale<GD, kFloat16>(a, stream); return true;
  }
  return false;
}

bool dispatch(const PackedArgs& a, cudaStream_t stream) {
  switch (a.grad_dtype) {
    case kFloat32: return launch_lowp<kFloat32>(a, stream);
    case kBFloat16: return launch_lowp<kBFloat16>(a, stream);
    case kFloat16: return launch_lowp<kFloat16>(a, stream);
  }
  return false;
}


// ---------------------------------------------------------------------------------------- lean state
// Moment formats, master modes and grad_sumsq (kernels/contract.py), each mode its own instantiation
// (MF moment format, GD grad dtype, PM param mode, kScale grad_scale; one host-side switch picks it), so the
// loop holds only the mode's own work; grad_sumsq is a pointer tested after the loop (the loop always sums
// g * g, one FMA per element). A thread owns kLeanVec = 8 consecutive elements and a block step covers
// 2048, whole quantization blocks: a block of 256 (8-bit) is one warp, of 128 (4-bit) half a warp, so its
// absmax is a max over the thread's 8 values and a shuffle reduction, with no shared memory or barrier,
// and a thread's 4-bit codes fill whole bytes. Segment and chunk starts are multiples of ALIGN (256);
// offsets within a chunk are 32-bit, the chunk's own position 64-bit. Full steps of a chunk whose pointers
// are 16-byte aligned load and store vectors; the rest (the chunk's last step, or all of an unaligned
// chunk) takes the masked loop. Codes: adamw_math.h code_of, with the bucket tables built in shared
// memory by each block (nearest_code on the midpoints; 8-bit: ~0.1 warp instruction per element of a
// full 64K-element chunk).
enum ParamMode : int { kPmFp32 = 0, kPmFp32Bf16 = 1, kPmFp32F16 = 2, kPmKahanBf16 = 3, kPmKahanF16 = 4, kPmSrBf16 = 5 };
constexpr int kLeanVec = 8;
constexpr int kLeanStep = kThreads * kLeanVec;

template <int PM> struct ParamTraits {
  static constexpr bool kMaster = PM <= kPmFp32F16;  // fp32 master in `param`
  static constexpr bool kKahan = PM == kPmKahanBf16 || PM == kPmKahanF16;
  static constexpr bool kSr = PM == kPmSrBf16;
  // storage dtype of `param` (fp32 master) or of param and compensation (kahan, sr); of param_lowp
  static constexpr int kParam = kMaster ? kFloat32 : (PM == kPmKahanF16 ? kFloat16 : kBFloat16);
  static constexpr int kLowp = PM == kPmFp32Bf16 ? kBFloat16 : (PM == kPmFp32F16 ? kFloat16 : kNone);
};

// 8 elements of a storage type D at ptr -> fp32: kFull, one or two 16-byte loads; else the first n.
template <bool kFull, int D>
__device__ __forceinline__ void load8(const typename Storage<D>::T* ptr, int n, float (&out)[kLeanVec]) {
  if constexpr (kFull && D == kFloat32) {
    load_f32<kLeanVec>(ptr, out);
  } else if constexpr (kFull) {
    uint16_t raw[kLeanVec];
    load_pack<uint16_t, kLeanVec>(ptr, raw);
#pragma unroll
    for (int k = 0; k < kLeanVec; ++k) out[k] = Storage<D>::load(raw[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kLeanVec; ++k) out[k] = k < n ? Storage<D>::load(ptr[k]) : 0.0f;
  }
}

// Stores already converted elements (fp32 or 16-bit patterns).
template <bool kFull, typename T>
__device__ __forceinline__ void store8(T* ptr, int n, const T (&in)[kLeanVec]) {
  if constexpr (kFull && sizeof(T) == 4) {
    store_f32<kLeanVec>(ptr, in);
  } else if constexpr (kFull) {
    store_pack<T, kLeanVec>(ptr, in);
  } else {
#pragma unroll
    for (int k = 0; k < kLeanVec; ++k) {
      if (k < n) ptr[k] = in[k];
    }
  }
}

// A thread's code bytes (kWords 32-bit words: 8 codes of 8 bits or of 4) at ptr; masked: the first
// `nbytes`, the rest read as 0.
template <bool kFull, int kWords>
__device__ __forceinline__ void load_codes(const uint8_t* ptr, int nbytes, uint32_t (&w)[kWords]) {
  if constexpr (kFull) {
    load_pack<uint32_t, kWords>(reinterpret_cast<const uint32_t*>(ptr), w);
  } else {
#pragma unroll
    for (int q = 0; q < kWords; ++q) {
      w[q] = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (4 * q + k < nbytes) w[q] |= static_cast<uint32_t>(ptr[4 * q + k]) << (8 * k);
      }
    }
  }
}

template <bool kFull, int kWords>
__device__ __forceinline__ void store_codes(uint8_t* ptr, int nbytes, const uint32_t (&w)[kWords]) {
  if constexpr (kFull) {
    store_pack<uint32_t, kWords>(reinterpret_cast<uint32_t*>(ptr), w);
  } else {
#pragma unroll
    for (int k = 0; k < 4 * kWords; ++k) {
      if (k < nbytes) ptr[k] = static_cast<uint8_t>(w[k / 4] >> (8 * (k % 4)));
    }
  }
}

// Code k of a thread's words: 8-bit codes one byte each, 4-bit ones a nibble (element 2j low).
template <int kBitsPer>
__device__ __forceinline__ uint32_t code_at(const uint32_t* w, int k) {
  constexpr int kPerWord = 32 / kBitsPer;
  if constexpr (kBitsPer == 8) {
    return __byte_perm(w[k / kPerWord], 0u, 0x4440 + k % kPerWord);  // one PRMT
  } else {
    return (w[k / kPerWord] >> (kBitsPer * (k % kPerWord))) & ((1u << kBitsPer) - 1u);
  }
}

template <int kLanes>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// *addr += x with the IEEE fp32 add of the rest of the kernel (no flush to zero: nvcc's default
// -ftz=false). A float atomicAdd (atom/red.add.f32) flushes subnormal inputs and results to zero (PTX
// ISA), which would drop a segment's tiny partial sums of g * g; a compare-and-swap loop on the bits
// keeps them. One call per warp and chunk, so the retries under contention cost nothing measurable.
__device__ __forceinline__ void atomic_add_keep_subnormals(float* addr, float x) {
  unsigned int* bits = reinterpret_cast<unsigned int*>(addr);
  unsigned int seen = *bits, was;
  do {
    was = seen;
    seen = atomicCAS(bits, was, __float_as_uint(__uint_as_float(was) + x));
  } while (seen != was);  // compares bit patterns, so a NaN sum ends the loop too
}

template <int MF> struct LeanFormat {
  static constexpr bool kQuant = MF == kMom8bit || MF == kMom4bit;
  static constexpr int kGroup = MF == kMom4bit ? 128 : 256;  // elements per scale
  static constexpr int kMapM = MF == kMom4bit ? kCode4bitM : kCode8bitM;
  static constexpr int kMapV = MF == kMom4bit ? kCode4bitV : kCode8bitV;
  static constexpr int kCodeBits = MF == kMom4bit ? 4 : 8;
  // shared-memory sizes (1 where unused: no zero-length arrays)
  static constexpr int kQt = kQuant ? 4 * kQTableRow : 1;
  static constexpr int kTabM = kQuant ? static_cast<int>(code_table_bytes<kMapM>()) : 1;
  static constexpr int kTabV = kQuant && code_table_bytes<kMapV>() > 0 ? static_cast<int>(code_table_bytes<kMapV>()) : 1;
};

// ptxas' own register budget (0: no minimum of resident blocks) except where it spilled in the main loop:
// fp32 moments with fp16 grads and fp16 Kahan params (20 B per thread at 64 registers; none at 80 with a
// minimum of 3 blocks, sm_90, nvcc 13.0). A minimum for every mode spilled elsewhere (3: five modes at 80
// registers; 4: three at 64).
template <int MF, int GD, int PM>
constexpr int lean_min_blocks() {
  return MF == kMomFp32 && GD == kFloat16 && PM == kPmKahanF16 ? 3 : 0;
}

template <int MF, int GD, int PM, bool kScale>
__global__ void __launch_bounds__(kThreads, lean_min_blocks<MF, GD, PM>())
    adamw_lean_kernel(const PackedArgs a) {
  using F = LeanFormat<MF>;
  using P = ParamTraits<PM>;
  static_assert(P::kLowp == kNone || P::kMaster, "a bf16/fp16 copy is written only beside an fp32 master");
  using GT = typename Storage<GD>::T;
  using PT = typename Storage<P::kParam>::T;
  constexpr int MD = MF == kMomFp32 ? kFloat32 : kBFloat16;  // unquantized moments' storage
  using MT = typename Storage<MD>::T;
  __shared__ float qt[F::kQt];
  __shared__ uint8_t tab_m[F::kTabM], tab_v[F::kTabV];
  const int64_t* chunks = reinterpret_cast<const int64_t*>(a.chunks);
  const int64_t c = blockIdx.x;
  const int64_t seg = chunks[3 * c], begin = chunks[3 * c + 1], end = chunks[3 * c + 2];
  const float* row = reinterpret_cast<const float*>(a.table) + seg * a.n_cols;
  if (row[kEnabled] == 0.0f) return;  // uniform over the block, before any barrier
  if constexpr (F::kQuant) {
    const float* src = reinterpret_cast<const float*>(a.qtable);
    for (int k = threadIdx.x; k < 4 * kQTableRow; k += kThreads) qt[k] = src[k];
    __syncthreads();
    constexpr CodeBuckets bm = CodeMapTraits<F::kMapM>::kB, bv = CodeMapTraits<F::kMapV>::kB;
    for (uint32_t e = threadIdx.x; e < code_table_bytes<F::kMapM>(); e += kThreads) {
      tab_m[e] = bucket_base<CodeMapTraits<F::kMapM>::kBits>(e, bm, qt + kQTableRow);
    }
    if constexpr (code_table_bytes<F::kMapV>() > 0) {
      for (uint32_t e = threadIdx.x; e < code_table_bytes<F::kMapV>(); e += kThreads) {
        tab_v[e] = bucket_base<CodeMapTraits<F::kMapV>::kBits>(e, bv, qt + 3 * kQTableRow);
      }
    }
    __syncthreads();
  }
  SegScalars s;
  s.step_size = row[kStepSize];
  s.decay = row[kDecay];
  s.bc2_sqrt = row[kBc2Sqrt];
  const Hyper h = a.hyper;
  const bool small = h.one_minus_beta1 < 0.5f;
  uint32_t key_p = 0, key_m = 0, key_v = 0;
  if constexpr (MF == kMomBf16 || P::kSr) {
    const bool sr = a.n_cols >= kNumColsLean;
    const uint32_t pid = sr ? static_cast<uint32_t>(row[kParamId]) : 0u, step = sr ? static_cast<uint32_t>(row[kStep]) : 0u;
    key_p = segment_key(a.seed, pid, step, kLaneParam);
    key_m = segment_key(a.seed, pid, step, kLaneExpAvg);
    key_v = segment_key(a.seed, pid, step, kLaneExpAvgSq);
  }
  const float scale = kScale ? *reinterpret_cast<const float*>(a.grad_scale) : 1.0f;
  // The chunk's streams from its first element on: the segment's own tensors (segment-table row) from
  // element begin - offset, the packed state from element begin. In the loop, offsets within the chunk
  // (< 2^31) are 32-bit; the base pointers are 64-bit. SR indices are relative to the segment (< 2^32).
  const int64_t* srow = reinterpret_cast<const int64_t*>(a.segs) + seg * kNumSegCols;
  const int64_t local = begin - srow[kSegOffset];
  const GT* g0 = table_ptr<const GT>(srow[kSegGrad], local);
  PT* p0 = table_ptr<PT>(srow[kSegParam], local);
  PT* comp0 = reinterpret_cast<PT*>(a.compensation) + begin;
  uint16_t* low0 = nullptr;
  if constexpr (P::kLowp != kNone) low0 = table_ptr<uint16_t>(srow[kSegLowp], local);
  MT* m0 = reinterpret_cast<MT*>(a.exp_avg) + begin;
  MT* v0 = reinterpret_cast<MT*>(a.exp_avg_sq) + begin;
  uint8_t* cm0 = reinterpret_cast<uint8_t*>(a.exp_avg) + (begin * F::kCodeBits) / 8;
  uint8_t* cv0 = reinterpret_cast<uint8_t*>(a.exp_avg_sq) + (begin * F::kCodeBits) / 8;
  float* ms0 = reinterpret_cast<float*>(a.exp_avg_scale) + begin / F::kGroup;
  float* vs0 = reinterpret_cast<float*>(a.exp_avg_sq_scale) + begin / F::kGroup;
  const uint32_t idx0 = static_cast<uint32_t>(local);
  const int len = static_cast<int>(end - begin);  // <= the chunk size
  float sumsq = 0.0f;

  auto step = [&](auto full, int base) {
    constexpr bool kFull = decltype(full)::value;
    const int o = base + static_cast<int>(threadIdx.x) * kLeanVec;  // the thread's first element (>= 0)
    [[maybe_unused]] const uint32_t blk = static_cast<uint32_t>(o) / F::kGroup;  // its quantization block
    const int n = kFull ? kLeanVec : (len - o < 0 ? 0 : (len - o > kLeanVec ? kLeanVec : len - o));
    float g[kLeanVec], p[kLeanVec], m[kLeanVec], v[kLeanVec];
    load8<kFull, GD>(g0 + o, n, g);
    load8<kFull, P::kParam>(p0 + o, n, p);
    if constexpr (P::kKahan) {
      float comp[kLeanVec];
      load8<kFull, P::kParam>(comp0 + o, n, comp);
#pragma unroll
      for (int k = 0; k < kLeanVec; ++k) p[k] = p[k] + comp[k];
    }
    constexpr int kBitsPer = F::kCodeBits;
    [[maybe_unused]] const int nbytes = (n * kBitsPer + 7) / 8;  // code bytes of the valid elements
    if constexpr (!F::kQuant) {
      load8<kFull, MD>(m0 + o, n, m);
      load8<kFull, MD>(v0 + o, n, v);
    } else {
      uint32_t wm[kLeanVec * kBitsPer / 32], wv[kLeanVec * kBitsPer / 32];  // the thread's code words
      load_codes<kFull>(cm0 + o * kBitsPer / 8, nbytes, wm);
      load_codes<kFull>(cv0 + o * kBitsPer / 8, nbytes, wv);
      const float sm = n > 0 ? ms0[blk] : 0.0f;  // invalid elements: scale 0 -> 0
      const float sv = n > 0 ? vs0[blk] : 0.0f;
#pragma unroll
      for (int k = 0; k < kLeanVec; ++k) {
        m[k] = qt[code_at<kBitsPer>(wm, k)] * sm;
        v[k] = qt[2 * kQTableRow + code_at<kBitsPer>(wv, k)] * sv;
        if (!kFull && k >= n) m[k] = v[k] = 0.0f;
      }
    }
#pragma unroll
    for (int k = 0; k < kLeanVec; ++k) {
      if constexpr (kScale) g[k] = g[k] / scale;
      sumsq = fmaf(g[k], g[k], sumsq);  // invalid elements add 0
      adamw_element<true>(p[k], m[k], v[k], g[k], s, h, small);
    }
    [[maybe_unused]] const uint32_t idx = idx0 + static_cast<uint32_t>(o);  // SR index of element k: idx + k
    if constexpr (MF == kMomFp32) {
      store8<kFull>(m0 + o, n, m);
      store8<kFull>(v0 + o, n, v);
    } else if constexpr (MF == kMomBf16) {
      uint16_t om[kLeanVec], ov[kLeanVec];
#pragma unroll
      for (int k = 0; k < kLeanVec; ++k) {
        om[k] = f32_to_bf16_sr(m[k], sr_bits(key_m, idx + k));
        ov[k] = f32_to_bf16_sr(v[k], sr_bits(key_v, idx + k));
      }
      store8<kFull>(m0 + o, n, om);
      store8<kFull>(v0 + o, n, ov);
    } else {
      constexpr int kLanes = F::kGroup / kLeanVec;  // threads per quantization block: 32 or 16
      float am = 0.0f, av = 0.0f;  // invalid elements hold 0
#pragma unroll
      for (int k = 0; k < kLeanVec; ++k) {
        am = fmaxf(am, fabsf(m[k]));
        av = fmaxf(av, fabsf(v[k]));
      }
      am = group_max<kLanes>(am);
      av = group_max<kLanes>(av);
      if ((threadIdx.x % kLanes) == 0 && n > 0) {  // the block's first thread; the block starts at o
        ms0[blk] = am;
        vs0[blk] = av;
      }
      uint32_t wm[kLeanVec * kBitsPer / 32] = {}, wv[kLeanVec * kBitsPer / 32] = {};
      constexpr int kPerWord = 32 / kBitsPer;
#pragma unroll
      for (int k = 0; k < kLeanVec; ++k) {
        uint32_t cm = code_of<F::kMapM>(normalize(m[k], am), tab_m, qt + kQTableRow);
        uint32_t cv = code_of<F::kMapV>(normalize(v[k], av), tab_v, qt + 3 * kQTableRow);
        if (!kFull && k >= n) cm = cv = 0;  // an odd tail's high nibble is written as 0
        wm[k / kPerWord] += cm << (kBitsPer * (k % kPerWord));  // disjoint bits: + is |, as one IMAD
        wv[k / kPerWord] += cv << (kBitsPer * (k % kPerWord));
      }
      store_codes<kFull>(cm0 + o * kBitsPer / 8, nbytes, wm);
      store_codes<kFull>(cv0 + o * kBitsPer / 8, nbytes, wv);
    }
    if constexpr (P::kMaster) {
      store8<kFull>(p0 + o, n, p);
      if constexpr (P::kLowp != kNone) {
        uint16_t lo[kLeanVec];
#pragma unroll
        for (int k = 0; k < kLeanVec; ++k) lo[k] = Storage<P::kLowp>::store(p[k]);
        store8<kFull>(low0 + o, n, lo);
      }
    } else if constexpr (P::kKahan) {
      uint16_t hi[kLeanVec], lo[kLeanVec];
#pragma unroll
      for (int k = 0; k < kLeanVec; ++k) {
        hi[k] = Storage<P::kParam>::store(p[k]);
        lo[k] = Storage<P::kParam>::store(p[k] - Storage<P::kParam>::load(hi[k]));
      }
      store8<kFull>(p0 + o, n, hi);
      store8<kFull>(comp0 + o, n, lo);
    } else {
      uint16_t out[kLeanVec];
#pragma unroll
      for (int k = 0; k < kLeanVec; ++k) out[k] = f32_to_bf16_sr(p[k], sr_bits(key_p, idx + k));
      store8<kFull>(p0 + o, n, out);
    }
  };

  // Vector loads only where every stream the mode touches starts on a 16-byte boundary.
  uintptr_t addr_bits = reinterpret_cast<uintptr_t>(g0) | reinterpret_cast<uintptr_t>(p0);
  if constexpr (P::kKahan) addr_bits |= reinterpret_cast<uintptr_t>(comp0);
  if constexpr (P::kLowp != kNone) addr_bits |= reinterpret_cast<uintptr_t>(low0);
  if constexpr (F::kQuant) {
    addr_bits |= reinterpret_cast<uintptr_t>(cm0) | reinterpret_cast<uintptr_t>(cv0);
  } else {
    addr_bits |= reinterpret_cast<uintptr_t>(m0) | reinterpret_cast<uintptr_t>(v0);
  }
  int base = 0;
  if (addr_bits % 16 == 0) {
    for (; base + kLeanStep <= len; base += kLeanStep) step(std::true_type{}, base);
  }
  for (; base < len; base += kLeanStep) step(std::false_type{}, base);
  if (a.grad_sumsq != 0) {
    const float w = warp_sum(sumsq);
    if ((threadIdx.x & 31) == 0) atomic_add_keep_subnormals(reinterpret_cast<float*>(a.grad_sumsq) + seg, w);
  }
}

template <int MF, int GD, int PM>
void launch_lean(const PackedArgs& a, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(a.n_chunks);
  if (a.grad_scale != 0) {
    adamw_lean_kernel<MF, GD, PM, true><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    adamw_lean_kernel<MF, GD, PM, false><<<blocks, kThreads, 0, stream>>>(a);
  }
}

// The ParamMode of a call: master mode, param storage and param_lowp dtype; -1 for a combination the
// Python checks (contract.check_lean) never let through.
int param_mode(const PackedArgs& a) {
  if (a.master == kMasterFp32) {
    return a.lowp_dtype == kNone ? kPmFp32 : a.lowp_dtype == kBFloat16 ? kPmFp32Bf16 : a.lowp_dtype == kFloat16 ? kPmFp32F16 : -1;
  }
  if (a.lowp_dtype != kNone) return -1;
  if (a.master == kMasterKahan) return a.param_dtype == kBFloat16 ? kPmKahanBf16 : a.param_dtype == kFloat16 ? kPmKahanF16 : -1;
  if (a.master == kMasterStochastic) return a.param_dtype == kBFloat16 ? kPmSrBf16 : -1;
  return -1;
}

template <int MF, int GD>
bool launch_lean_param(const PackedArgs& a, cudaStream_t stream) {
  switch (param_mode(a)) {
    case kPmFp32: launch_lean<MF, GD, kPmFp32>(a, stream); return true;
    case kPmFp32Bf16: launch_lean<MF, GD, kPmFp32Bf16>(a, stream); return true;
    case kPmFp32F16: launch_lean<MF, GD, kPmFp32F16>(a, stream); return true;
    case kPmKahanBf16: launch_lean<MF, GD, kPmKahanBf16>(a, stream); return true;
    case kPmKahanF16: launch_lean<MF, GD, kPmKahanF16>(a, stream); return true;
    case kPmSrBf16: launch_lean<MF, GD, kPmSrBf16>(a, stream); return true;
  }
  return false;
}

template <int MF>
bool launch_lean_grad(const PackedArgs& a, cudaStream_t stream) {
  switch (a.grad_dtype) {
    case kFloat32: return launch_lean_param<MF, kFloat32>(a, stream);
    case kBFloat16: return launch_lean_param<MF, kBFloat16>(a, stream);
    case kFloat16: return launch_lean_param<MF, kFloat16>(a, stream);
  }
  return false;
}

bool dispatch_lean(const PackedArgs& a, cudaStream_t stream) {
  switch (a.moments) {
    case kMomFp32: return launch_lean_grad<kMomFp32>(a, stream);
    case kMomBf16: return launch_lean_grad<kMomBf16>(a, stream);
    case kMom8bit: return launch_lean_grad<kMom8bit>(a, stream);
    case kMom4bit: return launch_lean_grad<kMom4bit>(a, stream);
  }
  return false;
}

}  // namespace

int cuda_device_count(std::string* why) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset the runtime's last error so later calls start clean
    if (why) *why = cuda_error("cudaGetDeviceCount", err);
    return -1;
  }
  return n;
}

std::string adamw_cuda(const PackedArgs& a, int device, uintptr_t stream) {
  if (a.n_chunks <= 0) return "";
  if (a.n_chunks > 0x7fffffff) return "too many chunks for one launch: " + std::to_string(a.n_chunks);
  // The launch goes to the calling thread's current device, which the caller (kernels/native.py, under
  // torch.cuda.device) has made the tensors' device. Switching devices here and back would create a
  // context on the previous device when it had none (cudaSetDevice initializes its primary context), so
  // a mismatch is an error instead. The runtime reads the current device from the driver's current
  // context, the one torch's own runtime set.
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return cuda_error("cudaGetDevice", err);
  if (current != device) {
    return "the current CUDA device is " + std::to_string(current) + ", but the tensors are on cuda:" +
           std::to_string(device) + " (launch under torch.cuda.device(" + std::to_string(device) + "))";
  }
  if (!(a.lean() ? dispatch_lean(a, reinterpret_cast<cudaStream_t>(stream))
                  : dispatch(a, reinterpret_cast<cudaStream_t>(stream)))) {
    return "unsupported codes: grad dtype " + std::to_string(a.grad_dtype) + ", param_lowp dtype " +
           std::to_string(a.lowp_dtype) + ", moments " + std::to_string(a.moments) + ", master " +
           std::to_string(a.master) + ", param dtype " + std::to_string(a.param_dtype);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return cuda_error("launching the AdamW kernel", err);
  return "";
}

void cuda_build_archs(std::vector<int>* sass, int* ptx) {
  // __CUDA_ARCH_LIST__ (nvcc >= 11.5): the virtual architectures compiled, e.g. 800,900,1000,1200; each
  // also has its SASS (setup.py gencode_flags), and LISA_FUSED_PTX_ARCH is the one shipped as PTX.
#ifdef __CUDA_ARCH_LIST__
  for (const int arch : {__CUDA_ARCH_LIST__}) sass->push_back(arch / 10);
#endif
#ifdef LISA_FUSED_PTX_ARCH
  *ptx = LISA_FUSED_PTX_ARCH;
#else
  *ptx = -1;
#endif
}

}  // namespace lisa_fused
