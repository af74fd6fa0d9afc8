// Decode v2 (decode_v2.cu): the batch 1-8 fp16/bf16 path, chosen per call by
// tda_decode_args_t.version or $TDA_DECODE_VERSION; decode.cu dispatches.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>

#include "tda_kernels.h"

namespace tda {
namespace gpu {
namespace v2 {

// Calls v2 serves: fp16/bf16 float weights, batch 1..8, I <= 131072 (others, block-quantized
// weights included, run v1).
bool eligible(const tda_decode_args_t* a);
size_t workspace_size(const tda_decode_args_t* a);
tda_status_t run(const tda_decode_args_t* a, void* workspace, cudaStream_t stream);

}  // namespace v2
}  // namespace gpu
}  // namespace tda
