// x_format TDA_X_Q8_0 on AVX2: x quantized per block of 32 (bit for bit
// blocks.h's quantize_x_block) and the weights' integer block dot products
// with it, the way llama.cpp's AVX2 ggml_vec_dot_q8_0_q8_0 / q4_0_q8_0 /
// q4_1_q8_1 take them: the 32 weights as int8 (4-bit: nibbles unpacked,
// Q4_0's minus 8), _mm256_maddubs_epi16 (unsigned x signed bytes, pairs
// summed to int16) and _mm256_madd_epi16 (to 8 int32), so a block's sum is
// exact and one fma adds d_w * d_x times it; Q4_1 adds m_w * s_x per block.
// Sums across blocks are fp32 (8 lanes, then hsum): the same products as
// blocks.h's dot_row_qx up to fp32 rounding.
//
// Included by decode_avx2.cpp and decode_vnni.cpp (after simd_avx2.h,
// decode_simd.h, decode_quant_simd.h and linear_simd.h, inside their target
// pragma). decode_vnni.cpp defines TDA_QX_DPBUSD: a block's dot is one
// vpdpbusd (AVX-512 VNNI + VL) instead of vpmaddubsw + vpmaddwd, the same
// int32 sums, so both units give the same bits. AVX-512 CPUs without VNNI run
// decode_avx2.cpp's (decode.cpp / linear.cpp).

// Rows of x (row stride ldx, K a multiple of 32) into out, as quantize_x_generic does.
static void quantize_x_rows(const float* x, int64_t ldx, int32_t rows, int32_t K, const QX& out) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(INFINITY), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  // packs_epi32/epi16 interleave the two 128-bit lanes; this puts the 32 bytes back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int32_t r = 0; r < rows; ++r)
    for (int32_t k = 0; k < K / kBlock; ++k) {
      const float* p = x + r * ldx + k * kBlock;
      int8_t* q = out.q + int64_t(r) * K + k * kBlock;
      float* d = out.d + int64_t(r) * (K / kBlock) + k;
      float* s = out.s + int64_t(r) * (K / kBlock) + k;
      __m256 v[4], a = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(p + 8 * i);
        const __m256 av = _mm256_and_ps(v[i], abs_mask);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(av, inf, _CMP_NLT_UQ));  // inf or NaN
        a = _mm256_max_ps(a, av);
      }
      if (_mm256_movemask_ps(bad)) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_setzero_si256());
        *d = *s = NAN;
        continue;
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float dv = x_scale(_mm_cvtss_f32(m4));
      const __m256 id = _mm256_set1_ps(x_inverse(dv));
      __m256i qi[4];
      for (int i = 0; i < 4; ++i) {
        const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v[i], id), lo), hi);
        qi[i] = _mm256_cvtps_epi32(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
      __m256i sum = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
      const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(b, order));
      *d = dv;
      *s = dv * float(_mm_cvtsi128_si32(s4));
    }
}

// One weight block for integer dot products: u is maddubs' unsigned operand,
// sg the weights whose signs move onto x (Q8_0, Q4_0: u = |w|, so a weight of
// -128 reads 128; x is in [-127, 127], so its negation never overflows, and
// |w| * |x| pairs stay below 2 * 128 * 127 < 2^15: no saturation). Q4_1's
// nibbles are unsigned already (sg unused).
template <tda_weight_format_t F>
struct QxBlock {
  __m256i u, sg;
  float d, m;
  explicit QxBlock(const uint8_t* b) {
    d = V::f16(b);
    __m256i w;
    if constexpr (F == TDA_WEIGHTS_Q8_0) {
      w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + Block<F>::qs));
    } else {
      // Weight k: the low nibble of byte k (low lane), weight k + 16: its high nibble (high lane).
      const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + Block<F>::qs));
      w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(15));
    }
    if constexpr (F == TDA_WEIGHTS_Q4_1) {
      m = V::f16(b + 2);
      u = sg = w;
    } else {
      m = 0.0f;
      sg = F == TDA_WEIGHTS_Q4_0 ? _mm256_sub_epi8(w, _mm256_set1_epi8(8)) : w;
      u = _mm256_sign_epi8(sg, sg);
    }
  }
  // The block's 32 products w(i) * x(i) summed to 8 exact int32 lanes, as fp32.
  __m256 dot(const int8_t* xq) const {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
    const __m256i sx = F == TDA_WEIGHTS_Q4_1 ? x : _mm256_sign_epi8(x, sg);
#if TDA_QX_DPBUSD
    // AVX-512 VNNI on 256 bits: the same 8 exact int32 sums in one instruction (no int16 step to saturate).
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, sx));
#else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, sx), _mm256_set1_epi16(1)));
#endif
  }
};

// Gate and up of one neuron's block rows with NB sequences' quantized x, in
// decode_quant_simd.h's qdots' shape: each weight block unpacked once for
// the NB sequences, one accumulator per sequence, and the next active
// neuron's rows prefetched a line at a time.
template <tda_weight_format_t F, int NB>
static inline void qxdots(const QX* xs, const uint8_t* g, const uint8_t* u, int32_t blocks, float* go, float* uo,
                          const uint8_t* pf) {
  constexpr int32_t bytes = Block<F>::bytes;
  __m256 ag[NB], au[NB];
  float mg[NB], mu[NB];  // Q4_1: sums of m_w * s_x
  for (int s = 0; s < NB; ++s) {
    ag[s] = au[s] = _mm256_setzero_ps();
    mg[s] = mu[s] = 0.0f;
  }
  const int64_t rb = int64_t(blocks) * bytes;
  for (int32_t k = 0; k < blocks; ++k) {
    const int64_t o = int64_t(k) * bytes;
    if (pf && ((o + bytes - 1) >> 6) != ((o - 1) >> 6)) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + o + bytes - 1), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + rb + o + bytes - 1), _MM_HINT_T0);
    }
    const QxBlock<F> wg(g + o);
    for (int s = 0; s < NB; ++s) {
      ag[s] = _mm256_fmadd_ps(_mm256_set1_ps(wg.d * xs[s].d[k]), wg.dot(xs[s].q + k * kBlock), ag[s]);
      if constexpr (F == TDA_WEIGHTS_Q4_1) mg[s] += wg.m * xs[s].s[k];
    }
    const QxBlock<F> wu(u + o);
    for (int s = 0; s < NB; ++s) {
      au[s] = _mm256_fmadd_ps(_mm256_set1_ps(wu.d * xs[s].d[k]), wu.dot(xs[s].q + k * kBlock), au[s]);
      if constexpr (F == TDA_WEIGHTS_Q4_1) mu[s] += wu.m * xs[s].s[k];
    }
  }
  for (int s = 0; s < NB; ++s) {
    go[s] = V::hsum(ag[s]);
    uo[s] = V::hsum(au[s]);
    if constexpr (F == TDA_WEIGHTS_Q4_1) {
      go[s] += mg[s];
      uo[s] += mu[s];
    }
  }
}

// decode_simd.h's gate_up reading ctx.xq; down is BlockWeights' (x plays no part there).
template <tda_dtype_t D_, tda_weight_format_t F>
struct BlockWeightsQx : BlockWeights<D_, F> {
  using X = QX;
  static X x(const DecodeCtx& c, int32_t b) { return c.xq.row(b, c.H); }
  using P = const uint8_t*;
  template <int NB, int UNR>  // UNR: unused (a block is the unit)
  static void dots(const X* xs, P g, P u, int32_t H, float* go, float* uo, P pf) {
    qxdots<F, NB>(xs, g, u, H / kBlock, go, uo, pf);
  }
};

template <tda_dtype_t D, tda_weight_format_t F, tda_activation_t A>
struct SimdQx {
  static constexpr GateUpFn gate_up = ::tda::cpu::gate_up<BlockWeightsQx<D, F>, A>;
  static constexpr DownFn down = ::tda::cpu::down<BlockWeights<D, F>>;
};

// ---- tda_block_linear ----

// linear_simd.h's qlinear_tile on quantized rows of x (row stride K): R weight
// rows times MB rows of x, each weight block unpacked once per tile, one
// accumulator per y element, so a y element's sum order never depends on the
// tile, on M or on how [n_begin, n_end) is split.
template <tda_weight_format_t F, int MB, int R>
static inline void qxlinear_tile(const QX& x, int32_t K, const uint8_t* w, int64_t rb, int32_t blocks, float* y,
                                 int64_t ldy, const uint8_t* pf) {
  constexpr int32_t bytes = Block<F>::bytes;
  __m256 acc[MB][R];
  float sm[MB][R];
  for (int s = 0; s < MB; ++s)
    for (int r = 0; r < R; ++r) {
      acc[s][r] = _mm256_setzero_ps();
      sm[s][r] = 0.0f;
    }
  for (int32_t k = 0; k < blocks; ++k) {
    for (int r = 0; r < R; ++r) {
      const int64_t o = r * rb + int64_t(k) * bytes;
      if (pf && ((o + bytes - 1) >> 6) != ((o - 1) >> 6))
        _mm_prefetch(reinterpret_cast<const char*>(pf + o + bytes - 1), _MM_HINT_T0);
      const QxBlock<F> wb(w + o);
      for (int s = 0; s < MB; ++s) {
        const int64_t xb = int64_t(s) * (K / kBlock) + k;
        acc[s][r] = _mm256_fmadd_ps(_mm256_set1_ps(wb.d * x.d[xb]), wb.dot(x.q + xb * kBlock), acc[s][r]);
        if constexpr (F == TDA_WEIGHTS_Q4_1) sm[s][r] += wb.m * x.s[xb];
      }
    }
  }
  for (int s = 0; s < MB; ++s)
    for (int r = 0; r < R; ++r) {
      y[s * ldy + r] = V::hsum(acc[s][r]);
      if constexpr (F == TDA_WEIGHTS_Q4_1) y[s * ldy + r] += sm[s][r];
    }
}

// Weight rows [n0, n1) for MB quantized rows of x, R at a time, prefetching kAhead tiles ahead (linear_simd.h).
template <tda_weight_format_t F, int MB, int R>
static inline void qxlinear_rows(const tda_block_linear_args_t* a, const QX& x, float* y, int32_t n0, int32_t n1) {
  const int32_t blocks = a->k / kBlock;
  const int64_t rb = int64_t(blocks) * Block<F>::bytes;
  const uint8_t* w = static_cast<const uint8_t*>(a->weight);
  int32_t n = n0;
  for (; n + R <= n1; n += R) {
    const uint8_t* pf = n + (kAhead + 1) * R <= n1 ? w + (n + kAhead * R) * rb : nullptr;  // inside the range
    qxlinear_tile<F, MB, R>(x, a->k, w + n * rb, rb, blocks, y + n, a->ldy, pf);
  }
  for (; n < n1; ++n) qxlinear_tile<F, MB, 1>(x, a->k, w + n * rb, rb, blocks, y + n, a->ldy, nullptr);
}

// y rows [m0, m0 + rows) from xq (those rows of x, quantized): M = 1 one weight row at a time, in address
// order (linear_simd.h's LinearShape says why); more rows of x in tiles of 4 (then 2, 1) x 2 weight rows,
// weight rows outer as in linear_simd.h's qlinear.
template <tda_weight_format_t F>
static void qxlinear(const tda_block_linear_args_t* a, const QX& xq, int32_t m0, int32_t rows) {
  float* y = a->y + m0 * a->ldy;
  if (rows == 1) {
    qxlinear_rows<F, 1, 1>(a, xq, y, a->n_begin, a->n_end);
    return;
  }
  constexpr int RB = 16;
  for (int32_t n0 = a->n_begin; n0 < a->n_end; n0 += RB) {
    const int32_t n1 = n0 + RB < a->n_end ? n0 + RB : a->n_end;
    int32_t m = 0;
    for (; m + 4 <= rows; m += 4) qxlinear_rows<F, 4, 2>(a, xq.row(m, a->k), y + m * a->ldy, n0, n1);
    if (rows - m >= 2) {
      qxlinear_rows<F, 2, 2>(a, xq.row(m, a->k), y + m * a->ldy, n0, n1);
      m += 2;
    }
    if (m < rows) qxlinear_rows<F, 1, 4>(a, xq.row(m, a->k), y + m * a->ldy, n0, n1);
  }
}

static LinearQxFn linear_qx_for(tda_weight_format_t w) {
  switch (w) {
    case TDA_WEIGHTS_Q8_0: return qxlinear<TDA_WEIGHTS_Q8_0>;
    case TDA_WEIGHTS_Q4_0: return qxlinear<TDA_WEIGHTS_Q4_0>;
    case TDA_WEIGHTS_DTYPE:  // never asked for (check_block_linear)
    case TDA_WEIGHTS_Q4_1: break;
  }
  return qxlinear<TDA_WEIGHTS_Q4_1>;
}
