// CUDA prefill statistics: per-token normaliser, then per-neuron sums over
// tokens in order t = 0..S-1 (coalesced over neurons, reproducible).
#include <cub/block/block_reduce.cuh>

#include "common.h"
#include "device.cuh"

namespace tda {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr float kNormFloor = 1e-30f;  // contract.NORM_FLOOR

// coef[b,t] = token_valid / max(sum_j z^2, NORM_FLOOR) (or token_valid).
template <tda_dtype_t D>
__global__ void __launch_bounds__(kThreads) token_coef(const typename Ty<D>::T* __restrict__ z,
                                                       const float* __restrict__ valid, int32_t inter,
                                                       tda_score_norm_t norm, float* __restrict__ coef) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t bt = blockIdx.x;
  const float v = valid[bt];
  if (v == 0.0f || norm == TDA_SCORE_NORM_NONE) {  // uniform per block: no thread skips the reduction alone
    if (threadIdx.x == 0) coef[bt] = v;
    return;
  }
  const typename Ty<D>::T* zt = z + bt * inter;
  float s = 0.0f;
  for (int32_t j = threadIdx.x; j < inter; j += kThreads) {
    const float x = Ty<D>::to_f(zt[j]);
    s = fmaf(x, x, s);
  }
  s = Reduce(tmp).Sum(s);
  if (threadIdx.x == 0) coef[bt] = v / fmaxf(s, kNormFloor);
}

template <tda_dtype_t D>
__global__ void __launch_bounds__(kThreads) accumulate_scores(const typename Ty<D>::T* __restrict__ z,
                                                              const float* __restrict__ coef, int32_t seq,
                                                              int32_t inter, const float* scores_in,
                                                              float* scores_out) {
  const int b = blockIdx.y;
  const int32_t j = blockIdx.x * kThreads + threadIdx.x;
  if (j >= inter) return;
  float acc = 0.0f;
  for (int32_t t = 0; t < seq; ++t) {
    const float c = coef[int64_t(b) * seq + t];
    if (c == 0.0f) continue;  // padding tokens contribute nothing, even if z there is garbage
    const float x = Ty<D>::to_f(z[(int64_t(b) * seq + t) * inter + j]);
    acc = fmaf(c, x * x, acc);
  }
  // scores_out may alias scores_in: each element is read before it is written by the same thread.
  scores_out[int64_t(b) * inter + j] = scores_in[int64_t(b) * inter + j] + acc;
}

template <tda_dtype_t D>
tda_status_t run(const tda_prefill_scores_args_t* a, float* coef, cudaStream_t st) {
  using T = typename Ty<D>::T;
  const T* z = static_cast<const T*>(a->z);
  if (a->seq_len > 0)
    token_coef<D><<<a->batch * a->seq_len, kThreads, 0, st>>>(z, a->token_valid, a->intermediate, a->score_norm,
                                                              coef);
  accumulate_scores<D><<<dim3((a->intermediate + kThreads - 1) / kThreads, a->batch), kThreads, 0, st>>>(
      z, coef, a->seq_len, a->intermediate, a->scores_in, a->scores_out);
  return launch_status();
}

}  // namespace
}  // namespace gpu
}  // namespace tda

extern "C" size_t tda_prefill_scores_workspace_size(const tda_prefill_scores_args_t* a) {
  if (tda::check_prefill_shape(a) != TDA_OK) return 0;
  return size_t(a->batch) * a->seq_len * sizeof(float);
}

extern "C" tda_status_t tda_prefill_scores(const tda_prefill_scores_args_t* a, void* ws, size_t ws_size,
                                           void* stream) {
  const tda_status_t s = tda::check_prefill(a, ws, ws_size, tda_prefill_scores_workspace_size(a));
  if (s != TDA_OK || a->batch == 0) return s;
  float* coef = static_cast<float*>(ws);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (a->dtype) {
    case TDA_F32: return tda::gpu::run<TDA_F32>(a, coef, st);
    case TDA_F16: return tda::gpu::run<TDA_F16>(a, coef, st);
    case TDA_BF16: return tda::gpu::run<TDA_BF16>(a, coef, st);
  }
  return TDA_ERR_BAD_DTYPE;
}
