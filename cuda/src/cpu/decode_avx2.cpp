// AVX2+FMA (+F16C) decode kernels. The library is built without -march, so
// only the functions after the target pragma may use these instructions;
// decode.cpp calls them only when CPUID reports AVX2, FMA and F16C.
#include <immintrin.h>
#include <math.h>

#include <type_traits>

#include "../activation.h"
#include "blocks.h"
#include "decode_ctx.h"
#include "fp.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace tda {
namespace cpu {
namespace {

#include "simd_avx2.h"

#include "decode_simd.h"
#include "decode_quant_simd.h"
#include "linear_simd.h"
#include "quant_x_avx2.h"

}  // namespace

LinearFn avx2_linear(tda_weight_format_t w) { return linear_for(w); }
LinearQxFn avx2_linear_qx(tda_weight_format_t w) { return linear_qx_for(w); }
DequantFn avx2_dequantize(tda_weight_format_t w) { return dequantize_for(w); }
void avx2_quantize_x(const float* x, int64_t ldx, int32_t rows, int32_t K, const QX& out) {
  quantize_x_rows(x, ldx, rows, K, out);
}

DecodeKernels avx2_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w, tda_x_format_t x) {
  if (w == TDA_WEIGHTS_DTYPE) return kernels(d, a);
  return x == TDA_X_Q8_0 ? block_kernels<SimdQx>(d, a, w) : block_kernels<Simd>(d, a, w);
}

}  // namespace cpu
}  // namespace tda

#pragma GCC pop_options
