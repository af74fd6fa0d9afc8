// z = act(gate) * up for a prefill, the one piece of device code in the
// plugin library: the C ABI reduces z (tda_prefill_scores) but leaves the
// dense GEMMs and this elementwise step to the caller, and no cuBLAS epilogue
// is a gated activation.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "tda_kernels.h"

namespace tda_trt {

// gate_up: [tokens, inter, 2] (gate, up) pairs, z: [tokens, inter], both of
// `dtype`. act and the product in fp32, z rounded to dtype once (contract).
cudaError_t gated_activation(tda_dtype_t dtype, tda_activation_t act, const void* gate_up, void* z, int64_t tokens,
                             int32_t inter, cudaStream_t stream);

}  // namespace tda_trt
