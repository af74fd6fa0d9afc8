// CUDA decode of SparseGatedMLP over active neurons only.
//
// Pipeline (all on `stream`, no host synchronisation; counts stay on the GPU):
//   batch > 1: union  - one bit per sequence per neuron, compacted into the
//                       ascending list of rows any sequence needs, so every
//                       weight row is read once per call whatever the batch;
//   gate_up           - z[k, b] = act(x_b . gate_j) * (x_b . up_j) for union
//                       row k = j, 0 where sequence b has j inactive;
//   down              - split-K over the union rows: partial y per split;
//   finalize          - sum of the partials in split order (bitwise
//                       reproducible) or conversion of fp32-atomic sums.
// Block-quantized weights (weight_format Q8_0/Q4_0/Q4_1) take the same
// pipeline with gate_up_q and down_proj<.., BlockRows> (see "Block-quantized
// weights" below); gate_up reads weight_format's blocks, down the blocks of
// down_format(a) (ABI 6: e.g. Q8_0 down rows under Q4_1 gate/up rows, any of
// the 3 x 3 block pairs). Decode v2 serves float weights only. x is read as
// is: x_format TDA_X_Q8_0 (ABI 7) is the CPU library's (TDA_ERR_BAD_DTYPE here).
// Grids are sized for the worst case (all I rows) and blocks beyond the
// device-side count exit or stride, which keeps the launch graph-capturable.
#include <algorithm>

#include <cub/block/block_scan.cuh>

#include "common.h"
#include "cuda/blocks.cuh"
#include "cuda/decode_v2.h"
#include "device.cuh"

namespace tda {
namespace gpu {
namespace {

constexpr int kGroup = 8;           // neurons per gate_up block
constexpr int kGateUpWarps = 8;     // warps splitting H inside a gate_up block
constexpr int kMaxTiles = TDA_MAX_BATCH / 8;
constexpr int kDownThreads = 128;   // x 8 columns each
constexpr int kDownTargetBlocks = 512;
constexpr size_t kMaxPartialBytes = size_t(64) << 20;
constexpr int kCompactThreads = 1024;

int padded_batch(int b) { return (b + 7) / 8 * 8; }

// ---- union of the sequences' active lists (batch > 1) ----

__global__ void scatter_mask(const int32_t* __restrict__ idx, const int32_t* __restrict__ count, int32_t inter,
                             unsigned long long* __restrict__ mask) {
  const int b = blockIdx.y;
  const int32_t k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k < clamp_count_dev(count[b], inter)) atomicOr(&mask[idx[int64_t(b) * inter + k]], 1ull << b);
}

// One block: each thread owns a contiguous run of neurons, so one block-wide
// scan orders the whole list.
__global__ void __launch_bounds__(kCompactThreads) compact_union(const unsigned long long* __restrict__ mask,
                                                                 int32_t inter, int32_t* __restrict__ rows,
                                                                 unsigned long long* __restrict__ row_mask,
                                                                 int32_t* __restrict__ n_rows) {
  using Scan = cub::BlockScan<int32_t, kCompactThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int32_t per = (inter + kCompactThreads - 1) / kCompactThreads;
  const int32_t j0 = threadIdx.x * per, j1 = min(inter, j0 + per);
  int32_t mine = 0;
  for (int32_t j = j0; j < j1; ++j) mine += mask[j] != 0;
  int32_t pos, total;
  Scan(tmp).ExclusiveSum(mine, pos, total);
  for (int32_t j = j0; j < j1; ++j) {
    const unsigned long long m = mask[j];
    if (m) {
      rows[pos] = j;
      row_mask[pos] = m;
      ++pos;
    }
  }
  if (threadIdx.x == 0) *n_rows = total;
}

// Writes z for the block's 8 union rows from per-lane gate/up sums laid out
// as the MMA accumulator: c0,c1 = gate(neuron g, batch 2t, 2t+1),
// c2,c3 = up(neuron g, batch 2t, 2t+1) of batch tile bt.
template <tda_dtype_t D>
__device__ __forceinline__ void write_z(const float (&s)[4], int bt, int lane, int32_t k0, int32_t n_rows,
                                        int batch, int bp, const unsigned long long* row_mask,
                                        tda_activation_t act, float* __restrict__ z) {
  const int g = lane >> 2, t = lane & 3;
  const int32_t k = k0 + g;
  if (k >= n_rows) return;
  const unsigned long long m = row_mask ? row_mask[k] : 1ull;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int b = bt * 8 + 2 * t + e;
    const bool on = b < batch && (m >> b & 1ull);
    z[int64_t(k) * bp + b] = on ? round_to<D>(activate_rt(act, s[e]) * s[2 + e]) : 0.0f;
  }
}

// gate_up for fp16/bf16 on tensor cores. One block = 8 union rows; the MMA's
// 16 A-rows are those neurons' 8 gate rows and 8 up rows, its 8 columns one
// batch tile. Because a dot product does not care about the order of k, each
// lane loads 8 consecutive elements (one 16-byte load) of its rows and of its
// sequence's x and feeds them to two k16 MMAs, instead of the 4-byte pieces
// the canonical fragment layout would need. The 8 warps take interleaved
// 32-element slices of H and are summed through shared memory.
template <tda_dtype_t D, int NT>
__global__ void __launch_bounds__(kGateUpWarps * 32, NT <= 2 ? 2 : 1) gate_up_mma(
    const typename Ty<D>::T* __restrict__ x, const typename Ty<D>::T* __restrict__ gate_up, int32_t hidden,
    int32_t inter, int batch, const int32_t* __restrict__ rows, const int32_t* __restrict__ n_rows_ptr,
    const unsigned long long* __restrict__ row_mask, tda_activation_t act, float* __restrict__ z) {
  __shared__ float4 red[kGateUpWarps][NT][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tiles = (batch + 7) / 8, bp = tiles * 8;
  const int32_t n_rows = clamp_count_dev(*n_rows_ptr, inter);
  const int32_t steps = (hidden + 31) / 32;

  for (int32_t k0 = blockIdx.x * kGroup; k0 < n_rows; k0 += gridDim.x * kGroup) {
    const bool have_row = k0 + g < n_rows;
    const typename Ty<D>::T* gate = gate_up + (have_row ? int64_t(rows[k0 + g]) * 2 * hidden : 0);
    const typename Ty<D>::T* up = gate + hidden;
    float acc[NT][4] = {};
#pragma unroll 4
    for (int32_t s = warp; s < steps; s += kGateUpWarps) {
      const int32_t h = s * 32 + t * 8;
      const bool in = have_row && h < hidden;
      const uint4 wg = in ? ld_stream(gate + h) : make_uint4(0, 0, 0, 0);
      const uint4 wu = in ? ld_stream(up + h) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int bt = 0; bt < NT; ++bt) {
        if (bt < tiles) {
          const int b = bt * 8 + g;
          const uint4 xv = (b < batch && h < hidden)
                               ? __ldg(reinterpret_cast<const uint4*>(x + int64_t(b) * hidden + h))
                               : make_uint4(0, 0, 0, 0);
          mma_16816<D>(acc[bt], wg.x, wu.x, wg.y, wu.y, xv.x, xv.y);
          mma_16816<D>(acc[bt], wg.z, wu.z, wg.w, wu.w, xv.z, xv.w);
        }
      }
    }
#pragma unroll
    for (int bt = 0; bt < NT; ++bt)
      if (bt < tiles) red[warp][bt][lane] = make_float4(acc[bt][0], acc[bt][1], acc[bt][2], acc[bt][3]);
    __syncthreads();
    for (int bt = warp; bt < tiles; bt += kGateUpWarps) {
      float s[4] = {};
      for (int w = 0; w < kGateUpWarps; ++w) {  // fixed order: reproducible
        const float4 v = red[w][bt][lane];
        s[0] += v.x, s[1] += v.y, s[2] += v.z, s[3] += v.w;
      }
      write_z<D>(s, bt, lane, k0, n_rows, batch, bp, row_mask, act, z);
    }
    __syncthreads();
  }
}

// gate_up for fp32 (the exactness path used in tests): one warp per union
// row, lanes striding H in float4s, batch in tiles of 8.
__global__ void __launch_bounds__(kGateUpWarps * 32) gate_up_f32(
    const float* __restrict__ x, const float* __restrict__ gate_up, int32_t hidden, int32_t inter, int batch,
    const int32_t* __restrict__ rows, const int32_t* __restrict__ n_rows_ptr,
    const unsigned long long* __restrict__ row_mask, tda_activation_t act, float* __restrict__ z) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tiles = (batch + 7) / 8, bp = tiles * 8;
  const int32_t n_rows = clamp_count_dev(*n_rows_ptr, inter);
  for (int32_t k = blockIdx.x * kGateUpWarps + warp; k < n_rows; k += gridDim.x * kGateUpWarps) {
    const float* gate = gate_up + int64_t(rows[k]) * 2 * hidden;
    const float* up = gate + hidden;
    const unsigned long long m = row_mask ? row_mask[k] : 1ull;
    for (int bt = 0; bt < tiles; ++bt) {
      float ag[8] = {}, au[8] = {};
      for (int32_t h = lane * 4; h < hidden; h += 128) {
        const float4 wg = *reinterpret_cast<const float4*>(gate + h);
        const float4 wu = *reinterpret_cast<const float4*>(up + h);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int b = bt * 8 + i;
          if (b < batch) {
            const float4 xv = __ldg(reinterpret_cast<const float4*>(x + int64_t(b) * hidden + h));
            ag[i] += wg.x * xv.x + wg.y * xv.y + wg.z * xv.z + wg.w * xv.w;
            au[i] += wu.x * xv.x + wu.y * xv.y + wu.z * xv.z + wu.w * xv.w;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
        for (int off = 16; off > 0; off >>= 1) {
          ag[i] += __shfl_xor_sync(0xffffffffu, ag[i], off);
          au[i] += __shfl_xor_sync(0xffffffffu, au[i], off);
        }
      if (lane < 8) {
        float zv = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i == lane) zv = activate_rt(act, ag[i]) * au[i];
        const int b = bt * 8 + lane;
        z[int64_t(k) * bp + b] = (b < batch && (m >> b & 1ull)) ? zv : 0.0f;
      }
    }
  }
}

// ---- Block-quantized weights ----
// gate_up_q: one warp per union row, the gate and up rows' dot products with
// the batch tile's x by block_dots (blocks.cuh: dequantized in registers, fp32
// sums, lanes summed with shuffles, no shared memory). Batch in tiles of NB
// (1 for batch 1, else 8) sequences; weights are re-read (from L1/L2) per tile
// past batch 8.
template <tda_dtype_t D>
__device__ __forceinline__ void load_x8(const typename Ty<D>::T* p, float (&f)[8]) {
  if constexpr (D == TDA_F32) {
    const float4 lo = __ldg(reinterpret_cast<const float4*>(p)), hi = __ldg(reinterpret_cast<const float4*>(p) + 1);
    f[0] = lo.x, f[1] = lo.y, f[2] = lo.z, f[3] = lo.w, f[4] = hi.x, f[5] = hi.y, f[6] = hi.z, f[7] = hi.w;
  } else {
    unpack8<D>(__ldg(reinterpret_cast<const uint4*>(p)), f);
  }
}

template <tda_dtype_t D, tda_weight_format_t F, int NB>
__global__ void __launch_bounds__(kGateUpWarps * 32, 2) gate_up_q(
    const typename Ty<D>::T* __restrict__ x, const uint8_t* __restrict__ gate_up, int32_t hidden, int32_t inter,
    int batch, const int32_t* __restrict__ rows, const int32_t* __restrict__ n_rows_ptr,
    const unsigned long long* __restrict__ row_mask, tda_activation_t act, float* __restrict__ z) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tiles = (batch + NB - 1) / NB, bp = (batch + 7) / 8 * 8;
  const int32_t n_rows = clamp_count_dev(*n_rows_ptr, inter);
  const int32_t nblk = hidden / kQBlock;
  const int64_t rb = int64_t(nblk) * QBlock<F>::bytes;
  for (int32_t k = blockIdx.x * kGateUpWarps + warp; k < n_rows; k += gridDim.x * kGateUpWarps) {
    const uint8_t* gate = gate_up + int64_t(rows[k]) * 2 * rb;
    const uint8_t* const gu[2] = {gate, gate + rb};
    const unsigned long long m = row_mask ? row_mask[k] : 1ull;
    for (int bt = 0; bt < tiles; ++bt) {
      const typename Ty<D>::T* xt = x + int64_t(bt) * NB * hidden;
      const auto xload = [&](int i, int32_t h, float (&f)[8]) { load_x8<D>(xt + int64_t(i) * hidden + h, f); };
      float acc[2][NB];
#pragma unroll
      for (int i = 0; i < NB; ++i) acc[0][i] = acc[1][i] = 0.0f;
      block_dots<F, 2, NB>(gu, nblk, lane, batch - bt * NB, xload, acc);
      float g = 0.0f, u = 0.0f;
#pragma unroll
      for (int i = 0; i < NB; ++i) {
        const float gs = warp_sum(acc[0][i]), us = warp_sum(acc[1][i]);
        if (i == lane) g = gs, u = us;
      }
      const int b = bt * NB + lane;
      if (lane < NB && b < bp)
        z[int64_t(k) * bp + b] = (b < batch && (m >> b & 1ull)) ? round_to<D>(activate_rt(act, g) * u) : 0.0f;
    }
  }
}

// Down projection, split-K: block (tile + tiles*col_block, split) adds the
// union rows of its split for 8 columns per thread and BT sequences. Blocks of
// the same columns and split but different batch tiles are adjacent in launch
// order, so they read each weight row while it is still in L2.
// How down_proj reads 8 consecutive weights (columns c0..c0+7) of a row.
// FloatRows: the row in dtype D.
template <tda_dtype_t D>
struct FloatRows {
  static constexpr bool kBlocks = false;
  const typename Ty<D>::T* __restrict__ w;
  int32_t hidden;
  __device__ __forceinline__ void load8(int32_t row, int32_t c0, float (&f)[8]) const {
    const typename Ty<D>::T* p = w + int64_t(row) * hidden + c0;
    if constexpr (D == TDA_F32) {
      const uint4 lo = ld_stream(p), hi = ld_stream(reinterpret_cast<const float*>(p) + 4);
      const uint32_t u[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int c = 0; c < 8; ++c) f[c] = __uint_as_float(u[c]);
    } else {
      unpack8<D>(ld_stream(p), f);
    }
  }
};

// BlockRows: H/32 blocks of format F per row; columns c0..c0+7 are eighth
// (c0 / 8) % 4 of block c0 / 32, dequantized in registers (blocks.cuh).
template <tda_weight_format_t F>
struct BlockRows {
  static constexpr bool kBlocks = true;
  static constexpr int kUnroll = 8;  // rows whose bytes down_proj loads before using the first
  const uint8_t* __restrict__ w;
  int64_t row_bytes;
  struct Raw {
    uint32_t q0, q1;
    float d, c;
  };
  __device__ __forceinline__ Raw load(int32_t row, int32_t c0) const {
    const uint8_t* b = w + int64_t(row) * row_bytes + (c0 / kQBlock) * QBlock<F>::bytes;
    Raw r;
    block_scale<F>(b, r.d, r.c);
    load_eighth<F>(b, (c0 / 8) & 3, r.q0, r.q1);
    return r;
  }
  __device__ __forceinline__ void unpack(const Raw& r, int32_t c0, float (&f)[8]) const {
    dequant_eighth<F>(r.q0, r.q1, (c0 / 8) & 3, r.d, r.c, f);
  }
};

template <tda_dtype_t D, int BT, class W>
__global__ void __launch_bounds__(kDownThreads) down_proj(
    W wd, int32_t hidden, int32_t inter, int batch,
    const int32_t* __restrict__ rows, const int32_t* __restrict__ n_rows_ptr, const float* __restrict__ z,
    int deterministic, float* __restrict__ out) {
  const int bp = (batch + 7) / 8 * 8;
  const int tiles = BT == 8 ? bp / 8 : 1;
  const int tile = blockIdx.x % tiles, col_block = blockIdx.x / tiles;
  const int32_t c0 = (col_block * kDownThreads + threadIdx.x) * 8;
  if (c0 >= hidden) return;
  const int32_t n_rows = clamp_count_dev(*n_rows_ptr, inter);
  const int32_t per = (n_rows + gridDim.y - 1) / gridDim.y;
  const int32_t k_begin = min(n_rows, int32_t(blockIdx.y) * per), k_end = min(n_rows, k_begin + per);
  const int b0 = tile * BT;

  float acc[BT][8] = {};
  const auto add_row = [&](int32_t k, const float (&w)[8]) {
    float zb[BT];
    if constexpr (BT == 1) {
      zb[0] = z[int64_t(k) * bp + b0];
    } else {
#pragma unroll
      for (int i = 0; i < BT; i += 4) {
        const float4 v = *reinterpret_cast<const float4*>(z + int64_t(k) * bp + b0 + i);
        zb[i] = v.x, zb[i + 1] = v.y, zb[i + 2] = v.z, zb[i + 3] = v.w;
      }
    }
#pragma unroll
    for (int i = 0; i < BT; ++i)
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[i][c] = fmaf(zb[i], w[c], acc[i][c]);
  };
  if constexpr (W::kBlocks) {
    // A lane reads 8-12 bytes of a block row (8 weights and the scale) where it reads 16 of a bf16 row, so
    // the bytes of kUnroll = 8 rows are loaded before the first is used (rows past the split repeat its
    // last row and are dropped): 8 x 32 lanes x 10 bytes of Q4_0 = 2.5 KB in flight per warp at batch 1.
    constexpr int R = W::kUnroll;
    for (int32_t k0 = k_begin; k0 < k_end; k0 += R) {
      typename W::Raw raw[R];
#pragma unroll
      for (int u = 0; u < R; ++u) raw[u] = wd.load(rows[min(k0 + u, k_end - 1)], c0);
#pragma unroll
      for (int u = 0; u < R; ++u) {
        if (k0 + u >= k_end) break;
        float w[8];
        wd.unpack(raw[u], c0, w);
        add_row(k0 + u, w);
      }
    }
  } else {
#pragma unroll 4
    for (int32_t k = k_begin; k < k_end; ++k) {
      float w[8];
      wd.load8(rows[k], c0, w);
      add_row(k, w);
    }
  }
#pragma unroll
  for (int i = 0; i < BT; ++i) {
    const int b = b0 + i;
    if (b >= batch) break;
    float* o = out + (deterministic ? int64_t(blockIdx.y) * batch * hidden : 0) + int64_t(b) * hidden + c0;
    if (deterministic) {
      reinterpret_cast<float4*>(o)[0] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      reinterpret_cast<float4*>(o)[1] = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
    } else {
#pragma unroll
      for (int c = 0; c < 8; ++c) atomicAdd(o + c, acc[i][c]);
    }
  }
}

// out = T(sum over splits in order). 8 warps each sum every 8th split for 32
// consecutive outputs, then warp 0 adds the 8 in warp order.
template <tda_dtype_t D>
__global__ void __launch_bounds__(256) finalize(const float* __restrict__ part, int32_t splits, int64_t n,
                                                typename Ty<D>::T* __restrict__ out) {
  __shared__ float sums[8][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * 32 + lane;
  float s = 0.0f;
  if (i < n) {
#pragma unroll 4
    for (int32_t k = warp; k < splits; k += 8) s += part[k * n + i];
  }
  sums[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && i < n) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) total += sums[w][lane];
    out[i] = Ty<D>::from_f(total);
  }
}

struct Plan {
  int bp, tiles, bt, col_blocks, splits;
};

Plan plan(const tda_decode_args_t* a) {
  Plan p;
  p.bp = padded_batch(a->batch);
  p.bt = a->batch == 1 ? 1 : (a->batch <= 4 ? 4 : 8);
  p.tiles = p.bt == 8 ? p.bp / 8 : 1;
  p.col_blocks = (a->hidden / 8 + kDownThreads - 1) / kDownThreads;
  // Enough blocks to fill the GPU several times over even at batch 1,
  // where H/8 threads alone would occupy a handful of SMs.
  int splits = (kDownTargetBlocks + p.col_blocks * p.tiles - 1) / (p.col_blocks * p.tiles);
  splits = std::max(1, std::min(splits, a->intermediate / 8));
  if (a->deterministic) {
    // max(1, .): batch 0 must not divide by zero (callers query batch 0 too).
    const size_t per_split = std::max<size_t>(1, size_t(a->batch) * a->hidden * sizeof(float));
    splits = int(std::max<size_t>(1, std::min<size_t>(splits, kMaxPartialBytes / per_split)));
  }
  p.splits = splits;
  return p;
}

struct Ws {
  unsigned long long *mask, *row_mask;
  int32_t *rows, *n_rows;
  float *z, *part;
  size_t bytes;
};

Ws carve(const tda_decode_args_t* a, const Plan& p, void* base) {
  Carver c{static_cast<char*>(base)};
  Ws w{};
  if (a->batch > 1) {
    w.mask = c.take<unsigned long long>(a->intermediate);
    w.row_mask = c.take<unsigned long long>(a->intermediate);
    w.rows = c.take<int32_t>(a->intermediate);
    w.n_rows = c.take<int32_t>(1);
  }
  w.z = c.take<float>(size_t(a->intermediate) * p.bp);
  w.part = c.take<float>(size_t(a->deterministic ? p.splits : 1) * a->batch * a->hidden);
  w.bytes = c.used;
  return w;
}

// The down projection's weights policy for (dtype, weight format).
template <tda_dtype_t D, tda_weight_format_t F>
struct DownRows {
  using type = BlockRows<F>;
  static type make(const tda_decode_args_t* a) {
    return {static_cast<const uint8_t*>(a->down_weight_t), int64_t(a->hidden / kQBlock) * QBlock<F>::bytes};
  }
};
template <tda_dtype_t D>
struct DownRows<D, TDA_WEIGHTS_DTYPE> {
  using type = FloatRows<D>;
  static type make(const tda_decode_args_t* a) {
    return {static_cast<const typename Ty<D>::T*>(a->down_weight_t), a->hidden};
  }
};

// F: gate_up_weight's format, Fd: down_weight_t's (down_format(a)); both TDA_WEIGHTS_DTYPE or both blocks.
template <tda_dtype_t D, tda_weight_format_t F, tda_weight_format_t Fd>
tda_status_t run(const tda_decode_args_t* a, const Plan& p, const Ws& w, cudaStream_t st) {
  static_assert((F == TDA_WEIGHTS_DTYPE) == (Fd == TDA_WEIGHTS_DTYPE), "a block down format needs block gate_up");
  using T = typename Ty<D>::T;
  const int32_t I = a->intermediate, H = a->hidden, B = a->batch;
  const int32_t* rows = a->active_idx;
  const int32_t* n_rows = a->active_count;
  const unsigned long long* row_mask = nullptr;
  // Everything that can fail before the first launch: the header promises that
  // a non-OK status launched nothing (the SM count is a device query, the
  // memsets are the only other runtime calls).
  const int gu_sms = num_sms();
  if (B > 1 && cudaMemsetAsync(w.mask, 0, sizeof(unsigned long long) * I, st) != cudaSuccess) return TDA_ERR_CUDA;
  if (!a->deterministic && cudaMemsetAsync(w.part, 0, sizeof(float) * B * H, st) != cudaSuccess)
    return TDA_ERR_CUDA;
  if (B > 1) {
    scatter_mask<<<dim3((I + 255) / 256, B), 256, 0, st>>>(a->active_idx, a->active_count, I, w.mask);
    compact_union<<<1, kCompactThreads, 0, st>>>(w.mask, I, w.rows, w.row_mask, w.n_rows);
    rows = w.rows;
    n_rows = w.n_rows;
    row_mask = w.row_mask;
  }
  const int groups = (I + kGroup - 1) / kGroup;
  const int gu_blocks = std::min(groups, gu_sms * 4);
  const T* x = static_cast<const T*>(a->hidden_states);
  if constexpr (F != TDA_WEIGHTS_DTYPE) {
    const uint8_t* gu = static_cast<const uint8_t*>(a->gate_up_weight);
    if (B == 1)
      gate_up_q<D, F, 1><<<gu_blocks, kGateUpWarps * 32, 0, st>>>(x, gu, H, I, B, rows, n_rows, row_mask,
                                                                  a->activation, w.z);
    else
      gate_up_q<D, F, 8><<<gu_blocks, kGateUpWarps * 32, 0, st>>>(x, gu, H, I, B, rows, n_rows, row_mask,
                                                                  a->activation, w.z);
  } else if constexpr (D == TDA_F32) {
    gate_up_f32<<<gu_blocks, kGateUpWarps * 32, 0, st>>>(
        reinterpret_cast<const float*>(a->hidden_states), reinterpret_cast<const float*>(a->gate_up_weight), H, I,
        B, rows, n_rows, row_mask, a->activation, w.z);
  } else {
    const T* gu = static_cast<const T*>(a->gate_up_weight);
    const int tiles = p.bp / 8;
    // Registers hold one accumulator and one x vector per batch tile:
    // instantiate for the tiles needed so batch 1 keeps occupancy high.
    if (tiles == 1) {
      gate_up_mma<D, 1><<<gu_blocks, kGateUpWarps * 32, 0, st>>>(x, gu, H, I, B, rows, n_rows, row_mask,
                                                                 a->activation, w.z);
    } else if (tiles == 2) {
      gate_up_mma<D, 2><<<gu_blocks, kGateUpWarps * 32, 0, st>>>(x, gu, H, I, B, rows, n_rows, row_mask,
                                                                 a->activation, w.z);
    } else if (tiles <= 4) {
      gate_up_mma<D, 4><<<gu_blocks, kGateUpWarps * 32, 0, st>>>(x, gu, H, I, B, rows, n_rows, row_mask,
                                                                 a->activation, w.z);
    } else {
      gate_up_mma<D, kMaxTiles><<<gu_blocks, kGateUpWarps * 32, 0, st>>>(x, gu, H, I, B, rows, n_rows, row_mask,
                                                                         a->activation, w.z);
    }
  }
  const dim3 down_grid(p.col_blocks * p.tiles, p.splits);
  using W = typename DownRows<D, Fd>::type;
  const W wd = DownRows<D, Fd>::make(a);
  if (p.bt == 1) {
    down_proj<D, 1, W><<<down_grid, kDownThreads, 0, st>>>(wd, H, I, B, rows, n_rows, w.z, a->deterministic, w.part);
  } else if (p.bt == 4) {
    down_proj<D, 4, W><<<down_grid, kDownThreads, 0, st>>>(wd, H, I, B, rows, n_rows, w.z, a->deterministic, w.part);
  } else {
    down_proj<D, 8, W><<<down_grid, kDownThreads, 0, st>>>(wd, H, I, B, rows, n_rows, w.z, a->deterministic, w.part);
  }
  const int64_t n = int64_t(B) * H;
  finalize<D><<<unsigned((n + 31) / 32), 256, 0, st>>>(w.part, a->deterministic ? p.splits : 1, n,
                                                       static_cast<T*>(a->output));
  return launch_status();
}

// Block gate_up in format F: down in its own block format (check_decode_shape admitted only block ones).
// Every pair runs: the kernels are gate_up_q<D, F, .> and down_proj<D, ., BlockRows<Fd>>, each already
// instantiated per format, so the 3 x 3 pairs add host code only.
template <tda_dtype_t D, tda_weight_format_t F>
tda_status_t run_blocks(const tda_decode_args_t* a, const Plan& p, const Ws& w, cudaStream_t st) {
  switch (down_format(a)) {
    case TDA_WEIGHTS_Q8_0: return run<D, F, TDA_WEIGHTS_Q8_0>(a, p, w, st);
    case TDA_WEIGHTS_Q4_0: return run<D, F, TDA_WEIGHTS_Q4_0>(a, p, w, st);
    case TDA_WEIGHTS_Q4_1: return run<D, F, TDA_WEIGHTS_Q4_1>(a, p, w, st);
    default: return TDA_ERR_BAD_DTYPE;  // unreachable: check_decode_shape refused it
  }
}

template <tda_dtype_t D>
tda_status_t run_dtype(const tda_decode_args_t* a, const Plan& p, const Ws& w, cudaStream_t st) {
  switch (a->weight_format) {
    case TDA_WEIGHTS_Q8_0: return run_blocks<D, TDA_WEIGHTS_Q8_0>(a, p, w, st);
    case TDA_WEIGHTS_Q4_0: return run_blocks<D, TDA_WEIGHTS_Q4_0>(a, p, w, st);
    case TDA_WEIGHTS_Q4_1: return run_blocks<D, TDA_WEIGHTS_Q4_1>(a, p, w, st);
    default: return run<D, TDA_WEIGHTS_DTYPE, TDA_WEIGHTS_DTYPE>(a, p, w, st);
  }
}

}  // namespace
}  // namespace gpu
}  // namespace tda

namespace {
bool use_v2(const tda_decode_args_t* a) { return tda::decode_version(a) == 2 && tda::gpu::v2::eligible(a); }
}  // namespace

extern "C" size_t tda_sparse_gated_mlp_decode_workspace_size(const tda_decode_args_t* a) {
  // Batch 0 launches nothing and needs nothing (checked before plan() runs). x_format: TDA_X_DTYPE only
  // (check_decode_shape's runs_x_q8_0 = false: TDA_X_Q8_0 is TDA_ERR_BAD_DTYPE, and sized 0 here).
  if (tda::check_decode_shape(a, true) != TDA_OK || a->batch == 0) return 0;
  if (use_v2(a)) return tda::gpu::v2::workspace_size(a);
  return tda::gpu::carve(a, tda::gpu::plan(a), nullptr).bytes;
}

extern "C" tda_status_t tda_sparse_gated_mlp_decode(const tda_decode_args_t* a, void* ws, size_t ws_size,
                                                    void* stream) {
  const tda_status_t s = tda::check_decode(a, ws, ws_size, tda_sparse_gated_mlp_decode_workspace_size(a), true);
  if (s != TDA_OK || a->batch == 0) return s;
  // Blocks are read as 16/32-bit pieces (blocks.cuh): both arrays must be 4-byte aligned here, down_weight_t
  // in its own format too (a block down format comes only with block gate_up weights: check_decode_shape).
  if (tda::block_weights(a) &&
      ((reinterpret_cast<uintptr_t>(a->gate_up_weight) | reinterpret_cast<uintptr_t>(a->down_weight_t)) & 3u))
    return TDA_ERR_MISALIGNED;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (use_v2(a)) return tda::gpu::v2::run(a, ws, st);
  const tda::gpu::Plan p = tda::gpu::plan(a);
  const tda::gpu::Ws w = tda::gpu::carve(a, p, ws);
  switch (a->dtype) {
    case TDA_F32: return tda::gpu::run_dtype<TDA_F32>(a, p, w, st);
    case TDA_F16: return tda::gpu::run_dtype<TDA_F16>(a, p, w, st);
    case TDA_BF16: return tda::gpu::run_dtype<TDA_BF16>(a, p, w, st);
  }
  return TDA_ERR_BAD_DTYPE;
}
