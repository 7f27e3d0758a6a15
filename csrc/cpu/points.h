// Point rows as the fp32 kernels read them; included by kernels_impl.h inside namespace DM_NS
// (it uses the vector helpers defined there).  Points are float32, or a storage dtype (uint8
// codes, float16, bfloat16) converted to float32 row by row as the tiles are packed: every
// point is read in its own bytes, converted exactly (each of these values is a float32), and
// the kernels compute as if the points had been converted to float32 first.
namespace {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0) {  // zero or subnormal: m * 2^-24 is exact in float
    const float f = (float)m * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  if (e == 31) bits = sign | 0x7f800000u | (m << 13);
  else bits = sign | ((e + 112u) << 23) | (m << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// n values of a storage dtype at src -> float32 at dst.
inline void convert_span(const char* src, int type, int n, float* dst) {
  int k = 0;
  if (type == kPointU8) {
    const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
#if DM_ISA == 2
    for (; k + 16 <= n; k += 16)
      _mm512_storeu_ps(dst + k, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)))));
#endif
    for (; k < n; ++k) dst[k] = (float)s[k];
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    if (type == kPointF16) {
#if DM_ISA == 2
      for (; k + 16 <= n; k += 16)
        _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k))));
#endif
      for (; k < n; ++k) dst[k] = half_to_float(s[k]);
    } else {
#if DM_ISA == 2
      for (; k + 16 <= n; k += 16)
        _mm512_storeu_ps(dst + k, _mm512_castsi512_ps(_mm512_slli_epi32(
                                      _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                          reinterpret_cast<const __m256i*>(s + k))), 16)));
#endif
      for (; k < n; ++k) dst[k] = bf16_to_float(s[k]);
    }
  }
}

// The points of one group: row(i, scratch) is point i as d floats, either in place (float32)
// or converted into scratch (>= d floats).
struct PointRows {
  const char* base = nullptr;
  int type = kPointF32;
  int64_t d = 0;
  size_t esize = 4;
  const float* span(int64_t i, int64_t k0, int n, float* scratch) const {
    const char* p = base + ((size_t)i * d + k0) * esize;
    if (type == kPointF32) return reinterpret_cast<const float*>(p);
    convert_span(p, type, n, scratch);
    return scratch;
  }
  const float* row(int64_t i, float* scratch) const { return span(i, 0, (int)d, scratch); }
};

template <class P>
inline PointRows point_rows(const P& a, int64_t g) {
  PointRows r;
  r.type = a.y_type;
  r.esize = point_size(a.y_type);
  r.d = a.d;
  r.base = reinterpret_cast<const char*>(a.y) + (size_t)(g * a.gs_y) * r.esize;
  return r;
}

}  // namespace
