// Per-matrix time of the dense block-quantized linear: tda_block_linear (our CPU kernels, the C ABI;
// N split over OpenMP threads as the native runtime's pool does) against ggml's mul_mat (llama.cpp's
// CPU backend, which quantizes x to q8_0/q8_1 and uses int8 dot products) on the same bytes, plus a
// memcpy of the weight bytes (the read floor). Built and run by bench/linear_vs_ggml.py.
//   linear_vs_ggml FORMAT M N K THREADS REPEATS
// Prints one line: format M N K threads, then min/median microseconds of tda, ggml and memcpy.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

#include "ggml-cpu.h"
#include "ggml.h"
#include "tda_kernels.h"

static double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char** argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s q8_0|q4_0|q4_1 M N K THREADS REPEATS\n", argv[0]);
    return 2;
  }
  const char* fmt = argv[1];
  const int M = atoi(argv[2]), N = atoi(argv[3]), K = atoi(argv[4]), T = atoi(argv[5]), R = atoi(argv[6]);
  int tf;
  ggml_type gt;
  if (!strcmp(fmt, "q8_0")) tf = TDA_WEIGHTS_Q8_0, gt = GGML_TYPE_Q8_0;
  else if (!strcmp(fmt, "q4_0")) tf = TDA_WEIGHTS_Q4_0, gt = GGML_TYPE_Q4_0;
  else tf = TDA_WEIGHTS_Q4_1, gt = GGML_TYPE_Q4_1;
  ggml_cpu_init();
  const size_t wbytes = size_t(N) * (K / 32) * tda_block_bytes(tf);
  ggml_init_params ip = {wbytes * 2 + size_t(M) * (K + N) * 8 + (64 << 20), nullptr, false};
  ggml_context* ctx = ggml_init(ip);
  ggml_tensor* w = ggml_new_tensor_2d(ctx, gt, K, N);
  ggml_tensor* x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, M);
  ggml_tensor* y = ggml_mul_mat(ctx, w, x);
  ggml_cgraph* gf = ggml_new_graph(ctx);
  ggml_build_forward_expand(gf, y);
  // Random weights through ggml's own quantizer, so both sides read identical, valid blocks.
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> wf(size_t(N) * K);
  for (auto& v : wf) v = nd(rng);
  ggml_quantize_chunk(gt, wf.data(), w->data, 0, N, K, nullptr);
  float* xd = static_cast<float*>(x->data);
  for (int64_t i = 0; i < int64_t(M) * K; ++i) xd[i] = nd(rng);
  std::vector<float> yt(size_t(M) * N);
  std::vector<unsigned char> copy(wbytes);
  auto tda = [&] {
#pragma omp parallel num_threads(T)
    {
      const int t = omp_get_thread_num(), n = omp_get_num_threads();
      const int n0 = int(int64_t(N) * t / n), n1 = int(int64_t(N) * (t + 1) / n);
      tda_block_linear_args_t a{tf, M, N, K, n0, n1, K, N, xd, w->data, yt.data()};
      if (tda_block_linear(&a, nullptr, 0, nullptr) != TDA_OK) abort();
    }
  };
  auto gg = [&] { ggml_graph_compute_with_ctx(ctx, gf, T); };
  auto cp = [&] {
#pragma omp parallel num_threads(T)
    {
      const int t = omp_get_thread_num(), n = omp_get_num_threads();
      const size_t b0 = wbytes * t / n, b1 = wbytes * (t + 1) / n;
      memcpy(copy.data() + b0, static_cast<const char*>(w->data) + b0, b1 - b0);
    }
  };
  tda();
  gg();
  double err = 0, scale = 0;  // the two agree up to ggml's q8 activation rounding
  const float* yg = static_cast<const float*>(y->data);
  for (int64_t i = 0; i < int64_t(M) * N; ++i) {
    err = std::max(err, double(std::abs(yt[i] - yg[i])));
    scale = std::max(scale, double(std::abs(yt[i])));
  }
  std::vector<double> ts[3];
  for (int r = 0; r < R; ++r) {  // interleaved
    double t0 = now_us();
    tda();
    double t1 = now_us();
    gg();
    double t2 = now_us();
    cp();
    double t3 = now_us();
    ts[0].push_back(t1 - t0);
    ts[1].push_back(t2 - t1);
    ts[2].push_back(t3 - t2);
  }
  printf("%s %d %d %d %d %zu", fmt, M, N, K, T, wbytes);
  for (auto& v : ts) {
    std::sort(v.begin(), v.end());
    printf(" %.1f %.1f", v[0], v[v.size() / 2]);
  }
  printf(" %.3g\n", err / (scale > 0 ? scale : 1));
  ggml_free(ctx);
  return 0;
}
