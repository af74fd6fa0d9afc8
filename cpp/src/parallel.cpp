#include "parallel.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "blas.h"
#include "engine_dir.h"
#include "tda_kernels.h"

namespace tda {
namespace par {
namespace {

void check(tda_status_t st, const char* what) {
  if (st != TDA_OK) throw std::runtime_error(std::string(what) + ": " + tda_status_string(st));
}

// Block weights, columns [c0, c1) of y.
void block_slice(int64_t M, const Linear& j, int64_t c0, int64_t c1) {
  const int32_t fmt = j.w.format;
  if (M < block_gemm_rows() || j.w.x_format != TDA_X_DTYPE) {
    tda_block_linear_args_t a{fmt, static_cast<int32_t>(M), static_cast<int32_t>(j.N), static_cast<int32_t>(j.K),
                              static_cast<int32_t>(c0), static_cast<int32_t>(c1), j.K, j.N, j.x, j.w.blocks, j.y,
                              j.w.x_format};
    check(tda_block_linear(&a, nullptr, 0, nullptr), "tda_block_linear");
    return;
  }
  // Prefill: a tile of W rows made fp32 (exact, tda_block_dequantize), then one sgemm per tile.
  constexpr int64_t kTile = 64;
  thread_local std::vector<float> tile;
  tile.resize(static_cast<size_t>(kTile * j.K));
  const int64_t rb = j.w.bytes(1, j.K);
  for (int64_t r0 = c0; r0 < c1; r0 += kTile) {
    const int64_t n = std::min(kTile, c1 - r0);
    check(tda_block_dequantize(fmt, static_cast<int32_t>(j.K), n, static_cast<const uint8_t*>(j.w.blocks) + r0 * rb,
                               tile.data(), j.K, nullptr),
          "tda_block_dequantize");
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, n, j.K, 1.0f, j.x, j.K, tile.data(), j.K, 0.0f,
                j.y + r0, j.N);
  }
}

}  // namespace

int64_t WeightRef::bytes(int64_t n, int64_t k) const {
  return quantized() ? n * (k / TDA_QUANT_BLOCK) * static_cast<int64_t>(tda_block_bytes(format)) : n * k * 4;
}

int64_t block_gemm_rows() {
  static const int64_t rows = [] {
    const char* env = std::getenv("TDA_NATIVE_BLOCK_GEMM_ROWS");
    if (!env || !*env) return kBlockGemmRows;
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    return *end || v < 1 ? kBlockGemmRows : static_cast<int64_t>(v);
  }();
  return rows;
}

void linear_slice(int64_t M, const Linear& j, int64_t c0, int64_t c1) {
  const int64_t n = c1 - c0;
  if (n <= 0) return;
  float* y = j.y + c0;
  if (j.w.quantized()) {
    block_slice(M, j, c0, c1);
  } else if (M == 1) {
    if (j.k_major)
      cblas_sgemv(CblasRowMajor, CblasTrans, j.K, n, 1.0f, j.w.f + c0, j.N, j.x, 1, 0.0f, y, 1);
    else
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n, j.K, 1.0f, j.w.f + c0 * j.K, j.K, j.x, 1, 0.0f, y, 1);
  } else if (j.k_major) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, n, j.K, 1.0f, j.x, j.K, j.w.f + c0, j.N, 0.0f, y, j.N);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, n, j.K, 1.0f, j.x, j.K, j.w.f + c0 * j.K, j.K, 0.0f, y, j.N);
  }
  if (j.bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = c0; c < c1; ++c) j.y[m * j.N + c] += j.bias[c];
}

// ---- Governor ---------------------------------------------------------------------------------
namespace {
// max, max/2, ..., 1
std::vector<int> levels_of(int max_threads) {
  std::vector<int> out;
  for (int n = std::max(1, max_threads); n > 1; n /= 2) out.push_back(n);
  out.push_back(1);
  return out;
}
}  // namespace

Governor::Governor(GovernorConfig config) : c_(config) {
  c_.max_threads = std::max(1, c_.max_threads);
  c_.window = std::max(1, c_.window);
  c_.probe_steps = std::max(1, c_.probe_steps);
  c_.first_interval = std::max(c_.window, c_.first_interval);
  c_.max_interval = std::max(c_.first_interval, c_.max_interval);
  level_ = c_.max_threads;
  interval_ = c_.first_interval;
  steps_at_.assign(static_cast<size_t>(c_.max_threads) + 1, 0);
}

double Governor::window_mean() const {
  return win_.empty() ? 0.0 : std::accumulate(win_.begin(), win_.end(), 0.0) / static_cast<double>(win_.size());
}

void Governor::start_probe() {
  const std::vector<int> lv = levels_of(c_.max_threads);
  const size_t i = static_cast<size_t>(std::find(lv.begin(), lv.end(), level_) - lv.begin());
  bool up;
  if (i == 0) up = false;
  else if (i + 1 == lv.size()) up = true;
  else up = probe_up_ = !probe_up_;
  probe_level_ = lv[up ? i - 1 : i + 1];
  probing_ = true;
  probe_.clear();
}

void Governor::finish_probe() {
  const double p = std::accumulate(probe_.begin(), probe_.end(), 0.0) / static_cast<double>(probe_.size());
  const double cur = window_mean();
  probing_ = false;
  since_ = 0;
  if (p < cur * (1.0 - c_.margin)) {  // faster by more than the margin: move
    level_ = probe_level_;
    win_ = probe_;
    interval_ = c_.first_interval;
    ref_ = 0;  // set again from the first full window at the new level
  } else {
    interval_ = std::min(2 * interval_, c_.max_interval);
    ref_ = cur;
  }
  probe_.clear();
}

void Governor::record(double seconds, int threads, int64_t key) {
  if (threads >= 1 && threads <= c_.max_threads) ++steps_at_[static_cast<size_t>(threads)];
  if (c_.max_threads <= 1 || !(seconds >= 0)) return;
  if (key != key_) {  // another kind of step: time anew from the next one, at the same level
    key_ = key;
    probing_ = false;
    win_.clear();
    probe_.clear();
    ref_ = 0;
    since_ = 0;
    return;
  }
  if (threads != this->threads()) return;  // a step decided before a concurrent one moved us
  if (probing_) {
    probe_.push_back(seconds);
    if (static_cast<int>(probe_.size()) >= c_.probe_steps) finish_probe();
    return;
  }
  win_.push_back(seconds);
  if (static_cast<int>(win_.size()) > c_.window) win_.erase(win_.begin());
  ++since_;
  const bool full = static_cast<int>(win_.size()) >= c_.window;
  if (ref_ == 0 && full) ref_ = window_mean();
  const double m = window_mean();
  const bool moved = ref_ > 0 && since_ >= c_.window && (m > ref_ * c_.trigger || m * c_.trigger < ref_);
  if (full && (since_ >= interval_ || moved)) start_probe();
}

// ---- Pool -------------------------------------------------------------------------------------
namespace {
thread_local int t_step_threads = 0;  // inside a governed Step on this thread: its thread count

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool env_flag(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (!v) return fallback;
  if (std::strcmp(v, "0") == 0) return false;
  if (std::strcmp(v, "1") == 0) return true;
  throw ArgumentError(std::string(name) + "=" + v + ": expected 0 or 1");
}
}  // namespace

Pool::Pool(int threads_, int64_t slice_bytes_, bool adaptive)
    : threads(threads_ > 0 ? threads_ : std::max(1, omp_get_num_procs())), slice_bytes(std::max<int64_t>(1, slice_bytes_)) {
  openblas_set_num_threads(1);
  const bool trace = env_flag("TDA_NATIVE_ADAPTIVE_THREADS_TRACE", false);
  if (env_flag("TDA_NATIVE_ADAPTIVE_THREADS", adaptive) && threads > 1) {
    GovernorConfig c;
    c.max_threads = threads;
    governed = std::make_shared<Governed>(c, trace);
  }
}

Pool::Governed::~Governed() {
  if (!trace) return;
  std::string s;
  for (size_t n = 1; n < gov.steps_at().size(); ++n)
    s += (s.empty() ? "" : ", ") + std::to_string(gov.steps_at()[n]) + " on " + std::to_string(n);
  std::fprintf(stderr, "tda: decode steps by threads: %s\n", s.c_str());
}

int Pool::threads_now() const { return t_step_threads > 0 ? std::min(threads, t_step_threads) : threads; }

int Pool::threads_for(int64_t bytes) const {
  return static_cast<int>(std::clamp<int64_t>(bytes / slice_bytes, 1, threads_now()));
}

Step::Step(const Pool& pool, int64_t key) : g_(pool.governed.get()), key_(key), prev_(t_step_threads) {
  if (!g_) return;
  {
    std::lock_guard<std::mutex> lock(g_->mu);
    n_ = g_->gov.threads();
  }
  t_step_threads = n_;
  t0_ = now_seconds();
}

void Step::done() {
  if (!g_) return;
  const double dt = now_seconds() - t0_;
  t_step_threads = prev_;
  std::lock_guard<std::mutex> lock(g_->mu);
  const int before = g_->gov.level();
  g_->gov.record(dt, n_, key_);
  if (g_->trace && g_->gov.level() != before)
    std::fprintf(stderr, "tda: decode threads %d -> %d (probe step %.2f ms)\n", before, g_->gov.level(), dt * 1e3);
  g_ = nullptr;
}

Step::~Step() {
  if (g_) t_step_threads = prev_;
}

void Pool::linear(int64_t M, std::initializer_list<Linear> jobs) const {
  int64_t bytes = 0;
  for (const Linear& j : jobs) bytes += j.w.bytes(j.N, j.K);
  fork(threads_for(bytes), [&](int t, int n) {
    for (const Linear& j : jobs) {
      int64_t c0, c1;
      slice(j.N, t, n, &c0, &c1);
      linear_slice(M, j, c0, c1);
    }
  });
}

}  // namespace par
}  // namespace tda
