// SelectActive's clamp, shared by the CPU and CUDA libraries so both count and
// rank exactly alike: the contract's k = max(n_lo, min(c, n_hi)) and an
// order-preserving integer key of a score, which a radix select walks 8 bits
// at a time (4 histogram passes, no workspace, no sort).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "host_device.h"

namespace tda {

// A larger score gives a larger key; -0 and +0 give the same key (the contract ranks them as equal).
TDA_HD uint32_t rank_key(float f) {
#ifdef __CUDA_ARCH__
  uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
#endif
  if (f == 0.0f) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// k of the contract from the passing count c; no bounds (NULL) is no clamp.
TDA_HD int32_t clamp_count(int32_t c, int32_t inter, const float* bounds) {
  if (!bounds) return c;
  const float n = static_cast<float>(inter);
  const float lo = fminf(fmaxf(ceilf(bounds[0] * n), 0.0f), n);
  const float hi = fminf(fmaxf(floorf(bounds[1] * n), 0.0f), n);
  const int32_t n_lo = static_cast<int32_t>(lo), n_hi = static_cast<int32_t>(hi);
  const int32_t k = c < n_hi ? c : n_hi;
  return k > n_lo ? k : n_lo;
}

// One step of the radix select for the k-th largest key: given the histogram of the next 8 bits (at
// `shift`) of the keys matching `prefix` under `mask`, fix those bits and update `remaining`, the number of
// keys still to take among those matching the new prefix.
TDA_HD void radix_step(const uint32_t* hist, int shift, uint32_t& prefix, uint32_t& mask, int32_t& remaining) {
  for (int b = 255; b >= 0; --b) {
    const int32_t h = static_cast<int32_t>(hist[b]);
    if (h >= remaining) {
      prefix |= static_cast<uint32_t>(b) << shift;
      mask |= 255u << shift;
      return;
    }
    remaining -= h;
  }
}

}  // namespace tda
