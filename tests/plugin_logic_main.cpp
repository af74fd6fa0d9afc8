// Driver for tests/test_plugin_logic.py: reads one command per stdin line,
// answers one line each, so Python feeds it the contract's names and cases
// and asserts on the answers. Compiled with plain g++: no TensorRT, no CUDA.
//
// Tensors: "2,3,16" is a shape, "-" a scalar, "?" an unknown (-1) dimension.
// Types: f32 f16 bf16 i32 other i8; a trailing "!" marks a non-linear format.
// Fields: name=value (char), name:nul=value (char with NUL), name:int=value.
// Weight format: "wf=q4_0" right after a command sets the plugin's weight_format (default dtype), then
// "dwf=q8_0" its down_weight_format (default same), "xf=q8_0" its x_format (default dtype).
#include <cmath>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "activation.h"
#include "tda_plugin_logic.h"

using namespace tda_trt;

namespace {

const char* const kTypeNames[] = {"f32", "f16", "bf16", "i32", "other", "i8"};

DType parse_type(const std::string& s) {
  for (int i = 0; i < 6; ++i)
    if (s == kTypeNames[i]) return DType(i);
  return DType::kOther;
}

Dims parse_dims(const std::string& s) {
  Dims d;
  if (s == "-") return d;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) d.d[d.nb++] = part == "?" ? -1 : std::stoll(part);
  return d;
}

struct OwnedField {
  std::string name, value;
  bool is_char;
};

std::vector<FieldView> parse_fields(std::istream& in, std::vector<OwnedField>* own) {
  std::string tok;
  while (in >> tok) {
    const size_t eq = tok.find('=');
    std::string name = tok.substr(0, eq), value = tok.substr(eq + 1);
    const size_t colon = name.find(':');
    const std::string flag = colon == std::string::npos ? "" : name.substr(colon + 1);
    if (colon != std::string::npos) name.resize(colon);
    if (flag == "nul") value.push_back('\0');
    own->push_back({name, value, flag != "int"});
  }
  std::vector<FieldView> views;
  for (const OwnedField& f : *own)
    views.push_back({f.name.c_str(), f.value.data(), int32_t(f.value.size()), f.is_char});
  return views;
}

// Fake ABI queries with a decode size that is largest at batch 3, to check
// that the plugin takes the maximum over chunk sizes, not the size at max batch,
// and that, like the CUDA library's, grows by 500000 for decode version 2
// (version 0: $TDA_DECODE_VERSION, read per call).
size_t fake_decode(const tda_decode_args_t* a) {
  const int32_t version = a->version ? a->version : tda::env_decode_version();
  return 1000 * size_t(a->batch) + (a->batch == 3 ? 100000 : 0) + (version == 2 ? 500000 : 0);
}
size_t fake_prefill(const tda_prefill_scores_args_t* a) { return 4 * size_t(a->batch) * a->seq_len; }
size_t fake_select(const tda_select_args_t* a) { return 64 * size_t(a->batch); }
const KernelQueries kFake{fake_decode, fake_prefill, fake_select};

// Reference column-major GEMM with cuBLAS's meaning of the plan's fields.
void gemm_ref(const Gemm& g) {
  const float* A = static_cast<const float*>(g.a);
  const float* B = static_cast<const float*>(g.b);
  float* C = static_cast<float*>(g.c);
  for (int32_t i = 0; i < g.m; ++i)
    for (int32_t j = 0; j < g.n; ++j) {
      double acc = 0;
      for (int32_t p = 0; p < g.k; ++p) {
        const float a = g.trans_a ? A[i * g.lda + p] : A[p * g.lda + i];
        const float b = g.trans_b ? B[p * g.ldb + j] : B[j * g.ldb + p];
        acc += double(a) * b;
      }
      C[j * g.ldc + i] = float(acc);
    }
}

float act_ref(tda_activation_t a, float x) {
  switch (a) {
    case TDA_ACT_SILU: return tda::activate<TDA_ACT_SILU>(x);
    case TDA_ACT_GELU_TANH: return tda::activate<TDA_ACT_GELU_TANH>(x);
    case TDA_ACT_GELU: return tda::activate<TDA_ACT_GELU>(x);
    default: return tda::activate<TDA_ACT_RELU>(x);
  }
}

// Runs a fp32 prefill plan on the CPU (GEMMs by gemm_ref, the gated step as
// gated_act.cu does it) and returns the largest difference from the
// contract's formula written directly over the row-major tensors.
double prefill_numeric(int64_t B, int64_t S, int64_t H, int64_t I, tda_activation_t act) {
  const int64_t M = B * S;
  std::vector<float> x(M * H), gu_w(I * 2 * H), down(I * H), out(M * H);
  uint32_t seed = 1;
  auto rnd = [&seed] { return float((seed = seed * 1664525u + 1013904223u) >> 8) / float(1 << 24) - 0.5f; };
  for (auto* v : {&x, &gu_w, &down})
    for (float& f : *v) f = rnd();
  MlpAttrs attrs;
  attrs.activation = act;
  const MlpSizes s{B, S, H, I};
  const MlpBuffers buf{x.data(), gu_w.data(), down.data(), nullptr, nullptr, nullptr, nullptr, out.data(), nullptr};
  std::vector<char> ws(prefill_layout(DType::kFloat, B, S, I, kFake).total);
  PrefillPlan p;
  if (!prefill_plan(DType::kFloat, attrs, s, buf, ws.data(), kFake, &p).empty()) return -1;
  gemm_ref(p.gate_up_gemm);
  const float* gu = static_cast<const float*>(p.gate_up);
  float* z = static_cast<float*>(p.z);
  for (int64_t i = 0; i < p.tokens * I; ++i) z[i] = act_ref(act, gu[2 * i]) * gu[2 * i + 1];
  gemm_ref(p.down_gemm);
  double worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H; ++h) {
      double y = 0;
      for (int64_t j = 0; j < I; ++j) {
        double g = 0, u = 0;
        for (int64_t k = 0; k < H; ++k) {
          g += double(x[m * H + k]) * gu_w[(j * 2 + 0) * H + k];
          u += double(x[m * H + k]) * gu_w[(j * 2 + 1) * H + k];
        }
        y += double(act_ref(act, float(g))) * u * down[j * H + h];
      }
      worst = std::max(worst, std::fabs(y - out[m * H + h]));
    }
  return worst;
}

std::string shape_text(const OutputShape& o) {
  std::string s;
  for (int32_t k = 0; k < o.nb; ++k) s += " " + std::to_string(o.d[k].input) + "." + std::to_string(o.d[k].dim);
  return s;
}

std::string answer(const std::string& text) {
  std::string line = text, cmd;
  tda_weight_format_t wf = TDA_WEIGHTS_DTYPE, dwf = TDA_WEIGHTS_DTYPE;
  tda_x_format_t xf = TDA_X_DTYPE;
  {
    std::istringstream head(line);
    std::string tok;
    head >> cmd;
    while (head >> tok) {
      const bool is_wf = tok.rfind("wf=", 0) == 0, is_dwf = tok.rfind("dwf=", 0) == 0;
      const bool is_xf = tok.rfind("xf=", 0) == 0;
      if (!is_wf && !is_dwf && !is_xf) break;
      if (is_wf && !lookup(kWeightFormats, tok.substr(3), &wf)) return "error weight format " + tok;
      if (is_dwf && !lookup(kDownWeightFormats, tok.substr(4), &dwf)) return "error down weight format " + tok;
      if (is_xf && !lookup(kXFormats, tok.substr(3), &xf)) return "error x format " + tok;
      line.erase(line.find(tok), tok.size());
    }
  }
  std::istringstream in(line);
  in >> cmd;
  // mlp_fields: an ONNX node's fields (TensorRT's BUILD phase); plan_fields: a plan's (RUNTIME).
  // backend=NAME first: then whether a kernel library of that tda_backend() runs the fields (mlp_check_backend).
  std::string backend;
  if (cmd == "mlp_fields" || cmd == "plan_fields") {
    const std::streampos at = in.tellg();
    std::string tok;
    if (in >> tok && tok.rfind("backend=", 0) == 0)
      backend = tok.substr(8);
    else
      in.seekg(at);
  }
  if (cmd == "mlp_fields" || cmd == "plan_fields" || cmd == "select_fields") {
    std::vector<OwnedField> own;
    const std::vector<FieldView> f = parse_fields(in, &own);
    MlpAttrs a;
    const Error e = cmd == "select_fields" ? parse_select_fields(f.data(), int32_t(f.size()))
                                           : parse_mlp_fields(f.data(), int32_t(f.size()), cmd == "mlp_fields", &a);
    if (!e.empty()) return "error " + e;
    if (cmd == "select_fields") return "ok";
    if (!backend.empty())
      if (Error b = mlp_check_backend(a, backend.c_str()); !b.empty()) return "error " + b;
    std::string out = "ok " + std::to_string(a.activation) + " " + std::to_string(a.score_norm) + " " +
                      std::to_string(a.decode_version);
    for (int32_t i = 0; i < kSparseGatedMlpNbFields; ++i) out += std::string(i ? "," : " ") + mlp_field_value(i, a);
    return out;
  }
  if (cmd == "names") {  // the tables as the plugin sees them: name=ABI value
    std::string s = "ok";
    for (const auto& e : kActivations) s += " activation:" + std::string(e.name) + "=" + std::to_string(e.value);
    for (const auto& e : kScoreNorms) s += " score_norm:" + std::string(e.name) + "=" + std::to_string(e.value);
    for (const auto& e : kDtypes) s += " dtype:" + std::string(e.name) + "=" + std::to_string(e.value);
    for (const auto& e : kDownWeightFormats)
      s += " down_weight_format:" + std::string(e.name) + "=" + std::to_string(e.value);
    for (const auto& e : kXFormats) s += " x_format:" + std::string(e.name) + "=" + std::to_string(e.value);
    return s;
  }
  if (cmd == "mlp_shapes" || cmd == "select_shapes") {
    std::vector<Dims> dims;
    std::string tok;
    while (in >> tok) dims.push_back(parse_dims(tok));
    if (cmd == "select_shapes") {
      int64_t b = 0, i = 0;
      const Error e = select_check_shapes(dims.data(), int32_t(dims.size()), &b, &i);
      return e.empty() ? "ok " + std::to_string(b) + " " + std::to_string(i) : "error " + e;
    }
    MlpSizes s;
    const Error e = mlp_check_shapes(dims.data(), int32_t(dims.size()), &s, wf, dwf);
    if (!e.empty()) return "error " + e;
    return "ok " + std::to_string(s.batch) + " " + std::to_string(s.seq) + " " + std::to_string(s.hidden) + " " +
           std::to_string(s.inter);
  }
  if (cmd == "mlp_profile") {  // type min_seq, then the 7 inputs' max dims: bounds and workspace
    std::string t;
    int64_t min_seq;
    in >> t >> min_seq;
    std::vector<Dims> dims;
    std::string tok;
    while (in >> tok) dims.push_back(parse_dims(tok));
    MlpSizes s;
    const Error e = mlp_max_sizes(dims.data(), int32_t(dims.size()), &s, wf, dwf);
    if (!e.empty()) return "error " + e;
    MlpAttrs attrs;
    attrs.weight_format = wf;
    attrs.down_weight_format = dwf;
    return "ok " + std::to_string(s.batch) + " " + std::to_string(s.seq) + " " + std::to_string(s.hidden) + " " +
           std::to_string(s.inter) + " ws " + std::to_string(mlp_workspace_size(parse_type(t), attrs, s, min_seq, kFake));
  }
  if (cmd == "mlp_types" || cmd == "select_types") {
    std::vector<DType> types;
    std::string tok;
    while (in >> tok) types.push_back(parse_type(tok));
    DType out[2] = {DType::kOther, DType::kOther};
    const Error e = cmd == "mlp_types" ? mlp_output_types(types.data(), int32_t(types.size()), out)
                                       : select_output_types(types.data(), int32_t(types.size()), out);
    if (!e.empty()) return "error " + e;
    return std::string("ok ") + kTypeNames[int(out[0])] + " " + kTypeNames[int(out[1])];
  }
  if (cmd == "mlp_supports" || cmd == "select_supports") {  // types of io[0..pos]; answers for pos = last
    std::vector<IoDesc> io;
    std::string tok;
    while (in >> tok) {
      const bool linear = tok.back() != '!';
      io.push_back({parse_type(linear ? tok : tok.substr(0, tok.size() - 1)), linear});
    }
    const int32_t pos = int32_t(io.size()) - 1;
    return (cmd == "mlp_supports" ? mlp_supports(pos, io.data(), wf) : select_supports(pos, io.data())) ? "yes" : "no";
  }
  if (cmd == "out_shapes") {
    return "ok mlp" + shape_text(mlp_output_shape(0)) + " |" + shape_text(mlp_output_shape(1)) + " select" +
           shape_text(select_output_shape(0)) + " |" + shape_text(select_output_shape(1));
  }
  if (cmd == "mode") {
    int64_t seq;
    in >> seq;
    return mlp_mode(seq) == Mode::kDecode ? "decode" : "prefill";
  }
  if (cmd == "mlp_ws" || cmd == "prefill_layout") {  // type B S H I [min_seq]
    std::string t;
    MlpSizes s;
    int64_t min_seq = 1;
    in >> t >> s.batch >> s.seq >> s.hidden >> s.inter >> min_seq;
    MlpAttrs built;  // what a build from an ONNX node (no decode_version field) records in this process
    built.decode_version = absent_decode_version(true);
    built.weight_format = wf;
    built.down_weight_format = dwf;
    built.x_format = xf;
    if (cmd == "mlp_ws") return std::to_string(mlp_workspace_size(parse_type(t), built, s, min_seq, kFake));
    const PrefillLayout l = prefill_layout(parse_type(t), s.batch, s.seq, s.inter, kFake, wf, s.hidden, xf);
    std::string out = std::to_string(l.gate_up) + " " + std::to_string(l.z) + " " + std::to_string(l.scores) + " " +
                      std::to_string(l.cublas) + " " + std::to_string(l.total);
    if (wf != TDA_WEIGHTS_DTYPE) out += " weights " + std::to_string(l.weights);
    return xf == TDA_X_DTYPE ? out : out + " xq " + std::to_string(l.xq);
  }
  // wf=F type B S H I: where the GEMMs read their weights (workspace offsets or "in"); with xf=, where gate/up read x
  if (cmd == "prefill_weights") {
    std::string t;
    MlpSizes s;
    in >> t >> s.batch >> s.seq >> s.hidden >> s.inter;
    MlpAttrs attrs;
    attrs.weight_format = wf;
    attrs.down_weight_format = dwf;
    attrs.x_format = xf;
    std::vector<char> ws(prefill_layout(parse_type(t), s.batch, s.seq, s.inter, kFake, wf, s.hidden, xf).total);
    char x_in = 0, gu_in = 0, down_in = 0;
    const MlpBuffers buf{&x_in, &gu_in, &down_in, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    PrefillPlan p;
    if (Error e = prefill_plan(parse_type(t), attrs, s, buf, ws.data(), kFake, &p); !e.empty()) return "error " + e;
    auto where = [&](const void* a, const void* input) {
      return a == input ? std::string("in") : std::to_string(static_cast<const char*>(a) - ws.data());
    };
    return "ok wf" + std::to_string(p.weight_format) + " dwf" + std::to_string(p.down_weight_format) + " " +
           where(p.gate_up_gemm.a, &gu_in) + " " +
           where(p.down_gemm.a, &down_in) + " " + (p.gate_up_t ? where(p.gate_up_t, nullptr) : "-") + " " +
           (p.down_t ? where(p.down_t, nullptr) : "-") +
           (xf == TDA_X_DTYPE ? "" : " xf" + std::to_string(p.x_format) + " x:" + where(p.gate_up_gemm.b, &x_in) +
                                         " xq:" + (p.xq ? where(p.xq, nullptr) : "-"));
  }
  if (cmd == "select_ws") {
    int64_t b, i;
    in >> b >> i;
    return std::to_string(select_workspace_size(b, i, kFake));
  }
  if (cmd == "decode_calls") {  // type B H I version: per chunk, the version and bytes passed to the ABI
    std::string t;
    MlpSizes s;
    MlpAttrs attrs;
    in >> t >> s.batch >> s.hidden >> s.inter >> attrs.decode_version;
    s.seq = 1;
    std::string out = "ok";
    for (int64_t b0 = 0; b0 < s.batch; b0 += TDA_MAX_BATCH) {
      const DecodeCall c = decode_call(parse_type(t), attrs, s, b0, chunk_batch(s.batch, b0), MlpBuffers{}, kFake);
      out += " v" + std::to_string(c.args.version) + ":" + std::to_string(c.workspace_bytes);
    }
    return out;
  }
  if (cmd == "decode_chunks") {  // type B H I: per chunk b0 batch and byte offsets of hidden, idx, count, output
    std::string t;
    MlpSizes s;
    in >> t >> s.batch >> s.hidden >> s.inter;
    s.seq = 1;
    MlpAttrs attrs;
    attrs.weight_format = wf;
    attrs.down_weight_format = dwf;
    attrs.x_format = xf;
    char* base = reinterpret_cast<char*>(uintptr_t(1) << 20);
    const MlpBuffers buf{base, base, base, reinterpret_cast<int32_t*>(base), reinterpret_cast<int32_t*>(base),
                         nullptr, nullptr, base, nullptr};
    std::string out = "ok";
    for (int64_t b0 = 0; b0 < s.batch; b0 += TDA_MAX_BATCH) {
      const tda_decode_args_t a = decode_args(parse_type(t), attrs, s, b0, chunk_batch(s.batch, b0), buf);
      auto off = [base](const void* p) { return std::to_string(static_cast<const char*>(p) - base); };
      out += " " + std::to_string(b0) + ":" + std::to_string(a.batch) + ":" + off(a.hidden_states) + ":" +
             off(a.active_idx) + ":" + off(a.active_count) + ":" + off(a.output) + ":dtype" +
             std::to_string(a.dtype) + ":det" + std::to_string(a.deterministic) +
             (wf == TDA_WEIGHTS_DTYPE ? "" : ":wf" + std::to_string(a.weight_format)) +
             (dwf == TDA_WEIGHTS_DTYPE ? "" : ":dwf" + std::to_string(a.down_weight_format)) +
             (xf == TDA_X_DTYPE ? "" : ":xf" + std::to_string(a.x_format));
    }
    return out;
  }
  if (cmd == "prefill_numeric") {  // B S H I activation
    int64_t B, S, H, I;
    std::string act;
    in >> B >> S >> H >> I >> act;
    tda_activation_t a;
    if (!lookup(kActivations, act, &a)) return "error activation";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3e", prefill_numeric(B, S, H, I, a));
    return buf;
  }
  return "error unknown command " + cmd;
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) std::cout << answer(line) << "\n";
  return 0;
}
