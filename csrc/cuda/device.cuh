// The few CUDA language features the kernels use, spelled through macros so the same kernel
// source also compiles as plain C++ for a host emulator (DIFFMEM_CUDA_EMULATE): each block runs
// as blockDim host threads sharing one dynamic shared-memory buffer, __syncthreads is a barrier,
// and the two warp-level operations the kernels use (dm_group_sum, a butterfly of shuffles, and
// dm_mma_tf32, one m16n8k8 tensor-core product with the fragment layout of the PTX ISA) are
// exchanges through per-warp scratch memory between two per-warp barriers. Kernels use only
// dynamic shared memory, __syncthreads, these two and scalar math, which is what makes the
// emulation faithful enough to test them without a GPU.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(DIFFMEM_CUDA_EMULATE)

#include <condition_variable>
#include <cstring>
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
inline thread_local Barrier* warp_barrier = nullptr;  // the 32 threads of this thread's warp
inline thread_local float* warp_scratch = nullptr;    // this warp's 32 x kWarpScratch floats
inline thread_local float* shared_base = nullptr;

constexpr int kWarpScratch = 64;  // values per lane one dm_group_sum may exchange

// Pairwise sum of s[lo], s[lo + stride], ... (n terms, n a power of 2) in the order of the
// butterfly with ascending offsets: ((s0 + s1) + (s2 + s3)) + ...
template <class T>
inline T tree_sum(const T* s, int lo, int n, int stride) {
  if (n == 1) return s[lo * stride];
  return tree_sum(s, lo, n / 2, stride) + tree_sum(s, lo + n / 2, n / 2, stride);
}

}  // namespace dm_emu

#define DM_GLOBAL
#define DM_TILE_KERNEL
#define DM_DEVICE inline
#define DM_HOST_DEVICE inline
#define DM_SYNC() ::dm_emu::block_barrier->wait()
#define DM_THREAD_X (::dm_emu::thread_idx.x)
#define DM_BLOCK_X (static_cast<int64_t>(::dm_emu::block_idx.x))
#define DM_SHARED_FLOATS(name) float* name = ::dm_emu::shared_base
#define DM_RESTRICT
#define DM_FEW_KERNEL(min_blocks)
#define DM_UNROLL

// Sum each of v[0..K) over aligned groups of `width` consecutive lanes of a warp (width a power
// of 2, at most 32): every lane of a group gets the same sums. All 32 lanes must call it.
// T: float or double.
template <class T, int K>
inline void dm_group_sum(T (&v)[K], int width) {
  static_assert(K * sizeof(T) <= ::dm_emu::kWarpScratch * sizeof(float), "dm_group_sum: too many values");
  const int lane = static_cast<int>(::dm_emu::thread_idx.x % 32);
  T* scratch = reinterpret_cast<T*>(::dm_emu::warp_scratch);
  for (int i = 0; i < K; ++i) scratch[lane * K + i] = v[i];
  ::dm_emu::warp_barrier->wait();
  const int first = lane & ~(width - 1);
  for (int i = 0; i < K; ++i) v[i] = ::dm_emu::tree_sum(scratch + i, first, width, K);
  ::dm_emu::warp_barrier->wait();  // nobody overwrites the scratch before all have read it
}

// A double rounded up to a float (toward +inf), as __double2float_ru.
inline float dm_float_up(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, INFINITY);
  return f;
}

// A float rounded to TF32 (10 mantissa bits; nearest, ties away from zero), as cvt.rna.tf32.f32.
inline float dm_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;  // finite
  std::memcpy(&v, &bits, 4);
  return v;
}

// d += A B for one warp: A 16 x 8, B 8 x 8, TF32 operands (already rounded), fp32 accumulators.
// Fragments (g = lane / 4, t = lane % 4): a = A[g][t], A[g + 8][t], A[g][t + 4], A[g + 8][t + 4];
// b = B[t][g], B[t + 4][g]; d[q] = D[g + 8 (q / 2)][2 t + q % 2]. All 32 lanes must call it.
inline void dm_mma_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  const int lane = static_cast<int>(::dm_emu::thread_idx.x % 32);
  float* scratch = ::dm_emu::warp_scratch;  // per lane: a[4], b[2]
  for (int i = 0; i < 4; ++i) scratch[lane * 6 + i] = a[i];
  for (int i = 0; i < 2; ++i) scratch[lane * 6 + 4 + i] = b[i];
  ::dm_emu::warp_barrier->wait();
  auto A = [&](int r, int k) { return scratch[((r % 8) * 4 + k % 4) * 6 + (r / 8) + 2 * (k / 4)]; };
  auto B = [&](int k, int c) { return scratch[(c * 4 + k % 4) * 6 + 4 + k / 4]; };
  const int g = lane / 4, t = lane % 4;
  for (int q = 0; q < 4; ++q) {
    const int r = g + 8 * (q / 2), c = 2 * t + q % 2;
    float sum = d[q];
    for (int k = 0; k < 8; ++k) sum += A(r, k) * B(k, c);  // TF32 products are exact in fp32
    d[q] = sum;
  }
  ::dm_emu::warp_barrier->wait();
}

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
#define DM_HOST_DEVICE __host__ __device__ inline
#define DM_SYNC() __syncthreads()
#define DM_THREAD_X (threadIdx.x)
#define DM_BLOCK_X (static_cast<int64_t>(blockIdx.x))
#define DM_SHARED_FLOATS(name) extern __shared__ float name[]
#define DM_RESTRICT __restrict__
// The few-query kernel: 256 threads, registers capped so that min_blocks blocks fit on a
// multiprocessor (a memory-bound kernel needs many warps in flight).
#define DM_FEW_KERNEL(min_blocks) __launch_bounds__(256, min_blocks)
#define DM_UNROLL _Pragma("unroll")

// Sum each of v[0..K) over aligned groups of `width` consecutive lanes of a warp (width a power
// of 2, at most 32) by a butterfly of shuffles with ascending offsets: every lane of a group
// gets bit-identical sums (each step adds the same two values in either order). All 32 lanes
// must call it. T: float or double.
template <class T, int K>
__device__ __forceinline__ void dm_group_sum(T (&v)[K], int width) {
  for (int off = 1; off < width; off <<= 1)
    DM_UNROLL
    for (int i = 0; i < K; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
}

// A double rounded up to a float (toward +inf).
__device__ __forceinline__ float dm_float_up(double v) { return __double2float_ru(v); }

// A float rounded to TF32 (10 mantissa bits; nearest, ties away from zero).
__device__ __forceinline__ float dm_tf32(float v) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(v));
  return __uint_as_float(bits);
}

// d += A B for one warp on the tensor cores (mma.sync m16n8k8, TF32 operands already rounded,
// fp32 accumulators). Fragments (g = lane / 4, t = lane % 4): a = A[g][t], A[g + 8][t],
// A[g][t + 4], A[g + 8][t + 4]; b = B[t][g], B[t + 4][g]; d[q] = D[g + 8 (q / 2)][2 t + q % 2].
// All 32 lanes must call it.
__device__ __forceinline__ void dm_mma_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
}

// 16-byte shared-memory accesses (one instruction); p must be 16-byte aligned.
__device__ __forceinline__ void dm_load4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void dm_store4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

#endif
