// The dense block-quantized linear (tda_block_linear) over decode_quant_simd.h's
// deq: y[m, n] = x[m] . W[n] with each block of W made exact fp32 in registers
// and x never quantized. Included by decode_avx2.cpp and decode_avx512.cpp
// after decode_quant_simd.h, inside their target pragma; V as there.
//
// A tile is R weight rows times MB rows of x. Each block of a weight row is
// dequantized once per tile and used by all MB rows of x, whose loads come
// from L1; a pair (x row, weight row) has C accumulator chains (batch 1 wants
// several per row to hide FMA latency, larger tiles already have MB * R). A
// y element's sum order depends on its chains (C) only, never on R or on how
// [n_begin, n_end) is split between calls, so splits give equal bits.

// pf: where the tile kAhead tiles on starts (nullptr: none); streamed once per 64-byte line of this
// tile's rows, so a matrix that does not fit in the caches arrives ahead of its use.
template <tda_weight_format_t F, int MB, int R, int C>
static inline void qlinear_tile(const float* x, int64_t ldx, const uint8_t* w, int64_t rb, int32_t blocks, float* y,
                                int64_t ldy, const uint8_t* pf) {
  constexpr int32_t bytes = Block<F>::bytes;
  typename V::R acc[MB][R][C], wv[V::QV];
  for (int s = 0; s < MB; ++s)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[s][r][c] = V::zero();
  for (int32_t k = 0; k < blocks; ++k) {
    for (int r = 0; r < R; ++r) {
      const int64_t o = r * rb + int64_t(k) * bytes;
      if (pf && ((o + bytes - 1) >> 6) != ((o - 1) >> 6))
        _mm_prefetch(reinterpret_cast<const char*>(pf + o + bytes - 1), _MM_HINT_T0);
      deq<F>(w + o, wv);
      for (int s = 0; s < MB; ++s)
        for (int q = 0; q < V::QV; ++q)
          acc[s][r][q % C] = V::fma(V::loadf(x + s * ldx + k * kBlock + q * V::W), wv[q], acc[s][r][q % C]);
    }
  }
  for (int s = 0; s < MB; ++s)
    for (int r = 0; r < R; ++r) {
      typename V::R t = acc[s][r][0];
      for (int c = 1; c < C; ++c) t = V::add(t, acc[s][r][c]);
      y[s * ldy + r] = V::hsum(t);
    }
}

// Tile shapes: batch 1 (MB 1) with R rows of C chains; larger M in tiles of
// MB 4 (then 2, 1) x RM rows, one chain each. AVX-512 has 32 registers, AVX2 16.
// Batch 1 reads one weight row at a time (R1 = 1), so the weights stream in
// address order: with R1 = 4 the four rows' interleaved reads decoded SmolLM2
// q8_0 engines 1.15-1.2x slower end to end on one thread (lm_head and
// attention from DRAM; bench/RESULTS.md, 2026-12-08), though in cache 2x2 to
// 8x2 had run a gate_up within 4% of each other.
struct LinearShape {
  static constexpr int R1 = 1;
  static constexpr int C1 = 2;
  static constexpr int RM = V::W == 16 ? 4 : 2;
};

// Rows [n0, n1) for MB rows of x from m0, R weight rows at a time, prefetching kAhead tiles ahead
// (a SmolLM2 lm_head, 29 MB of q8_0, streamed ~1.5x faster with it on one core of a busy box;
// 2, 4 and 8 tiles could not be told apart there).
constexpr int kAhead = 2;
template <tda_weight_format_t F, int MB, int R, int C>
static inline void qlinear_rows(const tda_block_linear_args_t* a, int32_t m0, int32_t n0, int32_t n1) {
  const int64_t rb = int64_t(a->k / kBlock) * Block<F>::bytes;
  const uint8_t* w = static_cast<const uint8_t*>(a->weight);
  const float* x = a->x + m0 * a->ldx;
  float* y = a->y + m0 * a->ldy;
  const int32_t blocks = a->k / kBlock;
  int32_t n = n0;
  for (; n + R <= n1; n += R) {
    const uint8_t* pf = n + (kAhead + 1) * R <= n1 ? w + (n + kAhead * R) * rb : nullptr;  // inside the range
    qlinear_tile<F, MB, R, C>(x, a->ldx, w + n * rb, rb, blocks, y + n, a->ldy, pf);
  }
  for (; n < n1; ++n) qlinear_tile<F, MB, 1, C>(x, a->ldx, w + n * rb, rb, blocks, y + n, a->ldy, nullptr);
}

template <tda_weight_format_t F>
static void qlinear(const tda_block_linear_args_t* a) {
  using S = LinearShape;
  const int32_t M = a->m;
  if (M == 1) {
    qlinear_rows<F, 1, S::R1, S::C1>(a, 0, a->n_begin, a->n_end);
    return;
  }
  // Row tiles outer, x tiles inner: a tile of weight rows stays in L1 while
  // every row of x passes by (x itself, M x K floats, comes from L2).
  constexpr int RB = 16;  // weight rows per outer step (a multiple of RM)
  for (int32_t n0 = a->n_begin; n0 < a->n_end; n0 += RB) {
    const int32_t n1 = n0 + RB < a->n_end ? n0 + RB : a->n_end;
    int32_t m = 0;
    for (; m + 4 <= M; m += 4) qlinear_rows<F, 4, S::RM, 1>(a, m, n0, n1);
    if (M - m >= 2) {
      qlinear_rows<F, 2, S::RM, 1>(a, m, n0, n1);
      m += 2;
    }
    if (m < M) qlinear_rows<F, 1, S::R1, S::C1>(a, m, n0, n1);
  }
}

static LinearFn linear_for(tda_weight_format_t w) {
  switch (w) {
    case TDA_WEIGHTS_Q8_0: return qlinear<TDA_WEIGHTS_Q8_0>;
    case TDA_WEIGHTS_Q4_0: return qlinear<TDA_WEIGHTS_Q4_0>;
    case TDA_WEIGHTS_DTYPE:  // never asked for (check_block_linear)
    case TDA_WEIGHTS_Q4_1: break;
  }
  return qlinear<TDA_WEIGHTS_Q4_1>;
}

// out[r] = the exact fp32 rows of `weight` (tda_block_dequantize), block by block.
template <tda_weight_format_t F>
static void qdequantize(int32_t k, int64_t rows, const void* weight, float* out, int64_t ldo) {
  const uint8_t* w = static_cast<const uint8_t*>(weight);
  typename V::R wv[V::QV];
  for (int64_t r = 0; r < rows; ++r)
    for (int32_t b = 0; b < k / kBlock; ++b) {
      deq<F>(w + (r * (k / kBlock) + b) * Block<F>::bytes, wv);
      for (int q = 0; q < V::QV; ++q) V::storef(out + r * ldo + b * kBlock + q * V::W, wv[q]);
    }
}

static DequantFn dequantize_for(tda_weight_format_t w) {
  switch (w) {
    case TDA_WEIGHTS_Q8_0: return qdequantize<TDA_WEIGHTS_Q8_0>;
    case TDA_WEIGHTS_Q4_0: return qdequantize<TDA_WEIGHTS_Q4_0>;
    case TDA_WEIGHTS_DTYPE:
    case TDA_WEIGHTS_Q4_1: break;
  }
  return qdequantize<TDA_WEIGHTS_Q4_1>;
}
