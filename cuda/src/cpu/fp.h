// fp16/bf16 <-> fp32 by bit manipulation: branch-free widening so the hot
// loops stay vectorisable without -march flags or compiler extensions.
#pragma once

#include <stdint.h>
#include <string.h>

#include "tda_kernels.h"

namespace tda {
namespace cpu {

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

static inline float f16_to_f32(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  // Shifting into a float and scaling by 2^112 re-biases the exponent and
  // handles subnormals in one multiply; inf/nan keep an all-ones exponent.
  const float scaled = bits_to_f32(em << 13) * 0x1p112f;
  const uint32_t mag = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : f32_to_bits(scaled);
  return bits_to_f32(mag | (uint32_t(h & 0x8000u) << 16));
}

static inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                 // round to nearest even
}

static inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                   // below 2^-14: fp16 subnormal or zero
    // Adding 0.5 aligns the value's ulp with the subnormal ulp (2^-24); the
    // FPU's round-to-nearest-even then does the rounding.
    const float r = bits_to_f32(a) + 0.5f;
    return uint16_t(sign | (f32_to_bits(r) - 0x3f000000u));
  }
  const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

// Loads element i of a dtype-typed array as fp32.
template <tda_dtype_t D> struct Elem;
template <> struct Elem<TDA_F32> {
  using type = float;
  static float load(const float* p, int64_t i) { return p[i]; }
  static void store(float* p, int64_t i, float v) { p[i] = v; }
  static float round(float v) { return v; }
};
template <> struct Elem<TDA_F16> {
  using type = uint16_t;
  static float load(const uint16_t* p, int64_t i) { return f16_to_f32(p[i]); }
  static void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_f16(v); }
  static float round(float v) { return f16_to_f32(f32_to_f16(v)); }
};
template <> struct Elem<TDA_BF16> {
  using type = uint16_t;
  static float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
  static void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
  static float round(float v) { return bf16_to_f32(f32_to_bf16(v)); }
};

}  // namespace cpu
}  // namespace tda
