// AVX2+FMA (+F16C) decode kernels. The library is built without -march, so
// only the functions after the target pragma may use these instructions;
// decode.cpp calls them only when CPUID reports AVX2, FMA and F16C.
#include <immintrin.h>
#include <math.h>

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
  // Block weights (decode_quant_simd.h): QV vectors per block of 32; i8(p)
  // widens W int8 values to fp32, nibbles(qs, q) a 4-bit block's 32 values
  // (weight k: low nibble of byte k, weight k + 16: its high nibble).
  static constexpr int QV = 4;
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R i8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void nibbles(const uint8_t* qs, R* q) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m256i lo = _mm256_cvtepu8_epi32(bytes), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
    const __m256i low4 = _mm256_set1_epi32(15);
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, low4));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, low4));
    q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
  }
  static float f16(const uint8_t* p) { return _cvtsh_ss(load_u16(p)); }
  static constexpr bool kNibbleLut = false;  // 8-lane vpermps holds half a table
  static R iota16() { return zero(); }
  static void lut_nibbles(const uint8_t*, R, R*) {}
};

#include "decode_simd.h"
#include "decode_quant_simd.h"
#include "linear_simd.h"
#include "quant_x_avx2.h"

}  // namespace

LinearFn avx2_linear(tda_weight_format_t w) { return linear_for(w); }
LinearQxFn avx2_linear_qx(tda_weight_format_t w) { return linear_qx_for(w); }
DequantFn avx2_dequantize(tda_weight_format_t w) { return dequantize_for(w); }
void avx2_quantize_x(const float* x, int64_t ldx, int32_t rows, int32_t K, const QX& out) {
  quantize_x_rows(x, ldx, rows, K, out);
}

DecodeKernels avx2_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w, tda_x_format_t x) {
  if (w == TDA_WEIGHTS_DTYPE) return kernels(d, a);
  return x == TDA_X_Q8_0 ? block_kernels<SimdQx>(d, a, w) : block_kernels<Simd>(d, a, w);
}

}  // namespace cpu
}  // namespace tda

#pragma GCC pop_options
