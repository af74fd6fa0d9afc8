// Quantized-x (x_format TDA_X_Q8_0) kernels for AVX-512 VNNI CPUs: quant_x_avx2.h
// on 256-bit vectors with TDA_QX_DPBUSD, so a weight block's integer dot with
// x's block is one vpdpbusd. Only the quantized-x gate_up and block linears
// come from here; everything else on such a CPU is decode_avx512.cpp's, and
// quantize_x is decode_avx2.cpp's. The library is built without -march:
// decode.cpp / linear.cpp call these only when cpu_vnni() says CPUID has
// AVX-512 F, BW, VL and VNNI.
#include <immintrin.h>
#include <math.h>

#include <type_traits>

#include "../activation.h"
#include "blocks.h"
#include "decode_ctx.h"
#include "fp.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
// The shared headers' float-only helpers (kernels(), linear_for, ...) are not instantiated here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define TDA_QX_DPBUSD 1

namespace tda {
namespace cpu {
namespace {

#include "simd_avx2.h"

#include "decode_simd.h"
#include "decode_quant_simd.h"
#include "linear_simd.h"
#include "quant_x_avx2.h"

}  // namespace

LinearQxFn vnni_linear_qx(tda_weight_format_t w) { return linear_qx_for(w); }

DecodeKernels vnni_kernels(tda_dtype_t d, tda_activation_t a, tda_weight_format_t w) {
  return block_kernels<SimdQx>(d, a, w);
}

}  // namespace cpu
}  // namespace tda

#pragma GCC diagnostic pop
#pragma GCC pop_options
