// Block-quantized weights -> T for a prefill of a quantized engine: prefill is
// compute-bound, so the plugin dequantizes gate_up/down_t into its workspace
// and runs the same cuBLAS GEMMs as for float weights (decode reads the blocks
// themselves, tda_sparse_gated_mlp_decode).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "tda_kernels.h"

namespace tda_trt {

// out[r, :k] = the blocks' exact float32 weights rounded to dtype (once), for
// rows [0, rows) of k/32 blocks of weight_format each (blocks 4-byte aligned).
cudaError_t dequantize_weights(tda_dtype_t dtype, tda_weight_format_t weight_format, const void* blocks, int32_t k,
                               int64_t rows, void* out, cudaStream_t stream);

}  // namespace tda_trt
