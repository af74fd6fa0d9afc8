// What the decode phases share: the carved workspace plus the call's
// arguments, and the per-ISA kernel table that decode.cpp dispatches to.
#pragma once

#include <stdint.h>

#include "tda_kernels.h"

namespace tda {
namespace cpu {

struct DecodeCtx {
  int32_t B, H, U;         // batch, hidden, union length
  const float* x;          // [B, H] inputs widened to fp32
  const uint64_t* mask;    // [I] bit b: row active in sequence b
  const int32_t* rows;     // [U] union of active rows, ascending
  float* z;                // [U, B] intermediate, 0 where masked
  float* acc;              // [B, H] fp32 output accumulators
  const void* gate_up;     // [I, 2, H] dtype
  const void* down;        // [I, H] dtype
  void* out;               // [B, H] dtype
};

// gate_up fills z for union positions [k0, k1); down writes output columns
// [c0, c1) (c0 a multiple of 16, c1 one too or H) from all of z. Each output
// element is summed by one thread in row order, so results never depend on
// how the ranges are split.
using GateUpFn = void (*)(const DecodeCtx&, int32_t k0, int32_t k1);
using DownFn = void (*)(const DecodeCtx&, int32_t c0, int32_t c1);
struct DecodeKernels {
  GateUpFn gate_up;
  DownFn down;
};

// Defined in decode_avx2.cpp / decode_avx512.cpp (compiled for those ISAs with
// target pragmas; only called after a CPUID check).
DecodeKernels avx2_kernels(tda_dtype_t d, tda_activation_t a);
DecodeKernels avx512_kernels(tda_dtype_t d, tda_activation_t a);

}  // namespace cpu
}  // namespace tda
