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
#include <memory>
#include <mutex>
#include <vector>

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
  // tda_x_format_t a block linear reads its x with (the engine's x_format; 0 for down_t, whose input z
  // the contract never quantizes)
  int32_t x_format = 0;
  WeightRef() = default;
  WeightRef(const float* p) : f(p) {}  // NOLINT: implicit on purpose
  WeightRef(const void* b, int32_t fmt) : blocks(b), format(fmt) {}
  bool quantized() const { return format != 0; }
  // Bytes of an n x k matrix in this format (a row of k weights is k/32 blocks).
  int64_t bytes(int64_t n, int64_t k) const;
};

// y[M, N] = x[M, K] @ W (+ bias), W either [K, N] row-major (`k_major`, the exporter's weight_t
// layout) or [N, K] (gate_up, lm_head). Block weights are always [N, K/32 blocks] (GGUF rows,
// k_major ignored): tda_block_linear for small M, fp32 tiles through sgemm for prefill sizes (always
// tda_block_linear when the weights' x_format quantizes x: the library owns that rule).
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

// ---- how many threads a decode step forks, next to other processes ----------------------------
// A step forks ~150 short regions; when another process holds a core, each join can wait a whole
// scheduler slice for a descheduled worker, and N threads run slower than one (bench/busy_box.py
// measures it). The governor times the steps and runs them on fewer threads while that is faster:
//   - it starts at max_threads; levels are max, max/2, ..., 1 (halving);
//   - a probe runs `probe_steps` steps at the neighbouring level (down from max, up from 1, else
//     alternating) and compares their mean time with the mean of the last `window` steps at the
//     current level; it moves only when the probe is faster by more than `margin` (hysteresis);
//   - the first probe comes after `first_interval` steps; a probe that does not move doubles the
//     interval (up to `max_interval`: a quiet box pays ~1 slower step in max_interval), one that
//     moves resets it;
//   - a probe comes early (at most once per `window` steps) when the current level's recent steps
//     take more than `trigger` x, or less than 1/trigger x, what they took at the last decision:
//     the box got busier or quieter;
//   - steps of another `key` (the batch size: a different step length) restart the timing, at the
//     same level.
// Pure bookkeeping (no clock, no OpenMP), so tests feed it times; Step below is the clock and the
// hook. Not thread-safe by itself (Step locks).
struct GovernorConfig {
  int max_threads = 1;
  int window = 8;
  int probe_steps = 1;
  int first_interval = 32;
  int max_interval = 256;
  double margin = 0.10;
  double trigger = 1.5;
};

class Governor {
 public:
  explicit Governor(GovernorConfig config);
  // Threads for the next step.
  int threads() const { return probing_ ? probe_level_ : level_; }
  // A step that ran on `threads` took `seconds`; `key` identifies comparable steps. A step of another
  // count than threads() (decided before a concurrent step moved the level) is counted, not used.
  void record(double seconds, int threads, int64_t key);
  // The level steps run at when not probing, and whether the next step is a probe.
  int level() const { return level_; }
  bool probing() const { return probing_; }
  int interval() const { return interval_; }
  // Steps recorded at each thread count [0..max_threads], probes included.
  const std::vector<int64_t>& steps_at() const { return steps_at_; }
  const GovernorConfig& config() const { return c_; }

 private:
  void start_probe();
  void finish_probe();
  double window_mean() const;
  GovernorConfig c_;
  int level_;
  bool probing_ = false;
  int probe_level_ = 0;
  bool probe_up_ = false;  // direction of the next probe from a middle level
  int interval_;
  int since_ = 0;          // steps at the current level since the last probe or reset
  int64_t key_ = -1;
  double ref_ = 0;         // the current level's mean step time at the last decision (0: none yet)
  std::vector<double> win_, probe_;
  std::vector<int64_t> steps_at_;
};

// One executor's share of the pool: its thread count (<= 0 when made: all cores) and the least
// weight bytes worth a thread (tests pass 1 to fork every call). Making one keeps OpenBLAS
// single-threaded. `adaptive`: decode steps (Step) run on the governor's thread count (only with
// threads > 1); TDA_NATIVE_ADAPTIVE_THREADS=0/1 overrides it.
struct Pool {
  explicit Pool(int threads = 1, int64_t slice_bytes = kSliceBytes, bool adaptive = true);
  int threads;  // the most this executor forks
  int64_t slice_bytes;
  // What this thread's current step may fork: `threads`, or fewer inside a governed decode step.
  int threads_now() const;
  // Threads worth forking for `bytes` of weights streamed: one per slice_bytes, at most threads_now().
  int threads_for(int64_t bytes) const;
  // Every job in one fork/join, each thread on its slice of every job's N columns.
  void linear(int64_t M, std::initializer_list<Linear> jobs) const;

  struct Governed {  // shared by copies of the pool (one executor)
    Governed(const GovernorConfig& c, bool trace_) : gov(c), trace(trace_) {}
    ~Governed();
    std::mutex mu;
    Governor gov;
    bool trace;  // TDA_NATIVE_ADAPTIVE_THREADS_TRACE=1: level changes and the steps per count, to stderr
  };
  std::shared_ptr<Governed> governed;  // null: every step on `threads`
};

// The decode-step hook: `Step step(pool, key); forward(...); step.done();` runs the step on the
// governor's thread count (threads_now() on this thread) and records its time when done() is
// reached (a step that throws is not recorded). No-op for a pool without a governor.
class Step {
 public:
  Step(const Pool& pool, int64_t key);
  ~Step();
  void done();
  Step(const Step&) = delete;
  Step& operator=(const Step&) = delete;

 private:
  Pool::Governed* g_;
  int64_t key_;
  int prev_, n_ = 0;
  double t0_ = 0;
};

}  // namespace par
}  // namespace tda
