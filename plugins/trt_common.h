// TensorRT <-> tda_plugin_logic.h conversions shared by both plugins, and the
// library's logger (set by TensorRT through setLoggerFinder).
#pragma once

#include <NvInferRuntime.h>

#include <string>
#include <vector>

#include "tda_plugin_logic.h"

namespace tda_trt {

// Logs through TensorRT's logger when the library was loaded by
// IPluginRegistry::loadLibrary (which calls setLoggerFinder), else to stderr.
void log_error(const std::string& msg) noexcept;

// Reports a non-empty error and turns it into TensorRT's non-zero status.
inline int32_t report(const Error& e) noexcept {
  if (e.empty()) return 0;
  log_error(e);
  return -1;
}

inline DType to_dtype(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return DType::kFloat;
    case nvinfer1::DataType::kHALF: return DType::kHalf;
    case nvinfer1::DataType::kBF16: return DType::kBFloat16;
    case nvinfer1::DataType::kINT32: return DType::kInt32;
    case nvinfer1::DataType::kINT8: return DType::kInt8;  // packed block weights
    default: return DType::kOther;
  }
}

inline nvinfer1::DataType to_trt(DType t) {
  switch (t) {
    case DType::kHalf: return nvinfer1::DataType::kHALF;
    case DType::kBFloat16: return nvinfer1::DataType::kBF16;
    case DType::kInt32: return nvinfer1::DataType::kINT32;
    default: return nvinfer1::DataType::kFLOAT;
  }
}

inline Dims to_dims(nvinfer1::Dims const& d) {
  Dims out;
  out.nb = d.nbDims;
  for (int32_t i = 0; i < d.nbDims && i < 8; ++i) out.d[i] = d.d[i];
  return out;
}

// Build-time shape expressions: constants are checked now, the rest at
// configure/shape-change time.
inline Dims to_dims(nvinfer1::DimsExprs const& d) {
  Dims out;
  out.nb = d.nbDims;
  for (int32_t i = 0; i < d.nbDims && i < 8; ++i)
    out.d[i] = d.d[i]->isConstant() ? d.d[i]->getConstantValue() : -1;
  return out;
}

inline std::vector<DType> dtypes_of(nvinfer1::DataType const* t, int32_t nb) {
  std::vector<DType> out;
  for (int32_t i = 0; i < nb; ++i) out.push_back(to_dtype(t[i]));
  return out;
}

inline std::vector<IoDesc> io_of(nvinfer1::DynamicPluginTensorDesc const* io, int32_t upto) {
  std::vector<IoDesc> out;
  for (int32_t i = 0; i <= upto; ++i)
    out.push_back({to_dtype(io[i].desc.type), io[i].desc.format == nvinfer1::TensorFormat::kLINEAR});
  return out;
}

inline std::vector<FieldView> fields_of(nvinfer1::PluginFieldCollection const* fc) {
  std::vector<FieldView> out;
  for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
    nvinfer1::PluginField const& f = fc->fields[i];
    out.push_back({f.name, f.data, f.length, f.type == nvinfer1::PluginFieldType::kCHAR});
  }
  return out;
}

inline void write_output_shape(OutputShape const& s, nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs* out) {
  out->nbDims = s.nb;
  for (int32_t k = 0; k < s.nb; ++k) out->d[k] = inputs[s.d[k].input].d[s.d[k].dim];
}

// The C ABI's workspace queries, as the logic header takes them.
inline KernelQueries abi_queries() {
  return {tda_sparse_gated_mlp_decode_workspace_size, tda_prefill_scores_workspace_size,
          tda_select_active_workspace_size};
}

inline int32_t report_abi(tda_status_t s, char const* what) noexcept {
  if (s == TDA_OK) return 0;
  log_error(std::string(what) + ": " + tda_status_string(s));
  return -1;
}

// Factories the creators call (one translation unit per plugin).
nvinfer1::IPluginV3* make_sparse_gated_mlp(MlpAttrs const& attrs) noexcept;
nvinfer1::IPluginV3* make_select_active() noexcept;

}  // namespace tda_trt
