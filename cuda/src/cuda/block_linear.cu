// CUDA dense block-quantized linear (ABI 5: tda_block_linear, tda_block_dequantize,
// tda_block_bytes): the GEMV of the non-MLP linears (attention q/k/v/o, lm_head)
// of a quantized engine at decode.
//
// tda_block_linear: one warp per output row n in [n_begin, n_end), the row's
// dot products with up to 8 rows of x at a time by block_dots (blocks.cuh:
// dequantized in registers, fp32 sums, no shared memory), the same code as
// the sparse gate_up. M > 8 walks x in tiles of 8, re-reading the weight row
// (from L1/L2) per tile: right for decode's M <= 8; prefill should not run
// here but dequantize with tda_block_dequantize and use a GEMM library (the
// TensorRT plugins do: dequantize to the compute dtype, then cuBLAS).
// x and y are only 4-byte aligned (strides ldx, ldy are arbitrary), so x is
// read as floats; weight must be 4-byte aligned here (TDA_ERR_MISALIGNED), as
// for decode's blocks.
#include <algorithm>

#include "common.h"
#include "cuda/blocks.cuh"
#include "device.cuh"

namespace tda {
namespace gpu {
namespace {

constexpr int kWarps = 8;
constexpr int kTile = 8;  // rows of x per pass over a weight row

template <tda_weight_format_t F, int NB>
__global__ void __launch_bounds__(kWarps * 32, 2) block_gemv(const float* __restrict__ x, int64_t ldx,
                                                             const uint8_t* __restrict__ w, int32_t k, int32_t m,
                                                             int32_t n_begin, int32_t n_end, float* __restrict__ y,
                                                             int64_t ldy) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int32_t nblk = k / kQBlock;
  const int64_t rb = int64_t(nblk) * QBlock<F>::bytes;
  for (int32_t n = n_begin + blockIdx.x * kWarps + warp; n < n_end; n += gridDim.x * kWarps) {
    const uint8_t* const row[1] = {w + int64_t(n) * rb};
    for (int32_t m0 = 0; m0 < m; m0 += NB) {
      const float* xt = x + int64_t(m0) * ldx;
      const auto xload = [&](int i, int32_t h, float (&f)[8]) {
        const float* p = xt + int64_t(i) * ldx + h;
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = __ldg(p + e);
      };
      float acc[1][NB];
#pragma unroll
      for (int i = 0; i < NB; ++i) acc[0][i] = 0.0f;
      block_dots<F, 1, NB>(row, nblk, lane, m - m0, xload, acc);
      float v = 0.0f;
#pragma unroll
      for (int i = 0; i < NB; ++i) {
        const float s = warp_sum(acc[0][i]);
        if (i == lane) v = s;
      }
      if (lane < NB && m0 + lane < m) y[int64_t(m0 + lane) * ldy + n] = v;
    }
  }
}

template <tda_weight_format_t F>
__global__ void __launch_bounds__(256) dequantize_f32(const uint8_t* __restrict__ w, int32_t k, int64_t rows,
                                                      float* __restrict__ out, int64_t ldo) {
  dequantize_eighths<F>(w, k, rows, out, ldo, [](float v) { return v; });
}

template <tda_weight_format_t F>
tda_status_t linear(const tda_block_linear_args_t* a, cudaStream_t st) {
  const int32_t rows = a->n_end - a->n_begin;
  const int blocks = int(std::min<int64_t>((rows + kWarps - 1) / kWarps, int64_t(num_sms()) * 4));
  const uint8_t* w = static_cast<const uint8_t*>(a->weight);
  if (a->m == 1)
    block_gemv<F, 1><<<blocks, kWarps * 32, 0, st>>>(a->x, a->ldx, w, a->k, a->m, a->n_begin, a->n_end, a->y, a->ldy);
  else if (a->m <= 4)
    block_gemv<F, 4><<<blocks, kWarps * 32, 0, st>>>(a->x, a->ldx, w, a->k, a->m, a->n_begin, a->n_end, a->y, a->ldy);
  else
    block_gemv<F, kTile><<<blocks, kWarps * 32, 0, st>>>(a->x, a->ldx, w, a->k, a->m, a->n_begin, a->n_end, a->y,
                                                         a->ldy);
  return launch_status();
}

template <tda_weight_format_t F>
tda_status_t dequantize(int32_t k, int64_t rows, const void* w, float* out, int64_t ldo, cudaStream_t st) {
  const int64_t threads = rows * (k / 8);
  const int blocks = int(std::min<int64_t>((threads + 255) / 256, int64_t(num_sms()) * 8));
  dequantize_f32<F><<<blocks, 256, 0, st>>>(static_cast<const uint8_t*>(w), k, rows, out, ldo);
  return launch_status();
}

}  // namespace
}  // namespace gpu
}  // namespace tda

extern "C" size_t tda_block_linear_workspace_size(const tda_block_linear_args_t*) { return 0; }

extern "C" tda_status_t tda_block_linear(const tda_block_linear_args_t* a, void*, size_t, void* stream) {
  const tda_status_t s = tda::check_block_linear(a);  // x_format TDA_X_DTYPE only (TDA_X_Q8_0: TDA_ERR_BAD_DTYPE)
  if (s != TDA_OK || a->m == 0 || a->n_begin == a->n_end) return s;
  if (!tda::aligned4(a->weight)) return TDA_ERR_MISALIGNED;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (a->weight_format) {
    case TDA_WEIGHTS_Q8_0: return tda::gpu::linear<TDA_WEIGHTS_Q8_0>(a, st);
    case TDA_WEIGHTS_Q4_0: return tda::gpu::linear<TDA_WEIGHTS_Q4_0>(a, st);
    default: return tda::gpu::linear<TDA_WEIGHTS_Q4_1>(a, st);
  }
}

extern "C" tda_status_t tda_block_dequantize(int32_t weight_format, int32_t k, int64_t rows, const void* weight,
                                             float* out, int64_t ldo, void* stream) {
  const tda_status_t s = tda::check_block_dequantize(weight_format, k, rows, weight, out, ldo);
  if (s != TDA_OK || rows == 0) return s;
  if (!tda::aligned4(weight)) return TDA_ERR_MISALIGNED;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (weight_format) {
    case TDA_WEIGHTS_Q8_0: return tda::gpu::dequantize<TDA_WEIGHTS_Q8_0>(k, rows, weight, out, ldo, st);
    case TDA_WEIGHTS_Q4_0: return tda::gpu::dequantize<TDA_WEIGHTS_Q4_0>(k, rows, weight, out, ldo, st);
    default: return tda::gpu::dequantize<TDA_WEIGHTS_Q4_1>(k, rows, weight, out, ldo, st);
  }
}

extern "C" size_t tda_block_bytes(int32_t weight_format) { return tda::block_bytes(weight_format); }
