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
#define DM_TILE_KERNEL
#define DM_DEVICE inline
#define DM_SYNC() ::dm_emu::block_barrier->wait()
#define DM_THREAD_X (::dm_emu::thread_idx.x)
#define DM_BLOCK_X (static_cast<int64_t>(::dm_emu::block_idx.x))
#define DM_SHARED_FLOATS(name) float* name = ::dm_emu::shared_base
#define DM_RESTRICT

// 16-byte shared-memory accesses (one instruction on the GPU).
inline void dm_load4(const float* p, float (&v)[4]) {
  for (int q = 0; q < 4; ++q) v[q] = p[q];
}
inline void dm_store4(float* p, const float (&v)[4]) {
  for (int q = 0; q < 4; ++q) p[q] = v[q];
}

#else  // real CUDA

#define DM_GLOBAL __global__
// The 256-thread tile kernels: registers capped so that two blocks fit on a multiprocessor.
#define DM_TILE_KERNEL __launch_bounds__(256, 2)
#define DM_DEVICE __device__ __forceinline__
#define DM_SYNC() __syncthreads()
#define DM_THREAD_X (threadIdx.x)
#define DM_BLOCK_X (static_cast<int64_t>(blockIdx.x))
#define DM_SHARED_FLOATS(name) extern __shared__ float name[]
#define DM_RESTRICT __restrict__

// 16-byte shared-memory accesses (one instruction); p must be 16-byte aligned.
__device__ __forceinline__ void dm_load4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void dm_store4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

#endif
