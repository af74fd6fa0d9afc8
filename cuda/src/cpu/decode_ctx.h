// What the decode phases share: the carved workspace plus the call's
// arguments, and the per-ISA kernel table that decode.cpp dispatches to.
#pragma once

#include <stdint.h>

#include "blocks.h"
#include "tda_kernels.h"

namespace tda {
namespace cpu {

// Quantizes rows [0, rows) of x (row stride ldx, K a multiple of 32) into out:
// quantize_x_generic (blocks.h) and avx2_quantize_x (decode_avx2.cpp,
// quant_x_avx2.h) give the same bits.
using QuantizeXFn = void (*)(const float* x, int64_t ldx, int32_t rows, int32_t K, const QX& out);
void avx2_quantize_x(const float* x, int64_t ldx, int32_t rows, int32_t K, const QX& out);

struct DecodeCtx {
  int32_t B, H, U;         // batch, hidden, union length
  const float* x;          // [B, H] inputs widened to fp32 (x_format 0; else null)
  const uint64_t* mask;    // [I] bit b: row active in sequence b
  const int32_t* rows;     // [U] union of active rows, ascending
  float* z;                // [U, B] intermediate, 0 where masked
  float* acc;              // [B, H] fp32 output accumulators
  const void* gate_up;     // [I, 2, H] dtype or [I, 2, H/32] blocks
  const void* down;        // [I, H] dtype or [I, H/32] blocks
  void* out;               // [B, H] dtype
  QX xq;                   // [B, H] x quantized (x_format TDA_X_Q8_0; else nulls)
};

// gate_up fills z for union positions [k0, k1); down writes output columns
// [c0, c1) (c0 a multiple of 16, c1 one too or H; multiples of 32 for block
// weights, which never split a block) from all of z. Each output
// element is summed by one thread in row order, so results never depend on
// how the ranges are split.
using GateUpFn = void (*)(const DecodeCtx&, int32_t k0, int32_t k1);
using DownFn = void (*)(const DecodeCtx&, int32_t c0, int32_t c1);
struct DecodeKernels {
  GateUpFn gate_up;
  DownFn down;
};

// The widest variant this CPU runs, capped by $TDA_CPU_ISA (generic | avx2 |
// avx512), read per call so tests can switch variants (decode.cpp). cpu_vnni():
// the quantized-x kernels take decode_vnni.cpp's vpdpbusd (kAvx512 with
// AVX-512 BW, VL and VNNI, unless capped at avx512).
enum Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
Isa cpu_isa();
bool cpu_vnni();

// Dense block-quantized linear (tda_block_linear) for rows [n_begin, n_end):
// linear.cpp checks the arguments and picks a variant; avx2/avx512 come from
// linear_simd.h in decode_avx2.cpp / decode_avx512.cpp. With x_format
// TDA_X_Q8_0 linear.cpp quantizes rows of x and a LinearQxFn writes y's rows
// [m0, m0 + rows) from them (xq: those rows, row stride K).
using LinearFn = void (*)(const tda_block_linear_args_t* a);
LinearFn avx2_linear(tda_weight_format_t w);
LinearFn avx512_linear(tda_weight_format_t w);
using LinearQxFn = void (*)(const tda_block_linear_args_t* a, const QX& xq, int32_t m0, int32_t rows);
LinearQxFn avx2_linear_qx(tda_weight_format_t w);
LinearQxFn vnni_linear_qx(tda_weight_format_t w);
// tda_block_dequantize's rows, the same way.
using DequantFn = void (*)(int32_t k, int64_t rows, const void* weight, float* out, int64_t ldo);
DequantFn avx2_dequantize(tda_weight_format_t w);
DequantFn avx512_dequantize(tda_weight_format_t w);

// Defined in decode_avx2.cpp / decode_avx512.cpp (compiled for those ISAs with
// target pragmas; only called after a CPUID check), and the portable block
// weight kernels in decode_quant.cpp. d is the dtype of x, z and the output;
// w the weights' format; x how gate_up reads x (TDA_X_Q8_0: ctx.xq, block
// weights only; down is the same either way). The TDA_X_Q8_0 kernels are
// 256-bit integer dots: AVX2's, or vnni_kernels (decode_vnni.cpp) where
// cpu_vnni(); an AVX-512 CPU without VNNI runs AVX2's.
DecodeKernels avx2_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w, tda_x_format_t x);
DecodeKernels avx512_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w);
DecodeKernels vnni_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w);
DecodeKernels generic_block_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w, tda_x_format_t x);

}  // namespace cpu
}  // namespace tda

namespace tda {
namespace cpu {

// The kernel table of a family K<D, F, A> (static gate_up and down members)
// for run-time enums: one switch tree for every variant of the block formats.
// static: K is each ISA unit's own (anonymous-namespace) family, but GCC gives
// these instantiations one COMDAT name in every unit (..._GLOBAL__N_1::Simd...),
// so without internal linkage the linker kept the first unit's tables and an
// AVX-512 CPU ran decode_avx2.cpp's block kernels (tests/test_kernels_quant.py
// checks each unit's table is its own).
template <template <tda_dtype_t, tda_weight_format_t, tda_activation_t> class K, tda_dtype_t D,
          tda_weight_format_t F>
static DecodeKernels block_kernels_for(tda_activation_t a) {
  switch (a) {
    case TDA_ACT_SILU: return {K<D, F, TDA_ACT_SILU>::gate_up, K<D, F, TDA_ACT_SILU>::down};
    case TDA_ACT_GELU_TANH: return {K<D, F, TDA_ACT_GELU_TANH>::gate_up, K<D, F, TDA_ACT_GELU_TANH>::down};
    case TDA_ACT_GELU: return {K<D, F, TDA_ACT_GELU>::gate_up, K<D, F, TDA_ACT_GELU>::down};
    case TDA_ACT_RELU: break;
  }
  return {K<D, F, TDA_ACT_RELU>::gate_up, K<D, F, TDA_ACT_RELU>::down};
}

template <template <tda_dtype_t, tda_weight_format_t, tda_activation_t> class K, tda_dtype_t D>
static DecodeKernels block_kernels_for(tda_activation_t a, tda_weight_format_t w) {
  switch (w) {
    case TDA_WEIGHTS_Q8_0: return block_kernels_for<K, D, TDA_WEIGHTS_Q8_0>(a);
    case TDA_WEIGHTS_Q4_0: return block_kernels_for<K, D, TDA_WEIGHTS_Q4_0>(a);
    case TDA_WEIGHTS_DTYPE:  // not a block format: never asked for (check_decode_shape)
    case TDA_WEIGHTS_Q4_1: break;
  }
  return block_kernels_for<K, D, TDA_WEIGHTS_Q4_1>(a);
}

template <template <tda_dtype_t, tda_weight_format_t, tda_activation_t> class K>
static DecodeKernels block_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w) {
  switch (d) {
    case TDA_F16: return block_kernels_for<K, TDA_F16>(a, w);
    case TDA_BF16: return block_kernels_for<K, TDA_BF16>(a, w);
    case TDA_F32: break;
  }
  return block_kernels_for<K, TDA_F32>(a, w);
}

}  // namespace cpu
}  // namespace tda
