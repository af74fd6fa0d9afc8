// What a zero tda_decode_args_t.version means, written once: the kernel
// libraries resolve it on every call (common.h), the TensorRT plugins once,
// when a plan is built, and record the result in the plan
// (plugins/tda_plugin_logic.h), because the workspace a plan reserves depends
// on the version and must not change under it at run time.
#pragma once

#include <stdint.h>
#include <stdlib.h>

namespace tda {

constexpr int32_t kMaxDecodeVersion = 2;

// $TDA_DECODE_VERSION ("2" selects v2), else 1.
inline int32_t env_decode_version() {
  const char* env = getenv("TDA_DECODE_VERSION");
  return env && env[0] == '2' && env[1] == '\0' ? 2 : 1;
}

}  // namespace tda
