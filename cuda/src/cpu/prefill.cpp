// CPU prefill statistics: token norms first, then per-neuron sums in token
// order (the same order as the GPU kernel, so both are reproducible).
#include <algorithm>

#include "../common.h"
#include "fp.h"

namespace tda {
namespace cpu {
namespace {

constexpr float kNormFloor = 1e-30f;  // contract.NORM_FLOOR

template <tda_dtype_t D>
void run(const tda_prefill_scores_args_t* a, float* coef) {
  using T = typename Elem<D>::type;
  const int32_t B = a->batch, S = a->seq_len, I = a->intermediate;
  const T* z = static_cast<const T*>(a->z);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t bt = 0; bt < int64_t(B) * S; ++bt) {
      const float valid = a->token_valid[bt];
      float n = 1.0f;
      if (valid != 0.0f && a->score_norm == TDA_SCORE_NORM_TOKEN_L2) {
        const T* zt = z + bt * I;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int32_t j = 0; j < I; ++j) s += Elem<D>::load(zt, j) * Elem<D>::load(zt, j);
        n = std::max(s, kNormFloor);
      }
      coef[bt] = valid / n;
    }
#pragma omp for collapse(2) schedule(static)
    for (int32_t b = 0; b < B; ++b)
      for (int32_t j0 = 0; j0 < I; j0 += 256) {
        const int32_t j1 = std::min(I, j0 + 256);
        float acc[256] = {};
        for (int32_t t = 0; t < S; ++t) {
          const float c = coef[int64_t(b) * S + t];
          if (c == 0.0f) continue;  // padding tokens contribute nothing, even if z there is garbage
          const T* zt = z + (int64_t(b) * S + t) * I;
#pragma omp simd
          for (int32_t j = j0; j < j1; ++j) {
            const float v = Elem<D>::load(zt, j);
            acc[j - j0] += c * (v * v);
          }
        }
        for (int32_t j = j0; j < j1; ++j)
          a->scores_out[int64_t(b) * I + j] = a->scores_in[int64_t(b) * I + j] + acc[j - j0];
      }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace tda

extern "C" size_t tda_prefill_scores_workspace_size(const tda_prefill_scores_args_t* a) {
  if (tda::check_prefill_shape(a) != TDA_OK) return 0;
  return size_t(a->batch) * a->seq_len * sizeof(float);
}

extern "C" tda_status_t tda_prefill_scores(const tda_prefill_scores_args_t* a, void* ws, size_t ws_size,
                                           void* /*stream*/) {
  const tda_status_t s = tda::check_prefill(a, ws, ws_size, tda_prefill_scores_workspace_size(a));
  if (s != TDA_OK || a->batch == 0) return s;
  float* coef = static_cast<float*>(ws);
  switch (a->dtype) {
    case TDA_F32: tda::cpu::run<TDA_F32>(a, coef); break;
    case TDA_F16: tda::cpu::run<TDA_F16>(a, coef); break;
    case TDA_BF16: tda::cpu::run<TDA_BF16>(a, coef); break;
  }
  return TDA_OK;
}
