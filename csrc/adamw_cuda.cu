// CUDA AdamW over a packed buffer: one launch, one block per chunk of the chunk table.
//
// Each block reads its (segment, start, end) row and the segment's fp32 scalars, returns at once when
// the segment is disabled, then walks its chunk with 16-byte vector loads (4 fp32 grads or 8 bf16/fp16
// grads per thread and step) and finishes with a scalar tail. Segment offsets are multiples of 64
// elements (contract.ALIGN), so every chunk start is vector aligned; a block whose pointers are not
// (a sliced buffer) takes the scalar loop for its whole chunk. Indices are int64 throughout.
#include <cuda_runtime.h>

#include <string>

#include "adamw.h"

namespace lisa_fused {
namespace {

constexpr int kThreads = 256;

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

template <int GD, int LD, bool kScale>
__global__ void __launch_bounds__(kThreads)
    adamw_packed_kernel(float* __restrict__ p, const typename Storage<GD>::T* __restrict__ g,
                        float* __restrict__ m, float* __restrict__ v, void* __restrict__ low_ptr,
                        const int64_t* __restrict__ chunks, const float* __restrict__ table, const int n_cols,
                        const float* __restrict__ grad_scale, const Hyper h) {
  using GT = typename Storage<GD>::T;
  constexpr int kVec = 16 / sizeof(GT);  // 16-byte grad loads: 4 fp32 or 8 bf16/fp16
  const int64_t c = blockIdx.x;
  const int64_t begin = chunks[3 * c + 1];
  const int64_t end = chunks[3 * c + 2];
  const float* row = table + chunks[3 * c] * n_cols;
  if (row[kEnabled] == 0.0f) return;
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
  if (LD != kNone) addr_bits |= reinterpret_cast<uintptr_t>(low_ptr);
  const bool aligned = (addr_bits % 16 == 0) && (begin % kVec == 0);
  const int64_t vec_end = aligned ? begin + (end - begin) / kVec * kVec : begin;

  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
       i += static_cast<int64_t>(kThreads) * kVec) {
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
      using LT = typename Storage<LD>::T;
      LT lv[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) lv[k] = Storage<LD>::store(pv[k]);
      store_pack<LT, kVec>(static_cast<LT*>(low_ptr) + i, lv);
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < end; i += kThreads) {
    float pi = p[i], mi = m[i], vi = v[i];
    update(pi, mi, vi, Storage<GD>::load(g[i]));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (LD != kNone) static_cast<typename Storage<LD>::T*>(low_ptr)[i] = Storage<LD>::store(pi);
  }
}

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

template <int GD, int LD, bool kScale>
void launch(const PackedArgs& a, cudaStream_t stream) {
  adamw_packed_kernel<GD, LD, kScale><<<static_cast<unsigned>(a.n_chunks), kThreads, 0, stream>>>(
      reinterpret_cast<float*>(a.param), reinterpret_cast<const typename Storage<GD>::T*>(a.grad),
      reinterpret_cast<float*>(a.exp_avg), reinterpret_cast<float*>(a.exp_avg_sq),
      reinterpret_cast<void*>(a.param_lowp), reinterpret_cast<const int64_t*>(a.chunks),
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
// Moment formats, master modes and grad_sumsq (kernels/contract.py). One thread per element, the
// block walks its chunk 256 elements at a time: one 8-bit quantization block or two 4-bit ones, so the
// absmax is a warp-shuffle max plus a max over 8 (or 4) warp partials in shared memory. Segment starts
// and chunk lengths are multiples of ALIGN (256), so each step covers whole blocks of one segment.
template <typename T>
__device__ __forceinline__ float load_as_f32(const T* ptr, int64_t i, int dtype) {
  if constexpr (sizeof(T) == 4) {
    return ptr[i];
  } else {
    return dtype == kBFloat16 ? bf16_to_f32(ptr[i]) : f16_to_f32(ptr[i]);
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int MF, int GD>
__global__ void __launch_bounds__(kThreads)
    adamw_lean_kernel(const PackedArgs a) {
  static_assert(kThreads == 256, "one step covers one 256-element piece");
  __shared__ float qt[4 * kQTableRow];
  __shared__ float red_m[kThreads / 32], red_v[kThreads / 32];
  constexpr bool kQuant = MF == kMom8bit || MF == kMom4bit;
  constexpr int kBits = MF == kMom4bit ? 4 : 8;
  constexpr int kGroup = MF == kMom4bit ? 128 : 256;  // elements per scale
  if constexpr (kQuant) {
    const float* src = reinterpret_cast<const float*>(a.qtable);
    for (int k = threadIdx.x; k < 4 * kQTableRow; k += kThreads) qt[k] = src[k];
  }
  const int64_t* chunks = reinterpret_cast<const int64_t*>(a.chunks);
  const int64_t c = blockIdx.x;
  const int64_t seg = chunks[3 * c], begin = chunks[3 * c + 1], end = chunks[3 * c + 2];
  const float* row = reinterpret_cast<const float*>(a.table) + seg * a.n_cols;
  if (row[kEnabled] == 0.0f) return;  // uniform over the block, before any barrier
  SegScalars s;
  s.step_size = row[kStepSize];
  s.decay = row[kDecay];
  s.bc2_sqrt = row[kBc2Sqrt];
  const Hyper h = a.hyper;
  const bool small = h.one_minus_beta1 < 0.5f;
  const bool sr = a.n_cols >= kNumColsLean;
  const uint32_t pid = sr ? static_cast<uint32_t>(row[kParamId]) : 0u, step = sr ? static_cast<uint32_t>(row[kStep]) : 0u;
  const uint32_t key_p = segment_key(a.seed, pid, step, kLaneParam);
  const uint32_t key_m = segment_key(a.seed, pid, step, kLaneExpAvg);
  const uint32_t key_v = segment_key(a.seed, pid, step, kLaneExpAvgSq);
  const int64_t seg_off = reinterpret_cast<const int64_t*>(a.bounds)[2 * seg];
  const float scale = a.grad_scale != 0 ? *reinterpret_cast<const float*>(a.grad_scale) : 1.0f;
  using GT = typename Storage<GD>::T;
  const GT* g = reinterpret_cast<const GT*>(a.grad);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float sumsq = 0.0f;
  if constexpr (kQuant) __syncthreads();  // qt loaded

  for (int64_t base = begin; base < end; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < end;
    float pi = 0.0f, mi = 0.0f, vi = 0.0f, gi = 0.0f;
    const uint32_t idx = static_cast<uint32_t>(i - seg_off);
    if (valid) {
      gi = Storage<GD>::load(g[i]);
      if (a.grad_scale != 0) gi = gi / scale;
      sumsq = fmaf(gi, gi, sumsq);
      if (a.master == kMasterFp32) {
        pi = reinterpret_cast<const float*>(a.param)[i];
      } else {
        pi = load_as_f32(reinterpret_cast<const uint16_t*>(a.param), i, a.param_dtype);
        if (a.master == kMasterKahan) pi = pi + load_as_f32(reinterpret_cast<const uint16_t*>(a.compensation), i, a.param_dtype);
      }
      if constexpr (MF == kMomFp32) {
        mi = reinterpret_cast<const float*>(a.exp_avg)[i];
        vi = reinterpret_cast<const float*>(a.exp_avg_sq)[i];
      } else if constexpr (MF == kMomBf16) {
        mi = bf16_to_f32(reinterpret_cast<const uint16_t*>(a.exp_avg)[i]);
        vi = bf16_to_f32(reinterpret_cast<const uint16_t*>(a.exp_avg_sq)[i]);
      } else {
        const uint8_t* cm = reinterpret_cast<const uint8_t*>(a.exp_avg);
        const uint8_t* cv = reinterpret_cast<const uint8_t*>(a.exp_avg_sq);
        uint32_t codem, codev;
        if constexpr (MF == kMom4bit) {
          const int shift = static_cast<int>(i & 1) * 4;
          codem = (cm[i >> 1] >> shift) & 0xfu;
          codev = (cv[i >> 1] >> shift) & 0xfu;
        } else {
          codem = cm[i];
          codev = cv[i];
        }
        mi = qt[codem] * reinterpret_cast<const float*>(a.exp_avg_scale)[i / kGroup];
        vi = qt[2 * kQTableRow + codev] * reinterpret_cast<const float*>(a.exp_avg_sq_scale)[i / kGroup];
      }
      adamw_element<true>(pi, mi, vi, gi, s, h, small);
    }
    if constexpr (MF == kMomFp32) {
      if (valid) {
        reinterpret_cast<float*>(a.exp_avg)[i] = mi;
        reinterpret_cast<float*>(a.exp_avg_sq)[i] = vi;
      }
    } else if constexpr (MF == kMomBf16) {
      if (valid) {
        reinterpret_cast<uint16_t*>(a.exp_avg)[i] = f32_to_bf16_sr(mi, sr_bits(key_m, idx));
        reinterpret_cast<uint16_t*>(a.exp_avg_sq)[i] = f32_to_bf16_sr(vi, sr_bits(key_v, idx));
      }
    } else {
      // absmax over the thread's quantization block (invalid lanes hold 0)
      const float wm = warp_max(fabsf(mi)), wv = warp_max(fabsf(vi));
      __syncthreads();  // the previous step's readers of red_* are done
      if (lane == 0) {
        red_m[warp] = wm;
        red_v[warp] = wv;
      }
      __syncthreads();
      constexpr int kWarpsPerGroup = kGroup / 32;
      const int w0 = (warp / kWarpsPerGroup) * kWarpsPerGroup;
      float am = 0.0f, av = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarpsPerGroup; ++w) {
        am = fmaxf(am, red_m[w0 + w]);
        av = fmaxf(av, red_v[w0 + w]);
      }
      const uint32_t codem = nearest_code<kBits>(normalize(mi, am), qt + kQTableRow);
      const uint32_t codev = nearest_code<kBits>(normalize(vi, av), qt + 3 * kQTableRow);
      const int64_t first = base + static_cast<int64_t>(w0) * 32;  // the block's first element
      if (threadIdx.x % kGroup == 0 && first < end) {
        reinterpret_cast<float*>(a.exp_avg_scale)[first / kGroup] = am;
        reinterpret_cast<float*>(a.exp_avg_sq_scale)[first / kGroup] = av;
      }
      if constexpr (MF == kMom4bit) {
        const uint32_t nm = __shfl_down_sync(0xffffffffu, codem, 1);
        const uint32_t nv = __shfl_down_sync(0xffffffffu, codev, 1);
        if (valid && (i & 1) == 0) {
          const bool pair = i + 1 < end;  // an odd tail's high nibble is written as 0
          reinterpret_cast<uint8_t*>(a.exp_avg)[i >> 1] = static_cast<uint8_t>(codem | ((pair ? nm : 0u) << 4));
          reinterpret_cast<uint8_t*>(a.exp_avg_sq)[i >> 1] = static_cast<uint8_t>(codev | ((pair ? nv : 0u) << 4));
        }
      } else if (valid) {
        reinterpret_cast<uint8_t*>(a.exp_avg)[i] = static_cast<uint8_t>(codem);
        reinterpret_cast<uint8_t*>(a.exp_avg_sq)[i] = static_cast<uint8_t>(codev);
      }
    }
    if (valid) {
      if (a.master == kMasterFp32) {
        reinterpret_cast<float*>(a.param)[i] = pi;
        if (a.lowp_dtype == kBFloat16) reinterpret_cast<uint16_t*>(a.param_lowp)[i] = f32_to_bf16(pi);
        if (a.lowp_dtype == kFloat16) reinterpret_cast<uint16_t*>(a.param_lowp)[i] = f32_to_f16(pi);
      } else if (a.master == kMasterKahan) {
        uint16_t* p = reinterpret_cast<uint16_t*>(a.param);
        uint16_t* comp = reinterpret_cast<uint16_t*>(a.compensation);
        if (a.param_dtype == kBFloat16) {
          const uint16_t hi = f32_to_bf16(pi);
          p[i] = hi;
          comp[i] = f32_to_bf16(pi - bf16_to_f32(hi));
        } else {
          const uint16_t hi = f32_to_f16(pi);
          p[i] = hi;
          comp[i] = f32_to_f16(pi - f16_to_f32(hi));
        }
      } else {
        reinterpret_cast<uint16_t*>(a.param)[i] = f32_to_bf16_sr(pi, sr_bits(key_p, idx));
      }
    }
  }
  if (a.grad_sumsq != 0) {
    const float w = warp_sum(sumsq);
    if (lane == 0) atomicAdd(reinterpret_cast<float*>(a.grad_sumsq) + seg, w);
  }
}

template <int MF>
bool launch_lean_grad(const PackedArgs& a, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(a.n_chunks);
  switch (a.grad_dtype) {
    case kFloat32: adamw_lean_kernel<MF, kFloat32><<<blocks, kThreads, 0, stream>>>(a); return true;
    case kBFloat16: adamw_lean_kernel<MF, kBFloat16><<<blocks, kThreads, 0, stream>>>(a); return true;
    case kFloat16: adamw_lean_kernel<MF, kFloat16><<<blocks, kThreads, 0, stream>>>(a); return true;
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
  int prev = 0;
  cudaError_t err = cudaGetDevice(&prev);
  if (err != cudaSuccess) return cuda_error("cudaGetDevice", err);
  if (prev != device && (err = cudaSetDevice(device)) != cudaSuccess) return cuda_error("cudaSetDevice", err);
  std::string result;
  if (!(a.lean() ? dispatch_lean(a, reinterpret_cast<cudaStream_t>(stream))
                  : dispatch(a, reinterpret_cast<cudaStream_t>(stream)))) {
    result = "unsupported codes: grad dtype " + std::to_string(a.grad_dtype) + ", param_lowp dtype " +
             std::to_string(a.lowp_dtype) + ", moments " + std::to_string(a.moments);
  } else if ((err = cudaGetLastError()) != cudaSuccess) {
    result = cuda_error("launching the AdamW kernel", err);
  }
  if (prev != device) cudaSetDevice(prev);
  return result;
}

}  // namespace lisa_fused
