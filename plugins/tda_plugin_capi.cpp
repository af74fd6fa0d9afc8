// A plain C ABI over tda_plugin_logic.h, so that plugin realizations in other
// languages (tda_export/trt/plugins.py, for TensorRT's Python API) make the
// same decisions as the C++ plugins by calling the same code, not a copy.
// Compiled on demand with g++ (tda_export/trt/logic.py); no TensorRT, no CUDA.
//
// Conventions: tensors' dims are passed as nb_in rows of 8 int64 (-1 where
// unknown) plus their ranks; dtypes as tda_trt::DType values; functions that
// can fail return 0 on success, else non-zero with a message in `err`
// (TDA_TRT_ERR_LEN bytes, NUL-terminated).
#include <cstdio>
#include <vector>

#include "tda_plugin_logic.h"

using namespace tda_trt;

#define TDA_TRT_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr size_t kErrLen = 256;

int fail(const Error& e, char* err) {
  if (e.empty()) return 0;
  if (err) std::snprintf(err, kErrLen, "%s", e.c_str());
  return 1;
}

std::vector<Dims> dims_of(int32_t nb, const int32_t* ranks, const int64_t* dims) {
  std::vector<Dims> out(size_t(nb > 0 ? nb : 0));
  for (int32_t i = 0; i < nb; ++i) {
    out[i].nb = ranks[i];
    for (int32_t k = 0; k < 8; ++k) out[i].d[k] = dims[i * 8 + k];
  }
  return out;
}

std::vector<FieldView> fields_of(int32_t nb, const char* const* names, const void* const* data,
                                 const int32_t* lengths, const int32_t* is_char) {
  std::vector<FieldView> out;
  for (int32_t i = 0; i < nb; ++i) out.push_back({names[i], data[i], lengths[i], is_char[i] != 0});
  return out;
}

void sizes_out(const MlpSizes& s, int64_t* out) {
  out[0] = s.batch, out[1] = s.seq, out[2] = s.hidden, out[3] = s.inter;
}

MlpSizes sizes_in(const int64_t* v) { return MlpSizes{v[0], v[1], v[2], v[3]}; }

// attrs: activation, score_norm, decode_version, weight_format, down_weight_format, x_format (the plugin's fields,
// parsed; down_weight_format 0 = same).
constexpr int32_t kNbAttrs = 6;
MlpAttrs attrs_in(const int32_t* attrs) {
  MlpAttrs a;
  a.activation = tda_activation_t(attrs[0]);
  a.score_norm = tda_score_norm_t(attrs[1]);
  a.decode_version = attrs[2];
  a.weight_format = tda_weight_format_t(attrs[3]);
  a.down_weight_format = tda_weight_format_t(attrs[4]);
  a.x_format = tda_x_format_t(attrs[5]);
  return a;
}

}  // namespace

TDA_TRT_API size_t tda_trt_err_len(void) { return kErrLen; }
TDA_TRT_API size_t tda_trt_sizeof_prefill_plan(void) { return sizeof(PrefillPlan); }
TDA_TRT_API size_t tda_trt_sizeof_mlp_buffers(void) { return sizeof(MlpBuffers); }
TDA_TRT_API const char* tda_trt_identity(int32_t what) {
  switch (what) {
    case 0: return kNamespace;
    case 1: return kVersion;
    case 2: return kSparseGatedMlpName;
    default: return kSelectActiveName;
  }
}

// ---- fields ----
// The decode_version a plan built in this process records (an ONNX node carries none).
TDA_TRT_API int32_t tda_trt_build_decode_version(void) { return absent_decode_version(true); }
TDA_TRT_API int32_t tda_trt_mlp_nb_fields(void) { return kSparseGatedMlpNbFields; }
TDA_TRT_API const char* tda_trt_mlp_field_name(int32_t i) { return kSparseGatedMlpFields[i]; }
TDA_TRT_API int32_t tda_trt_mlp_nb_attrs(void) { return kNbAttrs; }

// attrs: kNbAttrs int32 out (activation, score_norm, decode_version, weight_format, down_weight_format, x_format);
// building as TensorRT's BUILD phase.
TDA_TRT_API int tda_trt_mlp_parse_fields(int32_t nb, const char* const* names, const void* const* data,
                                         const int32_t* lengths, const int32_t* is_char, int32_t building,
                                         int32_t* attrs, char* err) {
  const std::vector<FieldView> f = fields_of(nb, names, data, lengths, is_char);
  MlpAttrs a;
  if (int rc = fail(parse_mlp_fields(f.data(), nb, building != 0, &a), err)) return rc;
  attrs[0] = a.activation;
  attrs[1] = a.score_norm;
  attrs[2] = a.decode_version;
  attrs[3] = a.weight_format;
  attrs[4] = a.down_weight_format;
  attrs[5] = a.x_format;
  return 0;
}

// backend: the kernel library's tda_backend() ("cuda", "cpu"); fails naming a field that library does not run.
TDA_TRT_API int tda_trt_mlp_check_backend(const int32_t* attrs, const char* backend, char* err) {
  return fail(mlp_check_backend(attrs_in(attrs), backend), err);
}

TDA_TRT_API int tda_trt_select_parse_fields(int32_t nb, const char* const* names, const void* const* data,
                                            const int32_t* lengths, const int32_t* is_char, char* err) {
  const std::vector<FieldView> f = fields_of(nb, names, data, lengths, is_char);
  return fail(parse_select_fields(f.data(), nb), err);
}

// The serialized value of field i for these attributes: the same string the
// C++ plugin writes (its length + 1 bytes, NUL included, are serialized).
TDA_TRT_API const char* tda_trt_mlp_field_value(int32_t i, const int32_t* attrs) {
  return mlp_field_value(i, attrs_in(attrs));
}

// ---- shapes and types ----
// weight_format, down_weight_format: the plugin's (tda_weight_format_t; down 0 = same): block weights' last
// axes are row bytes of their format.
TDA_TRT_API int tda_trt_mlp_check_shapes(int32_t nb, const int32_t* ranks, const int64_t* dims, int32_t weight_format,
                                         int32_t down_weight_format, int64_t* sizes, char* err) {
  MlpSizes s;
  if (int rc = fail(mlp_check_shapes(dims_of(nb, ranks, dims).data(), nb, &s, tda_weight_format_t(weight_format),
                                     tda_weight_format_t(down_weight_format)),
                    err))
    return rc;
  sizes_out(s, sizes);
  return 0;
}

TDA_TRT_API int tda_trt_mlp_max_sizes(int32_t nb, const int32_t* ranks, const int64_t* dims, int32_t weight_format,
                                      int32_t down_weight_format, int64_t* sizes, char* err) {
  MlpSizes s;
  if (int rc = fail(mlp_max_sizes(dims_of(nb, ranks, dims).data(), nb, &s, tda_weight_format_t(weight_format),
                                  tda_weight_format_t(down_weight_format)),
                    err))
    return rc;
  sizes_out(s, sizes);
  return 0;
}

TDA_TRT_API int tda_trt_select_check_shapes(int32_t nb, const int32_t* ranks, const int64_t* dims, int64_t* sizes,
                                            char* err) {
  return fail(select_check_shapes(dims_of(nb, ranks, dims).data(), nb, &sizes[0], &sizes[1]), err);
}

// refs: 3 (input, dim) pairs; returns the output's rank.
TDA_TRT_API int32_t tda_trt_output_shape(int32_t op, int32_t out, int32_t* refs) {
  const OutputShape s = op == 0 ? mlp_output_shape(out) : select_output_shape(out);
  for (int32_t k = 0; k < s.nb; ++k) refs[2 * k] = s.d[k].input, refs[2 * k + 1] = s.d[k].dim;
  return s.nb;
}

TDA_TRT_API int tda_trt_output_types(int32_t op, int32_t nb, const int32_t* in, int32_t* out, char* err) {
  std::vector<DType> t;
  for (int32_t i = 0; i < nb; ++i) t.push_back(DType(in[i]));
  DType o[2] = {DType::kOther, DType::kOther};
  if (int rc = fail(op == 0 ? mlp_output_types(t.data(), nb, o) : select_output_types(t.data(), nb, o), err))
    return rc;
  out[0] = int32_t(o[0]), out[1] = int32_t(o[1]);
  return 0;
}

// types/linear of io[0..pos]; 1 if position pos is supported (weight_format: SparseGatedMLP's).
TDA_TRT_API int tda_trt_supports(int32_t op, int32_t pos, const int32_t* types, const int32_t* linear,
                                 int32_t weight_format) {
  std::vector<IoDesc> io;
  for (int32_t i = 0; i <= pos; ++i) io.push_back({DType(types[i]), linear[i] != 0});
  return op == 0 ? mlp_supports(pos, io.data(), tda_weight_format_t(weight_format)) : select_supports(pos, io.data());
}

// ---- workspace and launches ----
TDA_TRT_API size_t tda_trt_mlp_workspace_size(int32_t dtype, const int32_t* attrs, const int64_t* max_sizes,
                                              int64_t min_seq, const KernelQueries* q) {
  return mlp_workspace_size(DType(dtype), attrs_in(attrs), sizes_in(max_sizes), min_seq, *q);
}

TDA_TRT_API size_t tda_trt_select_workspace_size(int64_t max_batch, int64_t inter, const KernelQueries* q) {
  return select_workspace_size(max_batch, inter, *q);
}

TDA_TRT_API int tda_trt_mlp_is_decode(int64_t seq) { return mlp_mode(seq) == Mode::kDecode; }
TDA_TRT_API int64_t tda_trt_chunk_batch(int64_t batch, int64_t b0) { return chunk_batch(batch, b0); }

// One decode chunk: its arguments and the workspace bytes to pass (decode_call).
TDA_TRT_API size_t tda_trt_mlp_decode_call(int32_t dtype, const int32_t* attrs, const int64_t* sizes, int64_t b0,
                                           int64_t nb, const MlpBuffers* buf, const KernelQueries* q,
                                           tda_decode_args_t* out) {
  const DecodeCall c = decode_call(DType(dtype), attrs_in(attrs), sizes_in(sizes), b0, nb, *buf, *q);
  *out = c.args;
  return c.workspace_bytes;
}

TDA_TRT_API int tda_trt_mlp_prefill_plan(int32_t dtype, const int32_t* attrs, const int64_t* sizes,
                                         const MlpBuffers* buf, void* ws, const KernelQueries* q, PrefillPlan* out,
                                         char* err) {
  return fail(prefill_plan(DType(dtype), attrs_in(attrs), sizes_in(sizes), *buf, ws, *q, out), err);
}

TDA_TRT_API void tda_trt_select_args(int64_t inter, int64_t b0, int64_t nb, const float* scores,
                                     const float* threshold, const float* density_bounds, int32_t* idx,
                                     int32_t* count, tda_select_args_t* out) {
  *out = select_args(inter, b0, nb, scores, threshold, density_bounds, idx, count);
}
