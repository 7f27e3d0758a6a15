// pybind11 module diffmem._C: CPU kernels on raw pointers (no libtorch).  The Python layer
// passes tensor.data_ptr() values, sizes and element strides; 0 stands for "absent".  The
// fp32 kernels exist in several instruction-set builds; the best one the CPU supports is
// chosen once at import (DIFFMEM_ISA=generic|avx2|avx512 can force a lower one).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "problem.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace diffmem;

namespace {

enum class Isa { generic = 0, avx2 = 1, avx512 = 2 };

Isa detect_isa() {
  Isa best = Isa::generic;
#if DIFFMEM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    best = Isa::avx512;
#endif
  if (const char* env = std::getenv("DIFFMEM_ISA")) {
    Isa want = best;
    if (!std::strcmp(env, "generic")) want = Isa::generic;
    else if (!std::strcmp(env, "avx2")) want = Isa::avx2;
    else if (!std::strcmp(env, "avx512")) want = Isa::avx512;
    if ((int)want < (int)best) best = want;  // never above what the CPU supports
  }
  return best;
}

const Isa g_isa = detect_isa();

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

void fwd32(const Problem<float>& a) {
  switch (g_isa) {
#if DIFFMEM_X86
    case Isa::avx512: return isa_avx512::forward_f32(a);
    case Isa::avx2: return isa_avx2::forward_f32(a);
#endif
    default: return isa_generic::forward_f32(a);
  }
}
void bwd32(const Problem<float>& a) {
  switch (g_isa) {
#if DIFFMEM_X86
    case Isa::avx512: return isa_avx512::backward_f32(a);
    case Isa::avx2: return isa_avx2::backward_f32(a);
#endif
    default: return isa_generic::backward_f32(a);
  }
}
void knn32(const KnnProblem<float>& a) {
  switch (g_isa) {
#if DIFFMEM_X86
    case Isa::avx512: return isa_avx512::knn_f32(a);
    case Isa::avx2: return isa_avx2::knn_f32(a);
#endif
    default: return isa_generic::knn_f32(a);
  }
}

template <class T>
const T* cp(std::uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <class T>
T* mp(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

// Storage dtype of the points of a float32 call (see problem.h).
int point_type(const std::string& dtype, bool f32) {
  if (dtype == "" || dtype == (f32 ? "float32" : "float64")) return kPointF32;
  if (f32 && dtype == "uint8") return kPointU8;
  if (f32 && dtype == "float16") return kPointF16;
  if (f32 && dtype == "bfloat16") return kPointBF16;
  throw std::invalid_argument("diffmem._C: points dtype '" + dtype + "' is not served with these queries");
}

bool is_f32(const std::string& dtype) {
  if (dtype == "float32") return true;
  if (dtype == "float64") return false;
  throw std::invalid_argument("diffmem._C: dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

void check_sizes(int64_t G, int64_t B, int64_t N, int64_t d) {
  if (G < 0 || B < 0 || N < 1 || d < 1) throw std::invalid_argument("diffmem._C: invalid sizes");
}

// The exact-mode plan (float32 only): all of centre, expand and the top-K buffers, or none.
void check_plan(bool f32, int precision, std::uintptr_t centre, std::uintptr_t expand, int top_k,
                std::uintptr_t top_idx, std::uintptr_t top_logit) {
  if (!expand && !centre && !top_k) return;
  if (!f32) {  // float64: the nearest point alone, no plan
    if (expand || centre || top_k != 1 || !top_idx || !top_logit)
      throw std::invalid_argument("diffmem._C: float64 takes no plan, only top_k = 1 with its buffers");
    return;
  }
  if (precision != 0)
    throw std::invalid_argument("diffmem._C: an exact-mode plan needs precision 0");
  if (!expand || !centre || top_k < 0 || top_k > 64 || (top_k > 0 && (!top_idx || !top_logit)))
    throw std::invalid_argument("diffmem._C: incomplete exact-mode plan (centre, expand, 0 <= top_k <= 64, top buffers)");
}
void set_plan(Problem<float>& a, std::uintptr_t centre, int64_t gs_centre, std::uintptr_t expand, int top_k,
              std::uintptr_t top_idx, std::uintptr_t top_logit) {
  a.centre = cp<float>(centre);
  a.gs_centre = gs_centre;
  a.expand = cp<uint8_t>(expand);
  a.top_k = a.expand ? top_k : 0;
  a.top_idx = mp<int64_t>(top_idx);
  a.top_logit = mp<double>(top_logit);
}

template <class T>
Problem<T> make_problem(int precision, int threads, int64_t G, int64_t B, int64_t N, int64_t d,
                    std::uintptr_t x, int64_t gs_x, std::uintptr_t y, int64_t gs_y,
                    std::uintptr_t alpha, int64_t gs_alpha, std::uintptr_t var, int64_t gs_var,
                    std::uintptr_t bias, int64_t gs_bias) {
  Problem<T> a;
  a.precision = precision;
  a.threads = threads > 0 ? threads : 1;
  a.G = G; a.B = B; a.N = N; a.d = d;
  a.x = cp<T>(x); a.gs_x = gs_x;
  a.y = cp<T>(y); a.gs_y = gs_y;
  a.alpha = cp<T>(alpha); a.gs_alpha = gs_alpha;
  a.var = cp<T>(var); a.gs_var = gs_var;
  a.bias = cp<T>(bias); a.gs_bias = gs_bias;
  return a;
}

void softmax_mean_forward(const std::string& dtype, int precision, int threads, int64_t G, int64_t B,
                          int64_t N, int64_t d, std::uintptr_t x, int64_t gs_x, std::uintptr_t y,
                          int64_t gs_y, std::uintptr_t alpha, int64_t gs_alpha, std::uintptr_t var,
                          int64_t gs_var, std::uintptr_t bias, int64_t gs_bias,
                          std::uintptr_t mean_out, std::uintptr_t lse_out, std::uintptr_t lse64_out,
                          std::uintptr_t centre, int64_t gs_centre, std::uintptr_t expand, int top_k,
                          std::uintptr_t top_idx, std::uintptr_t top_logit,
                          const std::string& points_dtype, std::uintptr_t points_bad) {
  check_sizes(G, B, N, d);
  const bool f32 = is_f32(dtype);
  const int y_type = point_type(points_dtype, f32);
  if (points_bad && !f32)
    throw std::invalid_argument("diffmem._C: the points check (points_bad) is a float32 feature");
  check_plan(f32, precision, centre, expand, top_k, top_idx, top_logit);
  if (G == 0 || B == 0) return;
  py::gil_scoped_release nogil;
  if (f32) {
    auto a = make_problem<float>(precision, threads, G, B, N, d, x, gs_x, y, gs_y, alpha, gs_alpha, var,
                              gs_var, bias, gs_bias);
    a.mean_out = mp<float>(mean_out);
    a.lse_out = mp<float>(lse_out);
    a.lse64_out = mp<double>(lse64_out);
    a.y_type = y_type;
    a.points_bad = mp<uint8_t>(points_bad);
    set_plan(a, centre, gs_centre, expand, top_k, top_idx, top_logit);
    fwd32(a);
  } else {
    auto a = make_problem<double>(precision, threads, G, B, N, d, x, gs_x, y, gs_y, alpha, gs_alpha, var,
                               gs_var, bias, gs_bias);
    a.mean_out = mp<double>(mean_out);
    a.lse_out = mp<double>(lse_out);
    a.lse64_out = mp<double>(lse64_out);
    a.top_k = top_k;
    a.top_idx = mp<int64_t>(top_idx);
    a.top_logit = mp<double>(top_logit);
    forward_f64(a);
  }
}

template <class T>
void fill_bwd(Problem<T>& a, std::uintptr_t mean, std::uintptr_t lse64, std::uintptr_t grad_mean, std::uintptr_t grad_lse,
              std::uintptr_t dx, std::uintptr_t dy, std::uintptr_t dalpha, std::uintptr_t dvar,
              std::uintptr_t dbias) {
  a.mean = cp<T>(mean);
  a.lse64 = cp<double>(lse64);
  a.grad_mean = cp<T>(grad_mean);
  a.grad_lse = cp<T>(grad_lse);
  a.dx = mp<T>(dx);
  a.dy = mp<T>(dy);
  a.dalpha = mp<T>(dalpha);
  a.dvar = mp<T>(dvar);
  a.dbias = mp<T>(dbias);
}

void softmax_mean_backward(const std::string& dtype, int precision, int threads, int64_t G, int64_t B,
                           int64_t N, int64_t d, std::uintptr_t x, int64_t gs_x, std::uintptr_t y,
                           int64_t gs_y, std::uintptr_t alpha, int64_t gs_alpha, std::uintptr_t var,
                           int64_t gs_var, std::uintptr_t bias, int64_t gs_bias, std::uintptr_t mean,
                           std::uintptr_t lse64, std::uintptr_t grad_mean, std::uintptr_t grad_lse, std::uintptr_t dx,
                           std::uintptr_t dy, std::uintptr_t dalpha, std::uintptr_t dvar,
                           std::uintptr_t dbias, std::uintptr_t expand, int top_k,
                           std::uintptr_t top_idx, std::uintptr_t top_logit,
                           const std::string& points_dtype) {
  check_sizes(G, B, N, d);
  const bool f32 = is_f32(dtype);
  const int y_type = point_type(points_dtype, f32);
  if (expand || top_k) {
    if (!f32 || precision != 0 || !expand || top_k < 0 || top_k > 64 ||
        (top_k > 0 && (!top_idx || !top_logit)))
      throw std::invalid_argument("diffmem._C.softmax_mean_backward: invalid exact-mode plan");
  }
  if (G == 0) return;
  py::gil_scoped_release nogil;
  if (B == 0) {  // nothing flows back: zero the point gradients
    const size_t es = f32 ? 4 : 8;
    if (dy) std::memset(mp<char>(dy), 0, es * G * N * d);
    if (dbias) std::memset(mp<char>(dbias), 0, es * G * N);
    return;
  }
  if (!lse64) throw std::invalid_argument("diffmem._C.softmax_mean_backward: lse64 is required");
  if (grad_mean && !mean) throw std::invalid_argument("diffmem._C.softmax_mean_backward: mean is required");
  if (f32) {
    auto a = make_problem<float>(precision, threads, G, B, N, d, x, gs_x, y, gs_y, alpha, gs_alpha, var,
                              gs_var, bias, gs_bias);
    fill_bwd(a, mean, lse64, grad_mean, grad_lse, dx, dy, dalpha, dvar, dbias);
    a.expand = cp<uint8_t>(expand);
    a.top_k = expand ? top_k : 0;
    a.top_idx = mp<int64_t>(top_idx);
    a.top_logit = mp<double>(top_logit);
    a.y_type = y_type;
    bwd32(a);
  } else {
    auto a = make_problem<double>(precision, threads, G, B, N, d, x, gs_x, y, gs_y, alpha, gs_alpha, var,
                               gs_var, bias, gs_bias);
    fill_bwd(a, mean, lse64, grad_mean, grad_lse, dx, dy, dalpha, dvar, dbias);
    backward_f64(a);
  }
}

template <class T>
KnnProblem<T> knn_problem(int threads, int64_t G, int64_t B, int64_t N, int64_t d, int64_t k, std::uintptr_t x,
                    int64_t gs_x, std::uintptr_t y, int64_t gs_y, std::uintptr_t dist_out,
                    std::uintptr_t idx_out) {
  KnnProblem<T> a;
  a.threads = threads > 0 ? threads : 1;
  a.G = G; a.B = B; a.N = N; a.d = d; a.k = k;
  a.x = cp<T>(x); a.gs_x = gs_x; a.y = cp<T>(y); a.gs_y = gs_y;
  a.dist_out = mp<T>(dist_out);
  a.idx_out = mp<int64_t>(idx_out);
  return a;
}

void knn(const std::string& dtype, int threads, int64_t G, int64_t B, int64_t N, int64_t d, int64_t k,
         std::uintptr_t x, int64_t gs_x, std::uintptr_t y, int64_t gs_y, std::uintptr_t dist_out,
         std::uintptr_t idx_out, const std::string& points_dtype) {
  check_sizes(G, B, N, d);
  if (k < 1 || k > N) throw std::invalid_argument("diffmem._C.knn: need 1 <= k <= N");
  const bool f32 = is_f32(dtype);
  const int y_type = point_type(points_dtype, f32);
  if (G == 0 || B == 0) return;
  py::gil_scoped_release nogil;
  if (f32) {
    auto a = knn_problem<float>(threads, G, B, N, d, k, x, gs_x, y, gs_y, dist_out, idx_out);
    a.y_type = y_type;
    knn32(a);
  } else {
    knn_f64(knn_problem<double>(threads, G, B, N, d, k, x, gs_x, y, gs_y, dist_out, idx_out));
  }
}

py::dict info() {
  py::dict d;
  d["isa"] = isa_name(g_isa);
#ifdef _OPENMP
  d["openmp"] = true;
  d["max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["max_threads"] = 1;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "diffmem CPU kernels (softmax-weighted means over point sets, k-NN)";
  m.def("info", &info, "Build/run-time facts: {'isa', 'openmp', 'max_threads'}");
  m.def("softmax_mean_forward", &softmax_mean_forward, py::arg("dtype"), py::arg("precision"),
        py::arg("threads"), py::arg("G"), py::arg("B"), py::arg("N"), py::arg("d"), py::arg("x"),
        py::arg("gs_x"), py::arg("y"), py::arg("gs_y"), py::arg("alpha"), py::arg("gs_alpha"),
        py::arg("var"), py::arg("gs_var"), py::arg("bias"), py::arg("gs_bias"), py::arg("mean_out"),
        py::arg("lse_out"), py::arg("lse64_out"), py::arg("centre") = 0, py::arg("gs_centre") = 0,
        py::arg("expand") = 0, py::arg("top_k") = 0, py::arg("top_idx") = 0, py::arg("top_logit") = 0,
        py::arg("points_dtype") = "", py::arg("points_bad") = 0);
  m.def("softmax_mean_backward", &softmax_mean_backward, py::arg("dtype"), py::arg("precision"),
        py::arg("threads"), py::arg("G"), py::arg("B"), py::arg("N"), py::arg("d"), py::arg("x"),
        py::arg("gs_x"), py::arg("y"), py::arg("gs_y"), py::arg("alpha"), py::arg("gs_alpha"),
        py::arg("var"), py::arg("gs_var"), py::arg("bias"), py::arg("gs_bias"), py::arg("mean"),
        py::arg("lse64"), py::arg("grad_mean"), py::arg("grad_lse"), py::arg("dx"), py::arg("dy"), py::arg("dalpha"),
        py::arg("dvar"), py::arg("dbias"), py::arg("expand") = 0, py::arg("top_k") = 0,
        py::arg("top_idx") = 0, py::arg("top_logit") = 0, py::arg("points_dtype") = "");
  m.def("knn", &knn, py::arg("dtype"), py::arg("threads"), py::arg("G"), py::arg("B"), py::arg("N"),
        py::arg("d"), py::arg("k"), py::arg("x"), py::arg("gs_x"), py::arg("y"), py::arg("gs_y"),
        py::arg("dist_out"), py::arg("idx_out"), py::arg("points_dtype") = "");
}
