// Device helpers shared by the CUDA kernels: dtype traits, 16-byte loads,
// the bf16/fp16 tensor-core MMA and launch bookkeeping.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "activation.h"
#include "tda_kernels.h"

namespace tda {
namespace gpu {

template <tda_dtype_t D> struct Ty;
template <> struct Ty<TDA_F32> {
  using T = float;
  static __device__ __forceinline__ float to_f(T v) { return v; }
  static __device__ __forceinline__ T from_f(float v) { return v; }
};
template <> struct Ty<TDA_F16> {
  using T = __half;
  static __device__ __forceinline__ float to_f(T v) { return __half2float(v); }
  static __device__ __forceinline__ T from_f(float v) { return __float2half_rn(v); }
};
template <> struct Ty<TDA_BF16> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float to_f(T v) { return __bfloat162float(v); }
  static __device__ __forceinline__ T from_f(float v) { return __float2bfloat16_rn(v); }
};

// The contract rounds z to T before the down projection.
template <tda_dtype_t D>
__device__ __forceinline__ float round_to(float v) { return Ty<D>::to_f(Ty<D>::from_f(v)); }

// Weights are read once per call: skip L1 so it stays free for the
// activations every warp re-reads.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// Eight 16-bit values of a 16-byte vector as fp32.
template <tda_dtype_t D>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 p;
    if (D == TDA_F16) {
      p = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    } else {
      p = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
    }
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// D += A(16x16, row) * B(16x8, col), fp32 accumulate.
template <tda_dtype_t D>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if (D == TDA_BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ float activate_rt(tda_activation_t a, float x) {
  switch (a) {
    case TDA_ACT_SILU: return activate<TDA_ACT_SILU>(x);
    case TDA_ACT_GELU_TANH: return activate<TDA_ACT_GELU_TANH>(x);
    case TDA_ACT_GELU: return activate<TDA_ACT_GELU>(x);
    default: return activate<TDA_ACT_RELU>(x);
  }
}

// Every lane gets the warp's total (butterfly: a fixed order, reproducible).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ int32_t clamp_count_dev(int32_t c, int32_t n) { return c < 0 ? 0 : (c > n ? n : c); }

// SM count of the current device, cached: grids are sized from it and
// cudaDeviceGetAttribute is legal during stream capture. Several threads may
// enqueue at once (one per TensorRT context or stream): each slot is an
// atomic, written with the same value by whichever thread gets there first.
inline int num_sms() {
  static std::atomic<int> cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (!n) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

inline tda_status_t launch_status() {
  return cudaGetLastError() == cudaSuccess ? TDA_OK : TDA_ERR_CUDA;
}

}  // namespace gpu
}  // namespace tda
