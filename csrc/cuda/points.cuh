// Points as the kernels read them: float32, or a storage type (uint8 codes, float16, bfloat16;
// problem.h PointType) converted to float32 right after each load. Every value of these types is
// a float32, so the conversion is exact and the kernels compute as on the points converted to
// float32 first, reading only the stored bytes. float16 and bfloat16 are read as their 16 raw
// bits and widened here, which the host emulator build runs too.
//
// with_points(p, g, f) calls f with group g's points as a typed pointer: the one branch on the
// storage type (uniform across the block) sits around a whole load (a chunk of a tile, a step of
// the few-query kernel), so no kernel is instantiated per storage type. Loads are scalar (one
// element each, as for float32): a vector load of a thread's 4 consecutive features would need
// d and the row base aligned to 4 elements of the storage type, which the kernels do not assume.
#pragma once
#include <cstdint>
#include <cstring>

#include "device.cuh"
#include "problem.h"

#if !defined(DIFFMEM_CUDA_EMULATE)
#include <cuda_fp16.h>
#endif

namespace dmc {

// The raw bits of one float16 / bfloat16 value.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

DM_DEVICE float float_from_bits(uint32_t bits) {
#if defined(DIFFMEM_CUDA_EMULATE)
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#else
  return __uint_as_float(bits);
#endif
}

// A stored point value as float32, exactly.
DM_DEVICE float to_float(float v) { return v; }
DM_DEVICE float to_float(uint8_t v) { return static_cast<float>(v); }
DM_DEVICE float to_float(BFloat16 v) { return float_from_bits(static_cast<uint32_t>(v.bits) << 16); }
DM_DEVICE float to_float(Half v) {
#if defined(DIFFMEM_CUDA_EMULATE)
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t e = (v.bits >> 10) & 0x1fu, m = v.bits & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m 2^-24, exact in float32
    const float f = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  if (e == 31) return float_from_bits(sign | 0x7f800000u | (m << 13));  // inf, NaN
  return float_from_bits(sign | ((e + 112u) << 23) | (m << 13));
#else
  return __half2float(__ushort_as_half(v.bits));
#endif
}

// f(rows): rows = the points of group g (p.y offset by g * p.gs_y elements) as const float*,
// const uint8_t*, const Half* or const BFloat16*, by p.y_type; to_float(rows[i]) reads element i.
template <class F>
DM_DEVICE void with_points(const Problem& p, int64_t g, F&& f) {
  switch (p.y_type) {
    case kPointU8:
      f(static_cast<const uint8_t*>(p.y) + g * p.gs_y);
      break;
    case kPointF16:
      f(static_cast<const Half*>(p.y) + g * p.gs_y);
      break;
    case kPointBF16:
      f(static_cast<const BFloat16*>(p.y) + g * p.gs_y);
      break;
    default:
      f(static_cast<const float*>(p.y) + g * p.gs_y);
      break;
  }
}

}  // namespace dmc
