// tda_block_linear / tda_block_dequantize on the CPU: argument checks, the
// portable scalar reference (blocks.h's dequantize_block, then fp32 dot
// products) and the dispatch to the AVX2 / AVX-512 variants (linear_simd.h).
// Each call runs on the calling thread: the caller's pool splits N.
// x_format TDA_X_Q8_0: rows of x are quantized (blocks.h) a chunk at a time
// into a per-thread buffer, then the weights take integer block dot products
// with them (here dot_row_qx; AVX2 and AVX-512 VNNI: quant_x_avx2.h).
#include <vector>

#include "../common.h"
#include "blocks.h"
#include "decode_ctx.h"

namespace tda {
namespace cpu {
namespace {

template <tda_weight_format_t F>
void linear_generic(const tda_block_linear_args_t* a) {
  const int32_t blocks = a->k / kBlock;
  const int64_t rb = int64_t(blocks) * Block<F>::bytes;
  const uint8_t* wt = static_cast<const uint8_t*>(a->weight);
  float w[kBlock];
  for (int32_t n = a->n_begin; n < a->n_end; ++n)
    for (int32_t m = 0; m < a->m; ++m) {
      const float* x = a->x + m * a->ldx;
      float acc = 0.0f;
      for (int32_t k = 0; k < blocks; ++k) {
        dequantize_block<F>(wt + n * rb + int64_t(k) * Block<F>::bytes, w);
        const float* xk = x + int64_t(k) * kBlock;
#pragma omp simd reduction(+ : acc)
        for (int32_t i = 0; i < kBlock; ++i) acc += xk[i] * w[i];
      }
      a->y[m * a->ldy + n] = acc;
    }
}

template <tda_weight_format_t F>
void linear_generic_qx(const tda_block_linear_args_t* a, const QX& xq, int32_t m0, int32_t rows) {
  const int32_t blocks = a->k / kBlock;
  const int64_t rb = int64_t(blocks) * Block<F>::bytes;
  const uint8_t* wt = static_cast<const uint8_t*>(a->weight);
  for (int32_t n = a->n_begin; n < a->n_end; ++n)
    for (int32_t m = 0; m < rows; ++m)
      a->y[(m0 + m) * a->ldy + n] = dot_row_qx<F>(wt + n * rb, xq.row(m, a->k), blocks);
}

template <tda_weight_format_t F>
void dequantize_generic(int32_t k, int64_t rows, const void* weight, float* out, int64_t ldo) {
  const uint8_t* w = static_cast<const uint8_t*>(weight);
  for (int64_t r = 0; r < rows; ++r)
    for (int32_t b = 0; b < k / kBlock; ++b)
      dequantize_block<F>(w + (r * (k / kBlock) + b) * Block<F>::bytes, out + r * ldo + b * kBlock);
}

LinearFn pick_linear(tda_weight_format_t w) {
  switch (cpu_isa()) {
    case kAvx512: return avx512_linear(w);
    case kAvx2: return avx2_linear(w);
    case kGeneric: break;
  }
  switch (w) {
    case TDA_WEIGHTS_Q8_0: return linear_generic<TDA_WEIGHTS_Q8_0>;
    case TDA_WEIGHTS_Q4_0: return linear_generic<TDA_WEIGHTS_Q4_0>;
    default: return linear_generic<TDA_WEIGHTS_Q4_1>;
  }
}

// Rows of x quantized per chunk: a batch of decode sequences (TDA_MAX_BATCH) at once; a prefill's M rows
// in chunks, so the buffer stays at most 64 x K (1.1 MB for K = 16384) per thread.
constexpr int32_t kQxRows = TDA_MAX_BATCH;

void linear_qx(const tda_block_linear_args_t* a) {
  const Isa isa = cpu_isa();
  const tda_weight_format_t w = static_cast<tda_weight_format_t>(a->weight_format);
  LinearQxFn fn = linear_generic_qx<TDA_WEIGHTS_Q4_1>;
  if (isa != kGeneric) fn = cpu_vnni() ? vnni_linear_qx(w) : avx2_linear_qx(w);  // 256-bit integer dots
  else if (w == TDA_WEIGHTS_Q8_0) fn = linear_generic_qx<TDA_WEIGHTS_Q8_0>;
  else if (w == TDA_WEIGHTS_Q4_0) fn = linear_generic_qx<TDA_WEIGHTS_Q4_0>;
  const QuantizeXFn quantize = isa == kGeneric ? quantize_x_generic : avx2_quantize_x;
  const int32_t K = a->k, rows = a->m < kQxRows ? a->m : kQxRows;
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> ds;
  if (q.size() < size_t(rows) * K) {
    q.resize(size_t(rows) * K);
    ds.resize(2 * size_t(rows) * (K / kBlock));
  }
  const QX xq{q.data(), ds.data(), ds.data() + size_t(rows) * (K / kBlock)};
  for (int32_t m0 = 0; m0 < a->m; m0 += kQxRows) {
    const int32_t n = a->m - m0 < kQxRows ? a->m - m0 : kQxRows;
    quantize(a->x + m0 * a->ldx, a->ldx, n, K, xq);
    fn(a, xq, m0, n);
  }
}

DequantFn pick_dequantize(tda_weight_format_t w) {
  switch (cpu_isa()) {
    case kAvx512: return avx512_dequantize(w);
    case kAvx2: return avx2_dequantize(w);
    case kGeneric: break;
  }
  switch (w) {
    case TDA_WEIGHTS_Q8_0: return dequantize_generic<TDA_WEIGHTS_Q8_0>;
    case TDA_WEIGHTS_Q4_0: return dequantize_generic<TDA_WEIGHTS_Q4_0>;
    default: return dequantize_generic<TDA_WEIGHTS_Q4_1>;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace tda

extern "C" size_t tda_block_linear_workspace_size(const tda_block_linear_args_t* /*args*/) { return 0; }

extern "C" tda_status_t tda_block_linear(const tda_block_linear_args_t* a, void* /*workspace*/,
                                         size_t /*workspace_size*/, void* /*stream*/) {
  const tda_status_t s = tda::check_block_linear(a, /*runs_x_q8_0=*/true);
  if (s != TDA_OK || a->m == 0 || a->n_begin == a->n_end) return s;
  if (a->x_format == TDA_X_Q8_0)
    tda::cpu::linear_qx(a);
  else
    tda::cpu::pick_linear(static_cast<tda_weight_format_t>(a->weight_format))(a);
  return TDA_OK;
}

extern "C" tda_status_t tda_block_dequantize(int32_t weight_format, int32_t k, int64_t rows, const void* weight,
                                             float* out, int64_t ldo, void* /*stream*/) {
  const tda_status_t s = tda::check_block_dequantize(weight_format, k, rows, weight, out, ldo);
  if (s != TDA_OK || rows == 0) return s;
  tda::cpu::pick_dequantize(static_cast<tda_weight_format_t>(weight_format))(k, rows, weight, out, ldo);
  return TDA_OK;
}

extern "C" size_t tda_block_bytes(int32_t weight_format) { return tda::block_bytes(weight_format); }
