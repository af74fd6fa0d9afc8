// CUDA SelectActive: one block per sequence, a max reduction then an
// order-preserving block-scan compaction, so the list comes out ascending
// without a sort and without the host ever seeing the count. Where the clamp
// binds, a block radix select (select_rank.h) finds the k-th largest score
// and a second scan hands the ties to the lowest indices.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.h"
#include "device.cuh"
#include "select_rank.h"

namespace tda {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // consecutive neurons per thread per round

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__global__ void __launch_bounds__(kThreads) select_active_kernel(const float* __restrict__ scores,
                                                                 const float* __restrict__ threshold,
                                                                 const float* __restrict__ bounds, int32_t inter,
                                                                 int32_t* __restrict__ idx,
                                                                 int32_t* __restrict__ count) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  using Count = cub::BlockReduce<int32_t, kThreads>;
  using Scan = cub::BlockScan<int32_t, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Count::TempStorage count;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ float max_score;
  __shared__ int32_t passing;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t sel_prefix, sel_mask;
  __shared__ int32_t sel_remaining;
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

  // The clamp needs the passing count before the list is written.
  int32_t mine = 0;
  for (int32_t j = threadIdx.x; j < inter; j += kThreads) mine += all || s[j] >= cut;
  const int32_t c_part = Count(tmp.count).Sum(mine);
  if (threadIdx.x == 0) passing = c_part;
  __syncthreads();
  const int32_t c = passing;
  const int32_t k = m == 0.0f ? c : clamp_count(c, inter, bounds);
  const bool by_rank = k != c;  // the same for the whole block

  // Radix select of the k-th largest key, 8 bits per pass; afterwards sel_remaining = how many of the
  // keys equal to it to keep (the lowest-index ones).
  uint32_t key = 0;
  int32_t ties = 0;
  if (by_rank && k > 0) {
    if (threadIdx.x == 0) {
      sel_prefix = 0;
      sel_mask = 0;
      sel_remaining = k;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
      __syncthreads();
      const uint32_t prefix = sel_prefix, mask = sel_mask;
      for (int32_t j = threadIdx.x; j < inter; j += kThreads) {
        const uint32_t u = rank_key(s[j]);
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        uint32_t p = prefix, mk = mask;
        int32_t rem = sel_remaining;
        radix_step(hist, shift, p, mk, rem);
        sel_prefix = p;
        sel_mask = mk;
        sel_remaining = rem;
      }
      __syncthreads();
    }
    key = sel_prefix;
    ties = sel_remaining;
  }

  int32_t n = 0, ties_before = 0;
  for (int32_t base = 0; base < inter; base += kThreads * kItems) {
    const int32_t j0 = base + threadIdx.x * kItems;
    bool keep[kItems];
    int32_t kept = 0;
    if (!by_rank) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) keep[i] = j0 + i < inter && (all || s[j0 + i] >= cut);
    } else {
      bool tie[kItems];
      int32_t my_ties = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const bool in = k > 0 && j0 + i < inter;
        const uint32_t u = in ? rank_key(s[j0 + i]) : 0u;
        keep[i] = in && u > key;
        tie[i] = in && u == key;
        my_ties += tie[i];
      }
      int32_t tie_pos, round_ties;
      __syncthreads();  // tmp is reused across rounds
      Scan(tmp.scan).ExclusiveSum(my_ties, tie_pos, round_ties);
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (tie[i]) keep[i] = ties_before + tie_pos++ < ties;
      ties_before += round_ties;
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) kept += keep[i];
    int32_t pos, round_total;
    __syncthreads();  // tmp is reused across rounds
    Scan(tmp.scan).ExclusiveSum(kept, pos, round_total);
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
                                                                             a->density_bounds, a->intermediate,
                                                                             a->active_idx,
                                                                             a->active_count);
  }
  return tda::gpu::launch_status();
}
