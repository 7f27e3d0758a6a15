// Host side of the CUDA kernels: kernel selection, launch configuration and error checks.
// Compiled by nvcc for the GPU module, or as plain C++ with DIFFMEM_CUDA_EMULATE for the host
// emulator (each block run by 256 host threads, one block after another).
#include <stdexcept>
#include <string>

#include "backward.cuh"
#include "few.cuh"
#include "forward.cuh"
#include "knn.cuh"
#include "launch.h"

#if defined(DIFFMEM_CUDA_EMULATE)
#include <deque>
#include <limits>
#include <thread>
#include <vector>
#else
#include <cuda_runtime.h>
#endif

namespace dmc {
namespace {

constexpr int64_t kMaxK = 128;

#if defined(DIFFMEM_CUDA_EMULATE)

// Run a kernel block by block; shared memory is poisoned with NaN before each block so a read
// of anything the block did not write shows up in the results.
template <class... Params, class... Args>
void launch(const char*, void (*kernel)(Params...), int64_t blocks, int64_t smem_floats,
            std::uintptr_t, Args... args) {
  constexpr int warps = kThreads / 32;
  std::vector<float> shared(static_cast<size_t>(smem_floats) + 2);
  std::vector<float> scratch(static_cast<size_t>(warps) * 32 * dm_emu::kWarpScratch);
  for (int64_t b = 0; b < blocks; ++b) {
    std::fill(shared.begin(), shared.end(), std::numeric_limits<float>::quiet_NaN());
    dm_emu::Barrier barrier(kThreads);
    std::deque<dm_emu::Barrier> warp_barriers;
    for (int w = 0; w < warps; ++w) warp_barriers.emplace_back(32);
    std::vector<std::thread> threads;
    threads.reserve(kThreads);
    for (unsigned t = 0; t < static_cast<unsigned>(kThreads); ++t)
      threads.emplace_back([&, t] {
        dm_emu::thread_idx.x = t;
        dm_emu::block_idx.x = static_cast<unsigned>(b);
        dm_emu::block_barrier = &barrier;
        dm_emu::warp_barrier = &warp_barriers[t / 32];
        dm_emu::warp_scratch = scratch.data() + (t / 32) * 32 * dm_emu::kWarpScratch;
        dm_emu::shared_base = shared.data();
        kernel(args...);
      });
    for (auto& th : threads) th.join();
  }
}

#else

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("diffmem CUDA: ") + what + ": " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
}

template <class... Params, class... Args>
void launch(const char* name, void (*kernel)(Params...), int64_t blocks, int64_t smem_floats,
            std::uintptr_t stream, Args... args) {
  if (blocks == 0) return;
  if (blocks > 0x7fffffff) throw std::runtime_error(std::string("diffmem CUDA: too many blocks for ") + name);
  const size_t bytes = static_cast<size_t>(smem_floats) * sizeof(float) + 8;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes)),
        name);
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, reinterpret_cast<cudaStream_t>(stream)>>>(
      args...);
  check(cudaGetLastError(), name);
}

#endif

int64_t query_blocks(const Problem& p, int64_t split) { return p.G * split * ((p.B + kTile - 1) / kTile); }

}  // namespace

bool emulated() {
#if defined(DIFFMEM_CUDA_EMULATE)
  return true;
#else
  return false;
#endif
}

int device_count(std::string* why) {
#if defined(DIFFMEM_CUDA_EMULATE)
  (void)why;
  return 1;
#else
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (why) *why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  if (count == 0 && why) *why = "no CUDA device is present";
  return count;
#endif
}

// The few-query kernel for kQ queries per block and the features per thread d needs (few.cuh).
template <int kQ>
void launch_few(const Problem& p, int64_t split, float* acc, float* m, float* l, TopOut top,
                int final_, std::uintptr_t stream) {
  const int64_t gs = few_group_size(p.d);
  const int64_t per_thread = (p.d + gs - 1) / gs;
  const int64_t blocks = p.G * split * ((p.B + kQ - 1) / kQ);
  const int64_t smem = kFewSmem + (top.val ? few_top_floats(p.d, kQ) : 0);
  const char* name = "forward (few queries)";
  if (per_thread <= 4)
    launch(name, few_forward_kernel<kQ, 4>, blocks, smem, stream, p, acc, m, l, top, split, final_);
  else if (per_thread <= 8)
    launch(name, few_forward_kernel<kQ, 8>, blocks, smem, stream, p, acc, m, l, top, split, final_);
  else if (per_thread <= 12)
    launch(name, few_forward_kernel<kQ, 12>, blocks, smem, stream, p, acc, m, l, top, split, final_);
  else if (per_thread <= kFewMaxFeatures)
    launch(name, few_forward_kernel<kQ, kFewMaxFeatures>, blocks, smem, stream, p, acc, m, l, top,
           split, final_);
  else
    throw std::invalid_argument("diffmem CUDA: the few-query forward needs d <= " +
                                std::to_string(kFewMaxD) + ", got d = " + std::to_string(p.d));
}

void forward(const Problem& p, int64_t split, int kernel, float* acc, float* m_part, float* l_part,
             float* mean, float* m, float* l, TopOut top, std::uintptr_t stream) {
  if (kernel != kTileKernel && kernel != kFewKernel && kernel != kTensorKernel)
    throw std::invalid_argument("diffmem CUDA: unknown forward kernel " + std::to_string(kernel));
  if (kernel == kTensorKernel && !p.fast)
    throw std::invalid_argument("diffmem CUDA: the tensor-core forward is for precision fast only");
  const bool few = kernel == kFewKernel;
  const bool final_ = split == 1;
  float* acc_out = final_ ? mean : acc;
  float* m_out = final_ ? m : m_part;
  float* l_out = final_ ? l : l_part;
  const int64_t blocks = query_blocks(p, split);
  if ((top.val == nullptr) != (top.idx == nullptr))
    throw std::invalid_argument("diffmem CUDA: top values and indices go together");
  if (top.val && !few && p.fast)
    throw std::invalid_argument("diffmem CUDA: the fast tile forward reports no top logits");
  const TopOut none{nullptr, nullptr};
  if (few && p.B == 1)  // one query per group: registers for one, more blocks per multiprocessor
    launch_few<1>(p, split, acc_out, m_out, l_out, top, static_cast<int>(final_), stream);
  else if (few)
    launch_few<kFewQ>(p, split, acc_out, m_out, l_out, top, static_cast<int>(final_), stream);
  else if (kernel == kTensorKernel)
    launch("forward (fast, tensor cores)", forward_kernel<true, true>, blocks, kForwardSmem, stream,
           p, acc_out, m_out, l_out, none, split, static_cast<int>(final_));
  else if (p.fast)
    launch("forward (fast)", forward_kernel<true>, blocks, kForwardSmem, stream, p, acc_out, m_out,
           l_out, none, split, static_cast<int>(final_));
  else
    launch("forward", forward_kernel<false>, blocks, kForwardSmem, stream, p, acc_out, m_out, l_out,
           top, split, static_cast<int>(final_));
  if (!final_) {
    const int64_t elems = p.G * p.B * p.d;
    launch("merge", merge_kernel, (elems + kThreads - 1) / kThreads, 0, stream,
           static_cast<const float*>(acc), static_cast<const float*>(m_part),
           static_cast<const float*>(l_part), p.c, p.gs_c, mean, m, l, p.G, p.B, p.d, split);
  }
}

// Dispatch a backward kernel template over (fast, with q).
#define DMC_DISPATCH(NAME, KERNEL, BLOCKS, ...)                                              \
  do {                                                                                       \
    const bool q_ = in.gm != nullptr;                                                        \
    if (p.fast && q_) launch(NAME, KERNEL<true, true>, BLOCKS, kBackwardSmem, stream, __VA_ARGS__);   \
    else if (p.fast) launch(NAME, KERNEL<true, false>, BLOCKS, kBackwardSmem, stream, __VA_ARGS__);   \
    else if (q_) launch(NAME, KERNEL<false, true>, BLOCKS, kBackwardSmem, stream, __VA_ARGS__);       \
    else launch(NAME, KERNEL<false, false>, BLOCKS, kBackwardSmem, stream, __VA_ARGS__);             \
  } while (0)

// The backward's lse: float32 for the fast kernels, float64 (internal frame) for the exact ones.
void check_rows(const Problem& p, const RowInputs& in) {
  if (p.fast ? in.lse == nullptr : in.lse64 == nullptr)
    throw std::invalid_argument(p.fast ? "diffmem CUDA: the fast backward needs the float32 lse"
                                       : "diffmem CUDA: the exact backward needs the float64 lse");
  if (p.fast && in.top_k > 0)
    throw std::invalid_argument("diffmem CUDA: the fast backward takes no top lists");
}

void backward_stats(const Problem& p, const RowInputs& in, int64_t split, float* z, float* eq,
                    std::uintptr_t stream) {
  check_rows(p, in);
  DMC_DISPATCH("backward stats", stats_kernel, query_blocks(p, split), p, in, z, eq, split);
}

// The query kernel with its per-query sums (dalpha, dvar) or without them.
template <bool kFast, bool kWithQ>
void launch_query(const Problem& p, const RowInputs& in, int64_t split, float* dx,
                  float* dalpha, float* dvar, std::uintptr_t stream) {
  const int64_t blocks = query_blocks(p, split);
  if (dalpha || dvar)
    launch("backward queries", query_kernel<kFast, kWithQ, true>, blocks, kBackwardSmem, stream, p,
           in, dx, dalpha, dvar, split);
  else
    launch("backward queries", query_kernel<kFast, kWithQ, false>, blocks, kBackwardSmem, stream,
           p, in, dx, dalpha, dvar, split);
}

void backward_query(const Problem& p, const RowInputs& in, int64_t split, float* dx,
                    float* dalpha, float* dvar, std::uintptr_t stream) {
  check_rows(p, in);
  const bool q = in.gm != nullptr;
  if (p.fast && q) launch_query<true, true>(p, in, split, dx, dalpha, dvar, stream);
  else if (p.fast) launch_query<true, false>(p, in, split, dx, dalpha, dvar, stream);
  else if (q) launch_query<false, true>(p, in, split, dx, dalpha, dvar, stream);
  else launch_query<false, false>(p, in, split, dx, dalpha, dvar, stream);
}

void backward_point(const Problem& p, const RowInputs& in, int64_t split, float* dy,
                    float* dbias, std::uintptr_t stream) {
  check_rows(p, in);
  const int64_t blocks = p.G * split * ((p.N + kTile - 1) / kTile);
  DMC_DISPATCH("backward points", point_kernel, blocks, p, in, dy, dbias, split);
}

void backward_kappa(const Problem& p, const float* gm, const int64_t* ref, float* kappa,
                    std::uintptr_t stream) {
  launch("backward kappa", kappa_kernel, (p.G * p.B + kThreads - 1) / kThreads, 0, stream, p, gm,
         ref, kappa);
}

void knn(const Problem& p, int64_t k, int64_t split, bool take_sqrt, float* dist, int64_t* idx,
         std::uintptr_t stream) {
  if (k < 1 || k > kMaxK)
    throw std::invalid_argument("diffmem CUDA: knn needs 1 <= k <= " + std::to_string(kMaxK) +
                                ", got k = " + std::to_string(k));
  launch("knn", knn_kernel, query_blocks(p, split), knn_smem_floats(k), stream, p, k, split,
         static_cast<int>(take_sqrt), dist, idx);
}

int64_t knn_max_k() { return kMaxK; }

int64_t top_k() { return kTopK; }

int64_t few_queries() { return kFewQ; }

int64_t few_max_d() { return kFewMaxD; }

}  // namespace dmc
