// pybind11 module diffmem._cuda: the CUDA kernels on raw device pointers (no libtorch). The
// Python layer (diffmem/ops/_cuda.py) validates tensors and passes data_ptr() values, element
// group strides (0 = shared by all groups; 0 pointer = absent) and the current stream handle.
// Every tensor is float32 but the points, whose storage dtype comes by name (points_dtype:
// "float32", "uint8", "float16" or "bfloat16"; see problem.h PointType).
// CUDA errors arrive as RuntimeError with the CUDA message.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launch.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// The storage type of the points from its dtype name.
int point_type(const std::string& dtype) {
  if (dtype == "float32") return dmc::kPointF32;
  if (dtype == "uint8") return dmc::kPointU8;
  if (dtype == "float16") return dmc::kPointF16;
  if (dtype == "bfloat16") return dmc::kPointBF16;
  throw std::invalid_argument("diffmem._cuda: points dtype '" + dtype +
                              "' is not served (float32, uint8, float16, bfloat16)");
}

dmc::Problem make_problem(int precision, int64_t G, int64_t B, int64_t N, int64_t d,
                          std::uintptr_t x, int64_t gs_x, std::uintptr_t y, int64_t gs_y,
                          std::uintptr_t alpha, int64_t gs_alpha, std::uintptr_t var,
                          int64_t gs_var, std::uintptr_t bias, int64_t gs_bias, std::uintptr_t c,
                          int64_t gs_c, std::uintptr_t expand, int64_t gs_expand,
                          const std::string& points_dtype) {
  if (G < 0 || B < 0 || N < 1 || d < 1) throw std::invalid_argument("diffmem._cuda: invalid sizes");
  if (precision != 0 && precision != 1)
    throw std::invalid_argument("diffmem._cuda: precision must be 0 (exact) or 1 (fast)");
  dmc::Problem p{};
  p.G = G; p.B = B; p.N = N; p.d = d;
  p.x = ptr<const float>(x); p.gs_x = gs_x;
  p.y = ptr<const void>(y); p.gs_y = gs_y;
  p.y_type = point_type(points_dtype);
  p.alpha = ptr<const float>(alpha); p.gs_alpha = gs_alpha;
  p.var = ptr<const float>(var); p.gs_var = gs_var;
  p.bias = ptr<const float>(bias); p.gs_bias = gs_bias;
  p.c = ptr<const float>(c); p.gs_c = gs_c;
  p.expand = ptr<const unsigned char>(expand); p.gs_expand = gs_expand;
  p.fast = precision;
  return p;
}

// lse: float32 (fast) or lse64: float64 (exact), the other 0; top_k == 0: no listed points.
dmc::RowInputs make_rows(std::uintptr_t lse, std::uintptr_t lse64, std::uintptr_t z,
                         std::uintptr_t r, std::uintptr_t gm, std::uintptr_t kappa,
                         std::uintptr_t top_idx, std::uintptr_t top_val, int64_t top_k) {
  if (top_k < 0 || top_k > dmc::top_k() || (top_k > 0 && (!top_idx || !top_val)))
    throw std::invalid_argument("diffmem._cuda: invalid top lists");
  return {ptr<const float>(lse), ptr<const double>(lse64), ptr<const float>(z),
          ptr<const float>(r), ptr<const float>(gm), ptr<const float>(kappa),
          ptr<const int64_t>(top_idx), ptr<const double>(top_val), top_k};
}

py::dict info() {
  std::string why;
  const int count = dmc::device_count(&why);
  py::dict d;
  d["emulated"] = dmc::emulated();
  d["devices"] = count;
  d["reason"] = why;
  d["knn_max_k"] = dmc::knn_max_k();
  d["few_queries"] = dmc::few_queries();
  d["few_max_d"] = dmc::few_max_d();
  d["top_k"] = dmc::top_k();
  return d;
}

#define DMC_PROBLEM_ARGS                                                                    \
  int precision, int64_t G, int64_t B, int64_t N, int64_t d, std::uintptr_t x, int64_t gs_x, \
      std::uintptr_t y, int64_t gs_y, std::uintptr_t alpha, int64_t gs_alpha,               \
      std::uintptr_t var, int64_t gs_var, std::uintptr_t bias, int64_t gs_bias,             \
      std::uintptr_t c, int64_t gs_c, std::uintptr_t expand, int64_t gs_expand,            \
      const std::string& points_dtype
#define DMC_PROBLEM                                                                           \
  make_problem(precision, G, B, N, d, x, gs_x, y, gs_y, alpha, gs_alpha, var, gs_var, bias, gs_bias, \
               c, gs_c, expand, gs_expand, points_dtype)

void forward(DMC_PROBLEM_ARGS, int64_t split, int kernel, std::uintptr_t acc, std::uintptr_t m_part,
             std::uintptr_t l_part, std::uintptr_t mean, std::uintptr_t m, std::uintptr_t l,
             std::uintptr_t top_val, std::uintptr_t top_idx, std::uintptr_t stream) {
  const dmc::Problem p = DMC_PROBLEM;
  if (G == 0 || B == 0) return;
  py::gil_scoped_release nogil;
  dmc::forward(p, split, kernel, ptr<float>(acc), ptr<float>(m_part), ptr<float>(l_part), ptr<float>(mean),
               ptr<float>(m), ptr<float>(l), {ptr<double>(top_val), ptr<int64_t>(top_idx)}, stream);
}

#define DMC_ROW_ARGS                                                                        \
  std::uintptr_t lse, std::uintptr_t lse64, std::uintptr_t z, std::uintptr_t r,             \
      std::uintptr_t gm, std::uintptr_t kappa, std::uintptr_t top_idx, std::uintptr_t top_val, \
      int64_t top_k
#define DMC_ROWS make_rows(lse, lse64, z, r, gm, kappa, top_idx, top_val, top_k)

void backward_stats(DMC_PROBLEM_ARGS, DMC_ROW_ARGS, int64_t split, std::uintptr_t z_out,
                    std::uintptr_t eq, std::uintptr_t stream) {
  const dmc::Problem p = DMC_PROBLEM;
  const dmc::RowInputs rows = DMC_ROWS;
  if (G == 0 || B == 0) return;
  py::gil_scoped_release nogil;
  dmc::backward_stats(p, rows, split, ptr<float>(z_out), ptr<float>(eq), stream);
}

void backward_query(DMC_PROBLEM_ARGS, DMC_ROW_ARGS, int64_t split, std::uintptr_t dx,
                    std::uintptr_t dalpha, std::uintptr_t dvar, std::uintptr_t stream) {
  const dmc::Problem p = DMC_PROBLEM;
  const dmc::RowInputs rows = DMC_ROWS;
  if (G == 0 || B == 0) return;
  py::gil_scoped_release nogil;
  dmc::backward_query(p, rows, split, ptr<float>(dx), ptr<float>(dalpha), ptr<float>(dvar), stream);
}

void backward_point(DMC_PROBLEM_ARGS, DMC_ROW_ARGS, int64_t split, std::uintptr_t dy,
                    std::uintptr_t dbias, std::uintptr_t stream) {
  const dmc::Problem p = DMC_PROBLEM;
  const dmc::RowInputs rows = DMC_ROWS;
  if (G == 0 || B == 0) return;
  py::gil_scoped_release nogil;
  dmc::backward_point(p, rows, split, ptr<float>(dy), ptr<float>(dbias), stream);
}

void backward_kappa(DMC_PROBLEM_ARGS, std::uintptr_t gm, std::uintptr_t ref, std::uintptr_t kappa,
                    std::uintptr_t stream) {
  const dmc::Problem p = DMC_PROBLEM;
  if (G == 0 || B == 0) return;
  py::gil_scoped_release nogil;
  dmc::backward_kappa(p, ptr<const float>(gm), ptr<const int64_t>(ref), ptr<float>(kappa), stream);
}

// knn reads no centre (c = 0).
void knn(int64_t G, int64_t B, int64_t N, int64_t d, int64_t k, std::uintptr_t queries,
         int64_t gs_q, std::uintptr_t points, int64_t gs_p, const std::string& points_dtype,
         int64_t split, bool take_sqrt, std::uintptr_t dist, std::uintptr_t idx,
         std::uintptr_t stream) {
  const int precision = 0;
  const dmc::Problem p = make_problem(precision, G, B, N, d, queries, gs_q, points, gs_p, 0, 0, 0, 0,
                                      0, 0, 0, 0, 0, 0, points_dtype);
  if (G == 0 || B == 0) return;
  py::gil_scoped_release nogil;
  dmc::knn(p, k, split, take_sqrt, ptr<float>(dist), ptr<int64_t>(idx), stream);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "diffmem CUDA kernels on raw device pointers (see diffmem/ops/_cuda.py)";
  m.def("info", &info,
        "emulated, device count, reason when none, knn_max_k, few_queries, few_max_d, top_k");
  m.def("forward", &forward);
  m.def("backward_stats", &backward_stats);
  m.def("backward_query", &backward_query);
  m.def("backward_point", &backward_point);
  m.def("backward_kappa", &backward_kappa);
  m.def("knn", &knn);
}
