// tda::SelectActive as a TensorRT IPluginV3: tda_select_active in chunks of
// TDA_MAX_BATCH rows. Decisions live in tda_plugin_logic.h.
#include <new>

#include "trt_common.h"

namespace tda_trt {
namespace {

using namespace nvinfer1;

class SelectActivePlugin final : public IPluginV3,
                                 public IPluginV3OneCore,
                                 public IPluginV3OneBuild,
                                 public IPluginV3OneRuntime {
 public:
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }

  IPluginV3* clone() noexcept override { return new (std::nothrow) SelectActivePlugin(); }

  AsciiChar const* getPluginName() const noexcept override { return kSelectActiveName; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

  int32_t getNbOutputs() const noexcept override { return sel::kNbOut; }

  int32_t getOutputDataTypes(DataType* out, int32_t nb_out, DataType const* in, int32_t nb_in) const noexcept override {
    if (nb_out != sel::kNbOut) return report("SelectActive: expected 2 outputs");
    DType types[sel::kNbOut] = {DType::kOther, DType::kOther};
    if (int32_t rc = report(select_output_types(dtypes_of(in, nb_in).data(), nb_in, types))) return rc;
    for (int32_t i = 0; i < nb_out; ++i) out[i] = to_trt(types[i]);
    return 0;
  }

  int32_t getOutputShapes(DimsExprs const* in, int32_t nb_in, DimsExprs const*, int32_t, DimsExprs* out,
                          int32_t nb_out, IExprBuilder&) noexcept override {
    if (nb_in != sel::kNbIn || nb_out != sel::kNbOut) return report("SelectActive: expected 3 inputs, 2 outputs");
    if (int32_t rc = check(in, nb_in, [](DimsExprs const& d) -> DimsExprs const& { return d; })) return rc;
    for (int32_t o = 0; o < nb_out; ++o) write_output_shape(select_output_shape(o), in, &out[o]);
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nb_in,
                                 int32_t nb_out) noexcept override {
    return nb_in == sel::kNbIn && nb_out == sel::kNbOut && select_supports(pos, io_of(io, pos).data());
  }

  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nb_in, DynamicPluginTensorDesc const*,
                          int32_t) noexcept override {
    return check(in, nb_in, [](DynamicPluginTensorDesc const& d) -> nvinfer1::Dims const& { return d.desc.dims; });
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nb_in, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    int64_t batch = 0, inter = 0;
    Dims max[sel::kNbIn];
    for (int32_t i = 0; i < nb_in && i < sel::kNbIn; ++i) max[i] = to_dims(in[i].max);
    if (report(select_check_shapes(max, nb_in, &batch, &inter))) return 0;
    return select_workspace_size(batch, inter, abi_queries());
  }

  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nb_in, PluginTensorDesc const*, int32_t) noexcept override {
    return check(in, nb_in, [](PluginTensorDesc const& d) -> nvinfer1::Dims const& { return d.dims; });
  }

  int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    const int64_t batch = in[sel::kScores].dims.d[0], inter = in[sel::kScores].dims.d[1];
    for (int64_t b0 = 0; b0 < batch; b0 += TDA_MAX_BATCH) {
      const tda_select_args_t a = select_args(inter, b0, chunk_batch(batch, b0),
                                              static_cast<float const*>(inputs[sel::kScores]),
                                              static_cast<float const*>(inputs[sel::kThreshold]),
                                              static_cast<float const*>(inputs[sel::kDensityBounds]),
                                              static_cast<int32_t*>(outputs[0]), static_cast<int32_t*>(outputs[1]));
      if (int32_t rc = report_abi(tda_select_active(&a, workspace, tda_select_active_workspace_size(&a), stream),
                                  "tda_select_active"))
        return rc;
    }
    return 0;
  }

  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &empty_; }

 private:
  template <class Desc, class Get>
  static int32_t check(Desc const* in, int32_t nb_in, Get dims_of) noexcept {
    Dims dims[sel::kNbIn];
    for (int32_t i = 0; i < nb_in && i < sel::kNbIn; ++i) dims[i] = to_dims(dims_of(in[i]));
    int64_t batch = 0, inter = 0;
    return report(select_check_shapes(dims, nb_in, &batch, &inter));
  }

  PluginFieldCollection empty_{};
};

}  // namespace

IPluginV3* make_select_active() noexcept { return new (std::nothrow) SelectActivePlugin(); }

}  // namespace tda_trt
