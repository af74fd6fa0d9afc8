// Plugin creators and the library's entry points for
// IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, Python
// registry.load_library): getCreators and setLoggerFinder.
#include <atomic>
#include <cstdio>

#include "trt_common.h"

namespace tda_trt {
namespace {

using namespace nvinfer1;

std::atomic<ILoggerFinder*> g_logger_finder{nullptr};

class SparseGatedMlpCreator final : public IPluginCreatorV3One {
 public:
  SparseGatedMlpCreator() {
    for (int32_t i = 0; i < kSparseGatedMlpNbFields; ++i)
      fields_[i] = PluginField(kSparseGatedMlpFields[i], nullptr, PluginFieldType::kCHAR, 0);
    collection_.nbFields = kSparseGatedMlpNbFields;
    collection_.fields = fields_;
  }

  IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override {
    const std::vector<FieldView> fields = fields_of(fc);
    MlpAttrs attrs;
    if (report(parse_mlp_fields(fields.data(), int32_t(fields.size()), phase == TensorRTPhase::kBUILD, &attrs)))
      return nullptr;
    // Fields this library's kernels do not run (x_format q8_0: CPU kernel library only) are refused now,
    // building or deserializing, naming the field, rather than failing at the first enqueue.
    if (report(mlp_check_backend(attrs, tda_backend()))) return nullptr;
    return make_sparse_gated_mlp(attrs);
  }

  PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }
  AsciiChar const* getPluginName() const noexcept override { return kSparseGatedMlpName; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  PluginField fields_[kSparseGatedMlpNbFields];
  PluginFieldCollection collection_{};
};

class SelectActiveCreator final : public IPluginCreatorV3One {
 public:
  IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    const std::vector<FieldView> fields = fields_of(fc);
    if (report(parse_select_fields(fields.data(), int32_t(fields.size())))) return nullptr;
    return make_select_active();
  }

  PluginFieldCollection const* getFieldNames() noexcept override { return &empty_; }
  AsciiChar const* getPluginName() const noexcept override { return kSelectActiveName; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  PluginFieldCollection empty_{};
};

}  // namespace

void log_error(std::string const& msg) noexcept {
  ILoggerFinder* finder = g_logger_finder.load();
  ILogger* logger = finder ? finder->findLogger() : nullptr;
  const std::string line = "tda_trt_plugins: " + msg;
  if (logger) {
    logger->log(ILogger::Severity::kERROR, line.c_str());
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
}

}  // namespace tda_trt

#define TDA_TRT_EXPORT extern "C" __attribute__((visibility("default")))

TDA_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static tda_trt::SparseGatedMlpCreator mlp;
  static tda_trt::SelectActiveCreator select;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&mlp, &select};
  nbCreators = 2;
  return creators;
}

TDA_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { tda_trt::g_logger_finder.store(finder); }
