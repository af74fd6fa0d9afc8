// The exported decoder on a CPU: the network model.onnx defines (export/decoder.py), with dense
// GEMMs from OpenBLAS and the TDA MLP from our C ABI kernels (cuda/include/tda_kernels.h, CPU build).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include "engine_dir.h"
#include "executor.h"
#include "parallel.h"

namespace tda {

// Linear weights are par::WeightRef: float32 (as before), or block-quantized per the manifest's
// weight_formats (docs: quant engine layout), then stored as GGUF rows [out, in/32 blocks].
struct LayerWeights {
  par::WeightRef wq, wk, wv, wo;           // float: [in, out] (stored transposed); blocks: [out, in/32]
  const float *bq, *bk, *bv, *bo;          // nullptr where the model has none
  const float *q_norm, *k_norm;            // [head_dim] (qk_norm)
  const float *input_norm, *post_attn_norm, *pre_ffn_norm, *post_ffn_norm;
  par::WeightRef gate_up;                  // [I, 2, H] (blocks: [I, 2, H/32])
  par::WeightRef down_t;                   // [I, H] (blocks: [I, H/32], blocks along H)
  const float *cos, *sin;                  // [max_context, head_dim/2]
  int64_t window;                          // 0: global
};

struct Weights {
  std::unique_ptr<SafetensorsFile> file;
  par::WeightRef embed;   // [V, H] (blocks: [V, H/32]; a token's row is dequantized on lookup)
  par::WeightRef lm_head; // [V, H] (tied: the embedding's)
  int32_t mlp_format = 0;       // tda_weight_format_t of gate_up (every layer)
  int32_t mlp_down_format = 0;  // of down_t: mlp_format, or a block format of its own under block gate_up
  int32_t x_format = 0;         // tda_x_format_t: the manifest's x_format (gate/up and every block linear but down)
  const float* final_norm;
  std::vector<LayerWeights> layers;
  int64_t decode_bytes = 0;  // weight bytes one dense decode step reads
  int64_t mlp_bytes = 0;     // of those, gate_up + down_t (all layers)
  static Weights load(const EngineDir& dir);
};

// One session: a KV cache of slots, each a sequence with its own length and positions (continuous
// batching: tda_rt_join prefills newcomers into free slots, tda_rt_step decodes any set of them,
// tda_rt_release frees one). A prefill's rows are left padded, so a slot's cache may start with
// padding (pad = 0); rotary positions skip it. tda_rt_prefill/decode are the same calls on slots
// 0..batch-1 of a fresh session.
struct Scratch {  // per-call buffers, kept so decode steps allocate nothing
  std::vector<float> x, xn, q, k, v, y, h, gu, z, scores, att, last, token_valid;
  std::vector<int64_t> positions;
};

struct Session : ExecutorState {
  int64_t slots = 0, cap = 0;              // slots / positions per slot allocated
  int64_t static_batch = 0;                // the last tda_rt_prefill's batch (its slots 0..batch-1); 0: none
  std::vector<std::vector<float>> k, v;    // per layer [slots, kvh, cap, hd]
  std::vector<uint8_t> pad;                // [slots, cap] 1 = real token
  std::vector<int64_t> len, next_pos;      // [slots] positions filled (padding included), next rotary position
  std::vector<uint8_t> used;               // [slots]
  std::vector<std::vector<int32_t>> slot_idx;   // per layer [slots, I]: each slot's active neurons
  std::vector<std::vector<int32_t>> slot_count; // per layer [slots]
  // The running call: its rows are the slots `rows`; the MLP state below is per row.
  int64_t batch = 0;
  std::vector<int64_t> rows, loaded;       // loaded: the rows whose decode state idx/count/dense/keep hold
  std::vector<float> thresholds;           // [batch, L] of the running prefill
  std::vector<float> density_bounds;       // [batch, L, 2] SelectActive clamp of the running prefill; empty = none
  std::vector<std::vector<int32_t>> idx;   // per layer [batch, I]
  std::vector<std::vector<int32_t>> count; // per layer [batch]
  // per layer: decode through BLAS (active share above dense_above) instead of the sparse kernel,
  // with each sequence's inactive neurons zeroed by keep[layer] [B, I] (empty when all are active)
  std::vector<bool> dense;
  std::vector<std::vector<float>> keep;
  Scratch tmp;
  std::vector<unsigned char> workspace;
};

class CpuExecutor : public Executor {
 public:
  CpuExecutor(const EngineDir& dir, int threads);
  ~CpuExecutor();
  const DecoderSpec& spec() const { return spec_; }
  // Above this share of neurons active in a layer (union over the batch) decode runs the MLP densely
  // through BLAS with the inactive neurons zeroed (the same sum): the sparse kernel streams its rows
  // slower than OpenBLAS's GEMV, so past the break-even share it would be slower than dense.
  // bench/RESULTS.md (quiet window, session 2) measured it; TDA_NATIVE_DENSE_ABOVE overrides it.
  static constexpr double kDenseAbove = 0.8;
  int64_t decode_bytes() const override { return w_.decode_bytes; }
  int64_t decode_mlp_bytes() const override { return w_.mlp_bytes; }
  // Executor: the state is a Session.
  const char* name() const override { return "cpu"; }
  std::unique_ptr<ExecutorState> new_state() const override { return std::make_unique<Session>(); }
  void prefill(ExecutorState& state, int64_t batch, int64_t seq, const int64_t* ids, const int64_t* mask,
               const float* thresholds, const float* density_bounds, float* logits) override;
  void decode(ExecutorState& s, const int64_t* tokens, float* logits) override;
  void active_counts(const ExecutorState& state, int32_t* counts) const override;
  int64_t batch(const ExecutorState& s) const override { return static_cast<const Session&>(s).static_batch; }
  void join(ExecutorState& state, int64_t n, int64_t seq, const int32_t* slots, const int64_t* ids,
            const int64_t* mask, const float* thresholds, const float* density_bounds, float* logits) override;
  void step(ExecutorState& state, int64_t n, const int32_t* slots, const int64_t* tokens, float* logits) override;
  void release(ExecutorState& state, int32_t slot) override;
  void slot_active_counts(const ExecutorState& state, int32_t slot, int32_t* counts) const override;

 private:
  void forward(Session& s, int64_t S, const int64_t* ids, const int64_t* positions, const float* token_valid,
               const float* thresholds, float* logits);
  void attention(Session& s, int64_t n, int64_t S, const float* xn, const int64_t* positions, float* out);
  void mlp(Session& s, int64_t n, int64_t S, const float* xn, const float* token_valid, const float* thresholds,
           float* out);
  void block_down(int64_t M, const float* z, const par::WeightRef& w, float* out) const;
  void ensure_capacity(Session& s, int64_t slots, int64_t needed);
  void check_slots(const Session& s, int64_t n, const int32_t* slots, bool want_used, const char* what) const;
  void load_decode_rows(Session& s, int64_t n, const int32_t* slots);
  void choose_decode_path(Session& s, int64_t n) const;
  void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t dim) const;

  DecoderSpec spec_;
  Weights w_;
  int act_;
  double dense_above_;
  par::Pool pool_;
};

}  // namespace tda
