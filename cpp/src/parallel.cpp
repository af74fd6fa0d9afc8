#include "parallel.h"

#include <omp.h>

#include <algorithm>

#include "blas.h"

namespace tda {
namespace par {
void linear_slice(int64_t M, const Linear& j, int64_t c0, int64_t c1) {
  const int64_t n = c1 - c0;
  if (n <= 0) return;
  float* y = j.y + c0;
  if (M == 1) {
    if (j.k_major)
      cblas_sgemv(CblasRowMajor, CblasTrans, j.K, n, 1.0f, j.w + c0, j.N, j.x, 1, 0.0f, y, 1);
    else
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n, j.K, 1.0f, j.w + c0 * j.K, j.K, j.x, 1, 0.0f, y, 1);
  } else if (j.k_major) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, n, j.K, 1.0f, j.x, j.K, j.w + c0, j.N, 0.0f, y, j.N);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, n, j.K, 1.0f, j.x, j.K, j.w + c0 * j.K, j.K, 0.0f, y, j.N);
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
  for (const Linear& j : jobs) bytes += j.K * j.N * 4;
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
