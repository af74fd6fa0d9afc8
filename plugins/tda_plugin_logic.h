// Everything the TensorRT plugins decide, in plain C++ with no TensorRT type,
// so tests/test_plugin_logic.py compiles and checks it with g++ on a machine
// without TensorRT or a GPU. The adapters (*_plugin.cpp) only convert
// TensorRT structs to these and call cuBLAS / the C ABI with the results.
//
// Names, field lists and enum tables are written out literally here because
// the test parses this file against tda_export/ops/contract.py.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "decode_version.h"  // cuda/src
#include "tda_kernels.h"

namespace tda_trt {

constexpr const char* kNamespace = "tda";  // contract.PLUGIN_NAMESPACE
constexpr const char* kVersion = "1";      // contract.PLUGIN_VERSION
constexpr const char* kSparseGatedMlpName = "SparseGatedMLP";
constexpr const char* kSelectActiveName = "SelectActive";

// contract.PLUGIN_FIELDS; every field is a string, passed as a kCHAR field.
// The ONNX attributes, then the plan fields (contract.PLAN_FIELDS) the
// builder fixes and the plan records.
constexpr const char* kSparseGatedMlpFields[] = {"activation", "score_norm", "weight_format", "down_weight_format",
                                                 "x_format", "decode_version"};
constexpr int kSparseGatedMlpNbFields = 6;
// SelectActive has no fields.

// ONNX node metadata that a parser may forward as fields; not attributes.
constexpr const char* kIgnoredFields[] = {"plugin_namespace", "plugin_version"};

template <class E>
struct NamedEnum {
  const char* name;
  E value;
};
// String attribute -> C ABI enum (contract.ACTIVATIONS / SCORE_NORMS order).
constexpr NamedEnum<tda_activation_t> kActivations[] = {
    {"silu", TDA_ACT_SILU}, {"gelu_tanh", TDA_ACT_GELU_TANH}, {"gelu", TDA_ACT_GELU}, {"relu", TDA_ACT_RELU}};
constexpr NamedEnum<tda_score_norm_t> kScoreNorms[] = {{"token_l2", TDA_SCORE_NORM_TOKEN_L2},
                                                       {"none", TDA_SCORE_NORM_NONE}};
// decode_version field -> tda_decode_args_t.version (contract.DECODE_VERSIONS).
constexpr NamedEnum<int32_t> kDecodeVersions[] = {{"1", 1}, {"2", 2}};
// weight_format field -> tda_weight_format_t (contract.WEIGHT_FORMATS order). "dtype": gate_up_weight and
// down_weight_t in T; a block format: the contract's blocks (QUANTIZED_WEIGHTS) as int8 tensors (TensorRT
// plugin inputs cannot be uint8), [I, 2, H/32*bytes] and [I, H/32*bytes], the same bytes.
constexpr NamedEnum<tda_weight_format_t> kWeightFormats[] = {
    {"dtype", TDA_WEIGHTS_DTYPE}, {"q8_0", TDA_WEIGHTS_Q8_0}, {"q4_0", TDA_WEIGHTS_Q4_0}, {"q4_1", TDA_WEIGHTS_Q4_1}};
// down_weight_format field -> tda_decode_args_t.down_weight_format (contract.DOWN_WEIGHT_FORMATS order): "same"
// (0: down_weight_t as weight_format says) or a block format of its own, only under a block weight_format
// (e.g. q8_0 down rows under q4_1 gate/up rows).
constexpr NamedEnum<tda_weight_format_t> kDownWeightFormats[] = {
    {"same", TDA_WEIGHTS_DTYPE}, {"q8_0", TDA_WEIGHTS_Q8_0}, {"q4_0", TDA_WEIGHTS_Q4_0}, {"q4_1", TDA_WEIGHTS_Q4_1}};
// The format down_weight_t is stored in: dwf, or wf where dwf is "same" (contract.down_format).
inline tda_weight_format_t down_format(tda_weight_format_t wf, tda_weight_format_t dwf) {
  return dwf == TDA_WEIGHTS_DTYPE ? wf : dwf;
}
// x_format field -> tda_x_format_t (contract.X_FORMATS order): "dtype" (gate/up read x as is) or "q8_0" (x
// quantized per block of 32 along H, contract X_QUANT_SEMANTICS), only under a block weight_format. The CUDA
// kernels and the C++ plugin's cuBLAS prefill run "dtype" only (mlp_check_backend).
constexpr NamedEnum<tda_x_format_t> kXFormats[] = {{"dtype", TDA_X_DTYPE}, {"q8_0", TDA_X_Q8_0}};
// Bytes of one block (contract BLOCK_FORMATS block_bytes); 0 for "dtype".
inline int64_t weight_block_bytes(tda_weight_format_t f) {
  return f == TDA_WEIGHTS_Q8_0 ? 34 : (f == TDA_WEIGHTS_Q4_0 ? 18 : (f == TDA_WEIGHTS_Q4_1 ? 20 : 0));
}

// Tensor element types the plugins see (the adapter maps TensorRT's DataType). kInt8: packed block weights.
enum class DType : int32_t { kFloat, kHalf, kBFloat16, kInt32, kOther, kInt8 };
// T of the contract -> C ABI dtype (contract.DTYPES order).
constexpr NamedEnum<tda_dtype_t> kDtypes[] = {
    {"float32", TDA_F32}, {"float16", TDA_F16}, {"bfloat16", TDA_BF16}};

inline bool is_float_t(DType t) { return t == DType::kFloat || t == DType::kHalf || t == DType::kBFloat16; }
inline tda_dtype_t abi_dtype(DType t) {
  return t == DType::kFloat ? TDA_F32 : (t == DType::kHalf ? TDA_F16 : TDA_BF16);
}
inline size_t elem_size(DType t) { return t == DType::kHalf || t == DType::kBFloat16 ? 2 : 4; }

// Empty on success, else a message naming the offending tensor or field.
using Error = std::string;

// ---- I/O positions: the contract's input/output order ----
namespace mlp {
enum In { kHidden, kGateUp, kDownT, kActiveIdx, kActiveCount, kTokenValid, kScoresIn, kNbIn };
enum Out { kOutput = kNbIn, kScoresOut, kNbIo };
constexpr int kNbOut = kNbIo - kNbIn;
constexpr const char* kNames[] = {"hidden_states", "gate_up_weight", "down_weight_t", "active_idx",
                                  "active_count",  "token_valid",    "scores_in",     "output",
                                  "scores_out"};
constexpr int kRank[] = {3, 3, 2, 2, 1, 2, 2, 3, 2};
}  // namespace mlp

namespace sel {
enum In { kScores, kThreshold, kDensityBounds, kNbIn };
enum Out { kActiveIdx = kNbIn, kActiveCount, kNbIo };
constexpr int kNbOut = kNbIo - kNbIn;
constexpr const char* kNames[] = {"scores", "threshold", "density_bounds", "active_idx", "active_count"};
constexpr int kRank[] = {2, 0, 1, 2, 1};
}  // namespace sel

// ---- Fields ----
struct FieldView {
  const char* name;
  const void* data;
  int32_t length;  // bytes; a trailing NUL may or may not be counted
  bool is_char;
};

struct MlpAttrs {
  tda_activation_t activation = TDA_ACT_SILU;            // contract default "silu"
  tda_score_norm_t score_norm = TDA_SCORE_NORM_TOKEN_L2;  // contract default "token_l2"
  // The decode algorithm the plan's workspace was sized for, passed to every
  // decode call: never 0, so $TDA_DECODE_VERSION at run time cannot change
  // the kernel's workspace needs under TensorRT's reservation.
  int32_t decode_version = 1;
  // How gate_up_weight / down_weight_t are stored (field weight_format).
  tda_weight_format_t weight_format = TDA_WEIGHTS_DTYPE;
  // down_weight_t's own format (field down_weight_format): TDA_WEIGHTS_DTYPE = "same", else a block format
  // (only with a block weight_format; parse_mlp_fields refuses the rest).
  tda_weight_format_t down_weight_format = TDA_WEIGHTS_DTYPE;
  // How gate/up read hidden_states (field x_format): TDA_X_Q8_0 only with a block weight_format.
  tda_x_format_t x_format = TDA_X_DTYPE;
};

// decode_version when the fields do not carry it: an ONNX node (building)
// takes the kernel library's default of the build process, once; a plan
// serialized before the field existed was sized for version 1.
inline int32_t absent_decode_version(bool building) { return building ? tda::env_decode_version() : 1; }

template <class E, size_t N>
bool lookup(const NamedEnum<E> (&table)[N], const std::string& s, E* out) {
  for (const auto& e : table)
    if (s == e.name) return (*out = e.value), true;
  return false;
}

template <class E, size_t N>
const char* name_of(const NamedEnum<E> (&table)[N], E v) {
  for (const auto& e : table)
    if (e.value == v) return e.name;
  return "";
}

template <class E, size_t N>
std::string choices(const NamedEnum<E> (&table)[N]) {
  std::string s;
  for (const auto& e : table) s += (s.empty() ? "" : ", ") + std::string(e.name);
  return s;
}

inline bool ignored_field(const char* name) {
  for (const char* n : kIgnoredFields)
    if (std::strcmp(name, n) == 0) return true;
  return false;
}

inline Error field_string(const FieldView& f, std::string* out) {
  if (!f.is_char) return std::string("field ") + f.name + " must be a char (string) field";
  if (f.length < 0 || (f.length > 0 && !f.data)) return std::string("field ") + f.name + " has no data";
  const char* s = static_cast<const char*>(f.data);
  // ONNX parsers pass the bytes without a NUL, serialized plugins with one.
  out->assign(s, f.length > 0 ? strnlen(s, size_t(f.length)) : 0);
  return {};
}

// building: TensorRT's BUILD phase (fields from an ONNX node), else a plan
// being deserialized (fields as the plugin serialized them).
inline Error parse_mlp_fields(const FieldView* fields, int32_t nb, bool building, MlpAttrs* out) {
  MlpAttrs a;
  a.decode_version = absent_decode_version(building);
  for (int32_t i = 0; i < nb; ++i) {
    const FieldView& f = fields[i];
    if (!f.name) return "a field has no name";
    const bool is_act = std::strcmp(f.name, kSparseGatedMlpFields[0]) == 0;
    const bool is_norm = std::strcmp(f.name, kSparseGatedMlpFields[1]) == 0;
    const bool is_format = std::strcmp(f.name, kSparseGatedMlpFields[2]) == 0;
    const bool is_down = std::strcmp(f.name, kSparseGatedMlpFields[3]) == 0;
    const bool is_x = std::strcmp(f.name, kSparseGatedMlpFields[4]) == 0;
    const bool is_version = std::strcmp(f.name, kSparseGatedMlpFields[5]) == 0;
    if (!is_act && !is_norm && !is_format && !is_down && !is_x && !is_version) {
      if (ignored_field(f.name)) continue;
      return std::string("SparseGatedMLP: unknown field ") + f.name;
    }
    std::string s;
    if (Error e = field_string(f, &s); !e.empty()) return e;
    if (is_act && !lookup(kActivations, s, &a.activation))
      return "SparseGatedMLP: activation '" + s + "' not in " + choices(kActivations);
    if (is_norm && !lookup(kScoreNorms, s, &a.score_norm))
      return "SparseGatedMLP: score_norm '" + s + "' not in " + choices(kScoreNorms);
    if (is_format && !lookup(kWeightFormats, s, &a.weight_format))
      return "SparseGatedMLP: weight_format '" + s + "' not in " + choices(kWeightFormats);
    if (is_down && !lookup(kDownWeightFormats, s, &a.down_weight_format))
      return "SparseGatedMLP: down_weight_format '" + s + "' not in " + choices(kDownWeightFormats);
    if (is_x && !lookup(kXFormats, s, &a.x_format))
      return "SparseGatedMLP: x_format '" + s + "' not in " + choices(kXFormats);
    if (is_version && !lookup(kDecodeVersions, s, &a.decode_version))
      return "SparseGatedMLP: decode_version '" + s + "' not in " + choices(kDecodeVersions);
  }
  // Whatever the fields' order: a block down format needs block gate/up weights (the kernels refuse the rest).
  if (a.down_weight_format != TDA_WEIGHTS_DTYPE && a.weight_format == TDA_WEIGHTS_DTYPE)
    return std::string("SparseGatedMLP: down_weight_format '") + name_of(kDownWeightFormats, a.down_weight_format) +
           "' needs a block weight_format, not 'dtype'";
  if (a.x_format != TDA_X_DTYPE && a.weight_format == TDA_WEIGHTS_DTYPE)
    return std::string("SparseGatedMLP: x_format '") + name_of(kXFormats, a.x_format) +
           "' needs a block weight_format, not 'dtype'";
  *out = a;
  return {};
}

// Whether a kernel library (its tda_backend(): "cuda", "cpu") runs these fields, checked when a plugin is
// created: the CUDA kernels return TDA_ERR_BAD_DTYPE for x_format q8_0 and the C++ plugin's prefill (cuBLAS on
// the dequantized weights) reads x as is, so an engine with q8_0 activations runs on the CPU library only.
inline Error mlp_check_backend(const MlpAttrs& a, const char* backend) {
  if (a.x_format != TDA_X_DTYPE && std::strcmp(backend, "cpu") != 0)
    return std::string("SparseGatedMLP: x_format '") + name_of(kXFormats, a.x_format) + "' runs on the CPU kernel " +
           "library only, not the " + backend + " one: rebuild the engine with x_format dtype for TensorRT";
  return {};
}

// The serialized value of field i (the C++ and Python plugins write the same strings).
inline const char* mlp_field_value(int32_t i, const MlpAttrs& a) {
  switch (i) {
    case 0: return name_of(kActivations, a.activation);
    case 1: return name_of(kScoreNorms, a.score_norm);
    case 2: return name_of(kWeightFormats, a.weight_format);
    case 3: return name_of(kDownWeightFormats, a.down_weight_format);
    case 4: return name_of(kXFormats, a.x_format);
    default: return name_of(kDecodeVersions, a.decode_version);
  }
}

inline Error parse_select_fields(const FieldView* fields, int32_t nb) {
  for (int32_t i = 0; i < nb; ++i) {
    if (!fields[i].name) return "a field has no name";
    if (!ignored_field(fields[i].name)) return std::string("SelectActive: unknown field ") + fields[i].name;
  }
  return {};
}

// ---- Shapes ----
// A dimension is -1 where TensorRT does not know it yet (build-time wildcard).
struct Dims {
  int32_t nb = 0;
  int64_t d[8] = {};
};

// Output dimension k is dimension `dim` of input `input`: TensorRT needs the
// output shapes as expressions, and every output dimension here is an input's.
struct DimRef {
  int32_t input;
  int32_t dim;
};
struct OutputShape {
  int32_t nb;
  DimRef d[3];
};

// Both modes give the same shapes ([B,S,H] and [B,I]); prefill vs decode is
// a runtime decision on S (see mlp_mode), not a shape difference.
inline OutputShape mlp_output_shape(int32_t out) {
  if (out == mlp::kOutput - mlp::kNbIn) return {3, {{mlp::kHidden, 0}, {mlp::kHidden, 1}, {mlp::kHidden, 2}}};
  return {2, {{mlp::kScoresIn, 0}, {mlp::kScoresIn, 1}}};
}

inline OutputShape select_output_shape(int32_t out) {
  if (out == sel::kActiveIdx - sel::kNbIn) return {2, {{sel::kScores, 0}, {sel::kScores, 1}}};
  return {1, {{sel::kScores, 0}}};
}

struct MlpSizes {
  int64_t batch = -1, seq = -1, hidden = -1, inter = -1;
};

// Agrees a dimension seen in several tensors; -1 (unknown) matches anything.
inline Error unify(int64_t* dim, int64_t v, const char* what, const char* tensor) {
  if (v < 0) return {};
  if (*dim >= 0 && *dim != v)
    return std::string(tensor) + ": " + what + " = " + std::to_string(v) + " but " + std::to_string(*dim) +
           " elsewhere";
  *dim = v;
  return {};
}

inline Error check_ranks(const Dims* in, int32_t nb_in, int32_t expected_in, const int* rank,
                         const char* const* names) {
  if (nb_in != expected_in)
    return "expected " + std::to_string(expected_in) + " inputs, got " + std::to_string(nb_in);
  for (int32_t i = 0; i < nb_in; ++i)
    if (in[i].nb != rank[i])
      return std::string(names[i]) + ": rank " + std::to_string(in[i].nb) + ", expected " + std::to_string(rank[i]);
  return {};
}

inline Error size_multiple(int64_t v, const char* what) {
  if (v >= 0 && (v == 0 || v % TDA_SIZE_MULTIPLE != 0))
    return std::string(what) + " = " + std::to_string(v) + " must be a positive multiple of " +
           std::to_string(TDA_SIZE_MULTIPLE);
  return {};
}

// Where each size appears: (size, tensor, axis). Shared by the exact check
// and the bound computation so the two cannot disagree about the layout.
namespace mlp {
enum Size { kB, kS, kH, kI };
struct DimUse {
  Size size;
  int tensor, axis;
};
constexpr const char* kSizeNames[] = {"B", "S", "H", "I"};
constexpr DimUse kDimUses[] = {{kB, kHidden, 0},     {kS, kHidden, 1},     {kH, kHidden, 2},
                               {kI, kGateUp, 0},     {kH, kGateUp, 2},     {kI, kDownT, 0},
                               {kH, kDownT, 1},      {kB, kActiveIdx, 0},  {kI, kActiveIdx, 1},
                               {kB, kActiveCount, 0}, {kB, kTokenValid, 0}, {kS, kTokenValid, 1},
                               {kB, kScoresIn, 0},   {kI, kScoresIn, 1}};
}  // namespace mlp

// Block weights: the weights' last axis is H's row bytes (H/32 blocks), not H, so it does not give H.
inline bool weight_row_axis(const mlp::DimUse& u) {
  return u.size == mlp::kH && (u.tensor == mlp::kGateUp || u.tensor == mlp::kDownT);
}

inline int64_t* size_slot(MlpSizes* s, mlp::Size k) {
  return k == mlp::kB ? &s->batch : k == mlp::kS ? &s->seq : k == mlp::kH ? &s->hidden : &s->inter;
}

inline Error mlp_check_static(const Dims* in, int32_t nb_in) {
  using namespace mlp;
  if (Error e = check_ranks(in, nb_in, kNbIn, kRank, kNames); !e.empty()) return e;
  if (in[kGateUp].d[1] >= 0 && in[kGateUp].d[1] != 2) return "gate_up_weight: dimension 1 must be 2";
  return {};
}

// H and I as the weight format needs them: I a positive multiple of 8 (the prefill's score reduction,
// tda_prefill_scores, needs it whatever the weights); T weights: H too; block weights: H a positive
// multiple of 32 (whole blocks) and each weight's last axis exactly H/32 blocks of its format: gate_up's
// wf, down_weight_t's dwf (field down_weight_format; TDA_WEIGHTS_DTYPE = "same" as wf).
inline Error mlp_check_sizes(const Dims* in, const MlpSizes& s, tda_weight_format_t wf,
                             tda_weight_format_t dwf = TDA_WEIGHTS_DTYPE) {
  using namespace mlp;
  if (Error e = size_multiple(s.inter, "I (intermediate size)"); !e.empty()) return e;
  if (wf == TDA_WEIGHTS_DTYPE) return size_multiple(s.hidden, "H (hidden size)");
  const char* fmt = kWeightFormats[wf].name;
  if (s.hidden >= 0 && (s.hidden == 0 || s.hidden % TDA_QUANT_BLOCK != 0))
    return "H (hidden size) = " + std::to_string(s.hidden) + " must be a positive multiple of " +
           std::to_string(TDA_QUANT_BLOCK) + " for weight_format " + fmt;
  if (s.hidden < 0) return {};
  struct Weight {
    int tensor, axis;
    tda_weight_format_t format;
    const char* field;
  };
  const Weight weights[] = {{kGateUp, 2, wf, "weight_format"},
                            dwf == TDA_WEIGHTS_DTYPE ? Weight{kDownT, 1, wf, "weight_format"}
                                                     : Weight{kDownT, 1, dwf, "down_weight_format"}};
  for (const Weight& w : weights) {
    const int64_t row = s.hidden / TDA_QUANT_BLOCK * weight_block_bytes(w.format);
    const int64_t v = in[w.tensor].d[w.axis];
    if (v >= 0 && v != row)
      return std::string(kNames[w.tensor]) + ": last dimension " + std::to_string(v) + " but " + w.field + " " +
             kWeightFormats[w.format].name + " with H = " + std::to_string(s.hidden) + " needs " +
             std::to_string(row) + " bytes (H/32 blocks of " + std::to_string(weight_block_bytes(w.format)) + ")";
  }
  return {};
}

// Exact shapes (enqueue, onShapeChange) or TensorRT's desc.dims (build time,
// -1 where a dimension is not fixed): every size must agree where known.
inline Error mlp_check_shapes(const Dims* in, int32_t nb_in, MlpSizes* out,
                              tda_weight_format_t wf = TDA_WEIGHTS_DTYPE, tda_weight_format_t dwf = TDA_WEIGHTS_DTYPE) {
  using namespace mlp;
  if (Error e = mlp_check_static(in, nb_in); !e.empty()) return e;
  MlpSizes s;
  for (const DimUse& u : kDimUses) {
    if (wf != TDA_WEIGHTS_DTYPE && weight_row_axis(u)) continue;
    if (Error e = unify(size_slot(&s, u.size), in[u.tensor].d[u.axis], kSizeNames[u.size], kNames[u.tensor]);
        !e.empty())
      return e;
  }
  if (Error e = mlp_check_sizes(in, s, wf, dwf); !e.empty()) return e;
  *out = s;
  return {};
}

// A profile's max bounds (configurePlugin/getWorkspaceSize's desc.max). TensorRT
// bounds every tensor on its own: a tensor derived inside the graph (token_valid,
// from attention_mask) may have a larger max S than hidden_states, and that is
// a valid profile, so bounds are not required to agree. At run time every
// input carrying a size holds the same value, so that value is at most the
// smallest known bound: that is the bound the workspace is sized for (taking
// the largest would reserve a prefill workspace over the whole past in a
// decode profile). The weights' H and I are constants and are still checked.
inline Error mlp_max_sizes(const Dims* max, int32_t nb_in, MlpSizes* out,
                           tda_weight_format_t wf = TDA_WEIGHTS_DTYPE, tda_weight_format_t dwf = TDA_WEIGHTS_DTYPE) {
  using namespace mlp;
  if (Error e = mlp_check_static(max, nb_in); !e.empty()) return e;
  MlpSizes s;
  for (const DimUse& u : kDimUses) {
    if (wf != TDA_WEIGHTS_DTYPE && weight_row_axis(u)) continue;
    int64_t* slot = size_slot(&s, u.size);
    const int64_t v = max[u.tensor].d[u.axis];
    if (v >= 0) *slot = *slot < 0 ? v : std::min(*slot, v);
  }
  if (Error e = mlp_check_sizes(max, s, wf, dwf); !e.empty()) return e;
  if (s.batch < 0 || s.seq < 0) return "max bounds: B and S must be known (a profile's max)";
  *out = s;
  return {};
}

inline Error select_check_shapes(const Dims* in, int32_t nb_in, int64_t* batch, int64_t* inter) {
  if (Error e = check_ranks(in, nb_in, sel::kNbIn, sel::kRank, sel::kNames); !e.empty()) return e;
  if (in[sel::kDensityBounds].d[0] >= 0 && in[sel::kDensityBounds].d[0] != 2)
    return "density_bounds: must have 2 entries (lo, hi)";
  *batch = in[sel::kScores].d[0];
  *inter = in[sel::kScores].d[1];
  return {};
}

// ---- Types and formats ----
inline Error mlp_output_types(const DType* in, int32_t nb_in, DType* out) {
  if (nb_in != mlp::kNbIn) return "expected 7 inputs";
  if (!is_float_t(in[mlp::kHidden])) return "hidden_states: T must be float32, float16 or bfloat16";
  out[0] = in[mlp::kHidden];
  out[1] = DType::kFloat;
  return {};
}

inline Error select_output_types(const DType* in, int32_t nb_in, DType* out) {
  if (nb_in != sel::kNbIn) return "expected 3 inputs";
  if (in[sel::kScores] != DType::kFloat) return "scores: must be float32";
  out[0] = out[1] = DType::kInt32;
  return {};
}

struct IoDesc {
  DType type;
  bool linear;  // row-major contiguous (TensorFormat::kLINEAR)
};

// TensorRT asks position by position and guarantees io[0..pos-1] already hold
// supported choices, so each position only compares with an earlier one.
inline bool mlp_supports(int32_t pos, const IoDesc* io, tda_weight_format_t wf = TDA_WEIGHTS_DTYPE) {
  using namespace mlp;
  if (!io[pos].linear) return false;
  const DType t = io[pos].type;
  switch (pos) {
    case kHidden: return is_float_t(t);
    case kGateUp:
    case kDownT: return wf == TDA_WEIGHTS_DTYPE ? t == io[kHidden].type : t == DType::kInt8;
    case kOutput: return t == io[kHidden].type;
    case kActiveIdx:
    case kActiveCount: return t == DType::kInt32;
    case kTokenValid:
    case kScoresIn:
    case kScoresOut: return t == DType::kFloat;
  }
  return false;
}

inline bool select_supports(int32_t pos, const IoDesc* io) {
  if (!io[pos].linear || pos < 0 || pos >= sel::kNbIo) return false;
  return io[pos].type == (pos < sel::kNbIn ? DType::kFloat : DType::kInt32);
}

// ---- Execution plan ----
enum class Mode { kPrefill, kDecode };
// Decided per enqueue from the runtime S, so one engine serves both phases
// (the exported graph has a dynamic S). S == 0 takes the prefill path, which
// then only copies the scores.
inline Mode mlp_mode(int64_t seq) { return seq == 1 ? Mode::kDecode : Mode::kPrefill; }

// Workspace queries of the C ABI; tests substitute their own.
struct KernelQueries {
  size_t (*decode)(const tda_decode_args_t*);
  size_t (*prefill_scores)(const tda_prefill_scores_args_t*);
  size_t (*select)(const tda_select_args_t*);
};

// cuBLAS needs a caller-provided workspace to be capturable in a CUDA graph;
// 32 MiB is NVIDIA's recommendation for Hopper (4 MiB for older GPUs).
constexpr size_t kCublasWorkspaceBytes = size_t(32) << 20;
// Decode kernels reproducible run to run (the workspace cost is capped by the ABI).
constexpr int32_t kDeterministic = 1;

inline size_t align256(size_t n) { return (n + 255) & ~size_t(255); }

// One dense GEMM in cuBLAS's column-major terms: C(m x n) = op(A) op(B).
struct Gemm {
  bool trans_a, trans_b;
  int32_t m, n, k;
  const void* a;
  int32_t lda;
  const void* b;
  int32_t ldb;
  void* c;
  int32_t ldc;
};

struct MlpBuffers {
  const void* hidden;
  const void* gate_up;
  const void* down_t;
  const int32_t* active_idx;
  const int32_t* active_count;
  const float* token_valid;
  const float* scores_in;
  void* output;
  float* scores_out;
};

// Workspace of a prefill, 256-byte aligned pieces:
//   gate_up [M, I, 2] T | z [M, I] T | prefill-scores workspace | cuBLAS workspace
//   | block weights only: the dequantized weights in T, gate_up [I, 2, H] then down_t [I, H]
//   | x_format q8_0 only: xq [M, H] T, the quantized hidden_states the gate/up GEMM reads
// Prefill is compute-bound, so block weights are dequantized to T (exact fp32 values rounded to T once:
// the GEMM's input type) and the same cuBLAS GEMMs run on them; decode reads the blocks themselves.
// (x_format q8_0 runs on the CPU kernel library only, i.e. in the Python plugin's CPU enqueue: mlp_check_backend.)
struct PrefillLayout {
  size_t gate_up, z, scores, cublas, weights, xq, total;
};

inline PrefillLayout prefill_layout(DType t, int64_t batch, int64_t seq, int64_t inter, const KernelQueries& q,
                                    tda_weight_format_t wf = TDA_WEIGHTS_DTYPE, int64_t hidden = 0,
                                    tda_x_format_t xf = TDA_X_DTYPE) {
  const size_t tokens = size_t(batch) * size_t(seq);
  tda_prefill_scores_args_t a{};
  a.dtype = abi_dtype(t);
  a.batch = int32_t(batch);
  a.seq_len = int32_t(seq);
  a.intermediate = int32_t(inter);
  PrefillLayout l{};
  l.gate_up = 0;
  l.z = align256(l.gate_up + tokens * 2 * size_t(inter) * elem_size(t));
  l.scores = align256(l.z + tokens * size_t(inter) * elem_size(t));
  l.cublas = align256(l.scores + q.prefill_scores(&a));
  l.weights = align256(l.cublas + kCublasWorkspaceBytes);
  const size_t end = wf == TDA_WEIGHTS_DTYPE ? l.cublas + kCublasWorkspaceBytes
                                             : l.weights + 3 * size_t(inter) * size_t(hidden) * elem_size(t);
  l.xq = align256(end);
  l.total = xf == TDA_X_DTYPE ? end : l.xq + tokens * size_t(hidden) * elem_size(t);
  return l;
}

inline tda_decode_args_t decode_args(DType t, const MlpAttrs& attrs, const MlpSizes& s, int64_t b0, int64_t nb,
                                     const MlpBuffers& buf) {
  tda_decode_args_t a{};
  a.dtype = abi_dtype(t);
  a.activation = attrs.activation;
  a.batch = int32_t(nb);
  a.hidden = int32_t(s.hidden);
  a.intermediate = int32_t(s.inter);
  a.deterministic = kDeterministic;
  a.version = attrs.decode_version;
  a.weight_format = attrs.weight_format;
  a.down_weight_format = attrs.down_weight_format;
  a.x_format = attrs.x_format;
  const size_t row = size_t(s.hidden) * elem_size(t);  // one [H] row of hidden/output, in bytes
  a.hidden_states = buf.hidden ? static_cast<const char*>(buf.hidden) + b0 * row : nullptr;
  a.gate_up_weight = buf.gate_up;
  a.down_weight_t = buf.down_t;
  a.active_idx = buf.active_idx ? buf.active_idx + b0 * s.inter : nullptr;
  a.active_count = buf.active_count ? buf.active_count + b0 : nullptr;
  a.output = buf.output ? static_cast<char*>(buf.output) + b0 * row : nullptr;
  return a;
}

// Decode runs in batch chunks of at most TDA_MAX_BATCH (the ABI's limit); the
// workspace must fit the largest any chunk size asks for, which the ABI does
// not promise to grow monotonically with the batch.
inline size_t decode_workspace(DType t, const MlpAttrs& attrs, const MlpSizes& max, const KernelQueries& q) {
  size_t ws = 0;
  const int64_t top = std::min<int64_t>(max.batch, TDA_MAX_BATCH);
  for (int64_t b = 1; b <= top; ++b) {
    MlpSizes s = max;
    s.batch = b;
    const tda_decode_args_t a = decode_args(t, attrs, s, 0, b, MlpBuffers{});
    ws = std::max(ws, q.decode(&a));
  }
  return ws;
}

// One decode chunk's launch: its arguments (the plan's decode version) and the
// workspace bytes to pass, which that version needs for this chunk: at most
// what decode_workspace reserved, whatever $TDA_DECODE_VERSION says now.
struct DecodeCall {
  tda_decode_args_t args;
  size_t workspace_bytes;
};

inline DecodeCall decode_call(DType t, const MlpAttrs& attrs, const MlpSizes& s, int64_t b0, int64_t nb,
                              const MlpBuffers& buf, const KernelQueries& q) {
  DecodeCall c;
  c.args = decode_args(t, attrs, s, b0, nb, buf);
  c.workspace_bytes = q.decode(&c.args);
  return c;
}

// max: the profile's largest sizes; min_seq: its smallest S (S > 1 only
// reserves the prefill workspace, S == 1 in range the decode one).
inline size_t mlp_workspace_size(DType t, const MlpAttrs& attrs, const MlpSizes& max, int64_t min_seq,
                                 const KernelQueries& q) {
  size_t ws = 0;
  if (max.seq != 1)
    ws = prefill_layout(t, max.batch, max.seq, max.inter, q, attrs.weight_format, max.hidden, attrs.x_format).total;
  if (min_seq <= 1 && max.seq >= 1) ws = std::max(ws, decode_workspace(t, attrs, max, q));
  return ws;
}

// Everything a prefill enqueue launches, in order: (block weights: dequantize
// gate_up and down_t into the workspace, in T), (x_format q8_0: quantize
// hidden_states into the workspace, in T), gate/up GEMM, act(gate)*up
// into z (our kernel: no cuBLAS epilogue is a gated activation), the score
// reduction of the C ABI, down GEMM.
struct PrefillPlan {
  Gemm gate_up_gemm;
  void* gate_up;  // [M, I, 2] T
  void* z;        // [M, I] T
  int64_t tokens; // M = B * S
  tda_prefill_scores_args_t scores;
  void* scores_ws;
  size_t scores_ws_bytes;
  Gemm down_gemm;
  void* cublas_ws;
  size_t cublas_ws_bytes;
  // Block weights: the formats to dequantize (gate_up's, down_t's own) and where to (the GEMMs' A
  // operands); DTYPE: nothing to do.
  int32_t weight_format;
  int32_t down_weight_format;  // down_t's format itself (down_format: never "same")
  void* gate_up_t;  // [I, 2, H] T
  void* down_t;     // [I, H] T
  // x_format q8_0: hidden_states quantized (contract X_QUANT_SEMANTICS, exact in float32, rounded to T as the
  // weights are) into xq, which the gate/up GEMM reads (gate_up_gemm.b); dtype: nullptr, the GEMM reads the input.
  int32_t x_format;
  void* xq;  // [M, H] T
};

// ws: at least prefill_layout(...).total bytes, which getWorkspaceSize
// reserved for the profile's largest B*S (enqueue is not told the size).
inline Error prefill_plan(DType t, const MlpAttrs& attrs, const MlpSizes& s, const MlpBuffers& buf, void* ws,
                          const KernelQueries& q, PrefillPlan* out) {
  const int64_t tokens = s.batch * s.seq;
  if (tokens > INT32_MAX || 2 * s.inter > INT32_MAX) return "prefill: B*S or 2*I exceeds cuBLAS's int sizes";
  const PrefillLayout l = prefill_layout(t, s.batch, s.seq, s.inter, q, attrs.weight_format, s.hidden,
                                         attrs.x_format);
  if (!ws) return "prefill: no workspace";
  char* base = static_cast<char*>(ws);
  PrefillPlan p{};
  p.gate_up = base + l.gate_up;
  p.z = base + l.z;
  p.tokens = tokens;
  // Row-major gate_up[M, 2I] = hidden[M, H] . W[2I, H]^T is column-major
  // gate_up^T = W . hidden^T: A = W seen as [H, 2I] (transposed), B = hidden^T.
  const int32_t M = int32_t(tokens), H = int32_t(s.hidden), I = int32_t(s.inter);
  p.weight_format = attrs.weight_format;
  p.down_weight_format = down_format(attrs.weight_format, attrs.down_weight_format);
  const bool blocks = attrs.weight_format != TDA_WEIGHTS_DTYPE;
  p.gate_up_t = blocks ? base + l.weights : nullptr;
  p.down_t = blocks ? base + l.weights + 2 * size_t(I) * size_t(H) * elem_size(t) : nullptr;
  const void* gate_up_w = blocks ? p.gate_up_t : buf.gate_up;
  const void* down_w = blocks ? p.down_t : buf.down_t;
  p.x_format = attrs.x_format;
  p.xq = attrs.x_format != TDA_X_DTYPE ? base + l.xq : nullptr;
  const void* x = p.xq ? p.xq : buf.hidden;
  p.gate_up_gemm = {true, false, 2 * I, M, H, gate_up_w, H, x, H, p.gate_up, 2 * I};
  // Row-major out[M, H] = z[M, I] . Wd_t[I, H] is column-major out^T = Wd_t^T . z^T,
  // both already in that layout: no transposes.
  p.down_gemm = {false, false, H, M, I, down_w, H, p.z, I, buf.output, H};
  p.scores.dtype = abi_dtype(t);
  p.scores.score_norm = attrs.score_norm;
  p.scores.batch = int32_t(s.batch);
  p.scores.seq_len = int32_t(s.seq);
  p.scores.intermediate = I;
  p.scores.z = p.z;
  p.scores.token_valid = buf.token_valid;
  p.scores.scores_in = buf.scores_in;
  p.scores.scores_out = buf.scores_out;
  p.scores_ws = base + l.scores;
  p.scores_ws_bytes = l.cublas - l.scores;
  p.cublas_ws = base + l.cublas;
  p.cublas_ws_bytes = kCublasWorkspaceBytes;
  *out = p;
  return {};
}

inline tda_select_args_t select_args(int64_t inter, int64_t b0, int64_t nb, const float* scores,
                                     const float* threshold, const float* density_bounds, int32_t* idx,
                                     int32_t* count) {
  tda_select_args_t a{};
  a.density_bounds = density_bounds;
  a.batch = int32_t(nb);
  a.intermediate = int32_t(inter);
  a.scores = scores ? scores + b0 * inter : nullptr;
  a.threshold = threshold;
  a.active_idx = idx ? idx + b0 * inter : nullptr;
  a.active_count = count ? count + b0 : nullptr;
  return a;
}

// Same chunking as decode: the ABI takes at most TDA_MAX_BATCH rows a call.
inline size_t select_workspace_size(int64_t max_batch, int64_t inter, const KernelQueries& q) {
  size_t ws = 0;
  for (int64_t b = 1; b <= std::min<int64_t>(max_batch, TDA_MAX_BATCH); ++b) {
    const tda_select_args_t a = select_args(inter, 0, b, nullptr, nullptr, nullptr, nullptr, nullptr);
    ws = std::max(ws, q.select(&a));
  }
  return ws;
}

inline int64_t chunk_batch(int64_t batch, int64_t b0) { return std::min<int64_t>(TDA_MAX_BATCH, batch - b0); }

}  // namespace tda_trt
