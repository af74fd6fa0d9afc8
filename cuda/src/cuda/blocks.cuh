// Device side of the block-quantized weight formats (tda_kernels.h, contract
// BLOCK_FORMATS): the byte layout of cpu/blocks.h, dequantized in registers.
// Shared by the kernel library (decode_quant.cu, block_linear.cu) and the
// TensorRT plugins' prefill dequantizer (plugins/dequant.cu), so there is one
// device reading of the bytes.
//
// A block's weight i is q(i) * d + c with d its fp16 scale and c = 0 (Q8_0),
// -8d (Q4_0) or the fp16 minimum m (Q4_1); q(i) * d is exact in fp32, so
// fmaf(q, d, c) is the contract's float32 weight bit for bit (the CPU
// reference computes the same fma, cpu/blocks.h).
//
// Loads: blocks are 34/18/20 bytes, so a block's fields are only 2-byte
// aligned for Q8_0/Q4_0 (the CUDA library requires the block array itself to
// be 4-byte aligned, which cudaMalloc'd and TensorRT weights always are).
// Quantized bytes are read as 16-bit pairs for Q8_0/Q4_0 (as llama.cpp's CUDA
// kernels do) and as 32-bit words for Q4_1 (whose 20-byte blocks keep 4-byte
// alignment), through the non-coherent path with L1 allocation: the lanes of a
// warp read neighbouring blocks, so each 128-byte line is fetched from L2 once
// and the remaining 2-byte pieces hit L1.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include "tda_kernels.h"

#ifndef __CUDACC__
// Compiled by a host compiler: tests/cuda_blocks_host_main.cpp runs these very
// functions on the CPU, lane by lane, against ops/blocks.py (no GPU needed).
#include "cuda/blocks_host_shim.h"
#endif

namespace tda {
namespace gpu {

constexpr int kQBlock = TDA_QUANT_BLOCK;

template <tda_weight_format_t F> struct QBlock;
template <> struct QBlock<TDA_WEIGHTS_Q8_0> { static constexpr int bytes = 34, qs = 2; };
template <> struct QBlock<TDA_WEIGHTS_Q4_0> { static constexpr int bytes = 18, qs = 2; };
template <> struct QBlock<TDA_WEIGHTS_Q4_1> { static constexpr int bytes = 20, qs = 4; };

__device__ __forceinline__ uint32_t ld_u16(const uint8_t* p) {
  return __ldg(reinterpret_cast<const unsigned short*>(p));
}
// Four bytes at a 2-byte aligned address (little-endian, as the blocks are).
__device__ __forceinline__ uint32_t ld_u32_a2(const uint8_t* p) { return ld_u16(p) | (ld_u16(p + 2) << 16); }
__device__ __forceinline__ uint32_t ld_u32_a4(const uint8_t* p) {
  return __ldg(reinterpret_cast<const unsigned int*>(p));
}

__device__ __forceinline__ float f16_bits(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

// d and c of the block at b: w(i) = q(i) * d + c.
template <tda_weight_format_t F>
__device__ __forceinline__ void block_scale(const uint8_t* b, float& d, float& c) {
  if constexpr (F == TDA_WEIGHTS_Q4_1) {
    const uint32_t dm = ld_u32_a4(b);
    d = f16_bits(dm & 0xffffu);
    c = f16_bits(dm >> 16);
  } else {
    d = f16_bits(ld_u16(b));
    c = F == TDA_WEIGHTS_Q4_0 ? -8.0f * d : 0.0f;
  }
}

// The 4 quantized-byte words of block b that hold weights [8*p, 8*p+8) for
// 4-bit formats (p = 0..3: low nibbles of bytes 0-7, 8-15, then high nibbles
// of bytes 0-7, 8-15) or for Q8_0 (bytes 8p..8p+7): two 32-bit words.
template <tda_weight_format_t F>
__device__ __forceinline__ void load_eighth(const uint8_t* b, int p, uint32_t& w0, uint32_t& w1) {
  if constexpr (F == TDA_WEIGHTS_Q8_0) {
    const uint8_t* q = b + QBlock<F>::qs + 8 * p;
    w0 = ld_u32_a2(q);
    w1 = ld_u32_a2(q + 4);
  } else {
    const uint8_t* q = b + QBlock<F>::qs + 8 * (p & 1);
    if constexpr (F == TDA_WEIGHTS_Q4_1) {
      w0 = ld_u32_a4(q);
      w1 = ld_u32_a4(q + 4);
    } else {
      w0 = ld_u32_a2(q);
      w1 = ld_u32_a2(q + 4);
    }
  }
}

// Integer q of 4 nibbles/bytes as exact floats: the byte or nibble is placed
// in the mantissa of 2^23 and 2^23 subtracted (exact; no int->float convert).
__device__ __forceinline__ float mant(uint32_t v) { return __uint_as_float(0x4b000000u | v) - 8388608.0f; }

// Weights [8p, 8p+8) of the block from its words (load_eighth), as fp32:
// fmaf(q, d, c), the contract's exact value.
template <tda_weight_format_t F>
__device__ __forceinline__ void dequant_eighth(uint32_t w0, uint32_t w1, int p, float d, float c, float (&w)[8]) {
  if constexpr (F == TDA_WEIGHTS_Q8_0) {
    const uint32_t u[2] = {w0, w1};
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = float(int8_t((u[i >> 2] >> (8 * (i & 3))) & 0xffu)) * d;
  } else {
    const int sh = (p >> 1) * 4;  // low nibbles for weights 0-15, high for 16-31
    const uint32_t a = (w0 >> sh) & 0x0f0f0f0fu, b = (w1 >> sh) & 0x0f0f0f0fu;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = fmaf(mant((a >> (8 * i)) & 0xfu), d, c);
      w[4 + i] = fmaf(mant((b >> (8 * i)) & 0xfu), d, c);
    }
  }
}

// ---- Dot products of R block rows with NB activation vectors, one warp ----
// Lane l reads eighth l % 4 (8 weights) of block l / 4 + 8 s of every row, so a
// warp step covers 8 consecutive blocks (8 * bytes(F) contiguous bytes) of each
// row. kQSteps steps of all R rows are loaded before the first FMA: a warp has
// kQSteps * 8 * R * bytes(F) bytes in flight (gate_up, R = 2: Q4_0 1152,
// Q4_1 1280, Q8_0 2176). The weights are dequantized in registers and each
// multiplied by x widened to fp32 (fmaf, fp32 sums): no shared memory, no
// tensor cores (fp16/bf16 cannot hold q * d exactly). xload(i, h, f) writes
// x[i][h .. h+8) as floats; only i < nb are read. acc[r][i] gets this lane's
// partial sum; warp_sum (device.cuh) adds the lanes.
constexpr int kQSteps = 4;

template <tda_weight_format_t F, int R, int NB, class X>
__device__ __forceinline__ void block_dots(const uint8_t* const (&rows)[R], int32_t nblk, int lane, int nb,
                                           const X& xload, float (&acc)[R][NB]) {
  constexpr int32_t bytes = QBlock<F>::bytes;
  const int p = lane & 3;
  for (int32_t k0 = lane >> 2; k0 < nblk; k0 += 8 * kQSteps) {
    uint32_t q0[kQSteps][R], q1[kQSteps][R];
    float d[kQSteps][R], c[kQSteps][R];
#pragma unroll
    for (int s = 0; s < kQSteps; ++s) {
      const int32_t blk = k0 + 8 * s;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        q0[s][r] = q1[s][r] = 0u;
        d[s][r] = c[s][r] = 0.0f;
        if (blk < nblk) {  // blocks past the row: nothing loaded, nothing added
          const uint8_t* b = rows[r] + int64_t(blk) * bytes;
          block_scale<F>(b, d[s][r], c[s][r]);
          load_eighth<F>(b, p, q0[s][r], q1[s][r]);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kQSteps; ++s) {
      const int32_t blk = k0 + 8 * s;
      if (blk >= nblk) break;
      float w[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) dequant_eighth<F>(q0[s][r], q1[s][r], p, d[s][r], c[s][r], w[r]);
      const int32_t h = blk * kQBlock + p * 8;
#pragma unroll
      for (int i = 0; i < NB; ++i) {
        if (NB > 1 && i >= nb) break;
        float xv[8];
        xload(i, h, xv);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][i] = fmaf(xv[e], w[r][e], acc[r][i]);
      }
    }
  }
}

// Rows [0, rows) of K/32 blocks each, dequantized into out (row stride ldo
// elements of type T, converted by cvt(float)): thread per 8 weights.
template <tda_weight_format_t F, class T, class Cvt>
__device__ __forceinline__ void dequantize_eighths(const uint8_t* __restrict__ w, int32_t k, int64_t rows,
                                                   T* __restrict__ out, int64_t ldo, const Cvt& cvt) {
  const int32_t per_row = k / 8;
  const int64_t n = rows * per_row;
  const int64_t row_bytes = int64_t(k / kQBlock) * QBlock<F>::bytes;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / per_row;
    const int32_t col = int32_t(e - r * per_row) * 8;
    const uint8_t* b = w + r * row_bytes + (col / kQBlock) * QBlock<F>::bytes;
    const int p = (col / 8) & 3;
    float d, c, f[8];
    uint32_t w0, w1;
    block_scale<F>(b, d, c);
    load_eighth<F>(b, p, w0, w1);
    dequant_eighth<F>(w0, w1, p, d, c, f);
    T* o = out + r * ldo + col;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = cvt(f[i]);
  }
}

}  // namespace gpu
}  // namespace tda
