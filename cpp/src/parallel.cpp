#include "parallel.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "blas.h"
#include "tda_kernels.h"

namespace tda {
namespace par {
namespace {

void check(tda_status_t st, const char* what) {
  if (st != TDA_OK) throw std::runtime_error(std::string(what) + ": " + tda_status_string(st));
}

// Block weights, columns [c0, c1) of y.
void block_slice(int64_t M, const Linear& j, int64_t c0, int64_t c1) {
  const int32_t fmt = j.w.format;
  if (M < block_gemm_rows()) {
    tda_block_linear_args_t a{fmt, static_cast<int32_t>(M), static_cast<int32_t>(j.N), static_cast<int32_t>(j.K),
                              static_cast<int32_t>(c0), static_cast<int32_t>(c1), j.K, j.N, j.x, j.w.blocks, j.y};
    check(tda_block_linear(&a, nullptr, 0, nullptr), "tda_block_linear");
    return;
  }
  // Prefill: a tile of W rows made fp32 (exact, tda_block_dequantize), then one sgemm per tile.
  constexpr int64_t kTile = 64;
  thread_local std::vector<float> tile;
  tile.resize(static_cast<size_t>(kTile * j.K));
  const int64_t rb = j.w.bytes(1, j.K);
  for (int64_t r0 = c0; r0 < c1; r0 += kTile) {
    const int64_t n = std::min(kTile, c1 - r0);
    check(tda_block_dequantize(fmt, static_cast<int32_t>(j.K), n, static_cast<const uint8_t*>(j.w.blocks) + r0 * rb,
                               tile.data(), j.K, nullptr),
          "tda_block_dequantize");
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, n, j.K, 1.0f, j.x, j.K, tile.data(), j.K, 0.0f,
                j.y + r0, j.N);
  }
}

}  // namespace

int64_t WeightRef::bytes(int64_t n, int64_t k) const {
  return quantized() ? n * (k / TDA_QUANT_BLOCK) * static_cast<int64_t>(tda_block_bytes(format)) : n * k * 4;
}

int64_t block_gemm_rows() {
  static const int64_t rows = [] {
    const char* env = std::getenv("TDA_NATIVE_BLOCK_GEMM_ROWS");
    if (!env || !*env) return kBlockGemmRows;
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    return *end || v < 1 ? kBlockGemmRows : static_cast<int64_t>(v);
  }();
  return rows;
}

void linear_slice(int64_t M, const Linear& j, int64_t c0, int64_t c1) {
  const int64_t n = c1 - c0;
  if (n <= 0) return;
  float* y = j.y + c0;
  if (j.w.quantized()) {
    block_slice(M, j, c0, c1);
  } else if (M == 1) {
    if (j.k_major)
      cblas_sgemv(CblasRowMajor, CblasTrans, j.K, n, 1.0f, j.w.f + c0, j.N, j.x, 1, 0.0f, y, 1);
    else
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n, j.K, 1.0f, j.w.f + c0 * j.K, j.K, j.x, 1, 0.0f, y, 1);
  } else if (j.k_major) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, n, j.K, 1.0f, j.x, j.K, j.w.f + c0, j.N, 0.0f, y, j.N);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, n, j.K, 1.0f, j.x, j.K, j.w.f + c0 * j.K, j.K, 0.0f, y, j.N);
  }
  if (j.bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = c0; c < c1; ++c) j.y[m * j.N + c] += j.bias[c];
}

Pool::Pool(int threads_, int64_t slice_bytes_)
    : threads(threads_ > 0 ? threads_ : std::max(1, omp_get_num_procs())), slice_bytes(std::max<int64_t>(1, slice_bytes_)) {
  openblas_set_num_threads(1);
}

int Pool::threads_for(int64_t bytes) const {
  return static_cast<int>(std::clamp<int64_t>(bytes / slice_bytes, 1, threads));
}

void Pool::linear(int64_t M, std::initializer_list<Linear> jobs) const {
  int64_t bytes = 0;
  for (const Linear& j : jobs) bytes += j.w.bytes(j.N, j.K);
  fork(threads_for(bytes), [&](int t, int n) {
    for (const Linear& j : jobs) {
      int64_t c0, c1;
      slice(j.N, t, n, &c0, &c1);
      linear_slice(M, j, c0, c1);
    }
  });
}

}  // namespace par
}  // namespace tda
