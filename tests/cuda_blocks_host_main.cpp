// Runs the CUDA kernels' reading of the block formats (cuda/src/cuda/blocks.cuh)
// on the CPU: dequantize_eighths over an emulated grid, and block_dots lane by
// lane (R = 1 and R = 2 rows, tiles of NB = 1/4/8 sequences) with the lanes'
// partial sums added in lane order. tests/test_cuda_blocks_host.py compares
// the output with ops/blocks.py (bit for bit) and an fp64 reference.
//
//   cuda_blocks_host FORMAT K ROWS NB < weights(ROWS * row bytes) x(NB * K float32)
//   > dequantized(ROWS * K float32) dots_r1(ROWS * NB float32) dots_r2(ROWS * NB float32)
// (dots_r2: rows taken in pairs (2i, 2i+1) as gate_up does; ROWS even.)
#include <stdio.h>
#include <stdlib.h>

#include <vector>

#include "cuda/blocks.cuh"

using namespace tda::gpu;

namespace {

template <tda_weight_format_t F, int R, int NB>
void dots(const std::vector<uint8_t>& w, const std::vector<float>& x, int32_t k, int32_t rows, int nb,
          std::vector<float>& out) {
  const int64_t rb = int64_t(k / kQBlock) * QBlock<F>::bytes;
  const auto xload = [&](int i, int32_t h, float (&f)[8]) {
    for (int e = 0; e < 8; ++e) f[e] = __ldg(&x[size_t(i) * k + h + e]);
  };
  for (int32_t r0 = 0; r0 < rows; r0 += R) {
    const uint8_t* rp[R];
    for (int r = 0; r < R; ++r) rp[r] = w.data() + (r0 + r) * rb;
    float total[R][NB] = {};
    for (int lane = 0; lane < 32; ++lane) {
      float acc[R][NB] = {};
      block_dots<F, R, NB>(rp, k / kQBlock, lane, nb, xload, acc);
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < NB; ++i) total[r][i] += acc[r][i];
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < nb; ++i) out[size_t(r0 + r) * nb + i] = total[r][i];
  }
}

template <tda_weight_format_t F, int NB>
int run(int32_t k, int32_t rows, int nb) {
  const int64_t rb = int64_t(k / kQBlock) * QBlock<F>::bytes;
  std::vector<uint8_t> w(size_t(rows * rb));
  std::vector<float> x(size_t(nb) * k), deq(size_t(rows) * k, -1.0f), d1(size_t(rows) * nb), d2(size_t(rows) * nb);
  if (fread(w.data(), 1, w.size(), stdin) != w.size() || fread(x.data(), 4, x.size(), stdin) != x.size()) {
    fprintf(stderr, "short input\n");
    return 2;
  }
  // An odd grid (3 blocks of 64 threads) so the grid-stride loop wraps.
  gridDim.x = 3, blockDim.x = 64;
  for (unsigned b = 0; b < gridDim.x; ++b)
    for (unsigned t = 0; t < blockDim.x; ++t) {
      blockIdx.x = b, threadIdx.x = t;
      dequantize_eighths<F>(w.data(), k, rows, deq.data(), k, [](float v) { return v; });
    }
  dots<F, 1, NB>(w, x, k, rows, nb, d1);
  if (rows % 2 == 0) dots<F, 2, NB>(w, x, k, rows, nb, d2);
  fwrite(deq.data(), 4, deq.size(), stdout);
  fwrite(d1.data(), 4, d1.size(), stdout);
  fwrite(d2.data(), 4, d2.size(), stdout);
  return 0;
}

template <tda_weight_format_t F>
int run_nb(int32_t k, int32_t rows, int nb) {
  if (nb == 1) return run<F, 1>(k, rows, nb);
  if (nb <= 4) return run<F, 4>(k, rows, nb);
  return run<F, 8>(k, rows, nb);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s FORMAT(1-3) K ROWS NB(1-8)\n", argv[0]);
    return 2;
  }
  const int f = atoi(argv[1]), k = atoi(argv[2]), rows = atoi(argv[3]), nb = atoi(argv[4]);
  if (k <= 0 || k % kQBlock || rows < 0 || nb < 1 || nb > 8) return 2;
  switch (f) {
    case TDA_WEIGHTS_Q8_0: return run_nb<TDA_WEIGHTS_Q8_0>(k, rows, nb);
    case TDA_WEIGHTS_Q4_0: return run_nb<TDA_WEIGHTS_Q4_0>(k, rows, nb);
    case TDA_WEIGHTS_Q4_1: return run_nb<TDA_WEIGHTS_Q4_1>(k, rows, nb);
  }
  return 2;
}
