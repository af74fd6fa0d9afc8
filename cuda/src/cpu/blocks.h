// The block-quantized weight formats of tda_kernels.h (contract BLOCK_FORMATS):
// byte layout and the scalar dequantization every CPU variant agrees with.
// A block's weight i is q(i) * d + c with d its fp16 scale and c = 0 (Q8_0),
// -8d (Q4_0) or the fp16 minimum m (Q4_1); q(i) * d is exact in fp32, so one
// fma or a multiply and an add give the contract's value (dequantize_block
// below also matches the reference's signs of zero: (q - 8) * d for Q4_0).
//
// x_format TDA_X_Q8_0 (contract X_QUANT_SEMANTICS): rows of x quantized per
// block of 32 (QX, quantize_x_generic) and the scalar integer block dot
// products of the weights with them (dot_row_qx), the reference the AVX2
// kernels (quant_x_avx2.h) agree with.
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fp.h"
#include "tda_kernels.h"

namespace tda {
namespace cpu {

constexpr int32_t kBlock = TDA_QUANT_BLOCK;

template <tda_weight_format_t F> struct Block;
template <> struct Block<TDA_WEIGHTS_Q8_0> {
  static constexpr int32_t bytes = 34, qs = 2;  // fp16 d, 32 x int8
  static int32_t q(const uint8_t* b, int32_t i) { return int8_t(b[qs + i]); }
};
template <> struct Block<TDA_WEIGHTS_Q4_0> {
  static constexpr int32_t bytes = 18, qs = 2;  // fp16 d, 16 bytes of nibbles
  static int32_t q(const uint8_t* b, int32_t i) { return i < 16 ? b[qs + i] & 15 : b[qs + i - 16] >> 4; }
};
template <> struct Block<TDA_WEIGHTS_Q4_1> {
  static constexpr int32_t bytes = 20, qs = 4;  // fp16 d, fp16 m, 16 bytes of nibbles
  static int32_t q(const uint8_t* b, int32_t i) { return i < 16 ? b[qs + i] & 15 : b[qs + i - 16] >> 4; }
};

static inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  memcpy(&v, p, 2);  // blocks are 18/20/34 bytes: fields are unaligned
  return v;
}

// Scale d and offset c of the block at b: w(i) = q(i) * d + c.
template <tda_weight_format_t F>
static inline void block_scale(const uint8_t* b, float* d, float* c) {
  *d = f16_to_f32(load_u16(b));
  if constexpr (F == TDA_WEIGHTS_Q8_0) *c = 0.0f;
  else if constexpr (F == TDA_WEIGHTS_Q4_0) *c = -8.0f * *d;
  else *c = f16_to_f32(load_u16(b + 2));
}

// The 32 exact fp32 weights of the block at b, bit for bit ops/blocks.py's
// (the signs of zeros and non-finite scales included): d * q (Q8_0),
// d * (q - 8) (Q4_0), d * q + m (Q4_1; d * q is exact, so one rounding, as
// an fma). The scalar reference every SIMD variant agrees with.
template <tda_weight_format_t F>
static inline void dequantize_block(const uint8_t* b, float* w) {
  float d, c;
  block_scale<F>(b, &d, &c);
  for (int32_t i = 0; i < kBlock; ++i) {
    if constexpr (F == TDA_WEIGHTS_Q8_0) w[i] = d * float(Block<F>::q(b, i));
    else if constexpr (F == TDA_WEIGHTS_Q4_0) w[i] = d * float(Block<F>::q(b, i) - 8);
    else w[i] = d * float(Block<F>::q(b, i)) + c;
  }
}

// Bytes of one row of H weights.
template <tda_weight_format_t F>
static inline int64_t row_bytes(int32_t H) { return int64_t(H / kBlock) * Block<F>::bytes; }

// Rows of x quantized per block of 32 (x_format TDA_X_Q8_0): the int8 values,
// each block's scale d and d * sum(q), what a Q4_1 block's minimum multiplies
// (llama.cpp's Q8_1 s). A block that held inf/NaN has d = s = NaN, q = 0.
struct QX {
  int8_t* q;  // [rows, K]
  float* d;   // [rows, K/32]
  float* s;   // [rows, K/32]
  QX row(int64_t r, int32_t K) const { return {q + r * K, d + r * (K / kBlock), s + r * (K / kBlock)}; }
};

// The contract's block scale: max|x| / 127, flushed to 0 below the smallest
// normal float32 (a zero block), so that 1/d is finite and |x * (1/d)| <= 127.
static inline float x_scale(float a) {
  const float d = a / 127.0f;
  return d < FLT_MIN ? 0.0f : d;
}

// The reciprocal the contract multiplies by: 1/d, 0 when d == 0.
static inline float x_inverse(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

// One block of x: d = x_scale(max|x|), q = round-half-even(x * x_inverse(d))
// (nearbyintf, the default rounding mode). The product is clamped to +-127
// first, a no-op with the flushed scale (kept as a guard: q must fit int8).
static inline void quantize_x_block(const float* x, int8_t* q, float* d, float* s) {
  float a = 0.0f;
  bool finite = true;
  for (int32_t i = 0; i < kBlock; ++i) {
    const float v = fabsf(x[i]);
    finite &= v <= FLT_MAX;  // false for inf and NaN
    a = v > a ? v : a;
  }
  if (!finite) {
    memset(q, 0, kBlock);
    *d = *s = NAN;
    return;
  }
  const float dv = x_scale(a), id = x_inverse(dv);
  int32_t sum = 0;
  for (int32_t i = 0; i < kBlock; ++i) {
    const int32_t qi = int32_t(nearbyintf(fminf(fmaxf(x[i] * id, -127.0f), 127.0f)));
    q[i] = int8_t(qi);
    sum += qi;
  }
  *d = dv;
  *s = dv * float(sum);
}

static inline void quantize_x_generic(const float* x, int64_t ldx, int32_t rows, int32_t K, const QX& out) {
  for (int32_t r = 0; r < rows; ++r)
    for (int32_t k = 0; k < K / kBlock; ++k)
      quantize_x_block(x + r * ldx + k * kBlock, out.q + int64_t(r) * K + k * kBlock,
                       out.d + int64_t(r) * (K / kBlock) + k, out.s + int64_t(r) * (K / kBlock) + k);
}

// One block of weights at b times one of x: d_w * d_x * sum_i q_w(i) q_x(i)
// (the sum in int32; Q4_0's q_w is its nibble - 8), plus m_w * s_x for Q4_1.
template <tda_weight_format_t F>
static inline float block_dot_qx(const uint8_t* b, const int8_t* xq, float dx, float sx) {
  int32_t sum = 0;
  for (int32_t i = 0; i < kBlock; ++i)
    sum += (F == TDA_WEIGHTS_Q4_0 ? Block<F>::q(b, i) - 8 : Block<F>::q(b, i)) * int32_t(xq[i]);
  const float v = f16_to_f32(load_u16(b)) * dx * float(sum);
  if constexpr (F == TDA_WEIGHTS_Q4_1) return v + f16_to_f32(load_u16(b + 2)) * sx;
  return v;
}

// A row of `blocks` weight blocks times a quantized row of x, summed in fp32 in block order.
template <tda_weight_format_t F>
static inline float dot_row_qx(const uint8_t* row, const QX& x, int32_t blocks) {
  float acc = 0.0f;
  for (int32_t k = 0; k < blocks; ++k)
    acc += block_dot_qx<F>(row + int64_t(k) * Block<F>::bytes, x.q + k * kBlock, x.d[k], x.s[k]);
  return acc;
}

}  // namespace cpu
}  // namespace tda
