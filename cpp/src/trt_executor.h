// The TensorRT executor: the engine's model.plan (tda-export build --target tensorrt|tensorrt-rtx)
// deserialized with our plugin library loaded, one execution context per optimization profile
// (0 prefill, 1 decode), the KV cache and TDA state kept in device memory and fed back from each
// call's present* outputs to the next call's past* inputs: the protocol of the Python `tensorrt`
// backend (tda_export/runtime/trt_backend.py) and the ONNX Runtime backend it extends.
//
// No TensorRT type appears here, so only trt_executor.cpp needs TensorRT's headers. TensorRT itself
// is dlopened (see trt_executor.cpp for why), in the flavour its headers are.
#pragma once

#include <memory>
#include <string>

#include "executor.h"

namespace tda {

struct TrtOptions {
  // The TensorRT library; empty: the soname of the compiled flavour (libnvinfer.so.N for
  // "tensorrt", libtensorrt_rtx.so.N for "tensorrt-rtx") on the loader's search path.
  std::string tensorrt_library;
  // libtda_trt_plugins.so; empty: $TDA_TRT_PLUGIN_LIBRARY, else the manifest's
  // tensorrt.plugin.library in the engine directory, else that name on the loader's search path.
  std::string plugin_library;
  int device = 0;
};

// "tensorrt" or "tensorrt-rtx": the flavour of the headers this file was compiled against.
const char* trt_compiled_flavour();
std::unique_ptr<Executor> make_trt_executor(const EngineDir& dir, const TrtOptions& options);

}  // namespace tda
