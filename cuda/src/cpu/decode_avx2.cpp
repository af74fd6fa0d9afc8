// AVX2+FMA (+F16C) decode kernels. The library is built without -march, so
// only the functions after the target pragma may use these instructions;
// decode.cpp calls them only when CPUID reports AVX2, FMA and F16C.
#include <immintrin.h>

#include <type_traits>

#include "../activation.h"
#include "blocks.h"
#include "decode_ctx.h"
#include "fp.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace tda {
namespace cpu {
namespace {

struct V {
  using R = __m256;
  static constexpr int W = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float f) { return _mm256_set1_ps(f); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static float hsum(R r) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static R loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, R r) { _mm256_storeu_ps(p, r); }
  // 8-lane tails are whole vectors here (decode_simd.h never needs them).
  static R loadf8(const float* p) { return loadf(p); }
  static void storef8(float* p, R r) { storef(p, r); }
  template <tda_dtype_t D>
  static R ld8(const typename Elem<D>::type* p) { return ld<D>(p); }
  template <tda_dtype_t D>
  static R ld(const typename Elem<D>::type* p) {
    if constexpr (D == TDA_F32) {
      return _mm256_loadu_ps(p);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      if constexpr (D == TDA_F16) return _mm256_cvtph_ps(h);
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  // A block's 32 weights, dequantized exactly (blocks.h): w[r] = weights 8r..8r+7.
  static constexpr int QV = 4;
  template <tda_weight_format_t F>
  static void deq(const uint8_t* b, R* w) {
    const float d = _cvtsh_ss(load_u16(b));
    const R dv = set1(d);
    const uint8_t* qs = b + Block<F>::qs;
    if constexpr (F == TDA_WEIGHTS_Q8_0) {
      for (int r = 0; r < 4; ++r)
        w[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                 _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * r)))), dv);
    } else {
      const R cv = set1(F == TDA_WEIGHTS_Q4_0 ? -8.0f * d : _cvtsh_ss(load_u16(b + 2)));
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
      const __m256i lo = _mm256_cvtepu8_epi32(bytes), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
      const __m256i nib = _mm256_set1_epi32(15);
      w[0] = fma(_mm256_cvtepi32_ps(_mm256_and_si256(lo, nib)), dv, cv);  // low nibbles: weights 0-15
      w[1] = fma(_mm256_cvtepi32_ps(_mm256_and_si256(hi, nib)), dv, cv);
      w[2] = fma(_mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4)), dv, cv);   // high nibbles: weights 16-31
      w[3] = fma(_mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4)), dv, cv);
    }
  }
};

#include "decode_simd.h"
#include "decode_quant_simd.h"

}  // namespace

DecodeKernels avx2_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w) {
  return w == TDA_WEIGHTS_DTYPE ? kernels(d, a) : block_kernels<Simd>(d, a, w);
}

}  // namespace cpu
}  // namespace tda

#pragma GCC pop_options
