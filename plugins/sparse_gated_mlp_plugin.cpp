// tda::SparseGatedMLP as a TensorRT IPluginV3. Decisions live in
// tda_plugin_logic.h; this file converts TensorRT's structs and launches.
//
// Prefill (runtime S != 1): cuBLAS gate/up GEMM, act(gate)*up (gated_act.cu),
// tda_prefill_scores, cuBLAS down GEMM; with block-quantized weights
// (weight_format q8_0/q4_0/q4_1, int8 inputs holding the contract's bytes;
// down_weight_t possibly in a block format of its own, down_weight_format)
// the blocks are first dequantized to T in the workspace (dequant.cu).
// x_format q8_0 (quantized activations) is refused when the plugin is created:
// the CUDA kernels and this prefill read x as is (mlp_check_backend).
// Decode (runtime S == 1): tda_sparse_gated_mlp_decode in chunks of
// TDA_MAX_BATCH on the blocks themselves, scores copied.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <new>

#include "dequant.h"
#include "gated_act.h"
#include "trt_common.h"

namespace tda_trt {
namespace {

using namespace nvinfer1;

cudaDataType_t cuda_type(DType t) {
  return t == DType::kHalf ? CUDA_R_16F : (t == DType::kBFloat16 ? CUDA_R_16BF : CUDA_R_32F);
}

int32_t report_cublas(cublasStatus_t s, char const* what) noexcept {
  if (s == CUBLAS_STATUS_SUCCESS) return 0;
  log_error(std::string(what) + ": " + cublasGetStatusString(s));
  return -1;
}

int32_t report_cuda(cudaError_t s, char const* what) noexcept {
  if (s == cudaSuccess) return 0;
  log_error(std::string(what) + ": " + cudaGetErrorString(s));
  return -1;
}

// fp32 accumulation for every T (the contract's rule); CUBLAS_COMPUTE_32F
// also keeps fp32 inputs off TF32.
cublasStatus_t gemm(cublasHandle_t h, DType t, Gemm const& g) {
  const float one = 1.0f, zero = 0.0f;
  const cudaDataType_t ct = cuda_type(t);
  return cublasGemmEx(h, g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, g.m, g.n,
                      g.k, &one, g.a, ct, g.lda, g.b, ct, g.ldb, &zero, g.c, ct, g.ldc, CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT);
}

class SparseGatedMlpPlugin final : public IPluginV3,
                                   public IPluginV3OneCore,
                                   public IPluginV3OneBuild,
                                   public IPluginV3OneRuntime {
 public:
  explicit SparseGatedMlpPlugin(MlpAttrs const& attrs) : attrs_(attrs) {
    // Strings point into the logic header's static tables, so they outlive
    // the collection; the NUL is included for readers that expect C strings.
    for (int32_t i = 0; i < kSparseGatedMlpNbFields; ++i) {
      char const* value = mlp_field_value(i, attrs_);
      fields_[i] = PluginField(kSparseGatedMlpFields[i], value, PluginFieldType::kCHAR, int32_t(std::strlen(value) + 1));
    }
    collection_.nbFields = kSparseGatedMlpNbFields;
    collection_.fields = fields_;
  }

  ~SparseGatedMlpPlugin() override {
    if (cublas_) cublasDestroy(cublas_);
  }

  SparseGatedMlpPlugin(SparseGatedMlpPlugin const&) = delete;
  SparseGatedMlpPlugin& operator=(SparseGatedMlpPlugin const&) = delete;

  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }

  // The cuBLAS handle is per clone: each execution context gets its own.
  IPluginV3* clone() noexcept override { return new (std::nothrow) SparseGatedMlpPlugin(attrs_); }

  AsciiChar const* getPluginName() const noexcept override { return kSparseGatedMlpName; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

  int32_t getNbOutputs() const noexcept override { return mlp::kNbOut; }

  int32_t getOutputDataTypes(DataType* out, int32_t nb_out, DataType const* in, int32_t nb_in) const noexcept override {
    if (nb_out != mlp::kNbOut) return report("SparseGatedMLP: expected 2 outputs");
    DType types[mlp::kNbOut] = {DType::kOther, DType::kOther};
    if (int32_t rc = report(mlp_output_types(dtypes_of(in, nb_in).data(), nb_in, types))) return rc;
    for (int32_t i = 0; i < nb_out; ++i) out[i] = to_trt(types[i]);
    return 0;
  }

  int32_t getOutputShapes(DimsExprs const* in, int32_t nb_in, DimsExprs const*, int32_t, DimsExprs* out,
                          int32_t nb_out, IExprBuilder&) noexcept override {
    if (nb_in != mlp::kNbIn || nb_out != mlp::kNbOut) return report("SparseGatedMLP: expected 7 inputs, 2 outputs");
    Dims dims[mlp::kNbIn];
    for (int32_t i = 0; i < nb_in; ++i) dims[i] = to_dims(in[i]);
    MlpSizes s;
    if (int32_t rc = report(mlp_check_shapes(dims, nb_in, &s, attrs_.weight_format, attrs_.down_weight_format)))
      return rc;
    for (int32_t o = 0; o < nb_out; ++o) write_output_shape(mlp_output_shape(o), in, &out[o]);
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nb_in,
                                 int32_t nb_out) noexcept override {
    return nb_in == mlp::kNbIn && nb_out == mlp::kNbOut &&
           mlp_supports(pos, io_of(io, pos).data(), attrs_.weight_format);
  }

  // desc.dims, not max: a profile bounds each tensor separately (see mlp_max_sizes).
  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nb_in, DynamicPluginTensorDesc const*,
                          int32_t) noexcept override {
    return check(in, nb_in, [](DynamicPluginTensorDesc const& d) -> nvinfer1::Dims const& { return d.desc.dims; });
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nb_in, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    Dims max[mlp::kNbIn];
    for (int32_t i = 0; i < nb_in && i < mlp::kNbIn; ++i) max[i] = to_dims(in[i].max);
    MlpSizes s;
    if (report(mlp_max_sizes(max, nb_in, &s, attrs_.weight_format, attrs_.down_weight_format))) return 0;
    return mlp_workspace_size(to_dtype(in[mlp::kHidden].desc.type), attrs_, s, in[mlp::kHidden].min.d[1],
                              abi_queries());
  }

  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nb_in, PluginTensorDesc const*, int32_t) noexcept override {
    return check(in, nb_in, [](PluginTensorDesc const& d) -> nvinfer1::Dims const& { return d.dims; });
  }

  int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    Dims dims[mlp::kNbIn];
    for (int32_t i = 0; i < mlp::kNbIn; ++i) dims[i] = to_dims(in[i].dims);
    MlpSizes s;
    if (int32_t rc = report(mlp_check_shapes(dims, mlp::kNbIn, &s, attrs_.weight_format, attrs_.down_weight_format)))
      return rc;
    const MlpBuffers buf{inputs[mlp::kHidden],
                         inputs[mlp::kGateUp],
                         inputs[mlp::kDownT],
                         static_cast<int32_t const*>(inputs[mlp::kActiveIdx]),
                         static_cast<int32_t const*>(inputs[mlp::kActiveCount]),
                         static_cast<float const*>(inputs[mlp::kTokenValid]),
                         static_cast<float const*>(inputs[mlp::kScoresIn]),
                         outputs[0],
                         static_cast<float*>(outputs[1])};
    if (s.batch == 0) return 0;
    const DType t = to_dtype(in[mlp::kHidden].type);
    return mlp_mode(s.seq) == Mode::kDecode ? decode(t, s, buf, workspace, stream)
                                            : prefill(t, s, buf, workspace, stream);
  }

  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override {
    auto* p = new (std::nothrow) SparseGatedMlpPlugin(attrs_);
    // Created here, not in enqueue, because enqueue may be under CUDA graph
    // capture, where cublasCreate's allocation is illegal.
    if (p && p->ensure_cublas() != 0) {
      delete p;
      return nullptr;
    }
    return p;
  }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &collection_; }

 private:
  template <class Desc, class Get>
  int32_t check(Desc const* in, int32_t nb_in, Get dims_of) const noexcept {
    Dims dims[mlp::kNbIn];
    for (int32_t i = 0; i < nb_in && i < mlp::kNbIn; ++i) dims[i] = to_dims(dims_of(in[i]));
    MlpSizes s;
    return report(mlp_check_shapes(dims, nb_in, &s, attrs_.weight_format, attrs_.down_weight_format));
  }

  // Build-time enqueues (timing) may reach a clone that was never attached.
  int32_t ensure_cublas() noexcept {
    return cublas_ ? 0 : report_cublas(cublasCreate(&cublas_), "cublasCreate");
  }

  int32_t decode(DType t, MlpSizes const& s, MlpBuffers const& buf, void* ws, cudaStream_t st) noexcept {
    // The plan's decode version and the bytes it needs (within what
    // getWorkspaceSize reserved), not a query under today's $TDA_DECODE_VERSION.
    for (int64_t b0 = 0; b0 < s.batch; b0 += TDA_MAX_BATCH) {
      const DecodeCall c = decode_call(t, attrs_, s, b0, chunk_batch(s.batch, b0), buf, abi_queries());
      if (int32_t rc = report_abi(tda_sparse_gated_mlp_decode(&c.args, ws, c.workspace_bytes, st),
                                  "tda_sparse_gated_mlp_decode"))
        return rc;
    }
    // Decode leaves the scores unchanged (contract): a plain copy, no aliasing
    // preview feature needed.
    return report_cuda(cudaMemcpyAsync(buf.scores_out, buf.scores_in, size_t(s.batch) * s.inter * sizeof(float),
                                       cudaMemcpyDeviceToDevice, st),
                       "copy scores_in -> scores_out");
  }

  int32_t prefill(DType t, MlpSizes const& s, MlpBuffers const& buf, void* ws, cudaStream_t st) noexcept {
    PrefillPlan p;
    if (int32_t rc = report(prefill_plan(t, attrs_, s, buf, ws, abi_queries(), &p))) return rc;
    // Never reached (the creator refuses x_format q8_0 here): this prefill has no quantizing step for xq.
    if (p.xq) return report(mlp_check_backend(attrs_, tda_backend()));
    if (int32_t rc = ensure_cublas()) return rc;
    // cublasSetStream resets the workspace to cuBLAS's own pool, so the
    // workspace is set after it, every call (its address may change).
    if (int32_t rc = report_cublas(cublasSetStream(cublas_, st), "cublasSetStream")) return rc;
    if (int32_t rc = report_cublas(cublasSetWorkspace(cublas_, p.cublas_ws, p.cublas_ws_bytes), "cublasSetWorkspace"))
      return rc;
    if (p.tokens > 0) {
      if (p.weight_format != TDA_WEIGHTS_DTYPE) {
        // Each weight in its own format: down_t may have one of its own (down_weight_format, e.g. q8_0 under q4_1).
        const tda_weight_format_t f = tda_weight_format_t(p.weight_format);
        const tda_weight_format_t fd = tda_weight_format_t(p.down_weight_format);
        if (int32_t rc = report_cuda(dequantize_weights(abi_dtype(t), f, buf.gate_up, int32_t(s.hidden), 2 * s.inter,
                                                        p.gate_up_t, st),
                                     "dequantize gate_up_weight"))
          return rc;
        if (int32_t rc = report_cuda(
                dequantize_weights(abi_dtype(t), fd, buf.down_t, int32_t(s.hidden), s.inter, p.down_t, st),
                "dequantize down_weight_t"))
          return rc;
      }
      if (int32_t rc = report_cublas(gemm(cublas_, t, p.gate_up_gemm), "gate/up GEMM")) return rc;
      if (int32_t rc = report_cuda(gated_activation(abi_dtype(t), attrs_.activation, p.gate_up, p.z, p.tokens,
                                                    int32_t(s.inter), st),
                                   "act(gate)*up"))
        return rc;
      if (int32_t rc = report_cublas(gemm(cublas_, t, p.down_gemm), "down GEMM")) return rc;
    }
    return report_abi(tda_prefill_scores(&p.scores, p.scores_ws, p.scores_ws_bytes, st), "tda_prefill_scores");
  }

  MlpAttrs attrs_;
  PluginField fields_[kSparseGatedMlpNbFields];
  PluginFieldCollection collection_{};
  cublasHandle_t cublas_ = nullptr;
};

}  // namespace

IPluginV3* make_sparse_gated_mlp(MlpAttrs const& attrs) noexcept {
  return new (std::nothrow) SparseGatedMlpPlugin(attrs);
}

}  // namespace tda_trt
