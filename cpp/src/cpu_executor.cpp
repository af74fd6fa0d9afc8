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
  int64_t bytes = 0;
  // contract x_format: how gate/up and the other block linears (never down_t) read their input.
  w.x_format = dir.x_format == "q8_0" ? TDA_X_Q8_0 : TDA_X_DTYPE;
  auto with_x = [&](par::WeightRef r) {
    if (r.quantized()) r.x_format = w.x_format;
    return r;
  };
  // Formats come from the manifest's weight_formats (never from shapes): float32, or a block format.
  auto format_of = [&](const std::string& name) -> int32_t {
    const std::string fmt = dir.weight_format(name);
    if (fmt == "float32") return TDA_WEIGHTS_DTYPE;
    if (fmt == "q8_0") return TDA_WEIGHTS_Q8_0;
    if (fmt == "q4_0") return TDA_WEIGHTS_Q4_0;
    if (fmt == "q4_1") return TDA_WEIGHTS_Q4_1;
    throw UnsupportedError(path + ": tensor '" + name + "' has weight format '" + fmt +
                           "'; the CPU executor runs float32, q8_0, q4_0 and q4_1");
  };
  // Bytes per row of `in` weights in block format `fmt`; `in` must be whole blocks.
  auto row_bytes = [&](const std::string& name, int32_t fmt, int64_t in) {
    if (in % TDA_QUANT_BLOCK)
      throw EngineError(path + ": tensor '" + name + "' is block-quantized but its rows of " + std::to_string(in) +
                        " weights are not whole blocks of " + std::to_string(TDA_QUANT_BLOCK));
    return in / TDA_QUANT_BLOCK * static_cast<int64_t>(tda_block_bytes(fmt));
  };
  // A linear layer `prefix`: float `{prefix}.weight_t` [in, out], or `{prefix}.weight_blocks`
  // [out, in/32 blocks] where weight_formats lists it.
  auto linear = [&](const std::string& prefix, int64_t in, int64_t out) -> par::WeightRef {
    const std::string bname = prefix + ".weight_blocks";
    if (dir.weight_formats.count(bname)) {
      const int32_t fmt = format_of(bname);
      if (fmt == TDA_WEIGHTS_DTYPE)
        throw EngineError(path + ": tensor '" + bname + "' is listed as float32 in weight_formats; block tensors "
                                 "need a block format");
      const int64_t rb = row_bytes(bname, fmt, in);
      bytes += out * rb;
      return with_x(par::WeightRef(f.u8(bname, {out, rb}), fmt));
    }
    const std::string name = prefix + ".weight_t";
    format_of(name);  // a float tensor listed with another format is refused by name
    if (dir.weight_format(name) != "float32")
      throw UnsupportedError(path + ": tensor '" + name + "' is " + dir.weight_format(name) + ", expected float32");
    bytes += in * out * 4;
    return f.f32(name, {in, out});
  };
  // A [rows, H] matrix stored row-major as float `{name}` or blocks `{name}_blocks` (embedding, lm_head).
  auto rows_of = [&](const std::string& name, int64_t rows) -> par::WeightRef {
    const std::string bname = name + "_blocks";
    if (dir.weight_formats.count(bname)) {
      const int32_t fmt = format_of(bname);
      if (fmt == TDA_WEIGHTS_DTYPE)
        throw EngineError(path + ": tensor '" + bname + "' is listed as float32 in weight_formats");
      const int64_t rb = row_bytes(bname, fmt, H);
      return par::WeightRef(f.u8(bname, {rows, rb}), fmt);
    }
    if (format_of(name) != TDA_WEIGHTS_DTYPE)
      throw EngineError(path + ": tensor '" + name + "' is listed with a block format but is not a _blocks tensor");
    return f.f32(name, {rows, H});
  };
  w.embed = rows_of("embed_tokens.weight", V);
  w.lm_head = with_x(s.tied_embeddings ? w.embed : rows_of("lm_head.weight", V));
  bytes += w.lm_head.bytes(V, H);
  w.final_norm = f.f32("final_norm.weight", {H});
  bytes += H * 4;
  auto optional = [&](const std::string& name, int64_t n) -> const float* {
    if (!f.has(name)) return nullptr;
    bytes += n * 4;
    return f.f32(name, {n});
  };
  for (int64_t n = 0; n < s.num_layers; ++n) {
    const std::string L = layer_name(n), A = L + ".attn.";
    LayerWeights lw{};
    lw.wq = linear(A + "q_proj", H, qd);
    lw.wk = linear(A + "k_proj", H, kvd);
    lw.wv = linear(A + "v_proj", H, kvd);
    lw.wo = linear(A + "o_proj", qd, H);
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
    // The MLP: gate_up in one format, down_t in its own (contract down_weight_format: q8_0 rows under 4-bit
    // gate/up rows), both float32 or both blocks; every layer the same pair.
    const std::string gname = L + ".mlp.gate_up_weight", dname = L + ".mlp.down_weight_t";
    const int32_t mf = format_of(gname), df = format_of(dname);
    if ((mf == TDA_WEIGHTS_DTYPE) != (df == TDA_WEIGHTS_DTYPE))
      throw UnsupportedError(path + ": '" + gname + "' is " + dir.weight_format(gname) + " but '" + dname + "' is " +
                             dir.weight_format(dname) + "; the MLP kernels take float32 or blocks for both");
    if (n > 0 && (mf != w.mlp_format || df != w.mlp_down_format))
      throw UnsupportedError(path + ": layer " + std::to_string(n) + "'s MLP is " + dir.weight_format(gname) + "/" +
                             dir.weight_format(dname) + ", layer 0's is another pair of formats; the CPU executor "
                             "runs one MLP format pair per engine");
    w.mlp_format = mf;
    w.mlp_down_format = df;
    if (w.x_format != TDA_X_DTYPE && mf == TDA_WEIGHTS_DTYPE)
      throw EngineError(path + ": manifest x_format is '" + dir.x_format + "' but '" + gname +
                        "' is float32; x_format q8_0 needs block-format MLP weights");
    if (mf == TDA_WEIGHTS_DTYPE) {
      lw.gate_up = f.f32(gname, {I, 2, H});
      lw.down_t = f.f32(dname, {I, H});
      bytes += 3 * I * H * 4;
      w.mlp_bytes += 3 * I * H * 4;
    } else {
      const int64_t rb = row_bytes(gname, mf, H), drb = row_bytes(dname, df, H);
      lw.gate_up = with_x(par::WeightRef(f.u8(gname, {I, 2, rb}), mf));
      lw.down_t = par::WeightRef(f.u8(dname, {I, drb}), df);
      bytes += I * (2 * rb + drb);
      w.mlp_bytes += I * (2 * rb + drb);
    }
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

void CpuExecutor::ensure_capacity(Session& s, int64_t slots, int64_t needed) {
  if (needed > spec_.max_context)
    throw StateError("sequence of " + std::to_string(needed) + " tokens exceeds the engine's context of " +
                     std::to_string(spec_.max_context));
  slots = std::max(slots, s.slots);
  if (needed <= s.cap && slots == s.slots) return;
  const int64_t cap = needed <= s.cap ? s.cap : std::min(spec_.max_context, std::max({needed, 2 * s.cap, int64_t(64)}));
  const int64_t kvh = spec_.kv_heads, hd = spec_.head_dim, I = spec_.intermediate;
  auto regrow = [&](std::vector<float>& buf) {
    std::vector<float> out(static_cast<size_t>(slots * kvh * cap * hd));
    for (int64_t r = 0; r < s.slots * kvh && s.cap > 0; ++r)
      std::memcpy(&out[static_cast<size_t>(r * cap * hd)], &buf[static_cast<size_t>(r * s.cap * hd)],
                  static_cast<size_t>(s.cap * hd) * sizeof(float));
    buf.swap(out);
  };
  s.k.resize(static_cast<size_t>(spec_.num_layers));
  s.v.resize(static_cast<size_t>(spec_.num_layers));
  for (auto& b : s.k) regrow(b);
  for (auto& b : s.v) regrow(b);
  std::vector<uint8_t> pad(static_cast<size_t>(slots * cap), 0);
  for (int64_t b = 0; b < s.slots && s.cap > 0; ++b)
    std::memcpy(&pad[static_cast<size_t>(b * cap)], &s.pad[static_cast<size_t>(b * s.cap)], static_cast<size_t>(s.cap));
  s.pad.swap(pad);
  const size_t n = static_cast<size_t>(slots);
  s.len.resize(n, 0);
  s.next_pos.resize(n, 0);
  s.used.resize(n, 0);
  s.slot_idx.resize(static_cast<size_t>(spec_.num_layers));
  s.slot_count.resize(static_cast<size_t>(spec_.num_layers));
  for (auto& v : s.slot_idx) v.resize(n * static_cast<size_t>(I), 0);
  for (auto& v : s.slot_count) v.resize(n, 0);
  s.slots = slots;
  s.cap = cap;
}

void CpuExecutor::attention(Session& s, int64_t n, int64_t S, const float* xn, const int64_t* positions,
                            float* out) {
  const DecoderSpec& sp = spec_;
  const LayerWeights& lw = w_.layers[static_cast<size_t>(n)];
  const int64_t B = s.batch, M = B * S, H = sp.hidden, hd = sp.head_dim, half = hd / 2;
  const int64_t qd = sp.heads * hd, kvd = sp.kv_heads * hd, group = sp.heads / sp.kv_heads;
  int64_t T = 0;  // the longest row's keys; row b attends to len[slot] + S of them
  for (int64_t b = 0; b < B; ++b) T = std::max(T, s.len[static_cast<size_t>(s.rows[static_cast<size_t>(b)])] + S);
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
  // cache position len + t of the row's slot for token t of every row
  float* kc = s.k[static_cast<size_t>(n)].data();
  float* vc = s.v[static_cast<size_t>(n)].data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t h = 0; h < sp.kv_heads; ++h) {
        const int64_t slot = s.rows[static_cast<size_t>(b)], start = s.len[static_cast<size_t>(slot)];
        const size_t dst = static_cast<size_t>(((slot * sp.kv_heads + h) * s.cap + start + i) * hd);
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
      const int64_t b = p / sp.heads, h = p % sp.heads, slot = s.rows[static_cast<size_t>(b)];
      const int64_t start = s.len[static_cast<size_t>(slot)], T = start + S;
      const uint8_t* pad = s.pad.data() + slot * s.cap;
      const int64_t g = h / group;
      const float* K = kc + (slot * sp.kv_heads + g) * s.cap * hd;
      const float* Vv = vc + (slot * sp.kv_heads + g) * s.cap * hd;
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
  // Block weights have no BLAS: their dense decode is the sparse kernel over every active row (it
  // reads each row once, as a dense GEMV would), on the same thread count.
  s.dense[ln] = share > dense_above_ && !w_.mlp_format;
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
  auto down = [&]() {
    if (lw.down_t.quantized()) block_down(M, t.z.data(), lw.down_t, out);
    else pool_.linear(M, {{t.z.data(), lw.down_t, nullptr, out, I, H, true}});
  };
  if (S > 1) {
    dense_z(nullptr);
    tda_prefill_scores_args_t pa{TDA_F32, TDA_SCORE_NORM_TOKEN_L2, static_cast<int32_t>(B), static_cast<int32_t>(S),
                                 static_cast<int32_t>(I), t.z.data(), token_valid, t.scores.data(), t.scores.data()};
    std::fill(t.scores.begin(), t.scores.end(), 0.0f);
    size_t ws = tda_prefill_scores_workspace_size(&pa);
    check(tda_prefill_scores(&pa, aligned_workspace(s.workspace, ws), ws, nullptr), "tda_prefill_scores");
    const int64_t L = spec_.num_layers;
    for (int64_t b = 0; b < B; ++b) {  // each row with its own thresholds and clamp (continuous batching)
      tda_select_args_t sa{1, static_cast<int32_t>(I), t.scores.data() + b * I, thresholds + b * L + n,
                           s.idx[ln].data() + b * I, s.count[ln].data() + b,
                           s.density_bounds.empty() ? nullptr : s.density_bounds.data() + 2 * (b * L + n)};
      ws = tda_select_active_workspace_size(&sa);
      check(tda_select_active(&sa, aligned_workspace(s.workspace, ws), ws, nullptr), "tda_select_active");
    }
    choose_decode_path(s, n);
    down();
    return;
  }
  if (s.dense[ln]) {  // the same sum as the sparse kernel, through BLAS
    dense_z(s.keep[ln].empty() ? nullptr : s.keep[ln].data());
    down();
    return;
  }
  const bool q = lw.gate_up.quantized();
  tda_decode_args_t da{TDA_F32, static_cast<tda_activation_t>(act_), static_cast<int32_t>(B), static_cast<int32_t>(H),
                       static_cast<int32_t>(I), 1, xn, q ? lw.gate_up.blocks : lw.gate_up.f,
                       q ? lw.down_t.blocks : lw.down_t.f, s.idx[ln].data(), s.count[ln].data(), out,
                       /*version=*/0, /*weight_format=*/lw.gate_up.format,  // 0: the library's default algorithm
                       /*down_weight_format=*/lw.down_t.format == lw.gate_up.format ? 0 : lw.down_t.format,
                       /*x_format=*/lw.gate_up.x_format};
  size_t ws = tda_sparse_gated_mlp_decode_workspace_size(&da);
  check(tda_sparse_gated_mlp_decode(&da, aligned_workspace(s.workspace, ws), ws, nullptr),
        "tda_sparse_gated_mlp_decode");
}

// out[M, H] = z[M, I] @ down_t for block weights, whose rows (neurons) run along H: each thread
// takes whole blocks of H columns and accumulates fp32 tiles of its columns of kRows neurons
// (exact, tda_block_dequantize) with sgemm. Prefill only (decode runs the sparse kernel).
void CpuExecutor::block_down(int64_t M, const float* z, const par::WeightRef& w, float* out) const {
  const int64_t H = spec_.hidden, I = spec_.intermediate, blocks = H / TDA_QUANT_BLOCK, rb = w.bytes(1, H);
  const int64_t bb = static_cast<int64_t>(tda_block_bytes(w.format));
  par::fork(pool_.threads_for(w.bytes(I, H)), [&](int t, int n) {
    const int64_t c0 = blocks * t / n * TDA_QUANT_BLOCK, c1 = blocks * (t + 1) / n * TDA_QUANT_BLOCK, nc = c1 - c0;
    if (nc <= 0) return;
    constexpr int64_t kRows = 64;
    thread_local std::vector<float> tile;
    tile.resize(static_cast<size_t>(kRows * nc));
    const uint8_t* base = static_cast<const uint8_t*>(w.blocks) + c0 / TDA_QUANT_BLOCK * bb;
    for (int64_t j0 = 0; j0 < I; j0 += kRows) {
      const int64_t nj = std::min(kRows, I - j0);
      for (int64_t j = 0; j < nj; ++j)  // sizes were checked at load: these calls cannot fail
        tda_block_dequantize(w.format, static_cast<int32_t>(nc), 1, base + (j0 + j) * rb, tile.data() + j * nc, nc,
                             nullptr);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(M), static_cast<int>(nc),
                  static_cast<int>(nj), 1.0f, z + j0, static_cast<int>(I), tile.data(), static_cast<int>(nc),
                  j0 ? 1.0f : 0.0f, out + c0, static_cast<int>(H));
    }
  });
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
    const float* e = x + m * H;
    if (!w_.embed.quantized()) {
      e = w_.embed.f + ids[m] * H;
    } else {  // the token's row, dequantized exactly
      check(tda_block_dequantize(w_.embed.format, static_cast<int32_t>(H), 1,
                                 static_cast<const uint8_t*>(w_.embed.blocks) + ids[m] * w_.embed.bytes(1, H),
                                 x + m * H, H, nullptr),
            "tda_block_dequantize");
    }
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
  for (int64_t b = 0; b < B; ++b) s.len[static_cast<size_t>(s.rows[static_cast<size_t>(b)])] += S;
  float* last = t.last.data();
  for (int64_t b = 0; b < B; ++b) rms_norm(x + (b * S + S - 1) * H, w_.final_norm, last + b * H, 1, H);
  pool_.linear(B, {{last, w_.lm_head, nullptr, logits, H, V, false}});
  if (sp.final_softcap) {
    const float cap = static_cast<float>(*sp.final_softcap);
    for (int64_t i = 0; i < B * V; ++i) logits[i] = std::tanh(logits[i] / cap) * cap;
  }
}

void CpuExecutor::check_slots(const Session& s, int64_t n, const int32_t* slots, bool want_used,
                              const char* what) const {
  if (n < 1 || n > TDA_MAX_BATCH)
    throw ArgumentError(std::string(what) + ": n must be in 1.." + std::to_string(TDA_MAX_BATCH) + ", got " +
                        std::to_string(n));
  std::vector<uint8_t> seen(TDA_MAX_BATCH, 0);
  for (int64_t b = 0; b < n; ++b) {
    const int32_t slot = slots[b];
    if (slot < 0 || slot >= TDA_MAX_BATCH)
      throw ArgumentError(std::string(what) + ": slots[" + std::to_string(b) + "] = " + std::to_string(slot) +
                          " is outside 0.." + std::to_string(TDA_MAX_BATCH - 1));
    if (seen[static_cast<size_t>(slot)]++)
      throw ArgumentError(std::string(what) + ": slot " + std::to_string(slot) + " is named twice");
    const bool used = slot < s.slots && s.used[static_cast<size_t>(slot)];
    if (want_used && !used)
      throw StateError(std::string(what) + ": slot " + std::to_string(slot) + " holds no sequence (join it first)");
    if (!want_used && used)
      throw StateError(std::string(what) + ": slot " + std::to_string(slot) + " is in use (release it first)");
  }
}

void CpuExecutor::join(ExecutorState& state, int64_t n, int64_t seq, const int32_t* slots, const int64_t* ids,
                       const int64_t* mask, const float* thresholds, const float* density_bounds, float* logits) {
  auto& s = static_cast<Session&>(state);
  // seq, ids and mask: check_prompt (executor.h), which the C API runs before any executor
  check_slots(s, n, slots, false, "join");
  const int64_t L = spec_.num_layers, I = spec_.intermediate;
  int64_t top = 0;
  for (int64_t b = 0; b < n; ++b) top = std::max<int64_t>(top, slots[b] + 1);
  ensure_capacity(s, top, seq);
  s.batch = n;
  s.rows.assign(slots, slots + n);
  s.loaded.clear();
  s.thresholds.assign(thresholds, thresholds + n * L);
  if (density_bounds) s.density_bounds.assign(density_bounds, density_bounds + n * L * 2);
  else s.density_bounds.clear();
  s.idx.assign(static_cast<size_t>(L), std::vector<int32_t>(static_cast<size_t>(n * I)));
  s.count.assign(static_cast<size_t>(L), std::vector<int32_t>(static_cast<size_t>(n)));
  s.dense.assign(static_cast<size_t>(L), true);
  s.keep.assign(static_cast<size_t>(L), {});
  s.tmp.positions.resize(static_cast<size_t>(n * seq));
  s.tmp.token_valid.resize(static_cast<size_t>(n * seq));
  for (int64_t b = 0; b < n; ++b) {
    const size_t slot = static_cast<size_t>(slots[b]);
    s.len[slot] = 0;
    std::fill(s.pad.begin() + static_cast<std::ptrdiff_t>(slot * static_cast<size_t>(s.cap)),
              s.pad.begin() + static_cast<std::ptrdiff_t>((slot + 1) * static_cast<size_t>(s.cap)), 0);
    int64_t c = 0;
    for (int64_t i = 0; i < seq; ++i) {
      const int64_t m = mask[b * seq + i];
      c += m;
      s.tmp.positions[static_cast<size_t>(b * seq + i)] = std::max<int64_t>(c - 1, 0);
      s.tmp.token_valid[static_cast<size_t>(b * seq + i)] = static_cast<float>(m);
      s.pad[slot * static_cast<size_t>(s.cap) + static_cast<size_t>(i)] = static_cast<uint8_t>(m);
    }
    s.next_pos[slot] = c;
  }
  forward(s, seq, ids, s.tmp.positions.data(), s.tmp.token_valid.data(), s.thresholds.data(), logits);
  for (int64_t b = 0; b < n; ++b) {  // the rows' selections become their slots'
    const size_t slot = static_cast<size_t>(slots[b]);
    for (size_t l = 0; l < static_cast<size_t>(L); ++l) {
      std::copy_n(s.idx[l].begin() + b * I, I,
                  s.slot_idx[l].begin() + static_cast<std::ptrdiff_t>(slot * static_cast<size_t>(I)));
      s.slot_count[l][slot] = s.count[l][static_cast<size_t>(b)];
    }
    s.used[slot] = 1;  // only now: a failed prefill leaves its slots free
  }
}

void CpuExecutor::load_decode_rows(Session& s, int64_t n, const int32_t* slots) {
  s.batch = n;
  s.rows.assign(slots, slots + n);
  if (s.loaded == s.rows) return;  // the same sequences as the last step: their decode state is in place
  const int64_t L = spec_.num_layers, I = spec_.intermediate;
  s.loaded.clear();
  s.idx.resize(static_cast<size_t>(L));
  s.count.resize(static_cast<size_t>(L));
  s.dense.assign(static_cast<size_t>(L), true);
  s.keep.resize(static_cast<size_t>(L));
  for (size_t l = 0; l < static_cast<size_t>(L); ++l) {
    s.idx[l].resize(static_cast<size_t>(n * I));
    s.count[l].resize(static_cast<size_t>(n));
    for (int64_t b = 0; b < n; ++b) {
      const size_t slot = static_cast<size_t>(slots[b]);
      std::copy_n(s.slot_idx[l].begin() + static_cast<std::ptrdiff_t>(slot * static_cast<size_t>(I)), I,
                  s.idx[l].begin() + b * I);
      s.count[l][static_cast<size_t>(b)] = s.slot_count[l][slot];
    }
    choose_decode_path(s, static_cast<int64_t>(l));
  }
  s.loaded = s.rows;
}

void CpuExecutor::step(ExecutorState& state, int64_t n, const int32_t* slots, const int64_t* tokens, float* logits) {
  auto& s = static_cast<Session&>(state);
  check_slots(s, n, slots, true, "step");  // tokens: check_tokens, run by the C API
  int64_t longest = 0;
  for (int64_t b = 0; b < n; ++b) longest = std::max(longest, s.len[static_cast<size_t>(slots[b])]);
  ensure_capacity(s, s.slots, longest + 1);
  load_decode_rows(s, n, slots);
  s.tmp.positions.resize(static_cast<size_t>(n));
  for (int64_t b = 0; b < n; ++b) {
    const size_t slot = static_cast<size_t>(slots[b]);
    s.tmp.positions[static_cast<size_t>(b)] = s.next_pos[slot];
    s.pad[slot * static_cast<size_t>(s.cap) + static_cast<size_t>(s.len[slot])] = 1;
  }
  par::Step timed(pool_, n);  // on the governor's thread count (parallel.h), timed
  try {
    forward(s, 1, tokens, s.tmp.positions.data(), nullptr, nullptr, logits);
  } catch (...) {  // half a step is no usable state: these sequences are over, their slots free
    for (int64_t b = 0; b < n; ++b) s.used[static_cast<size_t>(slots[b])] = 0;
    s.loaded.clear();
    throw;
  }
  timed.done();
  for (int64_t b = 0; b < n; ++b) ++s.next_pos[static_cast<size_t>(slots[b])];
}

void CpuExecutor::release(ExecutorState& state, int32_t slot) {
  auto& s = static_cast<Session&>(state);
  if (slot < 0 || slot >= TDA_MAX_BATCH)
    throw ArgumentError("release: slot " + std::to_string(slot) + " is outside 0.." +
                        std::to_string(TDA_MAX_BATCH - 1));
  if (slot < s.slots) s.used[static_cast<size_t>(slot)] = 0;  // releasing a free slot is harmless
  s.loaded.clear();
  if (slot < s.static_batch) s.static_batch = 0;  // tda_rt_decode would step a hole
}

void CpuExecutor::slot_active_counts(const ExecutorState& state, int32_t slot, int32_t* counts) const {
  const auto& s = static_cast<const Session&>(state);
  check_slots(s, 1, &slot, true, "active counts");
  for (size_t l = 0; l < s.slot_count.size(); ++l) counts[l] = s.slot_count[l][static_cast<size_t>(slot)];
}

// tda_rt_prefill/decode: one batch on slots 0..batch-1 of a fresh session, one threshold table for all.
void CpuExecutor::prefill(ExecutorState& state, int64_t batch, int64_t seq, const int64_t* ids, const int64_t* mask,
                          const float* thresholds, const float* density_bounds, float* logits) {
  auto& s = static_cast<Session&>(state);
  if (batch < 1 || batch > TDA_MAX_BATCH)
    throw ArgumentError("batch must be in 1.." + std::to_string(TDA_MAX_BATCH) + ", got " + std::to_string(batch));
  Scratch tmp = std::move(s.tmp);  // a new prefill starts afresh (and frees the old cache); buffers stay
  std::vector<unsigned char> workspace = std::move(s.workspace);
  s = Session();
  s.tmp = std::move(tmp);
  s.workspace = std::move(workspace);
  const int64_t L = spec_.num_layers;
  std::vector<int32_t> slots(static_cast<size_t>(batch));
  std::vector<float> ths(static_cast<size_t>(batch * L)), bounds;
  for (int64_t b = 0; b < batch; ++b) {
    slots[static_cast<size_t>(b)] = static_cast<int32_t>(b);
    std::copy_n(thresholds, L, ths.begin() + b * L);
    if (density_bounds) bounds.insert(bounds.end(), density_bounds, density_bounds + 2 * L);
  }
  join(s, batch, seq, slots.data(), ids, mask, ths.data(), density_bounds ? bounds.data() : nullptr, logits);
  s.static_batch = batch;
}

void CpuExecutor::decode(ExecutorState& state, const int64_t* tokens, float* logits) {
  auto& s = static_cast<Session&>(state);
  if (s.static_batch == 0) throw StateError("decode before prefill");  // tokens: check_tokens, run by the C API
  std::vector<int32_t> slots(static_cast<size_t>(s.static_batch));
  for (size_t b = 0; b < slots.size(); ++b) slots[b] = static_cast<int32_t>(b);
  try {
    step(s, s.static_batch, slots.data(), tokens, logits);
  } catch (...) {
    s.static_batch = 0;  // positions moved on, half a step is no usable state
    throw;
  }
}

void CpuExecutor::active_counts(const ExecutorState& state, int32_t* counts) const {
  const auto& s = static_cast<const Session&>(state);
  if (s.static_batch == 0) throw StateError("active counts: no prefill yet");
  for (size_t l = 0; l < s.slot_count.size(); ++l)
    for (size_t b = 0; b < static_cast<size_t>(s.static_batch); ++b)
      counts[l * static_cast<size_t>(s.static_batch) + b] = s.slot_count[l][b];
}

}  // namespace tda
