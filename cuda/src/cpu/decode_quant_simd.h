// Decode kernels for block-quantized weights: decode_simd.h's gate_up and down
// with a weights policy whose rows are blocks, instantiated by decode_avx2.cpp
// and decode_avx512.cpp (include after decode_simd.h, inside their target
// pragma). Besides the float traits, V provides QV = 32 / W, mul, f16(p) (an
// fp16 field), i8(p) (W int8 values widened to fp32) and nibbles(qs, R[QV])
// (a 4-bit block's 32 values in weight order), and kNibbleLut: whether it has
// lut_nibbles(qs, table, R[QV]) (weight k = table[its nibble], 16 fp32 lanes)
// and iota16() (0..15); deq makes a block's 32 weights bit for bit as
// blocks.h's dequantize_block does, so these are the float loops on fp32
// weights made in registers. H is a multiple of 32 (no tails) and column
// slices are whole blocks.

template <tda_weight_format_t F>
static inline void deq(const uint8_t* b, typename V::R* w) {
  const float d = V::f16(b);
  const typename V::R dv = V::set1(d);
  const uint8_t* qs = b + Block<F>::qs;
  if constexpr (F == TDA_WEIGHTS_Q8_0) {
    for (int r = 0; r < V::QV; ++r) w[r] = V::mul(V::i8(qs + r * V::W), dv);
  } else if constexpr (V::kNibbleLut) {
    // The 16 values a nibble can take, computed as blocks.h's dequantize_block
    // does (same bits), then a table lookup per weight.
    const typename V::R table = F == TDA_WEIGHTS_Q4_0 ? V::mul(V::add(V::iota16(), V::set1(-8.0f)), dv)
                                                      : V::fma(V::iota16(), dv, V::set1(V::f16(b + 2)));
    V::lut_nibbles(qs, table, w);
  } else if constexpr (F == TDA_WEIGHTS_Q4_0) {
    V::nibbles(qs, w);
    const typename V::R eight = V::set1(-8.0f);
    for (int r = 0; r < V::QV; ++r) w[r] = V::mul(V::add(w[r], eight), dv);
  } else {
    const typename V::R cv = V::set1(V::f16(b + 2));
    V::nibbles(qs, w);
    for (int r = 0; r < V::QV; ++r) w[r] = V::fma(w[r], dv, cv);
  }
}

// Gate and up dot products of one neuron's block rows with NB sequences' x.
// Batch 1 keeps one accumulator per vector of a block (QV chains each for gate
// and up); tiles of NB > 1 sequences one per sequence (AVX2 has 16 registers).
template <tda_weight_format_t F, int NB>
static inline void qdots(const float* const* xs, const uint8_t* g, const uint8_t* u, int32_t blocks, float* go,
                         float* uo, const uint8_t* pf) {
  constexpr int C = NB == 1 ? V::QV : 1;
  constexpr int32_t bytes = Block<F>::bytes;
  typename V::R ag[NB][C], au[NB][C], w[V::QV];
  for (int s = 0; s < NB; ++s)
    for (int r = 0; r < C; ++r) ag[s][r] = au[s][r] = V::zero();
  const int64_t rb = int64_t(blocks) * bytes;
  for (int32_t k = 0; k < blocks; ++k) {
    const int64_t o = int64_t(k) * bytes;
    // The next active neuron's rows, which no hardware prefetcher predicts: the
    // line that holds this block's end there, once per 64-byte line.
    if (pf && ((o + bytes - 1) >> 6) != ((o - 1) >> 6)) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + o + bytes - 1), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + rb + o + bytes - 1), _MM_HINT_T0);
    }
    deq<F>(g + o, w);
    for (int s = 0; s < NB; ++s)
      for (int r = 0; r < V::QV; ++r)
        ag[s][r % C] = V::fma(V::loadf(xs[s] + k * kBlock + r * V::W), w[r], ag[s][r % C]);
    deq<F>(u + o, w);
    for (int s = 0; s < NB; ++s)
      for (int r = 0; r < V::QV; ++r)
        au[s][r % C] = V::fma(V::loadf(xs[s] + k * kBlock + r * V::W), w[r], au[s][r % C]);
  }
  sum_chains<NB, C>(ag, au, go, uo);
}

// acc[32*k0 : 32*k1] = fma chain over N rows' blocks k0..k1-1 in order.
template <tda_weight_format_t F, int N>
static inline void qaxpy_rows(float* acc, const uint8_t* const* r, const float* zs, int32_t k0, int32_t k1) {
  typename V::R zv[N], w[V::QV];
  for (int n = 0; n < N; ++n) zv[n] = V::set1(zs[n]);
  for (int32_t k = k0; k < k1; ++k) {
    typename V::R a[V::QV];
    for (int q = 0; q < V::QV; ++q) a[q] = V::loadf(acc + k * kBlock + q * V::W);
    for (int n = 0; n < N; ++n) {
      deq<F>(r[n] + int64_t(k) * Block<F>::bytes, w);
      for (int q = 0; q < V::QV; ++q) a[q] = V::fma(zv[n], w[q], a[q]);
    }
    for (int q = 0; q < V::QV; ++q) V::storef(acc + k * kBlock + q * V::W, a[q]);
  }
}

// decode_simd.h's gate_up and down on blocks of format F.
template <tda_dtype_t D_, tda_weight_format_t F>
struct BlockWeights {
  static constexpr tda_dtype_t D = D_;
  using X = const float*;
  static X x(const DecodeCtx& c, int32_t b) { return c.x + int64_t(b) * c.H; }
  using P = const uint8_t*;
  static constexpr bool kStreamRuns = true;  // decode_simd.h's down() says why
  static P row(const void* base, int64_t r, int32_t H) { return static_cast<P>(base) + r * row_bytes<F>(H); }
  template <int NB, int UNR>  // UNR: the float loops' unrolling; a block is the unit here
  static void dots(const float* const* xs, P g, P u, int32_t H, float* go, float* uo, P pf) {
    qdots<F, NB>(xs, g, u, H / kBlock, go, uo, pf);
  }
  template <int N>
  static void axpy(float* acc, const P* r, const float* zs, int32_t c0, int32_t c1) {
    qaxpy_rows<F, N>(acc, r, zs, c0 / kBlock, c1 / kBlock);
  }
  static const char* slice(P row, int32_t c0, int32_t c1, int32_t* bytes) {
    *bytes = (c1 - c0) / kBlock * Block<F>::bytes;
    return reinterpret_cast<const char*>(row + c0 / kBlock * Block<F>::bytes);
  }
};

template <tda_dtype_t D, tda_weight_format_t F, tda_activation_t A>
struct Simd {
  static constexpr GateUpFn gate_up = ::tda::cpu::gate_up<BlockWeights<D, F>, A>;
  static constexpr DownFn down = ::tda::cpu::down<BlockWeights<D, F>>;
};
