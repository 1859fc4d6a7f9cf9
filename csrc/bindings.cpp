// pybind11 module lisa_fused._C: raw pointers (as integers), sizes and scalars in; no torch headers,
// so one binary serves every torch version. Tensor checks happen in Python (kernels/__init__.py,
// kernels/native.py) before any pointer gets here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "adamw.h"

namespace py = pybind11;
using lisa_fused::PackedArgs;

namespace lisa_fused {
bool has_cuda() {
#ifdef LISA_FUSED_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace lisa_fused

namespace {

PackedArgs make_args(uintptr_t segs, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t grad_scale,
                     uintptr_t chunks, int64_t n_chunks, uintptr_t table, int grad_dtype, int lowp_dtype,
                     double one_minus_beta1, double beta2, double one_minus_beta2, double eps,
                     const py::dict& lean) {
  for (auto [name, ptr] : {std::pair<const char*, uintptr_t>{"segs", segs},
                           {"exp_avg", exp_avg},
                           {"exp_avg_sq", exp_avg_sq},
                           {"chunks", chunks},
                           {"table", table}}) {
    if (ptr == 0 && n_chunks > 0) throw std::invalid_argument(std::string(name) + " is a null pointer");
  }
  if (lowp_dtype != lisa_fused::kNone && lowp_dtype != lisa_fused::kBFloat16 && lowp_dtype != lisa_fused::kFloat16) {
    throw std::invalid_argument("lowp_dtype code " + std::to_string(lowp_dtype) + " is not none/bfloat16/float16");
  }
  PackedArgs a;
  a.segs = segs;
  a.exp_avg = exp_avg;
  a.exp_avg_sq = exp_avg_sq;
  a.grad_scale = grad_scale;
  a.chunks = chunks;
  a.table = table;
  a.n_chunks = n_chunks;
  a.grad_dtype = grad_dtype;
  a.lowp_dtype = lowp_dtype;
  a.hyper.one_minus_beta1 = static_cast<float>(one_minus_beta1);
  a.hyper.beta2 = static_cast<float>(beta2);
  a.hyper.one_minus_beta2 = static_cast<float>(one_minus_beta2);
  a.hyper.eps = static_cast<float>(eps);
  // Lean-state fields (adamw.h PackedArgs), by name; absent keys keep the fp32 defaults.
  for (auto item : lean) {
    const std::string key = py::cast<std::string>(item.first);
    const py::handle val = item.second;
    if (key == "n_cols") a.n_cols = py::cast<int>(val);
    else if (key == "moments") a.moments = py::cast<int>(val);
    else if (key == "master") a.master = py::cast<int>(val);
    else if (key == "param_dtype") a.param_dtype = py::cast<int>(val);
    else if (key == "exp_avg_scale") a.exp_avg_scale = py::cast<uintptr_t>(val);
    else if (key == "exp_avg_sq_scale") a.exp_avg_sq_scale = py::cast<uintptr_t>(val);
    else if (key == "compensation") a.compensation = py::cast<uintptr_t>(val);
    else if (key == "qtable") a.qtable = py::cast<uintptr_t>(val);
    else if (key == "grad_sumsq") a.grad_sumsq = py::cast<uintptr_t>(val);
    else if (key == "seed") a.seed = py::cast<uint32_t>(val);
    else throw std::invalid_argument("unknown lean argument '" + key + "'");
  }
  if (a.n_cols != lisa_fused::kNumCols && a.n_cols != lisa_fused::kNumColsLean) {
    throw std::invalid_argument("table has " + std::to_string(a.n_cols) + " columns, expected 4 or 6");
  }
  return a;
}

void adamw_cpu(uintptr_t segs, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t grad_scale, uintptr_t chunks,
               int64_t n_chunks, uintptr_t table, int grad_dtype, int lowp_dtype, double one_minus_beta1,
               double beta2, double one_minus_beta2, double eps, int num_threads, const py::dict& lean) {
  const PackedArgs a = make_args(segs, exp_avg, exp_avg_sq, grad_scale, chunks, n_chunks, table, grad_dtype,
                                 lowp_dtype, one_minus_beta1, beta2, one_minus_beta2, eps, lean);
  py::gil_scoped_release release;
  lisa_fused::adamw_cpu(a, num_threads);
}

#ifdef LISA_FUSED_WITH_CUDA
// Raises unless the CUDA runtime sees at least one device.
void require_gpu() {
  std::string why;
  const int n = lisa_fused::cuda_device_count(&why);
  if (n < 0) throw std::runtime_error("lisa_fused._C: no usable CUDA device: " + why);
  if (n == 0) throw std::runtime_error("lisa_fused._C: no CUDA device present");
}
#endif

void adamw_cuda(uintptr_t segs, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t grad_scale, uintptr_t chunks,
                int64_t n_chunks, uintptr_t table, int grad_dtype, int lowp_dtype, double one_minus_beta1,
                double beta2, double one_minus_beta2, double eps, int device, uintptr_t stream,
                const py::dict& lean) {
#ifdef LISA_FUSED_WITH_CUDA
  const PackedArgs a = make_args(segs, exp_avg, exp_avg_sq, grad_scale, chunks, n_chunks, table, grad_dtype,
                                 lowp_dtype, one_minus_beta1, beta2, one_minus_beta2, eps, lean);
  require_gpu();
  const std::string err = lisa_fused::adamw_cuda(a, device, stream);
  if (!err.empty()) throw std::runtime_error("lisa_fused._C.adamw_cuda: " + err);
#else
  throw std::runtime_error(
      "lisa_fused._C was built without CUDA (no CUDA toolkit at build time, or LISA_FUSED_SKIP_CUDA=1); "
      "rebuild with a CUDA toolkit (CUDA_HOME) to use backend 'cuda'");
#endif
}

void nearest_codes_cpu(uintptr_t x, int64_t n, uintptr_t qtable, int moments, int which, bool vectorized,
                       uintptr_t out) {
  if (n > 0 && (x == 0 || qtable == 0 || out == 0)) throw std::invalid_argument("x, qtable and out must be non-null");
  py::gil_scoped_release release;
  lisa_fused::nearest_codes_cpu(reinterpret_cast<const float*>(x), n, reinterpret_cast<const float*>(qtable),
                                moments, which, vectorized, reinterpret_cast<uint8_t*>(out));
}

// None when a CUDA device can be used, else a sentence saying why not.
py::object cuda_unavailable_reason() {
#ifdef LISA_FUSED_WITH_CUDA
  std::string why;
  const int n = lisa_fused::cuda_device_count(&why);
  if (n < 0) return py::str("the CUDA runtime sees no usable device: " + why);
  if (n == 0) return py::str("no CUDA device present");
  return py::none();
#else
  return py::str("lisa_fused._C was built without CUDA");
#endif
}

// None without CUDA, else {"sass": [80, 90, ...], "ptx": 90 or None}: the architectures compiled in.
py::object cuda_archs() {
#ifdef LISA_FUSED_WITH_CUDA
  std::vector<int> sass;
  int ptx = -1;
  lisa_fused::cuda_build_archs(&sass, &ptx);
  py::dict out;
  out["sass"] = py::cast(sass);
  out["ptx"] = ptx < 0 ? py::none() : py::object(py::int_(ptx));
  return std::move(out);
#else
  return py::none();
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lisa_fused native kernels: segment-table AdamW for the CPU and, when built with nvcc, CUDA";
  m.def("has_cuda", &lisa_fused::has_cuda, "True when this build contains the CUDA kernel");
  m.def("cpu_kernel_isa", &lisa_fused::cpu_kernel_isa,
        "The CPU loop this machine runs: 'avx2+fma' (rounds like torch's AVX2 kernels) or 'baseline'");
  m.def("cuda_unavailable_reason", &cuda_unavailable_reason,
        "None when the CUDA kernel can run here, else why not");
  m.def("cuda_archs", &cuda_archs,
        "None without the CUDA kernel, else {'sass': [80, 90, ...], 'ptx': 90 or None}: the architectures "
        "this build has machine code (SASS) and PTX for");
  m.attr("CUDA_MAX_CHUNK") = lisa_fused::kCudaMaxChunk;
#define LF_PACKED_ARGS                                                                                     \
  py::arg("segs"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grad_scale"), py::arg("chunks"),    \
      py::arg("n_chunks"), py::arg("table"), py::arg("grad_dtype"), py::arg("lowp_dtype"),                    \
      py::arg("one_minus_beta1"), py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("eps")
  m.def("adamw_cpu", &adamw_cpu, LF_PACKED_ARGS, py::arg("num_threads"), py::arg("lean") = py::dict(),
        "AdamW over a segment table on the CPU (pointers as integers; segs: int64 [S, 5] host, "
        "table: float64 [S, n_cols] host); `lean`: dict of PackedArgs lean fields (csrc/adamw.h), e.g. "
        "moments, master, qtable");
  m.def("adamw_cuda", &adamw_cuda, LF_PACKED_ARGS, py::arg("device"), py::arg("stream"), py::arg("lean") = py::dict(),
        "AdamW over a segment table on `stream` of `device` (segs: int64 [S, 5], table: float32 [S, n_cols], "
        "both in device memory)");
  m.def("nearest_codes_cpu", &nearest_codes_cpu, py::arg("x"), py::arg("n"), py::arg("qtable"), py::arg("moments"),
        py::arg("which"), py::arg("vectorized"), py::arg("out"),
        "Tests: the kernels' code search on n fp32 values (uint8 out[n]; csrc/adamw.h nearest_codes_cpu)");
#undef LF_PACKED_ARGS
}
