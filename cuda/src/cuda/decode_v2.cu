// CUDA decode v2 of SparseGatedMLP for batch 1-8 in fp16/bf16 (the memory-bound
// decode case), selected per call next to v1 (decode.cu).
//
// What changes against v1, and why:
//  - Work is split to the real active row count, read on the device: gate_up is
//    a persistent grid whose warps take (8-row group, K chunk) items, with the
//    K chunk count chosen so that every resident warp has an item even at low
//    density (v1 at d=0.1 left most blocks idle); the down projection's split-K
//    is sized to the active rows (>= 64 rows per split) instead of a fixed
//    128-way split, so few partial sums make a round trip.
//  - Loads are hoisted: each gate_up warp has 4 steps (4 KB of weights) in flight
//    before the first MMA and the x load is branch-free (rows past the batch or
//    past the list repeat a valid row and are dropped); each down warp has 8
//    rows in flight (4 at batch 5-8).
//  - Fewer launches: batch 1 is two kernels (gate_up, down), batch 2-8 three
//    (union, gate_up, down); the down kernel's last block per column block sums
//    the splits itself. Kernels after the first are launched with programmatic
//    dependent launch (Hopper), which stream capture records in CUDA graphs.
//  - The batch union is built by many blocks, one per 512-neuron segment, with
//    no memset: segment s holds its union rows at slots s*512.. and its count,
//    and consumers read the compact index through the segments' prefix sums.
// Every sum is in a fixed order (MMA K chunks in chunk order, warps in warp
// order, splits in split order), so results are bitwise reproducible whatever
// `deterministic` says.
#include <stdlib.h>

#include <atomic>

#include <cub/block/block_scan.cuh>

#include "common.h"
#include "cuda/decode_v2.h"
#include "device.cuh"

namespace tda {
namespace gpu {
namespace v2 {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSeg = 2 * kThreads;  // neurons per union segment (2 per thread in the compaction)
constexpr int kMaxSeg = kThreads;   // one prefix entry per thread: I <= 131072
constexpr int kMinSteps = 8;        // a gate_up K chunk is at least 8 x 32 elements
constexpr int kGateUpUnroll = 4;    // gate_up steps (1 KB per warp each) loaded before use
// Down rows (512 B per warp each) loaded before use; at batch 5-8 the 64
// accumulators leave room for 4 under the 2-blocks-per-SM register cap.
template <int BT>
constexpr int down_unroll() { return BT == 8 ? 4 : 8; }
constexpr int kCols = 256;          // down columns per block: 32 lanes x 8
constexpr int kTile = kThreads;     // down rows whose z sits in shared memory at once
constexpr int kMinRowsPerSplit = 64;
constexpr int kMaxSplits = 64;
constexpr int kBlocksPerSm = 2;
constexpr int kMaxBatchV2 = 8;

using Scan = cub::BlockScan<int32_t, kThreads>;

// Programmatic dependent launch (sm_90+; a no-op below, where the launch is a
// plain one too). wait: the grids this one depends on have completed and their
// writes are visible. launch_dependents: the next grid may be scheduled now.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The active rows as segments: compact index k lives at slot
// seg * seg_len + (k - prefix[seg]). Batch 1 is one segment: the caller's list.
struct Rows {
  const int32_t* rows;    // slot -> neuron
  const uint8_t* mask;    // slot -> bit b: sequence b has it active (nullptr: batch 1)
  const int32_t* counts;  // [nseg] slots used per segment
  int32_t nseg, seg_len;
};

struct GateUpSplit {
  int32_t kc, chunk;  // K chunks per row group, 32-element steps per chunk
};

// Shared by gate_up (which writes chunk partials) and down (which sums them).
__host__ __device__ inline GateUpSplit gate_up_split(int32_t n_rows, int32_t warps, int32_t steps) {
  const int32_t groups = (n_rows + 7) / 8;
  const int32_t kc_max = steps / kMinSteps > 1 ? steps / kMinSteps : 1;
  int32_t kc = groups > 0 ? warps / groups : 1;
  kc = kc < 1 ? 1 : (kc > kc_max ? kc_max : kc);  // never more items than resident warps
  const int32_t chunk = (steps + kc - 1) / kc;
  return {(steps + chunk - 1) / chunk, chunk};
}

__host__ __device__ inline int32_t down_splits(int32_t n_rows, int32_t max_splits) {
  const int32_t s = (n_rows + kMinRowsPerSplit - 1) / kMinRowsPerSplit;
  return s < 1 ? 1 : (s > max_splits ? max_splits : s);
}

// prefix[s] = slots before segment s, prefix[nseg] = total; returns the total.
__device__ int32_t load_prefix(const Rows& r, int32_t* prefix, typename Scan::TempStorage& tmp) {
  const int32_t c = int(threadIdx.x) < r.nseg ? clamp_count_dev(r.counts[threadIdx.x], r.seg_len) : 0;
  int32_t pos, total;
  Scan(tmp).ExclusiveSum(c, pos, total);
  if (int(threadIdx.x) < r.nseg) prefix[threadIdx.x] = pos;
  if (threadIdx.x == 0) prefix[r.nseg] = total;
  __syncthreads();
  return total;
}

// Slot of compact index k < total: the last segment whose prefix is <= k.
__device__ __forceinline__ int32_t slot_of(const int32_t* prefix, const Rows& r, int32_t k) {
  int lo = 0, hi = r.nseg - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= k) lo = mid;
    else hi = mid - 1;
  }
  return lo * r.seg_len + (k - prefix[lo]);
}

// ---- union (batch 2-8): block s builds segment s, warp b reads sequence b ----
__global__ void __launch_bounds__(kThreads) union_segments(const int32_t* __restrict__ idx,
                                                           const int32_t* __restrict__ count, int32_t inter,
                                                           int batch, int32_t* __restrict__ rows,
                                                           uint8_t* __restrict__ mask,
                                                           int32_t* __restrict__ seg_count) {
  __shared__ typename Scan::TempStorage tmp;
  __shared__ uint32_t bits[kSeg / 4];  // one byte of sequence bits per neuron
  pdl_launch_dependents();             // first kernel of the chain: a plain launch, inputs complete
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int32_t j0 = blockIdx.x * kSeg, j1 = min(inter, j0 + kSeg);
  for (int i = threadIdx.x; i < kSeg / 4; i += kThreads) bits[i] = 0;
  __syncthreads();
  if (warp < batch) {
    const int32_t* list = idx + int64_t(warp) * inter;
    const int32_t n = clamp_count_dev(count[warp], inter);
    // First position with list[p] >= j0, 32 probes per round (3-4 rounds for
    // 14336 entries instead of 14 dependent loads of a binary search).
    int32_t lo = 0, hi = n;
    while (lo < hi) {
      const int32_t step = (hi - lo + 31) / 32;
      const int32_t p = lo + lane * step;
      const bool probe = p < hi;
      const unsigned ge = __ballot_sync(0xffffffffu, probe && list[p] >= j0);
      if (ge) {
        const int f = __ffs(ge) - 1;
        const int32_t new_hi = lo + f * step;
        lo = f > 0 ? lo + (f - 1) * step + 1 : lo;
        hi = new_hi;
      } else {
        const int last = 31 - __clz(__ballot_sync(0xffffffffu, probe));
        lo += last * step + 1;
      }
    }
    for (int32_t p = lo + lane;; p += 32) {
      const int32_t j = p < n ? list[p] : j1;
      const bool in = j < j1;
      if (in && j >= j0) {
        const int o = j - j0;
        atomicOr(&bits[o >> 2], (1u << warp) << (8 * (o & 3)));
      }
      if (!__any_sync(0xffffffffu, in)) break;
    }
  }
  __syncthreads();
  const int o = 2 * threadIdx.x;
  const uint32_t word = bits[o >> 2];
  const uint32_t m0 = (word >> (8 * (o & 3))) & 0xffu, m1 = (word >> (8 * ((o + 1) & 3))) & 0xffu;
  int32_t pos, total;
  Scan(tmp).ExclusiveSum(int32_t(m0 != 0) + int32_t(m1 != 0), pos, total);
  const int64_t base = int64_t(blockIdx.x) * kSeg;
  if (m0) {
    rows[base + pos] = j0 + o;
    mask[base + pos] = uint8_t(m0);
    ++pos;
  }
  if (m1) {
    rows[base + pos] = j0 + o + 1;
    mask[base + pos] = uint8_t(m1);
  }
  if (threadIdx.x == 0) seg_count[blockIdx.x] = total;
}

// ---- gate_up: MMA over (8-row group, K chunk) items, partial sums per chunk ----
// The MMA layout is v1's (decode.cu, gate_up_mma): A rows are the group's 8 gate
// and 8 up rows, B columns the batch (one tile: batch <= 8), each lane feeding
// 8 consecutive elements per step to two k16 MMAs.
template <tda_dtype_t D>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) gate_up_v2(
    const typename Ty<D>::T* __restrict__ x, const typename Ty<D>::T* __restrict__ gate_up, int32_t hidden,
    int32_t inter, int batch, Rows r, float2* __restrict__ part, int32_t* __restrict__ counters,
    int32_t n_counters) {
  using T = typename Ty<D>::T;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int32_t prefix[kMaxSeg + 1];
  pdl_wait();  // after union: its segments; a no-op for a plain launch
  pdl_launch_dependents();
  // The down kernel's split counters: the previous call's down kernel has
  // completed (stream order), this call's waits for this grid to complete.
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i < n_counters; i += kThreads) counters[i] = 0;
  const int32_t n_rows = load_prefix(r, prefix, tmp);
  if (n_rows == 0) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int32_t steps = (hidden + 31) / 32, full = hidden / 32;
  const int32_t warps = gridDim.x * kWarps;
  const GateUpSplit sp = gate_up_split(n_rows, warps, steps);
  const int32_t items = (n_rows + 7) / 8 * sp.kc;
  // Sequences past the batch read the last sequence's x: no branch, dropped below.
  const T* xrow = x + int64_t(min(g, batch - 1)) * hidden + t * 8;
  // Item i goes to block i % grid: when there are fewer items than warps every
  // block (so every SM) still gets its share of the bytes.
  for (int32_t item = warp * gridDim.x + blockIdx.x; item < items; item += warps) {
    const int32_t grp = item / sp.kc, c = item - grp * sp.kc;
    const int32_t k = grp * 8 + g;
    // Rows past the list repeat the last one: loads stay in bounds, results are dropped.
    const int32_t slot = slot_of(prefix, r, min(k, n_rows - 1));
    const T* gate = gate_up + int64_t(r.rows[slot]) * 2 * hidden + t * 8;
    const T* up = gate + hidden;
    const int32_t s0 = c * sp.chunk, s1 = min(steps, s0 + sp.chunk), s1_full = min(s1, full);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int32_t s = s0;
    for (; s + kGateUpUnroll <= s1_full; s += kGateUpUnroll) {
      uint4 wg[kGateUpUnroll], wu[kGateUpUnroll], xv[kGateUpUnroll];
#pragma unroll
      for (int u = 0; u < kGateUpUnroll; ++u) {
        wg[u] = ld_stream(gate + (s + u) * 32);
        wu[u] = ld_stream(up + (s + u) * 32);
        xv[u] = __ldg(reinterpret_cast<const uint4*>(xrow + (s + u) * 32));
      }
#pragma unroll
      for (int u = 0; u < kGateUpUnroll; ++u) {
        mma_16816<D>(acc, wg[u].x, wu[u].x, wg[u].y, wu[u].y, xv[u].x, xv[u].y);
        mma_16816<D>(acc, wg[u].z, wu[u].z, wg[u].w, wu[u].w, xv[u].z, xv[u].w);
      }
    }
    for (; s < s1; ++s) {  // the chunk's remainder, and the partial last step when 32 does not divide H
      const bool in = s * 32 + t * 8 < hidden;
      const uint4 zero = make_uint4(0, 0, 0, 0);
      const uint4 wg = in ? ld_stream(gate + s * 32) : zero;
      const uint4 wu = in ? ld_stream(up + s * 32) : zero;
      const uint4 xv = in ? __ldg(reinterpret_cast<const uint4*>(xrow + s * 32)) : zero;
      mma_16816<D>(acc, wg.x, wu.x, wg.y, wu.y, xv.x, xv.y);
      mma_16816<D>(acc, wg.z, wu.z, wg.w, wu.w, xv.z, xv.w);
    }
    // acc: gate(neuron g, sequences 2t, 2t+1), up(neuron g, sequences 2t, 2t+1)
    if (k < n_rows) {
      float2* p = part + (int64_t(c) * inter + k) * batch;
      if (2 * t < batch) p[2 * t] = make_float2(acc[0], acc[2]);
      if (2 * t + 1 < batch) p[2 * t + 1] = make_float2(acc[1], acc[3]);
    }
  }
}

// ---- down: z from the chunk partials, then split-K over the active rows ----
template <tda_dtype_t D, int BT>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) down_v2(
    const typename Ty<D>::T* __restrict__ wd, int32_t hidden, int32_t inter, int batch, tda_activation_t act,
    Rows r, const float2* __restrict__ part, int32_t gate_up_warps, int32_t max_splits,
    float* __restrict__ split_out, int32_t* __restrict__ counters, typename Ty<D>::T* __restrict__ out) {
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int32_t prefix[kMaxSeg + 1];
  __shared__ float zs[kTile][BT];
  __shared__ int32_t zrow[kTile];
  __shared__ float4 red[kWarps][kCols / 4];
  __shared__ bool last_block;
  pdl_wait();  // gate_up (and, through it, union) complete
  const int32_t n_rows = load_prefix(r, prefix, tmp);
  const int32_t col_blocks = gridDim.x / max_splits;
  const int32_t cb = blockIdx.x % col_blocks, split = blockIdx.x / col_blocks;
  const int32_t splits = down_splits(n_rows, max_splits);
  if (split >= splits) return;
  const int32_t per = (n_rows + splits - 1) / splits;
  const int32_t k_begin = min(n_rows, split * per), k_end = min(n_rows, k_begin + per);
  const GateUpSplit gs = gate_up_split(n_rows, gate_up_warps, (hidden + 31) / 32);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // Lanes past H (last column block) read a valid vector and drop the result.
  const int32_t col0 = min(cb * kCols + lane * 8, hidden - 8);

  float acc[BT][8];
#pragma unroll
  for (int b = 0; b < BT; ++b)
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[b][c] = 0.0f;

  for (int32_t tile = k_begin; tile < k_end; tile += kTile) {
    const int32_t n = min(kTile, k_end - tile);
    __syncthreads();  // the previous tile's readers are done
    if (int32_t(threadIdx.x) < n) {
      const int32_t k = tile + threadIdx.x;
      const int32_t slot = slot_of(prefix, r, k);
      zrow[threadIdx.x] = r.rows[slot];
      const uint32_t m = r.mask ? r.mask[slot] : 1u;
#pragma unroll
      for (int b = 0; b < BT; ++b) {
        float zv = 0.0f;
        if (b < batch && (m >> b & 1u)) {
          float gsum = 0.0f, usum = 0.0f;
#pragma unroll 4
          for (int32_t c = 0; c < gs.kc; ++c) {  // chunk order: reproducible
            const float2 v = __ldcg(part + (int64_t(c) * inter + k) * batch + b);
            gsum += v.x;
            usum += v.y;
          }
          zv = round_to<D>(activate_rt(act, gsum) * usum);
        }
        zs[threadIdx.x][b] = zv;
      }
    }
    __syncthreads();
    constexpr int kDownUnroll = down_unroll<BT>();
    for (int32_t i = warp; i < n; i += kWarps * kDownUnroll) {
      uint4 w[kDownUnroll];
#pragma unroll
      for (int u = 0; u < kDownUnroll; ++u) {
        const int32_t iu = min(i + u * kWarps, n - 1);  // in bounds; its z is zeroed below
        w[u] = ld_stream(wd + int64_t(zrow[iu]) * hidden + col0);
      }
#pragma unroll
      for (int u = 0; u < kDownUnroll; ++u) {
        const int32_t iu = i + u * kWarps;
        const bool ok = iu < n;
        float f[8];
        unpack8<D>(w[u], f);
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          const float zv = ok ? zs[ok ? iu : 0][b] : 0.0f;
#pragma unroll
          for (int c = 0; c < 8; ++c) acc[b][c] = fmaf(zv, f[c], acc[b][c]);
        }
      }
    }
  }

  // Warps in order, one sequence at a time (shared memory holds one [8][256]).
  const int32_t col = cb * kCols + threadIdx.x;
#pragma unroll
  for (int b = 0; b < BT; ++b) {
    if (b >= batch) break;
    __syncthreads();
    red[warp][lane * 2] = make_float4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
    red[warp][lane * 2 + 1] = make_float4(acc[b][4], acc[b][5], acc[b][6], acc[b][7]);
    __syncthreads();
    const float* rf = reinterpret_cast<const float*>(red);
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += rf[w * kCols + threadIdx.x];
    if (col < hidden) {
      if (splits == 1) out[int64_t(b) * hidden + col] = Ty<D>::from_f(s);
      else split_out[(int64_t(split) * batch + b) * hidden + col] = s;
    }
  }
  if (splits == 1) return;
  // The last block of this column block to finish adds the splits in order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(&counters[cb], 1) == splits - 1;
  __syncthreads();
  if (!last_block || col >= hidden) return;
  __threadfence();
  for (int b = 0; b < batch; ++b) {
    float s = 0.0f;
    for (int32_t sp = 0; sp < splits; ++sp) s += __ldcg(split_out + (int64_t(sp) * batch + b) * hidden + col);
    out[int64_t(b) * hidden + col] = Ty<D>::from_f(s);
  }
}

struct Plan {
  int32_t nseg, col_blocks, max_splits, gate_up_blocks, kc_max;
};

Plan plan(const tda_decode_args_t* a, int sms) {
  Plan p;
  p.nseg = a->batch > 1 ? (a->intermediate + kSeg - 1) / kSeg : 1;
  p.col_blocks = (a->hidden + kCols - 1) / kCols;
  // Rounded down: one more block than the SMs hold would make a second wave
  // as long as the first (every block does an equal share).
  const int32_t want = kBlocksPerSm * sms / p.col_blocks;
  p.max_splits = want < 1 ? 1 : (want > kMaxSplits ? kMaxSplits : want);
  p.gate_up_blocks = kBlocksPerSm * sms;
  const int32_t steps = (a->hidden + 31) / 32;
  p.kc_max = steps / kMinSteps > 1 ? steps / kMinSteps : 1;
  return p;
}

struct Ws {
  int32_t *rows, *seg_count, *counters;
  uint8_t* mask;
  float2* part;
  float* split_out;
  size_t bytes;
};

// Sizes depend on the arguments only (kMaxSplits, not the SM count), so the
// query needs no device.
Ws carve(const tda_decode_args_t* a, const Plan& p, void* base) {
  Carver c{static_cast<char*>(base)};
  Ws w{};
  if (a->batch > 1) {
    w.rows = c.take<int32_t>(size_t(p.nseg) * kSeg);
    w.mask = c.take<uint8_t>(size_t(p.nseg) * kSeg);
    w.seg_count = c.take<int32_t>(p.nseg);
  }
  w.part = c.take<float2>(size_t(p.kc_max) * a->intermediate * a->batch);
  w.split_out = c.take<float>(size_t(kMaxSplits) * a->batch * a->hidden);
  w.counters = c.take<int32_t>(p.col_blocks);
  w.bytes = c.used;
  return w;
}

// Hopper and later run the dependent launches early; TDA_PDL=0 turns it off
// (to measure what it gains, or to rule it out).
bool use_pdl() {
  // One atomic slot per device (see num_sms): enqueuing threads may race here.
  static std::atomic<int> cache[64] = {};  // 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  int v = cache[dev].load(std::memory_order_relaxed);
  if (!v) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) major = 0;
    v = major >= 9 ? 2 : 1;
    cache[dev].store(v, std::memory_order_relaxed);
  }
  const char* env = getenv("TDA_PDL");
  if (env && env[0] == '0') return false;
  return v == 2;
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), unsigned grid, bool programmatic, cudaStream_t st,
                   Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<KernelArgs>(args)...);
}

template <tda_dtype_t D, int BT>
cudaError_t launch_down(const tda_decode_args_t* a, const Plan& p, const Rows& r, const Ws& w, bool pdl,
                        cudaStream_t st) {
  using T = typename Ty<D>::T;
  return launch(down_v2<D, BT>, unsigned(p.col_blocks * p.max_splits), pdl, st,
                static_cast<const T*>(a->down_weight_t), a->hidden, a->intermediate, int(a->batch), a->activation,
                r, static_cast<const float2*>(w.part), int32_t(p.gate_up_blocks * kWarps), p.max_splits,
                w.split_out, w.counters, static_cast<T*>(a->output));
}

template <tda_dtype_t D>
tda_status_t run_typed(const tda_decode_args_t* a, void* ws, cudaStream_t st) {
  using T = typename Ty<D>::T;
  // Device queries (and their caches) before the first launch: a failure
  // after a launch would break the header's "non-OK launched nothing".
  const Plan p = plan(a, num_sms());
  const Ws w = carve(a, p, ws);
  const bool pdl = use_pdl();
  const int B = a->batch;
  Rows r;
  if (B == 1) {
    r = Rows{a->active_idx, nullptr, a->active_count, 1, a->intermediate};
  } else {
    r = Rows{w.rows, w.mask, w.seg_count, p.nseg, kSeg};
    if (launch(union_segments, unsigned(p.nseg), false, st, a->active_idx, a->active_count, a->intermediate, B,
               w.rows, w.mask, w.seg_count) != cudaSuccess)
      return TDA_ERR_CUDA;
  }
  // gate_up follows union programmatically; at batch 1 it is the first kernel.
  if (launch(gate_up_v2<D>, unsigned(p.gate_up_blocks), pdl && B > 1, st, static_cast<const T*>(a->hidden_states),
             static_cast<const T*>(a->gate_up_weight), a->hidden, a->intermediate, B, r, w.part, w.counters,
             p.col_blocks) != cudaSuccess)
    return TDA_ERR_CUDA;
  cudaError_t e;
  if (B == 1) e = launch_down<D, 1>(a, p, r, w, pdl, st);
  else if (B == 2) e = launch_down<D, 2>(a, p, r, w, pdl, st);
  else if (B <= 4) e = launch_down<D, 4>(a, p, r, w, pdl, st);
  else e = launch_down<D, 8>(a, p, r, w, pdl, st);
  if (e != cudaSuccess) return TDA_ERR_CUDA;
  return launch_status();
}

}  // namespace

bool eligible(const tda_decode_args_t* a) {
  // Float weights only (down_weight_format 0 and x_format 0 follow from that; said here so they can never part).
  return a->dtype != TDA_F32 && a->weight_format == TDA_WEIGHTS_DTYPE && a->down_weight_format == 0 &&
         a->x_format == TDA_X_DTYPE &&
         a->batch >= 1 && a->batch <= kMaxBatchV2 && a->intermediate <= kMaxSeg * kSeg;
}

size_t workspace_size(const tda_decode_args_t* a) { return carve(a, plan(a, 1), nullptr).bytes; }

tda_status_t run(const tda_decode_args_t* a, void* ws, cudaStream_t stream) {
  if (a->dtype == TDA_F16) return run_typed<TDA_F16>(a, ws, stream);
  return run_typed<TDA_BF16>(a, ws, stream);
}

}  // namespace v2
}  // namespace gpu
}  // namespace tda
