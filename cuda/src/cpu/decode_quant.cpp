// Portable decode kernels for block-quantized weights (tda_weight_format_t
// Q8_0 / Q4_0 / Q4_1): the scalar reference the AVX2 and AVX-512 variants
// (decode_quant_simd.h) are checked against. Each block is dequantized to its
// 32 exact fp32 weights (blocks.h) and then used as decode.cpp's portable
// loops use float weights: x stays fp32, sums are fp32, z rounded to dtype.
// With x_format TDA_X_Q8_0 gate_up reads ctx.xq instead, one integer block
// dot product at a time (blocks.h's dot_row_qx); down is the same.
#include <algorithm>

#include "../activation.h"
#include "blocks.h"
#include "decode_ctx.h"
#include "fp.h"

namespace tda {
namespace cpu {
namespace {

template <tda_weight_format_t F>
float dot_row(const float* x, const uint8_t* row, int32_t blocks) {
  float acc = 0.0f, w[kBlock];
  for (int32_t k = 0; k < blocks; ++k) {
    dequantize_block<F>(row + int64_t(k) * Block<F>::bytes, w);
    const float* xk = x + int64_t(k) * kBlock;
#pragma omp simd reduction(+ : acc)
    for (int32_t i = 0; i < kBlock; ++i) acc += xk[i] * w[i];
  }
  return acc;
}

template <tda_dtype_t D, tda_weight_format_t F>
void down_block(const DecodeCtx& c, int32_t c0, int32_t c1) {
  const uint8_t* wd = static_cast<const uint8_t*>(c.down);
  const int32_t B = c.B, H = c.H;
  const int64_t rb = row_bytes<F>(H);
  for (int32_t b = 0; b < B; ++b) std::fill(c.acc + int64_t(b) * H + c0, c.acc + int64_t(b) * H + c1, 0.0f);
  float w[kBlock];
  for (int32_t k = 0; k < c.U; ++k) {
    const uint64_t m = c.mask[c.rows[k]];
    const uint8_t* row = wd + c.rows[k] * rb;
    for (int32_t col = c0; col < c1; col += kBlock) {
      dequantize_block<F>(row + col / kBlock * Block<F>::bytes, w);
      for (int32_t b = 0; b < B; ++b) {
        if (!(m >> b & 1)) continue;
        const float zv = c.z[int64_t(k) * B + b];
        float* acc = c.acc + int64_t(b) * H + col;
#pragma omp simd
        for (int32_t i = 0; i < kBlock; ++i) acc[i] += zv * w[i];
      }
    }
  }
  using T = typename Elem<D>::type;
  T* out = static_cast<T*>(c.out);
  for (int32_t b = 0; b < B; ++b)
    for (int32_t i = c0; i < c1; ++i) Elem<D>::store(out, int64_t(b) * H + i, c.acc[int64_t(b) * H + i]);
}

// z for the active rows [k0, k1) of every sequence whose mask has them; dot(b, row) is the dot product of a
// weight row of blocks with sequence b's x (as is, or quantized: x_format).
template <tda_dtype_t D, tda_weight_format_t F, tda_activation_t A, typename Dot>
static void generic_gate_up(const DecodeCtx& c, int32_t k0, int32_t k1, Dot dot) {
  const uint8_t* gu = static_cast<const uint8_t*>(c.gate_up);
  const int64_t rb = row_bytes<F>(c.H);
  for (int32_t k = k0; k < k1; ++k) {
    const int32_t j = c.rows[k];
    const uint8_t* gate = gu + j * 2 * rb;
    for (int32_t b = 0; b < c.B; ++b)
      c.z[int64_t(k) * c.B + b] =
          c.mask[j] >> b & 1 ? Elem<D>::round(activate<A>(dot(b, gate)) * dot(b, gate + rb)) : 0.0f;
  }
}

template <tda_dtype_t D, tda_weight_format_t F, tda_activation_t A>
struct Generic {
  static void gate_up(const DecodeCtx& c, int32_t k0, int32_t k1) {
    generic_gate_up<D, F, A>(c, k0, k1, [&](int32_t b, const uint8_t* row) {
      return dot_row<F>(c.x + int64_t(b) * c.H, row, c.H / kBlock);
    });
  }
  static constexpr DownFn down = down_block<D, F>;
};

template <tda_dtype_t D, tda_weight_format_t F, tda_activation_t A>
struct GenericQx {
  static void gate_up(const DecodeCtx& c, int32_t k0, int32_t k1) {
    generic_gate_up<D, F, A>(c, k0, k1, [&](int32_t b, const uint8_t* row) {
      return dot_row_qx<F>(row, c.xq.row(b, c.H), c.H / kBlock);
    });
  }
  static constexpr DownFn down = down_block<D, F>;
};

}  // namespace

DecodeKernels generic_block_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w, tda_x_format_t x) {
  return x == TDA_X_Q8_0 ? block_kernels<GenericQx>(d, a, w) : block_kernels<Generic>(d, a, w);
}

}  // namespace cpu
}  // namespace tda
