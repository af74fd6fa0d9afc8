#include "gated_act.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "activation.h"  // cuda/src: the same act() formulas as the decode kernels

namespace tda_trt {
namespace {

constexpr int kThreads = 256;

template <class T> struct Pair;
template <> struct Pair<float> {
  using V = float2;
  static __device__ float2 load(const V& v) { return v; }
  static __device__ float store(float f) { return f; }
};
template <> struct Pair<__half> {
  using V = __half2;
  static __device__ float2 load(const V& v) { return __half22float2(v); }
  static __device__ __half store(float f) { return __float2half_rn(f); }
};
template <> struct Pair<__nv_bfloat16> {
  using V = __nv_bfloat162;
  static __device__ float2 load(const V& v) { return __bfloat1622float2(v); }
  static __device__ __nv_bfloat16 store(float f) { return __float2bfloat16_rn(f); }
};

// One (gate, up) pair per thread, read as one vector: I is a multiple of 8,
// so every pair is aligned to its vector size.
template <class T, tda_activation_t A>
__global__ void __launch_bounds__(kThreads) gated(const typename Pair<T>::V* __restrict__ gu, T* __restrict__ z,
                                                  int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const float2 g = Pair<T>::load(gu[i]);
    z[i] = Pair<T>::store(tda::activate<A>(g.x) * g.y);
  }
}

template <class T>
cudaError_t launch(tda_activation_t act, const void* gate_up, void* z, int64_t n, cudaStream_t st) {
  const auto* gu = static_cast<const typename Pair<T>::V*>(gate_up);
  T* out = static_cast<T*>(z);
  // Grid-stride: enough blocks to fill any current GPU, bounded for huge prompts.
  const unsigned blocks = unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  switch (act) {
    case TDA_ACT_SILU: gated<T, TDA_ACT_SILU><<<blocks, kThreads, 0, st>>>(gu, out, n); break;
    case TDA_ACT_GELU_TANH: gated<T, TDA_ACT_GELU_TANH><<<blocks, kThreads, 0, st>>>(gu, out, n); break;
    case TDA_ACT_GELU: gated<T, TDA_ACT_GELU><<<blocks, kThreads, 0, st>>>(gu, out, n); break;
    case TDA_ACT_RELU: gated<T, TDA_ACT_RELU><<<blocks, kThreads, 0, st>>>(gu, out, n); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t gated_activation(tda_dtype_t dtype, tda_activation_t act, const void* gate_up, void* z, int64_t tokens,
                             int32_t inter, cudaStream_t stream) {
  const int64_t n = tokens * inter;
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case TDA_F32: return launch<float>(act, gate_up, z, n, stream);
    case TDA_F16: return launch<__half>(act, gate_up, z, n, stream);
    case TDA_BF16: return launch<__nv_bfloat16>(act, gate_up, z, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tda_trt
