// The executor's one thread pool: OpenMP's, which the TDA kernels (cuda/, CPU build) already use.
// OpenBLAS runs single-threaded inside it, on each thread's slice of the output, so no second pool
// (OpenBLAS's pthreads) ever competes for the cores: BLAS does the math, this module only partitions.
//
// How the pool's workers wait between regions is libgomp's spin count, which it reads from the
// environment once, when it loads (GOMP_SPINCOUNT; OMP_WAIT_POLICY). A decode step forks ~150 short
// regions a few µs apart: sleeping at once (PASSIVE) pays a futex wake-up (~20-30 µs, a scheduler
// slice on a busy box) per region; spinning for seconds (ACTIVE) burns a core that other processes
// want between requests. TDA_RT_GOMP_SPINCOUNT (include/tda/runtime.h) is the middle: 300
// `pause`s (~16 ns each on the Xeon of bench/RESULTS.md), a spin of ~5 µs that bridges the gaps
// between a step's regions, then sleep (6000, ~100 µs, lost to it with a competing process). tda-run and the Python binding set it before libgomp
// loads; bench/RESULTS.md measures all three.
#pragma once

#include <cstdint>
#include <initializer_list>

#include <omp.h>

namespace tda {
namespace par {

// Below this many weight bytes per thread a fork/join (1-3 µs with the bounded spin, more on a busy
// box) costs more than the slice saves: 64 KiB stream in ~5 µs at the box's ~13 GB/s per core.
constexpr int64_t kSliceBytes = int64_t(64) << 10;

// A weight matrix as the engine stores it: float32 (`f`), or block-quantized (`blocks`, a
// tda_weight_format_t other than TDA_WEIGHTS_DTYPE, cuda/include/tda_kernels.h). Converts from a
// float pointer, so float call sites read as before.
struct WeightRef {
  const float* f = nullptr;
  const void* blocks = nullptr;
  int32_t format = 0;  // tda_weight_format_t; 0: float32 `f`
  WeightRef() = default;
  WeightRef(const float* p) : f(p) {}  // NOLINT: implicit on purpose
  WeightRef(const void* b, int32_t fmt) : blocks(b), format(fmt) {}
  bool quantized() const { return format != 0; }
  // Bytes of an n x k matrix in this format (a row of k weights is k/32 blocks).
  int64_t bytes(int64_t n, int64_t k) const;
};

// y[M, N] = x[M, K] @ W (+ bias), W either [K, N] row-major (`k_major`, the exporter's weight_t
// layout) or [N, K] (gate_up, lm_head). Block weights are always [N, K/32 blocks] (GGUF rows,
// k_major ignored): tda_block_linear for small M, fp32 tiles through sgemm for prefill sizes.
struct Linear {
  const float* x;
  WeightRef w;
  const float* bias;  // [N] or nullptr
  float* y;
  int64_t K, N;
  bool k_major;
};

// Rows of x from which a block-weight linear dequantizes tiles of W to fp32 for sgemm instead of
// dequantizing in registers per 4 rows of x (tda_block_linear); TDA_NATIVE_BLOCK_GEMM_ROWS overrides.
// Measured on a SmolLM2 gate_up (1536 x 576, one thread, AVX-512): tda_block_linear is ahead up to
// M ~ 64 (1.1-2.7x at M 2..32), even at 128; a rough figure taken on a busy box, so a round number.
constexpr int64_t kBlockGemmRows = 64;
int64_t block_gemm_rows();

// One thread's share of a job: output columns [c0, c1), on the calling thread.
void linear_slice(int64_t M, const Linear& job, int64_t c0, int64_t c1);

// Column range [c0, c1) of thread t of n over N columns, in whole 16-float blocks (no two threads
// write one cache line).
inline void slice(int64_t N, int t, int n, int64_t* c0, int64_t* c1) {
  const int64_t blocks = (N + 15) / 16;
  *c0 = blocks * t / n * 16;
  const int64_t e = blocks * (t + 1) / n * 16;
  *c1 = e < N ? e : N;
}

// f(t, n) on n = nt threads of the pool (on the caller alone when nt == 1: no fork).
template <class F>
void fork(int nt, F&& f) {
  if (nt <= 1) {
    f(0, 1);
    return;
  }
#pragma omp parallel num_threads(nt)
  f(omp_get_thread_num(), omp_get_num_threads());
}

// One executor's share of the pool: its thread count (<= 0 when made: all cores) and the least
// weight bytes worth a thread (tests pass 1 to fork every call). Making one keeps OpenBLAS
// single-threaded.
struct Pool {
  explicit Pool(int threads = 1, int64_t slice_bytes = kSliceBytes);
  int threads;
  int64_t slice_bytes;
  // Threads worth forking for `bytes` of weights streamed: one per slice_bytes, at most `threads`.
  int threads_for(int64_t bytes) const;
  // Every job in one fork/join, each thread on its slice of every job's N columns.
  void linear(int64_t M, std::initializer_list<Linear> jobs) const;
};

}  // namespace par
}  // namespace tda
