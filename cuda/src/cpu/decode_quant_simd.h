// Decode kernels for block-quantized weights, written once over decode_simd.h's
// vector traits V and instantiated by decode_avx2.cpp and decode_avx512.cpp
// (include after decode_simd.h, inside their target pragma). Besides the float
// traits, V provides QV = 32 / W and deq<F>(block, R w[QV]): the block's 32
// weights dequantized exactly (fma(q, d, c), blocks.h), so these kernels are
// decode_simd.h's loops on fp32 weights made in registers. H is a multiple of
// 32: no tails.

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
    V::template deq<F>(g + o, w);
    for (int s = 0; s < NB; ++s)
      for (int r = 0; r < V::QV; ++r) ag[s][r % C] = V::fma(V::loadf(xs[s] + k * kBlock + r * V::W), w[r], ag[s][r % C]);
    V::template deq<F>(u + o, w);
    for (int s = 0; s < NB; ++s)
      for (int r = 0; r < V::QV; ++r) au[s][r % C] = V::fma(V::loadf(xs[s] + k * kBlock + r * V::W), w[r], au[s][r % C]);
  }
  for (int s = 0; s < NB; ++s) {
    typename V::R sg = ag[s][0], su = au[s][0];
    for (int r = 1; r < C; ++r) {
      sg = V::add(sg, ag[s][r]);
      su = V::add(su, au[s][r]);
    }
    go[s] = V::hsum(sg);
    uo[s] = V::hsum(su);
  }
}

template <tda_dtype_t D, tda_weight_format_t F, tda_activation_t A>
static void qgate_up(const DecodeCtx& c, int32_t k0, int32_t k1) {
  const uint8_t* gu = static_cast<const uint8_t*>(c.gate_up);
  const int32_t B = c.B, nb = c.H / kBlock;
  const int64_t rb = row_bytes<F>(c.H);
  for (int32_t k = k0; k < k1; ++k) {
    const int32_t j = c.rows[k];
    const uint8_t* g = gu + j * 2 * rb;
    const uint8_t* pf = k + 1 < k1 ? gu + c.rows[k + 1] * 2 * rb : nullptr;
    float* zr = c.z + int64_t(k) * B;
    uint64_t m = c.mask[j];
    if (B == 1) {
      const float* xs[1] = {c.x};
      float gv, uv;
      qdots<F, 1>(xs, g, g + rb, nb, &gv, &uv, pf);
      zr[0] = Elem<D>::round(activate<A>(gv) * uv);
      continue;
    }
    for (int32_t b = 0; b < B; ++b) zr[b] = 0.0f;
    int32_t seq[64];
    int32_t n = 0;
    while (m) {
      seq[n++] = __builtin_ctzll(m);
      m &= m - 1;
    }
    int32_t s0 = 0;
    auto tile = [&](auto nb_tag) {
      constexpr int NB = decltype(nb_tag)::value;
      const float* xs[NB];
      float gv[NB], uv[NB];
      for (int s = 0; s < NB; ++s) xs[s] = c.x + int64_t(seq[s0 + s]) * c.H;
      qdots<F, NB>(xs, g, g + rb, nb, gv, uv, s0 == 0 ? pf : nullptr);
      for (int s = 0; s < NB; ++s) zr[seq[s0 + s]] = Elem<D>::round(activate<A>(gv[s]) * uv[s]);
      s0 += NB;
    };
    while (n - s0 >= 4) tile(std::integral_constant<int, 4>{});
    if (n - s0 >= 2) tile(std::integral_constant<int, 2>{});
    if (n - s0 >= 1) tile(std::integral_constant<int, 1>{});
  }
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
      V::template deq<F>(r[n] + int64_t(k) * Block<F>::bytes, w);
      for (int q = 0; q < V::QV; ++q) a[q] = V::fma(zv[n], w[q], a[q]);
    }
    for (int q = 0; q < V::QV; ++q) V::storef(acc + k * kBlock + q * V::W, a[q]);
  }
}

template <tda_dtype_t D, tda_weight_format_t F>
static void qdown(const DecodeCtx& c, int32_t c0, int32_t c1) {
  const uint8_t* wd = static_cast<const uint8_t*>(c.down);
  const int32_t B = c.B, H = c.H, U = c.U, kb0 = c0 / kBlock, kb1 = c1 / kBlock;
  const int64_t rb = row_bytes<F>(H);
  for (int32_t b = 0; b < B; ++b)
    for (int32_t i = c0; i < c1; ++i) c.acc[int64_t(b) * H + i] = 0.0f;
  constexpr int G = 4;  // rows per pass over the slice, as decode_simd.h's down
  constexpr int kAhead = 2 * G;
  const int64_t slice0 = int64_t(kb0) * Block<F>::bytes, slice_bytes = int64_t(kb1 - kb0) * Block<F>::bytes;
  auto prefetch_row = [&](int32_t k) {
    const char* p = reinterpret_cast<const char*>(wd + c.rows[k] * rb + slice0);
    for (int64_t o = 0; o < slice_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
  };
  for (int32_t k = 0; k < kAhead && k < U; ++k) prefetch_row(k);
  for (int32_t k0 = 0; k0 < U; k0 += G) {
    const int32_t nk = U - k0 < G ? U - k0 : G;
    for (int32_t k = k0 + kAhead; k < k0 + kAhead + G && k < U; ++k) prefetch_row(k);
    const uint8_t* r[G];
    uint64_t m[G];
    for (int32_t i = 0; i < nk; ++i) {
      r[i] = wd + c.rows[k0 + i] * rb;
      m[i] = c.mask[c.rows[k0 + i]];
    }
    for (int32_t b = 0; b < B; ++b) {
      const uint8_t* rs[G];
      float zb[G];
      int n = 0;
      for (int32_t i = 0; i < nk; ++i)
        if (m[i] >> b & 1) {
          rs[n] = r[i];
          zb[n++] = c.z[int64_t(k0 + i) * B + b];
        }
      float* acc = c.acc + int64_t(b) * H;
      switch (n) {
        case 4: qaxpy_rows<F, 4>(acc, rs, zb, kb0, kb1); break;
        case 3: qaxpy_rows<F, 3>(acc, rs, zb, kb0, kb1); break;
        case 2: qaxpy_rows<F, 2>(acc, rs, zb, kb0, kb1); break;
        case 1: qaxpy_rows<F, 1>(acc, rs, zb, kb0, kb1); break;
        default: break;
      }
    }
  }
  using T = T_<D>;
  T* out = static_cast<T*>(c.out);
  for (int32_t b = 0; b < B; ++b)
    for (int32_t i = c0; i < c1; ++i) Elem<D>::store(out, int64_t(b) * H + i, c.acc[int64_t(b) * H + i]);
}

template <tda_dtype_t D, tda_weight_format_t F, tda_activation_t A>
struct Simd {
  static constexpr GateUpFn gate_up = qgate_up<D, F, A>;
  static constexpr DownFn down = qdown<D, F>;
};
