// Host-side entry points of the segment-table AdamW kernels. Raw pointers (as integers) and sizes only, so
// the bindings need neither torch nor CUDA headers.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "adamw_math.h"

namespace lisa_fused {

// One launch over S segments (kernels/contract.py). `segs` is the int64 [S, kNumSegCols] segment table
// (adamw_math.h SegCol: state offset, numel, and the addresses of each segment's own param, grad and
// low-precision copy, which may sit anywhere: separate allocations, slices at odd element offsets);
// `chunks` is an int64 [n_chunks, 3] table of (segment, start, end) indices in the packed *state* index
// space, each chunk inside one segment: the chunk's param / grad / lowp elements are those of the
// segment from (start - offset) on, its state elements those of exp_avg ... from start on. `table` is
// the per-segment [S, n_cols] hparams table (float64 on the host for the CPU kernel, float32 in device
// memory for the CUDA kernel). `grad_scale` may be 0 (no scaling); lowp_dtype == kNone: no segment has a
// low-precision copy (its SEG_LOWP is 0), else every enabled one has.
struct PackedArgs {
  uintptr_t segs = 0;        // const int64_t* [S, kNumSegCols] (host for the CPU kernel, device for CUDA)
  uintptr_t exp_avg = 0;     // float32* (fp32 moments), uint16_t* (bf16), uint8_t* (codes)
  uintptr_t exp_avg_sq = 0;
  uintptr_t grad_scale = 0;  // const float* (1 element) or 0
  uintptr_t chunks = 0;      // const int64_t* [n_chunks, 3]
  uintptr_t table = 0;       // const double* (CPU) / const float* (CUDA), [S, n_cols]
  int64_t n_chunks = 0;
  int grad_dtype = kFloat32;
  int lowp_dtype = kNone;
  Hyper hyper{};
  int n_cols = kNumCols;  // row stride of `table`: kNumCols or kNumColsLean

  // Lean state (kernels/contract.py). Defaults: fp32 moments, fp32 master, no grad_sumsq, which runs the
  // original fast loops. Anything else runs the block-wise lean loop.
  int moments = kMomFp32;        // MomentFormat of exp_avg / exp_avg_sq
  int master = kMasterFp32;      // MasterMode: params are float32* (fp32) or param_dtype* (kahan, stochastic)
  int param_dtype = kFloat32;    // storage dtype of the params
  uintptr_t exp_avg_scale = 0;   // float* [ceil(N / block)] (8bit/4bit) or 0
  uintptr_t exp_avg_sq_scale = 0;
  uintptr_t compensation = 0;    // param_dtype* [N] packed state (kahan) or 0
  uintptr_t qtable = 0;          // const float* [4][256] (8bit/4bit) or 0
  uintptr_t grad_sumsq = 0;      // float* [S] or 0: sum of g*g per enabled segment is added
  uint32_t seed = 0;             // stochastic-rounding seed

  bool lean() const { return moments != kMomFp32 || master != kMasterFp32 || grad_sumsq != 0; }
};

// CPU kernel (adamw_cpu.cpp): OpenMP over chunks with `num_threads` threads. Throws on bad dtypes.
void adamw_cpu(const PackedArgs& a, int num_threads);
// The copy of the CPU loop this machine runs: "avx2+fma" (fused multiply-adds) or "baseline".
const char* cpu_kernel_isa();
// The quantizer's code search as the kernels run it (adamw_math.h code_of, bucket tables built from the
// [4][256] `qtable` of format `moments` (kMom8bit / kMom4bit)) on n fp32 values x / 1: out[i] = code of
// x[i] in the exp_avg (which = 0) or exp_avg_sq (which = 1) map. vectorized: the AVX2 copy where this
// CPU has it, else the scalar one. For tests (tests/test_lean_kernels.py); throws on bad codes.
void nearest_codes_cpu(const float* x, int64_t n, const float* qtable, int moments, int which, bool vectorized,
                       uint8_t* out);

// True when this binary contains the CUDA kernel (adamw_cuda.cu was compiled by nvcc).
bool has_cuda();

// Chunks of the CUDA kernels hold fewer elements than this (adamw_cuda.cu: the lean kernel's 32-bit
// code-bit offsets); kernels/native.py CUDA_CHUNK is checked against it (_C.CUDA_MAX_CHUNK).
constexpr int64_t kCudaMaxChunk = int64_t{1} << 27;

#ifdef LISA_FUSED_WITH_CUDA
// CUDA kernel (adamw_cuda.cu): one launch on `stream` (a cudaStream_t as an integer) of `device`, which
// must be the calling thread's current device (nothing here switches devices: that could create a
// context on another GPU). Returns "" when the launch was queued, else a sentence saying what went
// wrong. Never synchronizes.
std::string adamw_cuda(const PackedArgs& a, int device, uintptr_t stream);
// The architectures compiled in: SASS for each of *sass (e.g. 80, 90), PTX for *ptx (-1: none).
void cuda_build_archs(std::vector<int>* sass, int* ptx);
// Number of CUDA devices the runtime sees, or -1 with *why set when it cannot tell (no driver, ...).
int cuda_device_count(std::string* why);
#endif

}  // namespace lisa_fused
