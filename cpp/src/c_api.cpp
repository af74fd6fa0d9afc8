// The C API: exceptions end here, as status codes plus a per-thread message.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "executor.h"
#include "tda/runtime.h"

struct tda_rt_engine {
  tda::EngineDir dir;
  std::unique_ptr<tda::Executor> exec;
};

struct tda_rt_session {
  tda_rt_engine* engine;
  std::unique_ptr<tda::ExecutorState> state;
};

namespace {

thread_local std::string g_last_error;

tda_rt_status_t fail(tda_rt_status_t st, const std::string& msg) {
  g_last_error = msg;
  return st;
}

template <class F>
tda_rt_status_t guarded(F&& f) {
  try {
    g_last_error.clear();
    f();
    return TDA_RT_OK;
  } catch (const tda::ArgumentError& e) {
    return fail(TDA_RT_ERR_ARGUMENT, e.what());
  } catch (const tda::EngineError& e) {
    return fail(TDA_RT_ERR_ENGINE, e.what());
  } catch (const tda::StateError& e) {
    return fail(TDA_RT_ERR_STATE, e.what());
  } catch (const tda::UnsupportedError& e) {
    return fail(TDA_RT_ERR_UNSUPPORTED, e.what());
  } catch (const std::bad_alloc&) {
    return fail(TDA_RT_ERR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return fail(TDA_RT_ERR_INTERNAL, e.what());
  } catch (...) {
    return fail(TDA_RT_ERR_INTERNAL, "unknown error");
  }
}

#define TDA_RT_REQUIRE(ptr) \
  if (!(ptr)) throw tda::ArgumentError(std::string(__func__) + ": " #ptr " is NULL")

}  // namespace

extern "C" {

int tda_rt_api_version(void) { return TDA_RT_API_VERSION; }
const char* tda_rt_last_error(void) { return g_last_error.c_str(); }

const char* tda_rt_status_string(tda_rt_status_t status) {
  switch (status) {
    case TDA_RT_OK: return "ok";
    case TDA_RT_ERR_ARGUMENT: return "invalid argument";
    case TDA_RT_ERR_ENGINE: return "bad engine directory";
    case TDA_RT_ERR_STATE: return "call out of order";
    case TDA_RT_ERR_UNSUPPORTED: return "unsupported engine";
    case TDA_RT_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

void tda_rt_engine_options_init(tda_rt_engine_options* options) {
  if (options) *options = tda_rt_engine_options{1, 0, nullptr, nullptr, nullptr, 0};
}

tda_rt_status_t tda_rt_engine_open_with(const char* directory, const tda_rt_engine_options* options,
                                        tda_rt_engine** out) {
  return guarded([&] {
    TDA_RT_REQUIRE(out);
    *out = nullptr;
    TDA_RT_REQUIRE(directory);
    TDA_RT_REQUIRE(options);
    tda::ExecutorOptions o;
    o.kind = options->executor ? options->executor : "auto";
    o.threads = options->threads;
    o.tensorrt_library = options->tensorrt_library ? options->tensorrt_library : "";
    o.plugin_library = options->plugin_library ? options->plugin_library : "";
    o.device = options->device;
    if (o.device < 0) throw tda::ArgumentError("tda_rt_engine_open_with: device must be >= 0, got " + std::to_string(o.device));
    tda::check_executor_kind(o.kind);  // a bad name fails before the directory is read
    auto e = std::make_unique<tda_rt_engine>();
    e->dir = tda::EngineDir::open(directory, options->verify != 0);
    e->exec = tda::make_executor(e->dir, o);
    *out = e.release();
  });
}

tda_rt_status_t tda_rt_engine_open(const char* directory, int verify, int threads, tda_rt_engine** out) {
  tda_rt_engine_options o;
  tda_rt_engine_options_init(&o);
  o.verify = verify;
  o.threads = threads;
  return tda_rt_engine_open_with(directory, &o, out);
}

const char* tda_rt_engine_executor(const tda_rt_engine* engine) { return engine ? engine->exec->name() : nullptr; }
int tda_rt_has_tensorrt(void) { return tda::have_tensorrt_executor() ? 1 : 0; }
const char* tda_rt_tensorrt_flavour(void) { return tda::tensorrt_executor_flavour(); }

void tda_rt_engine_close(tda_rt_engine* engine) { delete engine; }

tda_rt_status_t tda_rt_engine_info_get(const tda_rt_engine* engine, tda_rt_engine_info* out) {
  return guarded([&] {
    TDA_RT_REQUIRE(engine);
    TDA_RT_REQUIRE(out);
    const auto& s = engine->dir.spec;
    *out = tda_rt_engine_info{static_cast<int32_t>(s.num_layers), static_cast<int32_t>(s.hidden),
                              static_cast<int32_t>(s.intermediate), static_cast<int32_t>(s.vocab),
                              static_cast<int32_t>(s.max_context), static_cast<int32_t>(engine->dir.bos_id),
                              engine->dir.eos_ids.empty() ? -1 : static_cast<int32_t>(engine->dir.eos_ids[0]),
                              static_cast<int32_t>(engine->dir.pad_id), engine->exec->decode_bytes(),
                              engine->exec->decode_mlp_bytes()};
  });
}

tda_rt_status_t tda_rt_engine_eos_ids(const tda_rt_engine* engine, int32_t* ids, int32_t capacity, int32_t* count) {
  return guarded([&] {
    TDA_RT_REQUIRE(engine);
    TDA_RT_REQUIRE(count);
    if (capacity < 0) throw tda::ArgumentError("tda_rt_engine_eos_ids: capacity < 0");
    if (capacity > 0) TDA_RT_REQUIRE(ids);
    const auto& e = engine->dir.eos_ids;
    *count = static_cast<int32_t>(e.size());
    for (size_t i = 0; i < e.size() && static_cast<int32_t>(i) < capacity; ++i) ids[i] = static_cast<int32_t>(e[i]);
  });
}

tda_rt_status_t tda_rt_engine_thresholds(const tda_rt_engine* engine, double density, int32_t prompt_len, float* out) {
  return guarded([&] {
    TDA_RT_REQUIRE(engine);
    TDA_RT_REQUIRE(out);
    auto t = engine->dir.thresholds(density > 0 ? std::optional<double>(density) : std::nullopt,
                                    prompt_len > 0 ? std::optional<int64_t>(prompt_len) : std::nullopt);
    std::memcpy(out, t.data(), t.size() * sizeof(float));
  });
}

tda_rt_status_t tda_rt_session_new(tda_rt_engine* engine, tda_rt_session** out) {
  return guarded([&] {
    TDA_RT_REQUIRE(out);
    *out = nullptr;
    TDA_RT_REQUIRE(engine);
    *out = new tda_rt_session{engine, engine->exec->new_state()};
  });
}

void tda_rt_session_free(tda_rt_session* session) { delete session; }

tda_rt_status_t tda_rt_engine_density_bounds(const tda_rt_engine* engine, double density, float* out) {
  return guarded([&] {
    TDA_RT_REQUIRE(engine);
    TDA_RT_REQUIRE(out);
    auto b = engine->dir.density_bounds(density > 0 ? std::optional<double>(density) : std::nullopt);
    std::memcpy(out, b.data(), b.size() * sizeof(float));
  });
}

tda_rt_status_t tda_rt_prefill(tda_rt_session* session, int32_t batch, int32_t seq, const int64_t* input_ids,
                               const int64_t* attention_mask, const float* thresholds, float* logits) {
  return tda_rt_prefill_bounded(session, batch, seq, input_ids, attention_mask, thresholds, nullptr, logits);
}

tda_rt_status_t tda_rt_prefill_bounded(tda_rt_session* session, int32_t batch, int32_t seq, const int64_t* input_ids,
                                       const int64_t* attention_mask, const float* thresholds,
                                       const float* density_bounds, float* logits) {
  return guarded([&] {
    TDA_RT_REQUIRE(session);
    TDA_RT_REQUIRE(input_ids);
    TDA_RT_REQUIRE(attention_mask);
    TDA_RT_REQUIRE(logits);
    const tda::EngineDir& dir = session->engine->dir;
    tda::check_prompt(dir.spec, batch, seq, input_ids, attention_mask);
    std::vector<float> defaults;
    if (!thresholds) {
      int32_t shortest = seq;
      for (int32_t b = 0; b < batch && batch > 0 && seq > 0; ++b) {
        int32_t n = 0;
        for (int32_t i = 0; i < seq; ++i) n += attention_mask[static_cast<int64_t>(b) * seq + i] != 0;
        shortest = std::min(shortest, n);
      }
      defaults = session->engine->dir.thresholds(std::nullopt, shortest > 0 ? std::optional<int64_t>(shortest) : std::nullopt);
      thresholds = defaults.data();
    }
    std::vector<float> bounds;  // explicit thresholds alone: no clamp
    if (density_bounds)
      bounds.assign(density_bounds, density_bounds + 2 * dir.spec.num_layers);
    else if (!defaults.empty() && dir.has_density_bounds)
      bounds = dir.density_bounds(std::nullopt);
    session->engine->exec->prefill(*session->state, batch, seq, input_ids, attention_mask, thresholds,
                                   bounds.empty() ? nullptr : bounds.data(), logits);
  });
}

tda_rt_status_t tda_rt_decode(tda_rt_session* session, const int64_t* tokens, float* logits) {
  return guarded([&] {
    TDA_RT_REQUIRE(session);
    TDA_RT_REQUIRE(tokens);
    TDA_RT_REQUIRE(logits);
    const auto& exec = *session->engine->exec;
    if (exec.batch(*session->state) == 0) throw tda::StateError("decode before prefill");
    tda::check_tokens(session->engine->dir.spec, exec.batch(*session->state), tokens);
    session->engine->exec->decode(*session->state, tokens, logits);
  });
}

tda_rt_status_t tda_rt_active_counts(const tda_rt_session* session, int32_t* counts) {
  return guarded([&] {
    TDA_RT_REQUIRE(session);
    TDA_RT_REQUIRE(counts);
    session->engine->exec->active_counts(*session->state, counts);
  });
}

int32_t tda_rt_session_batch(const tda_rt_session* session) {
  return session ? static_cast<int32_t>(session->engine->exec->batch(*session->state)) : 0;
}

tda_rt_status_t tda_rt_join(tda_rt_session* session, int32_t n, int32_t seq, const int32_t* slots,
                            const int64_t* input_ids, const int64_t* attention_mask, const float* thresholds,
                            const float* density_bounds, float* logits) {
  return guarded([&] {
    TDA_RT_REQUIRE(session);
    TDA_RT_REQUIRE(slots);
    TDA_RT_REQUIRE(input_ids);
    TDA_RT_REQUIRE(attention_mask);
    TDA_RT_REQUIRE(logits);
    const tda::EngineDir& dir = session->engine->dir;
    if (n < 1 || n > TDA_RT_MAX_SLOTS)
      throw tda::ArgumentError("tda_rt_join: n must be in 1.." + std::to_string(TDA_RT_MAX_SLOTS) + ", got " +
                               std::to_string(n));
    tda::check_prompt(dir.spec, n, seq, input_ids, attention_mask);
    const size_t L = static_cast<size_t>(dir.spec.num_layers);
    std::vector<float> defaults, bounds;
    if (!thresholds) {  // each row's default table at its own prompt length, with the default clamp
      for (int32_t b = 0; b < n; ++b) {
        int32_t len = 0;
        for (int32_t i = 0; i < seq; ++i) len += attention_mask[static_cast<int64_t>(b) * seq + i] != 0;
        auto t = dir.thresholds(std::nullopt, len > 0 ? std::optional<int64_t>(len) : std::nullopt);
        defaults.insert(defaults.end(), t.begin(), t.end());
        if (!density_bounds && dir.has_density_bounds) {
          auto d = dir.density_bounds(std::nullopt);
          bounds.insert(bounds.end(), d.begin(), d.end());
        }
      }
      thresholds = defaults.data();
    }
    if (density_bounds) bounds.assign(density_bounds, density_bounds + static_cast<size_t>(n) * L * 2);
    session->engine->exec->join(*session->state, n, seq, slots, input_ids, attention_mask, thresholds,
                                bounds.empty() ? nullptr : bounds.data(), logits);
  });
}

tda_rt_status_t tda_rt_step(tda_rt_session* session, int32_t n, const int32_t* slots, const int64_t* tokens,
                            float* logits) {
  return guarded([&] {
    TDA_RT_REQUIRE(session);
    TDA_RT_REQUIRE(slots);
    TDA_RT_REQUIRE(tokens);
    TDA_RT_REQUIRE(logits);
    if (n < 1 || n > TDA_RT_MAX_SLOTS)
      throw tda::ArgumentError("tda_rt_step: n must be in 1.." + std::to_string(TDA_RT_MAX_SLOTS) + ", got " +
                               std::to_string(n));
    tda::check_tokens(session->engine->dir.spec, n, tokens);
    session->engine->exec->step(*session->state, n, slots, tokens, logits);
  });
}

tda_rt_status_t tda_rt_release(tda_rt_session* session, int32_t slot) {
  return guarded([&] {
    TDA_RT_REQUIRE(session);
    session->engine->exec->release(*session->state, slot);
  });
}

tda_rt_status_t tda_rt_slot_active_counts(const tda_rt_session* session, int32_t slot, int32_t* counts) {
  return guarded([&] {
    TDA_RT_REQUIRE(session);
    TDA_RT_REQUIRE(counts);
    session->engine->exec->slot_active_counts(*session->state, slot, counts);
  });
}

double tda_rt_copy_bandwidth(int64_t bytes, int32_t repeats) {
  const size_t n = static_cast<size_t>(bytes > 0 ? bytes : TDA_RT_COPY_PROBE_BYTES);
  std::unique_ptr<char[]> a(new (std::nothrow) char[n]), b(new (std::nothrow) char[n]);
  if (!a || !b) return 0.0;
  std::memset(a.get(), 1, n);  // both written first: no page faults inside the timed copies
  std::memset(b.get(), 2, n);
  double best = 0.0;
  for (int32_t i = 0; i < (repeats > 0 ? repeats : TDA_RT_COPY_PROBE_REPEATS); ++i) {
    const auto t = std::chrono::steady_clock::now();
    std::memcpy(b.get(), a.get(), n);
#if defined(__GNUC__)
    asm volatile("" : : "r"(b.get()) : "memory");  // the copy is observable: never elided
#endif
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    if (s > 0) best = std::max(best, 2.0 * static_cast<double>(n) / s);  // read + write
  }
  return best;
}

}  // extern "C"
