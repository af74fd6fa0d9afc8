// The 256-bit vector traits (V) of the AVX2 units: decode_avx2.cpp (AVX2+FMA+F16C)
// and decode_vnni.cpp (the same plus AVX-512 VNNI on 256-bit vectors) include
// it inside their target pragma and anonymous namespace, before decode_simd.h.
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
