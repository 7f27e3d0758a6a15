// The few CUDA language features the kernels use, spelled through macros so the same kernel
// source also compiles as plain C++ for a host emulator (DIFFMEM_CUDA_EMULATE): each block runs
// as blockDim host threads sharing one dynamic shared-memory buffer, __syncthreads is a barrier.
// The kernels use only dynamic shared memory, __syncthreads and scalar math (no warp
// intrinsics), which is what makes the emulation faithful enough to test them without a GPU.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(DIFFMEM_CUDA_EMULATE)

#include <condition_variable>
#include <mutex>

namespace dm_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Reusable barrier for the threads of one emulated block.
class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  unsigned count_, arrived_ = 0, generation_ = 0;
};

inline thread_local Dim3 thread_idx, block_idx, block_dim, grid_dim;
inline thread_local Barrier* block_barrier = nullptr;
inline thread_local float* shared_base = nullptr;

}  // namespace dm_emu

#define DM_GLOBAL
#define DM_DEVICE inline
#define DM_SYNC() ::dm_emu::block_barrier->wait()
#define DM_THREAD_X (::dm_emu::thread_idx.x)
#define DM_BLOCK_X (static_cast<int64_t>(::dm_emu::block_idx.x))
#define DM_SHARED_FLOATS(name) float* name = ::dm_emu::shared_base
#define DM_RESTRICT

#else  // real CUDA

#define DM_GLOBAL __global__
#define DM_DEVICE __device__ __forceinline__
#define DM_SYNC() __syncthreads()
#define DM_THREAD_X (threadIdx.x)
#define DM_BLOCK_X (static_cast<int64_t>(blockIdx.x))
#define DM_SHARED_FLOATS(name) extern __shared__ float name[]
#define DM_RESTRICT __restrict__

#endif
