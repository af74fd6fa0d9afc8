// AVX-512F decode kernels (16 fp32 lanes, masked 8-lane tails). The library
// is built without -march, so only the functions after the target pragma may
// use these instructions; decode.cpp calls them only when CPUID reports
// AVX-512F (which includes the fp16 conversions).
#include <immintrin.h>

#include <type_traits>

#include "../activation.h"
#include "blocks.h"
#include "decode_ctx.h"
#include "fp.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
// GCC 12's avx512fintrin.h builds its "undefined" pass-through operand as
// `__m512i __Y = __Y;`, which -Wmaybe-uninitialized (and, where it is
// inlined into some loops, -Wuninitialized) flags.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace tda {
namespace cpu {
namespace {

struct V {
  using R = __m512;
  static constexpr int W = 16;
  static constexpr __mmask16 kLow8 = 0xff;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float f) { return _mm512_set1_ps(f); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  // Fixed-order tree (not _mm512_reduce_add_ps, whose order is the compiler's).
  static float hsum(R r) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(r),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static R loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, R r) { _mm512_storeu_ps(p, r); }
  static R loadf8(const float* p) { return _mm512_maskz_loadu_ps(kLow8, p); }
  static void storef8(float* p, R r) { _mm512_mask_storeu_ps(p, kLow8, r); }
  template <tda_dtype_t D>
  static R widen(__m256i h) {
    if constexpr (D == TDA_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  template <tda_dtype_t D>
  static R ld(const typename Elem<D>::type* p) {
    if constexpr (D == TDA_F32) return _mm512_loadu_ps(p);
    else return widen<D>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  template <tda_dtype_t D>
  static R ld8(const typename Elem<D>::type* p) {
    if constexpr (D == TDA_F32) return _mm512_maskz_loadu_ps(kLow8, p);
    else return widen<D>(_mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // Block weights (decode_quant_simd.h), as in decode_avx2.cpp.
  static constexpr int QV = 2;
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R i8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void nibbles(const uint8_t* qs, R* q) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    q[0] = _mm512_cvtepi32_ps(_mm512_and_si512(e, _mm512_set1_epi32(15)));
    q[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(e, 4));
  }
  static float f16(const uint8_t* p) { return _cvtsh_ss(load_u16(p)); }
  // 16 fp32 lanes hold a 4-bit block's whole value table: vpermps looks a
  // nibble up (it reads the low 4 bits of each index, so no mask is needed).
  static constexpr bool kNibbleLut = true;
  static R iota16() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static void lut_nibbles(const uint8_t* qs, R table, R* w) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    w[0] = _mm512_permutexvar_ps(e, table);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(e, 4), table);
  }
};

#include "decode_simd.h"
#include "decode_quant_simd.h"
#include "linear_simd.h"

}  // namespace

LinearFn avx512_linear(tda_weight_format_t w) { return linear_for(w); }
DequantFn avx512_dequantize(tda_weight_format_t w) { return dequantize_for(w); }

DecodeKernels avx512_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w) {
  return w == TDA_WEIGHTS_DTYPE ? kernels(d, a) : block_kernels<Simd>(d, a, w);
}

}  // namespace cpu
}  // namespace tda

#pragma GCC diagnostic pop
#pragma GCC pop_options
