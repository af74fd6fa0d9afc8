// CPU decode: the same union-of-active-rows algorithm as the GPU, with fp32
// accumulation. Each thread owns a slice of output columns in the down
// projection, so every output is summed in row order whatever the thread
// count: the CPU result is always deterministic.
#include <omp.h>
#include <string.h>

#include <algorithm>

#include "../activation.h"
#include "../common.h"
#include "fp.h"

namespace tda {
namespace cpu {
namespace {

struct DecodeWs {
  float* x;        // [B, H] inputs widened to fp32
  uint64_t* mask;  // [I] bit b set: neuron active in sequence b
  int32_t* rows;   // [I] union of active rows, ascending
  float* z;        // [U, B] intermediate (0 where masked), rounded to dtype
  float* acc;      // [B, H] fp32 output accumulators
  size_t bytes;
};

DecodeWs carve(const tda_decode_args_t* a, void* base) {
  Carver c{static_cast<char*>(base)};
  DecodeWs w;
  w.x = c.take<float>(size_t(a->batch) * a->hidden);
  w.mask = c.take<uint64_t>(a->intermediate);
  w.rows = c.take<int32_t>(a->intermediate);
  w.z = c.take<float>(size_t(a->intermediate) * a->batch);
  w.acc = c.take<float>(size_t(a->batch) * a->hidden);
  w.bytes = c.used;
  return w;
}

// Union of the sequences' sorted lists; returns its length.
int32_t build_union(const tda_decode_args_t* a, const DecodeWs& w) {
  const int32_t B = a->batch, I = a->intermediate;
  memset(w.mask, 0, sizeof(uint64_t) * I);
  for (int32_t b = 0; b < B; ++b) {
    const int32_t n = clamp_count(a->active_count[b], I);
    const int32_t* idx = a->active_idx + int64_t(b) * I;
    for (int32_t k = 0; k < n; ++k) w.mask[idx[k]] |= uint64_t(1) << b;
  }
  int32_t u = 0;
  for (int32_t j = 0; j < I; ++j)
    if (w.mask[j]) w.rows[u++] = j;
  return u;
}

// Gate and up dot products in one pass over x.
template <tda_dtype_t D>
void dot2(const float* x, const typename Elem<D>::type* gate, const typename Elem<D>::type* up, int32_t n,
          float* g_out, float* u_out) {
  float g = 0.0f, u = 0.0f;
#pragma omp simd reduction(+ : g, u)
  for (int32_t i = 0; i < n; ++i) {
    g += x[i] * Elem<D>::load(gate, i);
    u += x[i] * Elem<D>::load(up, i);
  }
  *g_out = g;
  *u_out = u;
}

template <tda_dtype_t D, tda_activation_t A>
void run(const tda_decode_args_t* a, const DecodeWs& w) {
  using T = typename Elem<D>::type;
  const int32_t B = a->batch, H = a->hidden;
  const T* x_in = static_cast<const T*>(a->hidden_states);
  const T* gu = static_cast<const T*>(a->gate_up_weight);
  const T* wd = static_cast<const T*>(a->down_weight_t);

  for (int64_t i = 0; i < int64_t(B) * H; ++i) w.x[i] = Elem<D>::load(x_in, i);
  const int32_t U = build_union(a, w);

  // Below ~100k multiply-adds a thread team costs more than it saves.
#pragma omp parallel if (int64_t(U) * H * B > (int64_t(1) << 17))
  {
#pragma omp for schedule(static)
    for (int32_t k = 0; k < U; ++k) {
      const int32_t j = w.rows[k];
      const T* gate = gu + int64_t(j) * 2 * H;
      for (int32_t b = 0; b < B; ++b) {
        float zv = 0.0f;
        if (w.mask[j] >> b & 1) {
          const float* xb = w.x + int64_t(b) * H;
          float g, u;
          dot2<D>(xb, gate, gate + H, H, &g, &u);
          zv = Elem<D>::round(activate<A>(g) * u);
        }
        w.z[int64_t(k) * B + b] = zv;
      }
    }
    // One contiguous column slice per thread (multiples of 16 floats keep
    // threads off each other's cache lines): long runs of each weight row
    // for the prefetcher. Every output still sums rows in order, so the
    // result does not depend on the thread count.
    const int32_t slice = std::max(256, (H / omp_get_num_threads() + 15) / 16 * 16);
#pragma omp for schedule(static)
    for (int32_t c0 = 0; c0 < H; c0 += slice) {
      const int32_t c1 = std::min(H, c0 + slice);
      for (int32_t b = 0; b < B; ++b) std::fill(w.acc + int64_t(b) * H + c0, w.acc + int64_t(b) * H + c1, 0.0f);
      for (int32_t k = 0; k < U; ++k) {
        const T* row = wd + int64_t(w.rows[k]) * H;
        for (int32_t b = 0; b < B; ++b) {
          if (!(w.mask[w.rows[k]] >> b & 1)) continue;
          const float zv = w.z[int64_t(k) * B + b];
          float* acc = w.acc + int64_t(b) * H;
#pragma omp simd
          for (int32_t c = c0; c < c1; ++c) acc[c] += zv * Elem<D>::load(row, c);
        }
      }
      T* out = static_cast<T*>(a->output);
      for (int32_t b = 0; b < B; ++b)
        for (int32_t c = c0; c < c1; ++c) Elem<D>::store(out, int64_t(b) * H + c, w.acc[int64_t(b) * H + c]);
    }
  }
}

template <tda_dtype_t D>
void run_dtype(const tda_decode_args_t* a, const DecodeWs& w) {
  switch (a->activation) {
    case TDA_ACT_SILU: return run<D, TDA_ACT_SILU>(a, w);
    case TDA_ACT_GELU_TANH: return run<D, TDA_ACT_GELU_TANH>(a, w);
    case TDA_ACT_GELU: return run<D, TDA_ACT_GELU>(a, w);
    case TDA_ACT_RELU: return run<D, TDA_ACT_RELU>(a, w);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace tda

extern "C" size_t tda_sparse_gated_mlp_decode_workspace_size(const tda_decode_args_t* a) {
  if (tda::check_decode_shape(a) != TDA_OK) return 0;
  return tda::cpu::carve(a, nullptr).bytes;
}

extern "C" tda_status_t tda_sparse_gated_mlp_decode(const tda_decode_args_t* a, void* ws, size_t ws_size,
                                                    void* /*stream*/) {
  const tda_status_t s = tda::check_decode(a, ws, ws_size, tda_sparse_gated_mlp_decode_workspace_size(a));
  if (s != TDA_OK || a->batch == 0) return s;
  const tda::cpu::DecodeWs w = tda::cpu::carve(a, ws);
  switch (a->dtype) {
    case TDA_F32: tda::cpu::run_dtype<TDA_F32>(a, w); break;
    case TDA_F16: tda::cpu::run_dtype<TDA_F16>(a, w); break;
    case TDA_BF16: tda::cpu::run_dtype<TDA_BF16>(a, w); break;
  }
  return TDA_OK;
}
