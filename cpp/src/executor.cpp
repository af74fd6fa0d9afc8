#include "executor.h"

#include <sys/stat.h>

#include "cpu_executor.h"
#ifdef TDA_HAVE_TENSORRT
#include "trt_executor.h"
#endif

namespace tda {

void check_prompt(const DecoderSpec& spec, int64_t batch, int64_t seq, const int64_t* ids, const int64_t* mask) {
  if (batch < 1) throw ArgumentError("batch must be >= 1, got " + std::to_string(batch));
  if (seq < 2) throw ArgumentError("a prompt call needs seq >= 2 (a 1-token call is a decode step), got " + std::to_string(seq));
  for (int64_t i = 0; i < batch * seq; ++i) {
    if (ids[i] < 0 || ids[i] >= spec.vocab)
      throw ArgumentError("input_ids[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
                          " is outside the vocabulary of " + std::to_string(spec.vocab));
    if (mask[i] != 0 && mask[i] != 1)
      throw ArgumentError("attention_mask[" + std::to_string(i) + "] = " + std::to_string(mask[i]) + " is not 0 or 1");
  }
}

void check_tokens(const DecoderSpec& spec, int64_t batch, const int64_t* tokens) {
  for (int64_t b = 0; b < batch; ++b)
    if (tokens[b] < 0 || tokens[b] >= spec.vocab)
      throw ArgumentError("tokens[" + std::to_string(b) + "] = " + std::to_string(tokens[b]) +
                          " is outside the vocabulary of " + std::to_string(spec.vocab));
}

bool have_tensorrt_executor() {
#ifdef TDA_HAVE_TENSORRT
  return true;
#else
  return false;
#endif
}

const char* tensorrt_executor_flavour() {
#ifdef TDA_HAVE_TENSORRT
  return trt_compiled_flavour();
#else
  return "";
#endif
}

void check_executor_kind(const std::string& kind) {
  if (!kind.empty() && kind != "auto" && kind != "cpu" && kind != "tensorrt")
    throw ArgumentError("executor '" + kind + "': expected \"auto\", \"cpu\" or \"tensorrt\"");
}

std::string resolve_executor_kind(const EngineDir& dir, const std::string& requested) {
  check_executor_kind(requested);
  if (requested == "cpu" || requested == "tensorrt") return requested;
  return dir.manifest.contains("tensorrt") && dir.manifest.at("tensorrt").is_object() ? "tensorrt" : "cpu";
}

std::unique_ptr<Executor> make_executor(const EngineDir& dir, const ExecutorOptions& options) {
  const std::string kind = resolve_executor_kind(dir, options.kind);
  if (kind == "cpu") return std::make_unique<CpuExecutor>(dir, options.threads);
  if (!dir.manifest.contains("tensorrt") || !dir.manifest.at("tensorrt").is_object())
    throw EngineError(dir.directory + "/manifest.json: no 'tensorrt' section, so no TensorRT plan to run "
                      "(build with --target tensorrt-rtx or tensorrt, or use the cpu executor)");
#ifdef TDA_HAVE_TENSORRT
  TrtOptions t;
  t.tensorrt_library = options.tensorrt_library;
  t.plugin_library = options.plugin_library;
  t.device = options.device;
  return make_trt_executor(dir, t);
#else
  std::string why = options.kind == "tensorrt" ? "" : " (chosen because the engine has a TensorRT plan; executor \"cpu\" runs float32 engines only)";
  throw UnsupportedError(dir.directory + "/model.plan: this libtda_runtime was built without the TensorRT executor" +
                         why + "; configure cpp/ with -DTDA_TENSORRT_INCLUDE=<TensorRT include dir> on a machine "
                         "with the CUDA toolkit (docs/native.md)");
#endif
}

}  // namespace tda
