#include "dequant.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/blocks.cuh"  // cuda/src: the kernel library's own reading of the blocks

namespace tda_trt {
namespace {

constexpr int kThreads = 256;

template <class T> struct To;
template <> struct To<float> {
  __device__ float operator()(float v) const { return v; }
};
template <> struct To<__half> {
  __device__ __half operator()(float v) const { return __float2half_rn(v); }
};
template <> struct To<__nv_bfloat16> {
  __device__ __nv_bfloat16 operator()(float v) const { return __float2bfloat16_rn(v); }
};

template <tda_weight_format_t F, class T>
__global__ void __launch_bounds__(kThreads) dequantize(const uint8_t* __restrict__ w, int32_t k, int64_t rows,
                                                       T* __restrict__ out) {
  tda::gpu::dequantize_eighths<F>(w, k, rows, out, k, To<T>());
}

template <class T>
cudaError_t launch(tda_weight_format_t f, const void* blocks, int32_t k, int64_t rows, void* out, cudaStream_t st) {
  const int64_t threads = rows * (k / 8);
  const unsigned grid = unsigned(std::max<int64_t>(1, std::min<int64_t>((threads + kThreads - 1) / kThreads, 65535)));
  const uint8_t* w = static_cast<const uint8_t*>(blocks);
  T* o = static_cast<T*>(out);
  switch (f) {
    case TDA_WEIGHTS_Q8_0: dequantize<TDA_WEIGHTS_Q8_0, T><<<grid, kThreads, 0, st>>>(w, k, rows, o); break;
    case TDA_WEIGHTS_Q4_0: dequantize<TDA_WEIGHTS_Q4_0, T><<<grid, kThreads, 0, st>>>(w, k, rows, o); break;
    case TDA_WEIGHTS_Q4_1: dequantize<TDA_WEIGHTS_Q4_1, T><<<grid, kThreads, 0, st>>>(w, k, rows, o); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t dequantize_weights(tda_dtype_t dtype, tda_weight_format_t f, const void* blocks, int32_t k, int64_t rows,
                               void* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case TDA_F32: return launch<float>(f, blocks, k, rows, out, stream);
    case TDA_F16: return launch<__half>(f, blocks, k, rows, out, stream);
    default: return launch<__nv_bfloat16>(f, blocks, k, rows, out, stream);
  }
}

}  // namespace tda_trt
