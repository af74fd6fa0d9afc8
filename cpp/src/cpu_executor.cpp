#include "cpu_executor.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "blas.h"
#include "parallel.h"

#include "tda_kernels.h"

namespace tda {
namespace {

constexpr int kActivations = 4;  // contract.ACTIVATIONS order == tda_activation_t
const char* const kActivationNames[kActivations] = {"silu", "gelu_tanh", "gelu", "relu"};

std::string layer_name(int64_t n) { return "layers." + std::to_string(n); }

void check(tda_status_t st, const char* what) {
  if (st != TDA_OK) throw std::runtime_error(std::string(what) + ": " + tda_status_string(st));
}

// act(gate) * up in float32, as the SparseGatedMLP ONNX function computes it in T = float32.
inline float activate(int act, float g) {
  switch (act) {
    case TDA_ACT_SILU: return g / (1.0f + std::exp(-g));
    case TDA_ACT_GELU_TANH: {
      const float c = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g)));
    }
    case TDA_ACT_GELU: return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
    default: return g > 0.0f ? g : 0.0f;
  }
}

void* aligned_workspace(std::vector<unsigned char>& buf, size_t bytes) {
  if (buf.size() < bytes + 256) buf.resize(bytes + 256);
  auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<void*>((p + 255) & ~uintptr_t(255));
}

}  // namespace

// ---- weights ----------------------------------------------------------------------------------
Weights Weights::load(const EngineDir& dir) {
  const DecoderSpec& s = dir.spec;
  if (s.dtype != "float32")
    throw UnsupportedError(dir.directory + ": the CPU executor runs float32 engines; this one is " + s.dtype +
                           " (rebuild with --dtype fp32)");
  const std::string path = dir.directory + "/model.safetensors";
  Weights w;
  try {
    w.file = std::make_unique<SafetensorsFile>(path);
  } catch (const EngineError& e) {
    if (std::string(e.what()).find("cannot be opened") != std::string::npos)
      throw EngineError(path + ": missing; this engine predates model.safetensors (weights inside model.onnx), "
                               "rebuild it with this tda-export for the native backend");
    throw;
  }
  const SafetensorsFile& f = *w.file;
  const int64_t H = s.hidden, I = s.intermediate, V = s.vocab, hd = s.head_dim;
  const int64_t qd = s.heads * hd, kvd = s.kv_heads * hd;
  w.embed = f.f32("embed_tokens.weight", {V, H});
  w.lm_head = s.tied_embeddings ? w.embed : f.f32("lm_head.weight", {V, H});
  w.final_norm = f.f32("final_norm.weight", {H});
  int64_t bytes = V * H * 4 + H * 4;
  auto optional = [&](const std::string& name, int64_t n) -> const float* {
    if (!f.has(name)) return nullptr;
    bytes += n * 4;
    return f.f32(name, {n});
  };
  for (int64_t n = 0; n < s.num_layers; ++n) {
    const std::string L = layer_name(n), A = L + ".attn.";
    LayerWeights lw{};
    lw.wq = f.f32(A + "q_proj.weight_t", {H, qd});
    lw.wk = f.f32(A + "k_proj.weight_t", {H, kvd});
    lw.wv = f.f32(A + "v_proj.weight_t", {H, kvd});
    lw.wo = f.f32(A + "o_proj.weight_t", {qd, H});
    bytes += (H * qd + 2 * H * kvd + qd * H) * 4;
    lw.bq = optional(A + "q_proj.bias", qd);
    lw.bk = optional(A + "k_proj.bias", kvd);
    lw.bv = optional(A + "v_proj.bias", kvd);
    lw.bo = optional(A + "o_proj.bias", H);
    if (s.qk_norm) {
      lw.q_norm = f.f32(A + "q_norm.weight", {hd});
      lw.k_norm = f.f32(A + "k_norm.weight", {hd});
    }
    lw.input_norm = f.f32(L + ".input_norm.weight", {H});
    lw.post_attn_norm = f.f32(L + ".post_attn_norm.weight", {H});
    if (s.sandwich_norms) {
      lw.pre_ffn_norm = f.f32(L + ".pre_ffn_norm.weight", {H});
      lw.post_ffn_norm = f.f32(L + ".post_ffn_norm.weight", {H});
    }
    lw.gate_up = f.f32(L + ".mlp.gate_up_weight", {I, 2, H});
    lw.down_t = f.f32(L + ".mlp.down_weight_t", {I, H});
    bytes += 3 * I * H * 4;
    const std::string& rope = s.layers[static_cast<size_t>(n)].rope;
    lw.cos = f.f32("rope." + rope + ".cos", {s.max_context, hd / 2});
    lw.sin = f.f32("rope." + rope + ".sin", {s.max_context, hd / 2});
    lw.window = s.layers[static_cast<size_t>(n)].window.value_or(0);
    w.layers.push_back(lw);
  }
  w.decode_bytes = bytes;
  return w;
}

// ---- executor ---------------------------------------------------------------------------------
CpuExecutor::CpuExecutor(const EngineDir& dir, int threads) : spec_(dir.spec), w_(Weights::load(dir)) {
  act_ = -1;
  for (int a = 0; a < kActivations; ++a)
    if (spec_.activation == kActivationNames[a]) act_ = a;
  if (act_ < 0) throw UnsupportedError(dir.directory + ": activation '" + spec_.activation + "' unknown");
  if (spec_.hidden % TDA_SIZE_MULTIPLE || spec_.intermediate % TDA_SIZE_MULTIPLE)
    throw UnsupportedError(dir.directory + ": hidden and intermediate sizes must be multiples of 8");
  dense_above_ = kDenseAbove;
  if (const char* env = std::getenv("TDA_NATIVE_DENSE_ABOVE")) {
    char* end = nullptr;
    double v = std::strtod(env, &end);
    if (!*env || *end || !(v >= 0.0 && v <= 1.0))
      throw ArgumentError(std::string("TDA_NATIVE_DENSE_ABOVE=") + env + ": expected a share in [0, 1]");
    dense_above_ = v;
  }
  int64_t slice_bytes = par::kSliceBytes;
  if (const char* env = std::getenv("TDA_NATIVE_SLICE_BYTES")) {  // tests: 1 forks every call
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (!*env || *end || v < 1)
      throw ArgumentError(std::string("TDA_NATIVE_SLICE_BYTES=") + env + ": expected a positive byte count");
    slice_bytes = v;
  }
  pool_ = par::Pool(threads, slice_bytes);
}

CpuExecutor::~CpuExecutor() = default;

void CpuExecutor::rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t dim) const {
  const float eps = static_cast<float>(spec_.rms_eps);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    float ss = 0.0f;
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] * inv) * w[i];
  }
}

void CpuExecutor::ensure_capacity(Session& s, int64_t needed) {
  if (needed > spec_.max_context)
    throw StateError("sequence of " + std::to_string(needed) + " tokens exceeds the engine's context of " +
                     std::to_string(spec_.max_context));
  if (needed <= s.cap) return;
  const int64_t cap = std::min(spec_.max_context, std::max({needed, 2 * s.cap, int64_t(64)}));
  const int64_t B = s.batch, kvh = spec_.kv_heads, hd = spec_.head_dim;
  auto regrow = [&](std::vector<float>& buf) {
    std::vector<float> out(static_cast<size_t>(B * kvh * cap * hd));
    for (int64_t r = 0; r < B * kvh && s.cap > 0; ++r)
      std::memcpy(&out[static_cast<size_t>(r * cap * hd)], &buf[static_cast<size_t>(r * s.cap * hd)],
                  static_cast<size_t>(s.len * hd) * sizeof(float));
    buf.swap(out);
  };
  s.k.resize(static_cast<size_t>(spec_.num_layers));
  s.v.resize(static_cast<size_t>(spec_.num_layers));
  for (auto& b : s.k) regrow(b);
  for (auto& b : s.v) regrow(b);
  std::vector<uint8_t> pad(static_cast<size_t>(B * cap), 0);
  for (int64_t b = 0; b < B && s.cap > 0; ++b)
    std::memcpy(&pad[static_cast<size_t>(b * cap)], &s.pad[static_cast<size_t>(b * s.cap)], static_cast<size_t>(s.len));
  s.pad.swap(pad);
  s.cap = cap;
}

void CpuExecutor::attention(Session& s, int64_t n, int64_t S, const float* xn, const int64_t* positions,
                            float* out) {
  const DecoderSpec& sp = spec_;
  const LayerWeights& lw = w_.layers[static_cast<size_t>(n)];
  const int64_t B = s.batch, M = B * S, H = sp.hidden, hd = sp.head_dim, half = hd / 2;
  const int64_t qd = sp.heads * hd, kvd = sp.kv_heads * hd, group = sp.heads / sp.kv_heads;
  const int64_t start = s.len, T = start + S;
  Scratch& t = s.tmp;
  float *q = t.q.data(), *k = t.k.data(), *v = t.v.data(), *y = t.y.data();
  pool_.linear(M, {{xn, lw.wq, lw.bq, q, H, qd, true}, {xn, lw.wk, lw.bk, k, H, kvd, true},
                  {xn, lw.wv, lw.bv, v, H, kvd, true}});
  if (sp.qk_norm) {
    rms_norm(q, lw.q_norm, q, M * sp.heads, hd);
    rms_norm(k, lw.k_norm, k, M * sp.kv_heads, hd);
  }
  auto rotate = [&](float* x, int64_t heads, int64_t pos) {
    const float* c = lw.cos + pos * half;
    const float* sn = lw.sin + pos * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* xh = x + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = xh[i], x2 = xh[i + half];
        xh[i] = x1 * c[i] - x2 * sn[i];
        xh[i + half] = x2 * c[i] + x1 * sn[i];
      }
    }
  };
  for (int64_t m = 0; m < M; ++m) {
    rotate(q + m * qd, sp.heads, positions[m]);
    rotate(k + m * kvd, sp.kv_heads, positions[m]);
  }
  // cache slot start + t for token t of every row
  float* kc = s.k[static_cast<size_t>(n)].data();
  float* vc = s.v[static_cast<size_t>(n)].data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t h = 0; h < sp.kv_heads; ++h) {
        const size_t dst = static_cast<size_t>(((b * sp.kv_heads + h) * s.cap + start + i) * hd);
        std::memcpy(kc + dst, k + (b * S + i) * kvd + h * hd, static_cast<size_t>(hd) * sizeof(float));
        std::memcpy(vc + dst, v + (b * S + i) * kvd + h * hd, static_cast<size_t>(hd) * sizeof(float));
      }
  const float scale = static_cast<float>(sp.attn_scale);
  const float cap = sp.attn_softcap ? static_cast<float>(*sp.attn_softcap) : 0.0f;
  const int64_t window = lw.window;
  // One (sequence, head) pair per work item, each thread on its own scores buffer; the work is the
  // K and V bytes every query row reads.
  const int64_t pairs = B * sp.heads;
  const int nt = static_cast<int>(std::min<int64_t>(pool_.threads_for(pairs * S * T * hd * 8), pairs));
  t.att.resize(static_cast<size_t>(nt * S * T));
  par::fork(nt, [&](int tid, int nth) {
    float* sc = t.att.data() + tid * S * T;
    for (int64_t p = pairs * tid / nth; p < pairs * (tid + 1) / nth; ++p) {
      const int64_t b = p / sp.heads, h = p % sp.heads;
      const uint8_t* pad = s.pad.data() + b * s.cap;
      const int64_t g = h / group;
      const float* K = kc + (b * sp.kv_heads + g) * s.cap * hd;
      const float* Vv = vc + (b * sp.kv_heads + g) * s.cap * hd;
      const float* Q = q + b * S * qd + h * hd;
      float* Y = y + b * S * qd + h * hd;
      // scores[i, j] = scale * q_i . k_j
      if (S == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, T, hd, scale, K, hd, Q, 1, 0.0f, sc, 1);
      else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, S, T, hd, scale, Q, qd, K, hd, 0.0f, sc, T);
      for (int64_t i = 0; i < S; ++i) {
        float* row = sc + i * T;
        const int64_t qslot = start + i;
        float mx = -std::numeric_limits<float>::infinity();
        bool any = false;
        for (int64_t j = 0; j < T; ++j) {
          const bool allowed = j <= qslot && pad[j] && (window == 0 || qslot - j < window);
          if (!allowed) {
            row[j] = -std::numeric_limits<float>::infinity();
            continue;
          }
          if (cap > 0.0f) row[j] = cap * std::tanh(row[j] / cap);
          mx = std::max(mx, row[j]);
          any = true;
        }
        if (!any) {  // a padding query: nothing to attend to, and nothing real reads its output
          std::fill(row, row + T, 0.0f);
          continue;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < T; ++j) {
          row[j] = std::isinf(row[j]) && row[j] < 0 ? 0.0f : std::exp(row[j] - mx);
          sum += row[j];
        }
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < T; ++j) row[j] *= inv;
      }
      // out_i = sum_j p_ij v_j
      if (S == 1)
        cblas_sgemv(CblasRowMajor, CblasTrans, T, hd, 1.0f, Vv, hd, sc, 1, 0.0f, Y, 1);
      else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, S, hd, T, 1.0f, sc, T, Vv, hd, 0.0f, Y, qd);
    }
  });
  pool_.linear(M, {{y, lw.wo, lw.bo, out, qd, H, true}});
}

void CpuExecutor::choose_decode_path(Session& s, int64_t n) const {
  const size_t ln = static_cast<size_t>(n);
  const int64_t B = s.batch, I = spec_.intermediate;
  std::vector<uint8_t> any(static_cast<size_t>(I), 0);
  bool all_full = true;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t c = s.count[ln][static_cast<size_t>(b)];
    all_full = all_full && c == I;
    for (int32_t k = 0; k < c; ++k) any[static_cast<size_t>(s.idx[ln][static_cast<size_t>(b * I + k)])] = 1;
  }
  const double share = static_cast<double>(std::count(any.begin(), any.end(), 1)) / static_cast<double>(I);
  s.dense[ln] = share > dense_above_;
  s.keep[ln].clear();
  if (s.dense[ln] && !all_full) {
    s.keep[ln].assign(static_cast<size_t>(B * I), 0.0f);
    for (int64_t b = 0; b < B; ++b)
      for (int32_t k = 0; k < s.count[ln][static_cast<size_t>(b)]; ++k)
        s.keep[ln][static_cast<size_t>(b * I + s.idx[ln][static_cast<size_t>(b * I + k)])] = 1.0f;
  }
}

void CpuExecutor::mlp(Session& s, int64_t n, int64_t S, const float* xn, const float* token_valid,
                      const float* thresholds, float* out) {
  const LayerWeights& lw = w_.layers[static_cast<size_t>(n)];
  const int64_t B = s.batch, M = B * S, H = spec_.hidden, I = spec_.intermediate;
  Scratch& t = s.tmp;
  const size_t ln = static_cast<size_t>(n);
  // gate_up and act(gate) * up in one pass: each thread owns a slice of neurons (its gate/up rows
  // are adjacent, [I, 2, H]), and applies `keep` (the sequences' masks) when given.
  auto dense_z = [&](const float* keep) {
    float *gu = t.gu.data(), *z = t.z.data();
    const par::Linear job{xn, lw.gate_up, nullptr, gu, H, 2 * I, false};
    const int act = act_;
    par::fork(pool_.threads_for(2 * I * H * 4), [&](int tid, int nth) {
      int64_t c0, c1;  // even: slices are whole 16-column blocks
      par::slice(2 * I, tid, nth, &c0, &c1);
      par::linear_slice(M, job, c0, c1);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = c0 / 2; j < c1 / 2; ++j) {
          const float v = activate(act, gu[m * 2 * I + 2 * j]) * gu[m * 2 * I + 2 * j + 1];
          z[m * I + j] = keep ? v * keep[m * I + j] : v;
        }
    });
  };
  auto down = [&]() { pool_.linear(M, {{t.z.data(), lw.down_t, nullptr, out, I, H, true}}); };
  if (S > 1) {
    dense_z(nullptr);
    tda_prefill_scores_args_t pa{TDA_F32, TDA_SCORE_NORM_TOKEN_L2, static_cast<int32_t>(B), static_cast<int32_t>(S),
                                 static_cast<int32_t>(I), t.z.data(), token_valid, t.scores.data(), t.scores.data()};
    std::fill(t.scores.begin(), t.scores.end(), 0.0f);
    size_t ws = tda_prefill_scores_workspace_size(&pa);
    check(tda_prefill_scores(&pa, aligned_workspace(s.workspace, ws), ws, nullptr), "tda_prefill_scores");
    tda_select_args_t sa{static_cast<int32_t>(B), static_cast<int32_t>(I), t.scores.data(), thresholds + n,
                         s.idx[ln].data(), s.count[ln].data(),
                         s.density_bounds.empty() ? nullptr : s.density_bounds.data() + 2 * n};
    ws = tda_select_active_workspace_size(&sa);
    check(tda_select_active(&sa, aligned_workspace(s.workspace, ws), ws, nullptr), "tda_select_active");
    choose_decode_path(s, n);
    down();
    return;
  }
  if (s.dense[ln]) {  // the same sum as the sparse kernel, through BLAS
    dense_z(s.keep[ln].empty() ? nullptr : s.keep[ln].data());
    down();
    return;
  }
  tda_decode_args_t da{TDA_F32, static_cast<tda_activation_t>(act_), static_cast<int32_t>(B), static_cast<int32_t>(H),
                       static_cast<int32_t>(I), 1, xn, lw.gate_up, lw.down_t, s.idx[ln].data(), s.count[ln].data(), out,
                       /*version=*/0, /*weight_format=*/TDA_WEIGHTS_DTYPE};  // 0: the library's default algorithm
  size_t ws = tda_sparse_gated_mlp_decode_workspace_size(&da);
  check(tda_sparse_gated_mlp_decode(&da, aligned_workspace(s.workspace, ws), ws, nullptr),
        "tda_sparse_gated_mlp_decode");
}

void CpuExecutor::forward(Session& s, int64_t S, const int64_t* ids, const int64_t* positions,
                          const float* token_valid, const float* thresholds, float* logits) {
  const DecoderSpec& sp = spec_;
  const int64_t B = s.batch, M = B * S, H = sp.hidden, I = sp.intermediate, V = sp.vocab;
  Scratch& t = s.tmp;
  omp_set_num_threads(pool_.threads_now());  // our kernels fork up to this many (OpenMP: the same pool)
  auto size = [](std::vector<float>& b, int64_t n) { if (b.size() < static_cast<size_t>(n)) b.resize(static_cast<size_t>(n)); };
  size(t.x, M * H); size(t.xn, M * H); size(t.h, M * H);
  size(t.q, M * sp.heads * sp.head_dim); size(t.y, M * sp.heads * sp.head_dim);
  size(t.k, M * sp.kv_heads * sp.head_dim); size(t.v, M * sp.kv_heads * sp.head_dim);
  size(t.gu, M * 2 * I); size(t.z, M * I); size(t.scores, B * I); size(t.last, B * H);
  float *x = t.x.data(), *xn = t.xn.data(), *h = t.h.data();
  const float escale = sp.embed_scale ? static_cast<float>(*sp.embed_scale) : 1.0f;
  for (int64_t m = 0; m < M; ++m) {
    const float* e = w_.embed + ids[m] * H;
    for (int64_t i = 0; i < H; ++i) x[m * H + i] = sp.embed_scale ? e[i] * escale : e[i];
  }
  for (int64_t n = 0; n < sp.num_layers; ++n) {
    const LayerWeights& lw = w_.layers[static_cast<size_t>(n)];
    rms_norm(x, lw.input_norm, xn, M, H);
    attention(s, n, S, xn, positions, h);
    if (sp.sandwich_norms) {
      rms_norm(h, lw.post_attn_norm, h, M, H);
      for (int64_t i = 0; i < M * H; ++i) x[i] += h[i];
      rms_norm(x, lw.pre_ffn_norm, xn, M, H);
      mlp(s, n, S, xn, token_valid, thresholds, h);
      rms_norm(h, lw.post_ffn_norm, h, M, H);
    } else {
      for (int64_t i = 0; i < M * H; ++i) x[i] += h[i];
      rms_norm(x, lw.post_attn_norm, xn, M, H);
      mlp(s, n, S, xn, token_valid, thresholds, h);
    }
    for (int64_t i = 0; i < M * H; ++i) x[i] += h[i];
  }
  s.len += S;
  float* last = t.last.data();
  for (int64_t b = 0; b < B; ++b) rms_norm(x + (b * S + S - 1) * H, w_.final_norm, last + b * H, 1, H);
  pool_.linear(B, {{last, w_.lm_head, nullptr, logits, H, V, false}});
  if (sp.final_softcap) {
    const float cap = static_cast<float>(*sp.final_softcap);
    for (int64_t i = 0; i < B * V; ++i) logits[i] = std::tanh(logits[i] / cap) * cap;
  }
}

void CpuExecutor::prefill(Session& s, int64_t batch, int64_t seq, const int64_t* ids, const int64_t* mask,
                          const float* thresholds, float* logits) {
  if (batch < 1 || batch > TDA_MAX_BATCH)
    throw ArgumentError("batch must be in 1.." + std::to_string(TDA_MAX_BATCH) + ", got " + std::to_string(batch));
  // seq, ids and mask: check_prompt (executor.h), which the C API runs before any executor
  s.prefilled = false;
  s.batch = batch;
  s.len = 0;
  s.cap = 0;
  s.k.clear();
  s.v.clear();
  s.pad.clear();
  ensure_capacity(s, seq);
  const int64_t L = spec_.num_layers, I = spec_.intermediate;
  s.idx.assign(static_cast<size_t>(L), std::vector<int32_t>(static_cast<size_t>(batch * I)));
  s.count.assign(static_cast<size_t>(L), std::vector<int32_t>(static_cast<size_t>(batch)));
  s.dense.assign(static_cast<size_t>(L), true);
  s.keep.assign(static_cast<size_t>(L), {});
  s.next_pos.assign(static_cast<size_t>(batch), 0);
  s.tmp.positions.resize(static_cast<size_t>(batch * seq));
  s.tmp.token_valid.resize(static_cast<size_t>(batch * seq));
  for (int64_t b = 0; b < batch; ++b) {
    int64_t c = 0;
    for (int64_t i = 0; i < seq; ++i) {
      const int64_t m = mask[b * seq + i];
      c += m;
      s.tmp.positions[static_cast<size_t>(b * seq + i)] = std::max<int64_t>(c - 1, 0);
      s.tmp.token_valid[static_cast<size_t>(b * seq + i)] = static_cast<float>(m);
      s.pad[static_cast<size_t>(b * s.cap + i)] = static_cast<uint8_t>(m);
    }
    s.next_pos[static_cast<size_t>(b)] = c;
  }
  forward(s, seq, ids, s.tmp.positions.data(), s.tmp.token_valid.data(), thresholds, logits);
  s.prefilled = true;
}

void CpuExecutor::decode(Session& s, const int64_t* tokens, float* logits) {
  if (!s.prefilled) throw StateError("decode before prefill");  // tokens: check_tokens, run by the C API
  ensure_capacity(s, s.len + 1);
  s.tmp.positions.resize(static_cast<size_t>(s.batch));
  for (int64_t b = 0; b < s.batch; ++b) {
    s.tmp.positions[static_cast<size_t>(b)] = s.next_pos[static_cast<size_t>(b)]++;
    s.pad[static_cast<size_t>(b * s.cap + s.len)] = 1;
  }
  s.prefilled = false;  // until this step has succeeded: positions moved on, half a step is no usable state
  par::Step step(pool_, s.batch);  // on the governor's thread count (parallel.h), timed
  forward(s, 1, tokens, s.tmp.positions.data(), nullptr, nullptr, logits);
  step.done();
  s.prefilled = true;
}

}  // namespace tda
