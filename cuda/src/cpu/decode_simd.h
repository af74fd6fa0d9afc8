// Decode kernels written once over a vector-traits type V (V::W fp32 lanes)
// and instantiated by decode_avx2.cpp and decode_avx512.cpp inside their own
// target pragma and anonymous namespace. Include only from those files, after
// all other headers and after defining V.
//
// V provides: R, W, zero(), set1(f), fma(a, b, c) = a*b+c, hsum(r), loadf(p),
// storef(p, r), ld<D>(p) (W elements of dtype D widened to fp32) and, when
// W == 16, the 8-lane tail versions loadf8/storef8/ld8<D> (upper lanes 0).
// H is a multiple of 8, so W = 8 needs no tail and W = 16 at most one of 8.
//
// gate_up and down are written over a weights policy Wt (FloatWeights<D>
// here, BlockWeights<D, F> in decode_quant_simd.h, BlockWeightsQx<D, F> in
// quant_x_avx2.h): Wt::D is the dtype of x, z and the output, Wt::X how the
// dots see one sequence's x and Wt::x(c, b) sequence b's, Wt::P a row
// pointer, Wt::row(base, r, H) row r of a weight matrix, Wt::dots<NB, UNR>
// the gate/up dot products of one neuron, Wt::axpy<N> the down projection's
// update from N rows and Wt::slice(row, c0, c1) the bytes of a row's columns
// [c0, c1) (prefetch).

template <tda_dtype_t D>
using T_ = typename Elem<D>::type;

// How many active rows ahead gate_up prefetches (a -D override is for benchmarks). 3 against 1: SmolLM2's
// q4_1 engine at d=0.5 decodes 16% faster on one thread, 5% on two (bench/RESULTS.md, 2026-12-07).
#ifndef TDA_GATE_UP_AHEAD
#define TDA_GATE_UP_AHEAD 3
#endif

// go[s], uo[s] = the sums of sequence s's C gate / up accumulator chains.
template <int NB, int C>
static inline void sum_chains(const typename V::R (&ag)[NB][C], const typename V::R (&au)[NB][C], float* go,
                              float* uo) {
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

// Gate and up dot products of one weight row pair with NB sequences' inputs
// (xs[s]); UNR vectors per step give NB*UNR*2 independent FMA chains.
template <tda_dtype_t D, int NB, int UNR>
static inline void dots(const float* const* xs, const T_<D>* g, const T_<D>* u, int32_t H, float* go, float* uo,
                        const T_<D>* pf) {
  typename V::R ag[NB][UNR], au[NB][UNR];
  for (int s = 0; s < NB; ++s)
    for (int r = 0; r < UNR; ++r) ag[s][r] = au[s][r] = V::zero();
  int32_t i = 0;
  for (; i + UNR * V::W <= H; i += UNR * V::W) {
    if (pf) {  // the next row pair, at the same offsets (one line per 64 bytes read)
      for (int32_t o = 0; o < UNR * V::W * int32_t(sizeof(T_<D>)); o += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + i) + o, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(pf + H + i) + o, _MM_HINT_T0);
      }
    }
    for (int r = 0; r < UNR; ++r) {
      const typename V::R wg = V::template ld<D>(g + i + r * V::W), wu = V::template ld<D>(u + i + r * V::W);
      for (int s = 0; s < NB; ++s) {
        const typename V::R xv = V::loadf(xs[s] + i + r * V::W);
        ag[s][r] = V::fma(xv, wg, ag[s][r]);
        au[s][r] = V::fma(xv, wu, au[s][r]);
      }
    }
  }
  for (; i + V::W <= H; i += V::W) {
    const typename V::R wg = V::template ld<D>(g + i), wu = V::template ld<D>(u + i);
    for (int s = 0; s < NB; ++s) {
      const typename V::R xv = V::loadf(xs[s] + i);
      ag[s][0] = V::fma(xv, wg, ag[s][0]);
      au[s][0] = V::fma(xv, wu, au[s][0]);
    }
  }
  if constexpr (V::W == 16) {
    if (i < H) {  // the one 8-element tail
      const typename V::R wg = V::template ld8<D>(g + i), wu = V::template ld8<D>(u + i);
      for (int s = 0; s < NB; ++s) {
        const typename V::R xv = V::loadf8(xs[s] + i);
        ag[s][0] = V::fma(xv, wg, ag[s][0]);
        au[s][0] = V::fma(xv, wu, au[s][0]);
      }
    }
  }
  sum_chains<NB, UNR>(ag, au, go, uo);
}

template <class Wt, tda_activation_t A>
static void gate_up(const DecodeCtx& c, int32_t k0, int32_t k1) {
  constexpr tda_dtype_t D = Wt::D;
  using P = typename Wt::P;
  const int32_t B = c.B, H = c.H;
  // Batch 1 wants many FMA chains per row; batched tiles already have them
  // (and AVX2 has only 16 registers).
  constexpr int UNR4 = V::W == 16 ? 2 : 1;
  // Active rows are not where the hardware prefetcher looks: while a row pair streams, the dots fetch
  // the pair kAhead rows on, at the same offsets; the ones before it are fetched whole up front.
  // One row ahead is less than a DRAM latency at batch 1 (a SmolLM2 q4_1 pair is 720 bytes).
  constexpr int32_t kAhead = TDA_GATE_UP_AHEAD;
  for (int32_t k = k0 + 1; k < k0 + kAhead && k < k1; ++k) {
    int32_t bytes;
    const char* p = Wt::slice(Wt::row(c.gate_up, 2 * int64_t(c.rows[k]), H), 0, H, &bytes);
    for (int32_t o = 0; o < 2 * bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
  }
  for (int32_t k = k0; k < k1; ++k) {
    const int32_t j = c.rows[k];
    const P g = Wt::row(c.gate_up, 2 * int64_t(j), H), u = Wt::row(c.gate_up, 2 * int64_t(j) + 1, H);
    const P pf = k + kAhead < k1 ? Wt::row(c.gate_up, 2 * int64_t(c.rows[k + kAhead]), H) : nullptr;
    float* zr = c.z + int64_t(k) * B;
    uint64_t m = c.mask[j];
    if (B == 1) {
      const typename Wt::X xs[1] = {Wt::x(c, 0)};
      float gv, uv;
      Wt::template dots<1, 4>(xs, g, u, H, &gv, &uv, pf);
      zr[0] = Elem<D>::round(activate<A>(gv) * uv);
      continue;
    }
    for (int32_t b = 0; b < B; ++b) zr[b] = 0.0f;
    // Active sequences of this row, in tiles of 4/2/1 sharing each weight load.
    int32_t seq[64];
    int32_t n = 0;
    while (m) {
      seq[n++] = __builtin_ctzll(m);
      m &= m - 1;
    }
    int32_t s0 = 0;
    auto tile = [&](auto nb_tag, auto unr_tag) {
      constexpr int NB = decltype(nb_tag)::value, UNR = decltype(unr_tag)::value;
      typename Wt::X xs[NB];
      float gv[NB], uv[NB];
      for (int s = 0; s < NB; ++s) xs[s] = Wt::x(c, seq[s0 + s]);
      Wt::template dots<NB, UNR>(xs, g, u, H, gv, uv, s0 == 0 ? pf : nullptr);
      for (int s = 0; s < NB; ++s) zr[seq[s0 + s]] = Elem<D>::round(activate<A>(gv[s]) * uv[s]);
      s0 += NB;
    };
    using I1 = std::integral_constant<int, 1>;
    using I2 = std::integral_constant<int, 2>;
    using I4 = std::integral_constant<int, 4>;
    using IU = std::integral_constant<int, UNR4>;
    while (n - s0 >= 4) tile(I4{}, IU{});
    if (n - s0 >= 2) tile(I2{}, I2{});
    if (n - s0 >= 1) tile(I1{}, I4{});
  }
}

// acc[c0:c1] = fma chain over N rows in order (acc = z0*r0 + acc, then r1...).
template <tda_dtype_t D, int N>
static inline void axpy_rows(float* acc, const T_<D>* const* r, const float* zs, int32_t c0, int32_t c1) {
  typename V::R zv[N];
  for (int n = 0; n < N; ++n) zv[n] = V::set1(zs[n]);
  int32_t c = c0;
  for (; c + 2 * V::W <= c1; c += 2 * V::W) {
    typename V::R a0 = V::loadf(acc + c), a1 = V::loadf(acc + c + V::W);
    for (int n = 0; n < N; ++n) {
      a0 = V::fma(zv[n], V::template ld<D>(r[n] + c), a0);
      a1 = V::fma(zv[n], V::template ld<D>(r[n] + c + V::W), a1);
    }
    V::storef(acc + c, a0);
    V::storef(acc + c + V::W, a1);
  }
  for (; c + V::W <= c1; c += V::W) {
    typename V::R a0 = V::loadf(acc + c);
    for (int n = 0; n < N; ++n) a0 = V::fma(zv[n], V::template ld<D>(r[n] + c), a0);
    V::storef(acc + c, a0);
  }
  if constexpr (V::W == 16) {
    if (c < c1) {
      typename V::R a0 = V::loadf8(acc + c);
      for (int n = 0; n < N; ++n) a0 = V::fma(zv[n], V::template ld8<D>(r[n] + c), a0);
      V::storef8(acc + c, a0);
    }
  }
}

template <tda_dtype_t D_>
struct FloatWeights {
  static constexpr tda_dtype_t D = D_;
  using X = const float*;
  static X x(const DecodeCtx& c, int32_t b) { return c.x + int64_t(b) * c.H; }
  using P = const T_<D>*;
  static constexpr bool kStreamRuns = false;  // down(): adjacent rows one at a time (not measured on floats)
  static P row(const void* base, int64_t r, int32_t H) { return static_cast<P>(base) + r * H; }
  template <int NB, int UNR>
  static void dots(const float* const* xs, P g, P u, int32_t H, float* go, float* uo, P pf) {
    ::tda::cpu::dots<D, NB, UNR>(xs, g, u, H, go, uo, pf);
  }
  template <int N>
  static void axpy(float* acc, const P* r, const float* zs, int32_t c0, int32_t c1) {
    axpy_rows<D, N>(acc, r, zs, c0, c1);
  }
  static const char* slice(P row, int32_t c0, int32_t c1, int32_t* bytes) {
    *bytes = (c1 - c0) * int32_t(sizeof(T_<D>));
    return reinterpret_cast<const char*>(row + c0);
  }
};

template <class Wt>
static void down(const DecodeCtx& c, int32_t c0, int32_t c1) {
  constexpr tda_dtype_t D = Wt::D;
  using P = typename Wt::P;
  const int32_t B = c.B, H = c.H, U = c.U;
  for (int32_t b = 0; b < B; ++b)
    for (int32_t i = c0; i < c1; ++i) c.acc[int64_t(b) * H + i] = 0.0f;
  // Four rows per pass over the slice: one accumulator load/store per four
  // FMAs, and every element still sums its rows in ascending order.
  constexpr int G = 4;
  // Active rows are scattered, where no hardware prefetcher looks: fetch this slice of the rows
  // two groups ahead (~2 x 4 x 1.2 KB for SmolLM2 on 2 threads) while this group streams.
  constexpr int kAhead = 2 * G;
  auto prefetch_row = [&](int32_t k) {
    int32_t slice_bytes;
    const char* p = Wt::slice(Wt::row(c.down, c.rows[k], H), c0, c1, &slice_bytes);
    for (int32_t o = 0; o < slice_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
  };
  for (int32_t k = 0; k < kAhead && k < U; ++k) prefetch_row(k);
  for (int32_t k0 = 0; k0 < U; k0 += G) {
    const int32_t nk = U - k0 < G ? U - k0 : G;
    for (int32_t k = k0 + kAhead; k < k0 + kAhead + G && k < U; ++k) prefetch_row(k);
    P r[G];
    uint64_t m[G];
    for (int32_t i = 0; i < nk; ++i) {
      r[i] = Wt::row(c.down, c.rows[k0 + i], H);
      m[i] = c.mask[c.rows[k0 + i]];
    }
    // Four adjacent rows (dense stretches) are one run of memory: block rows then go one at a time, so
    // the run streams in address order (same sums, same order, same bits). Interleaving them block by
    // block decoded SmolLM2 dense 1.15-1.3x slower; scattered rows keep the four-row pass, whose loads
    // overlap (one row at a time cost 7-12% at d=0.5). bench/RESULTS.md, 2026-12-08.
    const bool run = Wt::kStreamRuns && nk == G && c.rows[k0 + G - 1] - c.rows[k0] == G - 1;
    for (int32_t b = 0; b < B; ++b) {
      P rb[G];
      float zb[G];
      int n = 0;
      for (int32_t i = 0; i < nk; ++i)
        if (m[i] >> b & 1) {
          rb[n] = r[i];
          zb[n++] = c.z[int64_t(k0 + i) * B + b];
        }
      float* acc = c.acc + int64_t(b) * H;
      if (run && n == G) {
        for (int i = 0; i < G; ++i) Wt::template axpy<1>(acc, rb + i, zb + i, c0, c1);
        continue;
      }
      switch (n) {
        case 4: Wt::template axpy<4>(acc, rb, zb, c0, c1); break;
        case 3: Wt::template axpy<3>(acc, rb, zb, c0, c1); break;
        case 2: Wt::template axpy<2>(acc, rb, zb, c0, c1); break;
        case 1: Wt::template axpy<1>(acc, rb, zb, c0, c1); break;
        default: break;
      }
    }
  }
  T_<D>* out = static_cast<T_<D>*>(c.out);
  for (int32_t b = 0; b < B; ++b)
    for (int32_t i = c0; i < c1; ++i) Elem<D>::store(out, int64_t(b) * H + i, c.acc[int64_t(b) * H + i]);
}

template <tda_dtype_t D>
static DecodeKernels kernels_for(tda_activation_t a) {
  using Wt = FloatWeights<D>;
  switch (a) {
    case TDA_ACT_SILU: return {gate_up<Wt, TDA_ACT_SILU>, down<Wt>};
    case TDA_ACT_GELU_TANH: return {gate_up<Wt, TDA_ACT_GELU_TANH>, down<Wt>};
    case TDA_ACT_GELU: return {gate_up<Wt, TDA_ACT_GELU>, down<Wt>};
    case TDA_ACT_RELU: break;
  }
  return {gate_up<Wt, TDA_ACT_RELU>, down<Wt>};
}

static DecodeKernels kernels(tda_dtype_t d, tda_activation_t a) {
  switch (d) {
    case TDA_F16: return kernels_for<TDA_F16>(a);
    case TDA_BF16: return kernels_for<TDA_BF16>(a);
    case TDA_F32: break;
  }
  return kernels_for<TDA_F32>(a);
}
