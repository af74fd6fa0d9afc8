// One interface for the executors that run an engine directory: the CPU executor (cpu_executor.h,
// model.safetensors through OpenBLAS and our CPU kernels) and the TensorRT executor
// (trt_executor.h, model.plan). The C API (c_api.cpp) and everything above it (tda-run's generation
// loop, the Python binding) see only this, so prefill, decode and generation are the same for both.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "engine_dir.h"

namespace tda {

// A call out of order: decode before prefill, the context full (C API TDA_RT_ERR_STATE).
struct StateError : std::runtime_error { using std::runtime_error::runtime_error; };

// One batch's state (KV cache, padding mask, TDA state), owned by a session and made by the
// executor that runs it: each executor knows its own concrete type.
struct ExecutorState {
  virtual ~ExecutorState() = default;
};

class Executor {
 public:
  virtual ~Executor() = default;
  virtual const char* name() const = 0;  // "cpu", "tensorrt"
  // Bytes of weights one decode step streams at density 1 (tda_rt_engine_info.weight_bytes).
  virtual int64_t decode_bytes() const = 0;
  // Of those, the MLP's (gate_up + down, all layers; tda_rt_engine_info.mlp_weight_bytes); -1: unknown.
  virtual int64_t decode_mlp_bytes() const { return -1; }
  virtual std::unique_ptr<ExecutorState> new_state() const = 0;
  // ids/mask [batch, seq] (left padded, checked by check_prompt), thresholds [num_layers],
  // density_bounds [num_layers, 2] SelectActive's clamp (nullptr: none, select by thresholds alone);
  // logits [batch, vocab] of the last position. A new prefill starts the state afresh.
  virtual void prefill(ExecutorState& s, int64_t batch, int64_t seq, const int64_t* ids, const int64_t* mask,
                       const float* thresholds, const float* density_bounds, float* logits) = 0;
  // tokens [batch of the last prefill] -> logits [batch, vocab]; StateError before a prefill.
  virtual void decode(ExecutorState& s, const int64_t* tokens, float* logits) = 0;
  // counts [num_layers, batch]: active MLP neurons per layer and sequence after the last prefill.
  virtual void active_counts(const ExecutorState& s, int32_t* counts) const = 0;
  virtual int64_t batch(const ExecutorState& s) const = 0;  // 0 before the first prefill

  // Continuous batching: the state as slots (0..TDA_RT_MAX_SLOTS-1), each one sequence with its own
  // length, positions, thresholds and active neurons. join prefills n newcomers (ids/mask [n, seq],
  // left padded, checked by check_prompt; thresholds [n, num_layers]; density_bounds [n, num_layers, 2]
  // or nullptr) into free slots; step decodes one token for each named (joined) slot; release frees one.
  // UnsupportedError from executors without them (the TensorRT executor: its plan's KV bindings are one
  // batch of one length).
  virtual void join(ExecutorState&, int64_t, int64_t, const int32_t*, const int64_t*, const int64_t*, const float*,
                    const float*, float*) {
    throw UnsupportedError(std::string(name()) + " executor: no continuous batching (join/step/release)");
  }
  virtual void step(ExecutorState&, int64_t, const int32_t*, const int64_t*, float*) {
    throw UnsupportedError(std::string(name()) + " executor: no continuous batching (join/step/release)");
  }
  virtual void release(ExecutorState&, int32_t) {
    throw UnsupportedError(std::string(name()) + " executor: no continuous batching (join/step/release)");
  }
  // counts [num_layers]: the active MLP neurons of a joined slot.
  virtual void slot_active_counts(const ExecutorState&, int32_t, int32_t*) const {
    throw UnsupportedError(std::string(name()) + " executor: no continuous batching (join/step/release)");
  }
};

// The input rules every executor shares, checked before any executor runs (the C API calls them):
// batch >= 1, seq >= 2, ids inside the vocabulary, mask entries 0 or 1. Each executor adds its own
// upper bounds (the CPU kernels' TDA_MAX_BATCH, a plan's profiles).
void check_prompt(const DecoderSpec& spec, int64_t batch, int64_t seq, const int64_t* ids, const int64_t* mask);
void check_tokens(const DecoderSpec& spec, int64_t batch, const int64_t* tokens);

struct ExecutorOptions {
  std::string kind = "auto";     // "auto" | "cpu" | "tensorrt"
  int threads = 0;               // CPU executor; <= 0: all cores
  std::string tensorrt_library;  // TensorRT executor; empty: the flavour's soname on the loader path
  std::string plugin_library;    // TensorRT executor; empty: see trt_executor.h
  int device = 0;                // TensorRT executor: CUDA device ordinal
};

// ArgumentError unless kind is "auto" (or empty), "cpu" or "tensorrt".
void check_executor_kind(const std::string& kind);
// "auto" is "tensorrt" when the manifest has a "tensorrt" section (a model.plan), else "cpu".
std::string resolve_executor_kind(const EngineDir& dir, const std::string& requested);
// The executor for `dir`; UnsupportedError naming what is missing (e.g. a build without TensorRT).
std::unique_ptr<Executor> make_executor(const EngineDir& dir, const ExecutorOptions& options);
// Whether this build has the TensorRT executor, and the TensorRT flavour its headers are ("" if none).
bool have_tensorrt_executor();
const char* tensorrt_executor_flavour();

}  // namespace tda
