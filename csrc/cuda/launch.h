// Host entry points of the CUDA kernels (launch.cu), called by the pybind11 module
// (module.cpp). Plain C++ types only, so the module compiles without CUDA headers. Every
// function checks its launches and throws std::runtime_error with the CUDA message.
#pragma once
#include <cstdint>
#include <string>

#include "problem.h"

namespace dmc {

// True when the kernels run in the host emulator (CPU memory) instead of on a GPU.
bool emulated();

// Number of usable CUDA devices; 0 with the reason in *why when there are none.
int device_count(std::string* why);

// Forward kernels: the 64 x 64 tiles on the CUDA cores (forward.cuh), the few-query kernel
// (few.cuh; exact logits whatever p.fast, d <= few_max_d), the tiles with the fast dot products
// on the tensor cores (p.fast only).
constexpr int kTileKernel = 0, kFewKernel = 1, kTensorKernel = 2;

// Forward. split == 1: writes mean (G, B, d), m, l (G, B) directly. split > 1: the kernel
// writes partials acc (split, G, B, d), m_part, l_part (split, G, B) and a merge fills
// mean, m, l. top (exact logits only: the exact tile kernel and the few-query kernel; null
// pointers when not wanted): per split the top_k() largest logits per query, (split, G, B,
// top_k()), in the internal frame (see exact.cuh), merged by the caller.
void forward(const Problem& p, int64_t split, int kernel, float* acc, float* m_part, float* l_part,
             float* mean, float* m, float* l, TopOut top, std::uintptr_t stream);

// Backward passes (see backward.cuh); outputs are partial sums with a leading split dim.
void backward_stats(const Problem& p, const RowInputs& in, int64_t split, float* z, float* eq,
                    std::uintptr_t stream);
void backward_query(const Problem& p, const RowInputs& in, int64_t split, float* dx,
                    float* dalpha, float* dvar, std::uintptr_t stream);
void backward_point(const Problem& p, const RowInputs& in, int64_t split, float* dy,
                    float* dbias, std::uintptr_t stream);

// kappa (G, B) for RowInputs::kappa: q of point ref[g, b] for each query (-1: 0); gm (G, B, d).
void backward_kappa(const Problem& p, const float* gm, const int64_t* ref, float* kappa,
                    std::uintptr_t stream);

// k nearest neighbours; dist, idx: (split, G, B, k), square roots taken when take_sqrt.
void knn(const Problem& p, int64_t k, int64_t split, bool take_sqrt, float* dist, int64_t* idx,
         std::uintptr_t stream);

// Largest k the knn kernel accepts (its lists live in shared memory).
int64_t knn_max_k();

// Length of the forward's top lists per query (exact.cuh kTopK).
int64_t top_k();

// Queries per block of the few-query forward, and the largest d it accepts.
int64_t few_queries();
int64_t few_max_d();

}  // namespace dmc
