// Small-shape driver of libtda_kernels_cuda.so for compute-sanitizer (bench/gpu_check.sh):
// every decode variant (v1, v2; fp32/fp16/bf16; batch 0, 1, 3, 8, 64; empty, full,
// single, odd masks; deterministic or not; float and q8_0/q4_0/q4_1 block weights, also
// down rows in a format of their own (down_weight_format: q8_0 under q4_1/q4_0, q4_1 under
// q8_0, so a down row read at the other format's stride leaves its allocation), the
// blocks allocated to the exact byte), tda_block_linear, tda_block_dequantize,
// select_active and prefill_scores, through
// the C ABI with plain cudaMalloc buffers, so memcheck and racecheck see exactly the
// library's kernels and no framework. Exits non-zero on any non-OK status or CUDA error;
// correctness is checked elsewhere (bench/gpu_kernels.py), this only has to run clean.
//
//   nvcc -std=c++17 -arch=sm_90 -Icuda/include bench/gpu_sanitize.cu -L<dir> -ltda_kernels_cuda -o sanitize
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <vector>

#include "tda_kernels.h"

#define CHECK_CUDA(x)                                                                          \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));       \
      exit(2);                                                                                 \
    }                                                                                          \
  } while (0)

static void* upload(const void* host, size_t bytes) {
  void* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, bytes ? bytes : 1));
  if (bytes) CHECK_CUDA(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice));
  return d;
}

static int failures = 0;

static void expect_ok(tda_status_t s, const char* what) {
  if (s != TDA_OK) {
    fprintf(stderr, "FAIL %s: status %d (%s)\n", what, int(s), tda_status_string(s));
    ++failures;
  }
}

// Random bit patterns of 16-bit floats in [-1, 1) (fp32: real floats).
static std::vector<uint8_t> random_values(size_t n, tda_dtype_t dt, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<uint8_t> out(n * (dt == TDA_F32 ? 4 : 2));
  for (size_t i = 0; i < n; ++i) {
    const float f = u(rng);
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if (dt == TDA_F32) {
      memcpy(&out[4 * i], &bits, 4);
    } else {
      uint16_t h;
      if (dt == TDA_BF16) {
        h = uint16_t(bits >> 16);
      } else {  // fp16 from the float's exponent/mantissa for |f| < 1 (normal or zero)
        const uint32_t sign = (bits >> 16) & 0x8000u;
        const int exp = int((bits >> 23) & 0xff) - 127 + 15;
        h = exp <= 0 ? uint16_t(sign) : uint16_t(sign | (uint32_t(exp) << 10) | ((bits >> 13) & 0x3ffu));
      }
      memcpy(&out[2 * i], &h, 2);
    }
  }
  return out;
}

// Block rows of format f: random bytes (every nibble / int8) with each block's fp16 fields set to
// 0.01 (0x211f), so the weights are finite and small.
static std::vector<uint8_t> random_blocks(size_t rows, int hidden, int f, std::mt19937& rng) {
  const size_t bb = tda_block_bytes(f), nblk = size_t(hidden) / TDA_QUANT_BLOCK;
  std::vector<uint8_t> out(rows * nblk * bb);
  for (auto& v : out) v = uint8_t(rng());
  for (size_t b = 0; b < rows * nblk; ++b)
    for (size_t k = 0; k < (f == TDA_WEIGHTS_Q4_1 ? 2u : 1u); ++k) out[b * bb + 2 * k] = 0x1f, out[b * bb + 2 * k + 1] = 0x21;
  return out;
}

static void decode_case(tda_dtype_t dt, int batch, int hidden, int inter, int version, int deterministic,
                        std::mt19937& rng, int weight_format = TDA_WEIGHTS_DTYPE, int down_weight_format = 0) {
  const int es = dt == TDA_F32 ? 4 : 2;
  std::vector<int32_t> idx(size_t(std::max(batch, 1)) * inter, 0), cnt(std::max(batch, 1), 0);
  for (int b = 0; b < batch; ++b) {
    std::vector<int32_t> rows;
    const int kind = b % 5;  // empty, full, single, odd random, last neuron
    for (int j = 0; j < inter; ++j) {
      const bool on = kind == 1 || (kind == 2 && j == inter / 3) || (kind == 3 && (rng() % 7 < 3)) ||
                      (kind == 4 && j == inter - 1);
      if (on) rows.push_back(j);
    }
    if (kind == 3 && rows.size() % 2 == 0 && !rows.empty()) rows.pop_back();  // odd-sized
    std::copy(rows.begin(), rows.end(), idx.begin() + size_t(b) * inter);
    cnt[b] = int32_t(rows.size());
  }
  const size_t nb = size_t(std::max(batch, 1));
  auto x = random_values(nb * hidden, dt, rng);
  const bool blocks = weight_format != TDA_WEIGHTS_DTYPE;
  auto gu = blocks ? random_blocks(size_t(inter) * 2, hidden, weight_format, rng)
                   : random_values(size_t(inter) * 2 * hidden, dt, rng);
  const int down = down_weight_format ? down_weight_format : weight_format;
  auto wd = blocks ? random_blocks(size_t(inter), hidden, down, rng) : random_values(size_t(inter) * hidden, dt, rng);
  void* dx = upload(x.data(), x.size());
  void* dgu = upload(gu.data(), gu.size());
  void* dwd = upload(wd.data(), wd.size());
  void* didx = upload(idx.data(), idx.size() * 4);
  void* dcnt = upload(cnt.data(), cnt.size() * 4);
  void* dout = nullptr;
  CHECK_CUDA(cudaMalloc(&dout, nb * hidden * es));
  tda_decode_args_t a{};
  a.dtype = dt;
  a.activation = TDA_ACT_SILU;
  a.batch = batch;
  a.hidden = hidden;
  a.intermediate = inter;
  a.deterministic = deterministic;
  a.hidden_states = dx;
  a.gate_up_weight = dgu;
  a.down_weight_t = dwd;
  a.active_idx = static_cast<const int32_t*>(didx);
  a.active_count = static_cast<const int32_t*>(dcnt);
  a.output = dout;
  a.version = version;
  a.weight_format = weight_format;
  a.down_weight_format = down_weight_format;
  const size_t ws_size = tda_sparse_gated_mlp_decode_workspace_size(&a);
  void* ws = nullptr;
  if (ws_size) CHECK_CUDA(cudaMalloc(&ws, ws_size));  // cudaMalloc: 256-byte aligned
  char what[160];
  snprintf(what, sizeof what, "decode dtype=%d B=%d H=%d I=%d v%d det=%d weights=%d down=%d", int(dt), batch, hidden,
           inter, version, deterministic, weight_format, down_weight_format);
  for (int rep = 0; rep < 2; ++rep) expect_ok(tda_sparse_gated_mlp_decode(&a, ws, ws_size, nullptr), what);
  CHECK_CUDA(cudaDeviceSynchronize());
  for (void* p : {dx, dgu, dwd, didx, dcnt, dout, ws})
    if (p) CHECK_CUDA(cudaFree(p));
}

// tda_block_linear (M past one tile of 8, a row range, strided x and y) and tda_block_dequantize.
static void block_linear_cases(std::mt19937& rng) {
  const int N = 37, K = 288;
  for (int f : {TDA_WEIGHTS_Q8_0, TDA_WEIGHTS_Q4_0, TDA_WEIGHTS_Q4_1})
    for (int m : {1, 3, 17}) {
      auto w = random_blocks(N, K, f, rng);
      std::vector<float> x(size_t(m) * (K + 3), 0.5f);
      void* dw = upload(w.data(), w.size());
      float* dx = static_cast<float*>(upload(x.data(), x.size() * 4));
      float* dy = nullptr;
      CHECK_CUDA(cudaMalloc(&dy, size_t(m) * (N + 1) * 4));
      tda_block_linear_args_t a{};
      a.weight_format = f, a.m = m, a.n = N, a.k = K, a.n_begin = 1, a.n_end = N, a.ldx = K + 3, a.ldy = N + 1;
      a.x = dx, a.weight = dw, a.y = dy;
      char what[96];
      snprintf(what, sizeof what, "block_linear format=%d M=%d", f, m);
      expect_ok(tda_block_linear(&a, nullptr, tda_block_linear_workspace_size(&a), nullptr), what);
      float* dd = nullptr;
      CHECK_CUDA(cudaMalloc(&dd, size_t(N) * K * 4));
      expect_ok(tda_block_dequantize(f, K, N, dw, dd, K, nullptr), "block_dequantize");
      CHECK_CUDA(cudaDeviceSynchronize());
      for (void* p : {dw, static_cast<void*>(dx), static_cast<void*>(dy), static_cast<void*>(dd)}) CHECK_CUDA(cudaFree(p));
    }
}

static void select_and_prefill(std::mt19937& rng) {
  const int B = 3, S = 5, I = 1536;
  std::vector<float> scores(B * I), valid(B * S, 1.0f), z(B * S * I);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (auto& v : scores) v = u(rng);
  for (auto& v : z) v = u(rng) - 0.5f;
  const float tau = 0.5f;
  float* ds = static_cast<float*>(upload(scores.data(), scores.size() * 4));
  float* dtau = static_cast<float*>(upload(&tau, 4));
  float* dz = static_cast<float*>(upload(z.data(), z.size() * 4));
  float* dv = static_cast<float*>(upload(valid.data(), valid.size() * 4));
  int32_t *didx, *dcnt;
  float* dsout;
  CHECK_CUDA(cudaMalloc(&didx, B * I * 4));
  CHECK_CUDA(cudaMalloc(&dcnt, B * 4));
  CHECK_CUDA(cudaMalloc(&dsout, B * I * 4));
  tda_select_args_t sa{B, I, ds, dtau, didx, dcnt};
  expect_ok(tda_select_active(&sa, nullptr, 0, nullptr), "select_active");
  tda_prefill_scores_args_t pa{TDA_F32, TDA_SCORE_NORM_TOKEN_L2, B, S, I, dz, dv, ds, dsout};
  const size_t ws_size = tda_prefill_scores_workspace_size(&pa);
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, ws_size ? ws_size : 1));
  expect_ok(tda_prefill_scores(&pa, ws, ws_size, nullptr), "prefill_scores");
  CHECK_CUDA(cudaDeviceSynchronize());
  for (void* p : {static_cast<void*>(ds), static_cast<void*>(dtau), static_cast<void*>(dz), static_cast<void*>(dv),
                  static_cast<void*>(didx), static_cast<void*>(dcnt), static_cast<void*>(dsout), ws})
    CHECK_CUDA(cudaFree(p));
}

int main(int argc, char** argv) {
  // "quick": fewer cases (racecheck is much slower than memcheck).
  const bool quick = argc > 1 && argv[1][0] == 'q';
  std::mt19937 rng(1234);
  const int shapes[][2] = {{40, 72}, {264, 1032}};
  for (tda_dtype_t dt : {TDA_BF16, TDA_F16, TDA_F32}) {
    if (quick && dt == TDA_F16) continue;
    for (const auto& hw : shapes)
      for (int batch : {0, 1, 3, 8, 64})
        for (int version : {1, 2})
          for (int det : {1, 0}) {
            if (quick && (det == 0 || batch == 64)) continue;
            decode_case(dt, batch, hw[0], hw[1], version, det, rng);
          }
  }
  // Block weights: H a multiple of 32, I any (7: fewer rows than a gate_up block's 8 warps).
  const int block_shapes[][2] = {{64, 7}, {288, 1032}};
  for (int f : {TDA_WEIGHTS_Q8_0, TDA_WEIGHTS_Q4_0, TDA_WEIGHTS_Q4_1})
    for (tda_dtype_t dt : {TDA_BF16, TDA_F32})
      for (const auto& hw : block_shapes)
        for (int batch : {0, 1, 3, 8, 33})
          for (int det : {1, 0}) {
            if (quick && (det == 0 || batch == 33 || dt == TDA_F32)) continue;
            decode_case(dt, batch, hw[0], hw[1], 0, det, rng, f);
          }
  // down_weight_format: the same kernels paired, so bf16 and the deterministic path suffice.
  const int own_down[][2] = {{TDA_WEIGHTS_Q4_1, TDA_WEIGHTS_Q8_0}, {TDA_WEIGHTS_Q4_0, TDA_WEIGHTS_Q8_0},
                             {TDA_WEIGHTS_Q8_0, TDA_WEIGHTS_Q4_1}};
  for (const auto& fd : own_down)
    for (const auto& hw : block_shapes)
      for (int batch : {1, 3, 8, 33}) {
        if (quick && batch > 3) continue;
        decode_case(TDA_BF16, batch, hw[0], hw[1], 0, 1, rng, fd[0], fd[1]);
      }
  block_linear_cases(rng);
  select_and_prefill(rng);
  CHECK_CUDA(cudaDeviceSynchronize());
  printf("gpu_sanitize: %s, %d failures\n", quick ? "quick" : "full", failures);
  return failures ? 1 : 0;
}
