// The block-quantized weight formats of tda_kernels.h (contract BLOCK_FORMATS):
// byte layout and the scalar dequantization every CPU variant agrees with.
// A block's weight i is q(i) * d + c with d its fp16 scale and c = 0 (Q8_0),
// -8d (Q4_0) or the fp16 minimum m (Q4_1); q(i) * d is exact in fp32, so one
// fma or a multiply and an add give the contract's value (dequantize_block
// below also matches the reference's signs of zero: (q - 8) * d for Q4_0).
#pragma once

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

}  // namespace cpu
}  // namespace tda
