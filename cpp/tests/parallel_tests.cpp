// The decode-step thread governor (src/parallel.h): its decisions on simulated step times, and the
// Step hook's effect on the pool's thread count. No engine, no clock: the governor is fed times.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

using tda::par::Governor;
using tda::par::GovernorConfig;

static int failures = 0;
#define EXPECT(cond)                                                              \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);        \
      ++failures;                                                                 \
    }                                                                             \
  } while (0)

// seconds a step takes on n threads at step i
using Model = std::function<double(int n, int i)>;

// Runs `steps` steps through the governor; returns the thread count of each.
static std::vector<int> run(Governor& g, const Model& model, int steps, int first = 0, int64_t key = 1) {
  std::vector<int> used;
  for (int i = first; i < first + steps; ++i) {
    const int n = g.threads();
    used.push_back(n);
    g.record(model(n, i), n, key);
  }
  return used;
}

static int count(const std::vector<int>& v, int n, size_t from = 0, size_t to = SIZE_MAX) {
  int c = 0;
  for (size_t i = from; i < v.size() && i < to; ++i) c += v[i] == n;
  return c;
}

static GovernorConfig two() {
  GovernorConfig c;
  c.max_threads = 2;
  return c;
}

// The most probe steps `steps` steps can hold when no probe moves: intervals first, 2x, ... up to the
// longest, then every longest interval.
static int probe_steps_in(const GovernorConfig& c, int steps) {
  int probes = 1;
  for (int i = c.first_interval; i < c.max_interval; i *= 2) ++probes;
  return c.probe_steps * (probes + steps / c.max_interval + 1);
}

// A quiet box: 2 threads take 10 ms, 1 thread 18 ms (the box's measured ~0.55x). The governor stays
// on 2 and its probes grow rare: 1-thread steps are a small, bounded share.
static void quiet_stays_on_all_threads() {
  Governor g(two());
  const auto used = run(g, [](int n, int) { return n == 2 ? 0.010 : 0.018; }, 4000, 0);
  EXPECT(g.level() == 2);
  const GovernorConfig& c = g.config();
  // the first step of a key is not timed (after a prefill); nothing but 2 threads before the first probe
  EXPECT(count(used, 2, 0, c.first_interval + 1) == c.first_interval + 1);
  const int ones = count(used, 1);
  EXPECT(ones > 0);  // it does probe
  EXPECT(ones <= probe_steps_in(c, 4000));
  EXPECT(ones * 100 <= 4000);  // a quiet box loses < 1% of its steps to probes (each ~1.8x slower)
  EXPECT(g.interval() == g.config().max_interval);
  EXPECT(g.steps_at()[1] == ones && g.steps_at()[2] == 4000 - ones);
}

// Next to a busy process: 2 threads collapse (60 ms), 1 thread keeps its core (20 ms). The first
// probe moves to 1 thread and it stays there; probes back up are rare.
static void busy_moves_to_one_thread() {
  Governor g(two());
  const auto used = run(g, [](int n, int) { return n == 2 ? 0.060 : 0.020; }, 3000);
  EXPECT(g.level() == 1);
  const GovernorConfig& c = g.config();
  const size_t f = static_cast<size_t>(c.first_interval + 1), p = static_cast<size_t>(c.probe_steps);
  EXPECT(count(used, 1, f + p) >= static_cast<int>(used.size() - f - p) - probe_steps_in(c, 3000));
  // the first probe follows first_interval timed steps, and it moves
  EXPECT(count(used, 1, 0, f) == 0 && count(used, 1, f, f + p) == c.probe_steps);
  EXPECT(count(used, 1, f + p, f + p + 16) == 16);
}

// Quiet, then a competitor starts: the rise of the step time triggers a probe at once (not after the
// grown interval), and the governor moves within a window and a probe.
static void contention_onset_is_caught_early() {
  Governor g(two());
  const int onset = 1000;
  const Model m = [&](int n, int i) { return i < onset ? (n == 2 ? 0.010 : 0.018) : (n == 2 ? 0.060 : 0.020); };
  const auto used = run(g, m, 2000);
  EXPECT(g.interval() == g.config().max_interval || g.level() == 1);
  size_t moved = 0;
  for (size_t i = onset; i < used.size() && !moved; ++i)
    if (count(used, 1, i, i + 10) == 10) moved = i;
  EXPECT(moved > 0 && moved - onset <= static_cast<size_t>(g.config().window + g.config().probe_steps + 2));
  EXPECT(count(used, 2, onset + 40) <= probe_steps_in(g.config(), 1000));
  EXPECT(g.level() == 1);
}

// Busy, then the competitor stops: the governor goes back to all threads within the longest interval.
static void returns_when_the_box_is_quiet_again() {
  Governor g(two());
  const int quiet_from = 2000;
  const Model m = [&](int n, int i) { return i < quiet_from ? (n == 2 ? 0.060 : 0.020) : (n == 2 ? 0.010 : 0.018); };
  const auto used = run(g, m, 3000);
  EXPECT(g.level() == 2);
  size_t back = 0;
  for (size_t i = quiet_from; i < used.size() && !back; ++i)
    if (count(used, 2, i, i + 10) == 10) back = i;
  EXPECT(back > 0 && back - quiet_from <= static_cast<size_t>(g.config().max_interval + g.config().window + 4));
}

// Hysteresis: a level less than `margin` faster is not worth a move, and noise does not flip it.
static void margin_and_noise_keep_it_still() {
  {
    Governor g(two());
    const auto used = run(g, [](int n, int) { return n == 2 ? 0.0100 : 0.0095; }, 2000);  // 1 thread 5% faster
    EXPECT(g.level() == 2);
    EXPECT(count(used, 1) <= probe_steps_in(g.config(), 2000));
  }
  {
    Governor g(two());
    uint64_t state = 12345;
    auto noise = [&]() {  // +-25%, deterministic
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      return 0.75 + 0.5 * static_cast<double>(state >> 11) / 9007199254740992.0;
    };
    run(g, [&](int n, int) { return (n == 2 ? 0.010 : 0.018) * noise(); }, 3000);
    EXPECT(g.level() == 2);
    int moves = 0, last = 2;
    Governor h(two());
    for (int i = 0; i < 3000; ++i) {
      const int n = h.threads();
      h.record((n == 2 ? 0.010 : 0.018) * noise(), n, 1);
      moves += h.level() != last;
      last = h.level();
    }
    EXPECT(moves == 0);
  }
}

// More cores: levels 6, 3, 1; the fastest is 3 threads (e.g. 3 of 6 cores taken): it settles there,
// probing both ways, and does not wander.
static void halving_levels_settle_on_the_fastest() {
  GovernorConfig c;
  c.max_threads = 6;
  Governor g(c);
  const auto used = run(g, [](int n, int) { return n == 6 ? 0.050 : n == 3 ? 0.015 : 0.030; }, 3000);
  EXPECT(g.level() == 3);
  for (int n : used) EXPECT(n == 6 || n == 3 || n == 1);
  EXPECT(count(used, 3, 100) >= static_cast<int>(used.size()) - 100 - 2 * probe_steps_in(c, 3000));
  EXPECT(count(used, 1) > 0 && count(used, 6, 100) > 0);  // it tried both neighbours
}

// Steps of another key (batch size) restart the timing at the same level; a step recorded for a thread
// count the governor is not at (a concurrent session's) is counted and otherwise ignored.
static void keys_and_stale_records() {
  Governor g(two());
  run(g, [](int n, int) { return n == 2 ? 0.060 : 0.020; }, 40);
  EXPECT(g.level() == 1);
  // batch 4 now: its steps are longer; no decision from mixing the two
  const auto used = run(g, [](int n, int) { return n == 2 ? 0.240 : 0.080; }, 15, 40, 4);
  EXPECT(g.level() == 1 && count(used, 1) == 15);
  Governor h(two());
  for (int i = 0; i < 200; ++i) h.record(0.001, 1, 1);  // 1-thread records while at 2: ignored
  EXPECT(h.level() == 2 && !h.probing() && h.steps_at()[1] == 200);
  GovernorConfig one;
  one.max_threads = 1;
  Governor k(one);
  EXPECT(run(k, [](int, int) { return 0.01; }, 50) == std::vector<int>(50, 1));
}

// The hook: inside a Step this thread's pool forks the governor's count; after it (done or thrown
// out of) the pool's full count again. The environment switches the governor off.
static void step_hook_sets_and_restores() {
  unsetenv("TDA_NATIVE_ADAPTIVE_THREADS");
  tda::par::Pool pool(2, 1);
  EXPECT(pool.governed != nullptr && pool.threads_now() == 2);
  {
    std::lock_guard<std::mutex> lock(pool.governed->mu);  // steer it to 1 thread
    for (int i = 0; i < 40; ++i) {
      const int n = pool.governed->gov.threads();
      pool.governed->gov.record(n == 2 ? 0.060 : 0.020, n, 7);
    }
    EXPECT(pool.governed->gov.level() == 1);
  }
  {
    tda::par::Step step(pool, 7);
    EXPECT(pool.threads_now() == 1 && pool.threads_for(int64_t(1) << 30) == 1);
    step.done();
  }
  EXPECT(pool.threads_now() == 2 && pool.threads_for(int64_t(1) << 30) == 2);
  try {
    tda::par::Step step(pool, 7);
    EXPECT(pool.threads_now() == 1);
    throw std::runtime_error("step failed");
  } catch (const std::runtime_error&) {
  }
  EXPECT(pool.threads_now() == 2);
  const int64_t recorded = pool.governed->gov.steps_at()[1];
  {
    tda::par::Step step(pool, 7);  // not done: not recorded
  }
  EXPECT(pool.governed->gov.steps_at()[1] == recorded);
  setenv("TDA_NATIVE_ADAPTIVE_THREADS", "0", 1);
  tda::par::Pool fixed(2, 1);
  EXPECT(fixed.governed == nullptr);
  {
    tda::par::Step step(fixed, 7);
    EXPECT(fixed.threads_now() == 2);
    step.done();
  }
  setenv("TDA_NATIVE_ADAPTIVE_THREADS", "yes", 1);
  bool threw = false;
  try {
    tda::par::Pool bad(2, 1);
  } catch (const std::exception& e) {
    threw = std::string(e.what()).find("TDA_NATIVE_ADAPTIVE_THREADS=yes") != std::string::npos;
  }
  EXPECT(threw);
  unsetenv("TDA_NATIVE_ADAPTIVE_THREADS");
  EXPECT(tda::par::Pool(1, 1).governed == nullptr);             // one thread: nothing to govern
  EXPECT(tda::par::Pool(2, 1, false).governed == nullptr);      // off by the caller
}

int main() {
  quiet_stays_on_all_threads();
  busy_moves_to_one_thread();
  contention_onset_is_caught_early();
  returns_when_the_box_is_quiet_again();
  margin_and_noise_keep_it_still();
  halving_levels_settle_on_the_fastest();
  keys_and_stale_records();
  step_hook_sets_and_restores();
  if (failures) std::fprintf(stderr, "%d failure(s)\n", failures);
  else std::printf("ok\n");
  return failures ? 1 : 0;
}
