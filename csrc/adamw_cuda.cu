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
                        const int64_t* __restrict__ chunks, const float4* __restrict__ table,
                        const float* __restrict__ grad_scale, const Hyper h) {
  using GT = typename Storage<GD>::T;
  constexpr int kVec = 16 / sizeof(GT);  // 16-byte grad loads: 4 fp32 or 8 bf16/fp16
  const int64_t c = blockIdx.x;
  const int64_t begin = chunks[3 * c + 1];
  const int64_t end = chunks[3 * c + 2];
  const float4 row = table[chunks[3 * c]];  // (step_size, decay, bc2_sqrt, enabled)
  if (row.w == 0.0f) return;
  SegScalars s;
  s.step_size = row.x;
  s.decay = row.y;
  s.bc2_sqrt = row.z;
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
      reinterpret_cast<const float4*>(a.table), reinterpret_cast<const float*>(a.grad_scale), a.hyper);
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
  if (!dispatch(a, reinterpret_cast<cudaStream_t>(stream))) {
    result = "unsupported dtype codes: grad " + std::to_string(a.grad_dtype) + ", param_lowp " +
             std::to_string(a.lowp_dtype);
  } else if ((err = cudaGetLastError()) != cudaSuccess) {
    result = cuda_error("launching the AdamW kernel", err);
  }
  if (prev != device) cudaSetDevice(prev);
  return result;
}

}  // namespace lisa_fused
