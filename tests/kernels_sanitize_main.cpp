// Runs the CPU library's block-quantized sparse decode over every format,
// dtype, batch and mask kind, and its dense block linear (ABI 5) over every
// format, M and row range, each also with x quantized (x_format TDA_X_Q8_0),
// for tests/test_kernels_quant.py's ASan + UBSan build (compiled together
// with cuda/src/cpu/*.cpp). Weights are allocated to the exact byte, so
// reading past a row's last block hits a redzone; the
// ISA variant comes from $TDA_CPU_ISA. Prints "ok" when every call returned
// TDA_OK with finite outputs and exact zeros for empty masks.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <memory>
#include <random>
#include <vector>

#include "tda_kernels.h"

namespace {

int failures = 0;

int x_format = TDA_X_DTYPE;  // of the calls being made

void fail(const char* what, int fmt, int dtype, int H, int I, int B) {
  printf("FAIL %s: format %d dtype %d H %d I %d B %d x_format %d\n", what, fmt, dtype, H, I, B, x_format);
  ++failures;
}

uint16_t f16_bits(float v) {  // positive normal values only: enough for scales
  uint32_t u;
  memcpy(&u, &v, 4);
  return uint16_t(((u >> 23) - 112) << 10 | ((u >> 13) & 0x3ff));
}

// Random blocks with small finite fp16 scales (and minimums).
std::unique_ptr<uint8_t[]> random_blocks(int fmt, int64_t rows, int H, std::mt19937& rng) {
  const int bytes = fmt == TDA_WEIGHTS_Q8_0 ? 34 : fmt == TDA_WEIGHTS_Q4_0 ? 18 : 20;
  const int64_t n = rows * (H / TDA_QUANT_BLOCK) * bytes;
  std::unique_ptr<uint8_t[]> p(new uint8_t[n]);
  for (int64_t i = 0; i < n; ++i) p[i] = uint8_t(rng());
  std::uniform_real_distribution<float> scale(0.0002f, 0.002f);  // outputs stay well inside fp16's range
  for (int64_t b = 0; b < n; b += bytes) {
    const uint16_t d = f16_bits(scale(rng)), m = uint16_t(f16_bits(scale(rng)) | 0x8000u);
    memcpy(p.get() + b, &d, 2);
    if (fmt == TDA_WEIGHTS_Q4_1) memcpy(p.get() + b + 2, &m, 2);
  }
  return p;
}

void run_case(int fmt, int dtype, int H, int I, int B, std::mt19937& rng) {
  const int es = dtype == TDA_F32 ? 4 : 2;
  std::unique_ptr<uint8_t[]> gu = random_blocks(fmt, 2 * int64_t(I), H, rng), wd = random_blocks(fmt, I, H, rng);
  std::vector<uint16_t> x16(size_t(B) * H + 1);
  std::vector<float> x32(size_t(B) * H + 1), out32(size_t(B) * H + 1);
  std::vector<uint16_t> out16(size_t(B) * H + 1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (auto& v : x32) v = u(rng);
  for (auto& v : x16) v = dtype == TDA_F16 ? uint16_t(0x3800 | (rng() & 0x1ff)) : uint16_t(0x3f00 | (rng() & 0x7f));
  std::vector<int32_t> idx(size_t(B) * I, 0), cnt(B, 0);
  std::vector<int> kind(B);
  for (int b = 0; b < B; ++b) {
    kind[b] = int(rng() % 6);  // empty, full, single, first, last, random
    int32_t* row = idx.data() + int64_t(b) * I;
    int n = 0;
    for (int j = 0; j < I; ++j) {
      const bool on = kind[b] == 1 || (kind[b] == 2 && j == I / 2) || (kind[b] == 3 && j == 0) ||
                      (kind[b] == 4 && j == I - 1) || (kind[b] == 5 && rng() % 3 == 0);
      if (on) row[n++] = j;
    }
    cnt[b] = n;
  }
  // The output poisoned with NaN (fp32) / 0xffff (16-bit NaN), to see every element written.
  std::fill(out32.begin(), out32.end(), NAN);
  std::fill(out16.begin(), out16.end(), uint16_t(0xffff));
  tda_decode_args_t a{};
  a.dtype = static_cast<tda_dtype_t>(dtype);
  a.activation = static_cast<tda_activation_t>(rng() % 4);
  a.batch = B;
  a.hidden = H;
  a.intermediate = I;
  a.deterministic = 1;
  a.hidden_states = es == 4 ? static_cast<const void*>(x32.data()) : x16.data();
  a.gate_up_weight = gu.get();
  a.down_weight_t = wd.get();
  a.active_idx = idx.data();
  a.active_count = cnt.data();
  a.output = es == 4 ? static_cast<void*>(out32.data()) : out16.data();
  a.weight_format = fmt;
  a.x_format = x_format;
  const size_t ws_size = tda_sparse_gated_mlp_decode_workspace_size(&a);
  void* ws = ws_size ? aligned_alloc(256, (ws_size + 255) / 256 * 256) : nullptr;
  if (ws) memset(ws, 0xa5, ws_size);
  if (tda_sparse_gated_mlp_decode(&a, ws, ws_size, nullptr) != TDA_OK) fail("status", fmt, dtype, H, I, B);
  free(ws);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < H; ++i) {
      const int64_t e = int64_t(b) * H + i;
      float v;
      if (es == 4) {
        v = out32[e];
      } else {
        const uint32_t bits = dtype == TDA_BF16 ? uint32_t(out16[e]) << 16 : 0;
        memcpy(&v, &bits, 4);
        if (dtype == TDA_F16) v = (out16[e] & 0x7c00u) == 0x7c00u ? NAN : 0.0f;
      }
      if (!isfinite(v) || (kind[b] == 0 && v != 0.0f)) {
        fail("output", fmt, dtype, H, I, B);
        return;
      }
    }
  const bool past = es == 4 ? !isnan(out32[size_t(B) * H]) : out16[size_t(B) * H] != 0xffff;
  if (past) fail("wrote past output", fmt, dtype, H, I, B);
}

// tda_block_linear over rows [n0, n1) and tda_block_dequantize of every row,
// with weights, x and y allocated to the exact element (strides ldx = K,
// ldy = N), so a read or write past any edge hits a redzone.
void run_linear(int fmt, int M, int N, int K, int n0, int n1, std::mt19937& rng) {
  std::unique_ptr<uint8_t[]> w = random_blocks(fmt, N, K, rng);
  std::unique_ptr<float[]> x(new float[size_t(M) * K + (M == 0)]), y(new float[size_t(M) * N + (M == 0)]);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t i = 0; i < int64_t(M) * K; ++i) x[i] = u(rng);
  for (int64_t i = 0; i < int64_t(M) * N; ++i) y[i] = NAN;
  tda_block_linear_args_t a{};
  a.weight_format = fmt;
  a.m = M;
  a.n = N;
  a.k = K;
  a.n_begin = n0;
  a.n_end = n1;
  a.ldx = K;
  a.ldy = N;
  a.x = x.get();
  a.weight = w.get();
  a.y = y.get();
  a.x_format = x_format;
  if (tda_block_linear_workspace_size(&a) != 0 || tda_block_linear(&a, nullptr, 0, nullptr) != TDA_OK) {
    fail("linear status", fmt, 0, K, N, M);
    return;
  }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n)
      if (isfinite(y[int64_t(m) * N + n]) != (n >= n0 && n < n1)) {
        fail("linear output", fmt, 0, K, N, M);
        return;
      }
  std::unique_ptr<float[]> d(new float[size_t(N) * K]);
  if (tda_block_dequantize(fmt, K, N, w.get(), d.get(), K, nullptr) != TDA_OK) fail("dequantize status", fmt, 0, K, N, M);
  for (int64_t i = 0; i < int64_t(N) * K; ++i)
    if (!isfinite(d[i])) {
      fail("dequantize output", fmt, 0, K, N, M);
      return;
    }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const int shapes[][2] = {{32, 7}, {96, 13}, {160, 72}, {1056, 2051}};
  for (int xf : {TDA_X_DTYPE, TDA_X_Q8_0}) {
    x_format = xf;
    for (int fmt : {TDA_WEIGHTS_Q8_0, TDA_WEIGHTS_Q4_0, TDA_WEIGHTS_Q4_1})
      for (int dtype : {TDA_F32, TDA_F16, TDA_BF16})
        for (const auto& s : shapes)
          for (int B : {1, 2, 4, 7})
            if (s[0] < 1000 || B != 2) run_case(fmt, dtype, s[0], s[1], B, rng);
    for (int fmt : {TDA_WEIGHTS_Q8_0, TDA_WEIGHTS_Q4_0, TDA_WEIGHTS_Q4_1})
      for (int M : {0, 1, 2, 3, 4, 5, 9, 33, 70})  // 70: past the 64 rows of x quantized at a time
        for (const auto& s : {std::make_pair(1, 32), std::make_pair(13, 96), std::make_pair(37, 576)}) {
          if (M == 70 && xf == TDA_X_DTYPE) continue;
          run_linear(fmt, M, s.first, s.second, 0, s.first, rng);
          run_linear(fmt, M, s.first, s.second, s.first / 3, s.first - s.first / 4, rng);
        }
  }
  printf(failures ? "%d failures\n" : "ok\n", failures);
  return failures ? 1 : 0;
}
