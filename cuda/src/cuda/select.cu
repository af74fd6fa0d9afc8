// CUDA SelectActive: one block per sequence, a max reduction then an
// order-preserving block-scan compaction, so the list comes out ascending
// without a sort and without the host ever seeing the count.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.h"
#include "device.cuh"

namespace tda {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // consecutive neurons per thread per round

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__global__ void __launch_bounds__(kThreads) select_active_kernel(const float* __restrict__ scores,
                                                                 const float* __restrict__ threshold, int32_t inter,
                                                                 int32_t* __restrict__ idx,
                                                                 int32_t* __restrict__ count) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  using Scan = cub::BlockScan<int32_t, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ float max_score;
  const float* s = scores + int64_t(blockIdx.x) * inter;
  int32_t* out = idx + int64_t(blockIdx.x) * inter;

  // Start from an element, not 0, so the max is the contract's max_k scores.
  float m = s[0];
  for (int32_t j = threadIdx.x; j < inter; j += kThreads) m = fmaxf(m, s[j]);
  m = Reduce(tmp.reduce).Reduce(m, MaxOp());
  if (threadIdx.x == 0) max_score = m;
  __syncthreads();
  m = max_score;
  const float tau = *threshold;
  const bool all = tau <= 0.0f || m == 0.0f;
  const float cut = (tau * tau) * m;

  int32_t n = 0;
  for (int32_t base = 0; base < inter; base += kThreads * kItems) {
    const int32_t j0 = base + threadIdx.x * kItems;
    bool keep[kItems];
    int32_t mine = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      keep[i] = j0 + i < inter && (all || s[j0 + i] >= cut);
      mine += keep[i];
    }
    int32_t pos, round_total;
    __syncthreads();  // tmp is reused across rounds
    Scan(tmp.scan).ExclusiveSum(mine, pos, round_total);
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (keep[i]) out[n + pos++] = j0 + i;
    n += round_total;
  }
  for (int32_t j = n + threadIdx.x; j < inter; j += kThreads) out[j] = 0;
  if (threadIdx.x == 0) count[blockIdx.x] = n;
}

__global__ void zero_counts(int32_t* count, int32_t batch) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < batch) count[i] = 0;
}

}  // namespace
}  // namespace gpu
}  // namespace tda

extern "C" size_t tda_select_active_workspace_size(const tda_select_args_t*) { return 0; }

extern "C" tda_status_t tda_select_active(const tda_select_args_t* a, void* ws, size_t ws_size, void* stream) {
  const tda_status_t s = tda::check_select(a, ws, ws_size, 0);
  if (s != TDA_OK || a->batch == 0) return s;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a->intermediate == 0) {
    tda::gpu::zero_counts<<<1, TDA_MAX_BATCH, 0, st>>>(a->active_count, a->batch);
  } else {
    tda::gpu::select_active_kernel<<<a->batch, tda::gpu::kThreads, 0, st>>>(a->scores, a->threshold,
                                                                             a->intermediate, a->active_idx,
                                                                             a->active_count);
  }
  return tda::gpu::launch_status();
}
