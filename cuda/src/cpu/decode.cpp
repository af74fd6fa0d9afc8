// CPU decode: the same union-of-active-rows algorithm as the GPU, with fp32
// accumulation, in two phases: gate/up dot products + activation over the
// active rows (split across threads by row), then the down-projection axpy
// (split across threads by output column). Every z and every output element
// is computed by one thread in a fixed order, so the result is deterministic
// whatever the thread count.
//
// The library is built without -march; the hot loops come in three variants
// chosen per call from CPUID: AVX-512F (decode_avx512.cpp), AVX2+FMA+F16C
// (decode_avx2.cpp) and this file's portable `omp simd` loops. TDA_CPU_ISA=
// avx512, avx2 or generic caps the choice (tests use it to cover every variant).
// Block-quantized weights (tda_weight_format_t) take the same phases with
// decode_quant.cpp / decode_quant_simd.h's loops; with x_format TDA_X_Q8_0
// x is quantized once per call and gate_up takes integer dot products
// (decode_quant.cpp, quant_x_avx2.h; with vpdpbusd on AVX-512 VNNI CPUs,
// decode_vnni.cpp).
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <algorithm>

#include "../activation.h"
#include "../common.h"
#include "decode_ctx.h"
#include "fp.h"

namespace tda {
namespace cpu {
namespace {

constexpr int32_t kQuantBlock = TDA_QUANT_BLOCK;

struct DecodeWs {
  float* x;        // [B, H] inputs widened to fp32 (x_format TDA_X_Q8_0: holds xq, below)
  uint64_t* mask;  // [I] bit b set: neuron active in sequence b
  int32_t* rows;   // [I] union of active rows, ascending
  float* z;        // [U, B] intermediate (0 where masked), rounded to dtype
  float* acc;      // [B, H] fp32 output accumulators
  size_t bytes;
};

DecodeWs carve(const tda_decode_args_t* a, void* base) {
  Carver c{static_cast<char*>(base)};
  DecodeWs w;
  w.x = c.take<float>(size_t(a->batch) * a->hidden);
  w.mask = c.take<uint64_t>(a->intermediate);
  w.rows = c.take<int32_t>(a->intermediate);
  w.z = c.take<float>(size_t(a->intermediate) * a->batch);
  w.acc = c.take<float>(size_t(a->batch) * a->hidden);
  w.bytes = c.used;
  return w;
}

// Union of the sequences' sorted lists; returns its length and the number of
// (sequence, row) pairs.
int32_t build_union(const tda_decode_args_t* a, const DecodeWs& w, int64_t* pairs) {
  const int32_t B = a->batch, I = a->intermediate;
  *pairs = 0;
  if (B == 1) {  // one sorted list is its own union
    const int32_t n = clamp_count(a->active_count[0], I);
    for (int32_t k = 0; k < n; ++k) {
      w.rows[k] = a->active_idx[k];
      w.mask[a->active_idx[k]] = 1;
    }
    *pairs = n;
    return n;
  }
  memset(w.mask, 0, sizeof(uint64_t) * I);
  for (int32_t b = 0; b < B; ++b) {
    const int32_t n = clamp_count(a->active_count[b], I);
    const int32_t* idx = a->active_idx + int64_t(b) * I;
    for (int32_t k = 0; k < n; ++k) w.mask[idx[k]] |= uint64_t(1) << b;
    *pairs += n;
  }
  int32_t u = 0;
  for (int32_t j = 0; j < I; ++j)
    if (w.mask[j]) w.rows[u++] = j;
  return u;
}

// ---- Portable variant (SSE2 at baseline flags) ----

template <tda_dtype_t D>
void dot2(const float* x, const typename Elem<D>::type* gate, const typename Elem<D>::type* up, int32_t n,
          float* g_out, float* u_out) {
  float g = 0.0f, u = 0.0f;
#pragma omp simd reduction(+ : g, u)
  for (int32_t i = 0; i < n; ++i) {
    g += x[i] * Elem<D>::load(gate, i);
    u += x[i] * Elem<D>::load(up, i);
  }
  *g_out = g;
  *u_out = u;
}

template <tda_dtype_t D, tda_activation_t A>
void gate_up_generic(const DecodeCtx& c, int32_t k0, int32_t k1) {
  using T = typename Elem<D>::type;
  const T* gu = static_cast<const T*>(c.gate_up);
  for (int32_t k = k0; k < k1; ++k) {
    const int32_t j = c.rows[k];
    const T* gate = gu + int64_t(j) * 2 * c.H;
    for (int32_t b = 0; b < c.B; ++b) {
      float zv = 0.0f;
      if (c.mask[j] >> b & 1) {
        float g, u;
        dot2<D>(c.x + int64_t(b) * c.H, gate, gate + c.H, c.H, &g, &u);
        zv = Elem<D>::round(activate<A>(g) * u);
      }
      c.z[int64_t(k) * c.B + b] = zv;
    }
  }
}

template <tda_dtype_t D>
void down_generic(const DecodeCtx& c, int32_t c0, int32_t c1) {
  using T = typename Elem<D>::type;
  const T* wd = static_cast<const T*>(c.down);
  const int32_t B = c.B, H = c.H;
  for (int32_t b = 0; b < B; ++b) std::fill(c.acc + int64_t(b) * H + c0, c.acc + int64_t(b) * H + c1, 0.0f);
  for (int32_t k = 0; k < c.U; ++k) {
    const T* row = wd + int64_t(c.rows[k]) * H;
    for (int32_t b = 0; b < B; ++b) {
      if (!(c.mask[c.rows[k]] >> b & 1)) continue;
      const float zv = c.z[int64_t(k) * B + b];
      float* acc = c.acc + int64_t(b) * H;
#pragma omp simd
      for (int32_t i = c0; i < c1; ++i) acc[i] += zv * Elem<D>::load(row, i);
    }
  }
  T* out = static_cast<T*>(c.out);
  for (int32_t b = 0; b < B; ++b)
    for (int32_t i = c0; i < c1; ++i) Elem<D>::store(out, int64_t(b) * H + i, c.acc[int64_t(b) * H + i]);
}

template <tda_dtype_t D>
DecodeKernels generic_for(tda_activation_t a) {
  switch (a) {
    case TDA_ACT_SILU: return {gate_up_generic<D, TDA_ACT_SILU>, down_generic<D>};
    case TDA_ACT_GELU_TANH: return {gate_up_generic<D, TDA_ACT_GELU_TANH>, down_generic<D>};
    case TDA_ACT_GELU: return {gate_up_generic<D, TDA_ACT_GELU>, down_generic<D>};
    case TDA_ACT_RELU: break;
  }
  return {gate_up_generic<D, TDA_ACT_RELU>, down_generic<D>};
}

DecodeKernels generic_kernels(tda_dtype_t d, tda_activation_t a) {
  switch (d) {
    case TDA_F16: return generic_for<TDA_F16>(a);
    case TDA_BF16: return generic_for<TDA_BF16>(a);
    case TDA_F32: break;
  }
  return generic_for<TDA_F32>(a);
}

// ---- Dispatch ----

DecodeKernels select_kernels(Isa isa, tda_dtype_t d, tda_activation_t a, tda_weight_format_t w,
                             tda_x_format_t x = TDA_X_DTYPE) {
  switch (isa) {
    // Quantized x: integer dot products on 256-bit vectors, vpdpbusd where the CPU has AVX-512 VNNI.
    case kAvx512:
      if (x != TDA_X_Q8_0) return avx512_kernels(d, a, w);
      return cpu_vnni() ? vnni_kernels(d, a, w) : avx2_kernels(d, a, w, x);
    case kAvx2: return avx2_kernels(d, a, w, x);
    case kGeneric: break;
  }
  return w == TDA_WEIGHTS_DTYPE ? generic_kernels(d, a) : generic_block_kernels(d, a, w, x);
}

// x_format TDA_X_Q8_0: gate_up reads only the quantized x, so it takes the fp32 x's place in the workspace
// (q, d and s need 1.25 of its 4 bytes per value) and the workspace does not depend on x_format. x is
// widened into acc first, which down clears before it sums.
QX carve_xq(const DecodeWs& w, int32_t B, int32_t H) {
  int8_t* q = reinterpret_cast<int8_t*>(w.x);
  float* d = reinterpret_cast<float*>(q + int64_t(B) * H);  // B * H is a multiple of 32: 4-byte aligned
  return {q, d, d + int64_t(B) * (H / kQuantBlock)};
}

// Multiply-adds per thread below which a thread does not pay for itself; it
// depends on how the pool's idle workers wait, which libgomp reads from the
// environment once. Sleeping at once (OMP_WAIT_POLICY=PASSIVE or
// GOMP_SPINCOUNT=0, what the Python CLI sets for torch): waking and joining a
// worker costs ~20-30 µs, and on a loaded box a barrier can wait a whole
// scheduler slice (ms) for a descheduled worker; 2^20 fp32 multiply-adds
// stream ~4 MB of weights, ~60 µs on one core, so shorter calls stay on the
// calling thread. Spinning workers (libgomp's default, ACTIVE, or the native
// runtime's bounded GOMP_SPINCOUNT, cpp/src/parallel.h) join in ~1-3 µs, so
// 2^17 (~0.5 MB, a SmolLM2 layer at d=0.5 is ~1.8M) is already worth a fork.
// The caller's thread count (OMP_NUM_THREADS, torch.set_num_threads) caps it.
int64_t work_per_thread() {
  static const int64_t work = [] {
    const char* spin = getenv("GOMP_SPINCOUNT");
    const char* policy = getenv("OMP_WAIT_POLICY");
    const bool passive = spin ? (spin[0] >= '0' && spin[0] <= '9' && strtoull(spin, nullptr, 10) == 0)
                              : (policy && strcasecmp(policy, "passive") == 0);
    return passive ? int64_t(1) << 20 : int64_t(1) << 17;
  }();
  return work;
}

template <tda_dtype_t D>
void run(const tda_decode_args_t* a, const DecodeWs& w) {
  using T = typename Elem<D>::type;
  const int32_t B = a->batch, H = a->hidden;
  const T* x_in = static_cast<const T*>(a->hidden_states);
  const Isa isa = cpu_isa();
  const tda_x_format_t xf = static_cast<tda_x_format_t>(a->x_format);
  QX xq{};
  if (xf == TDA_X_Q8_0) {
    for (int64_t i = 0; i < int64_t(B) * H; ++i) w.acc[i] = Elem<D>::load(x_in, i);
    xq = carve_xq(w, B, H);
    (isa == kGeneric ? quantize_x_generic : avx2_quantize_x)(w.acc, H, B, H, xq);
  } else {
    for (int64_t i = 0; i < int64_t(B) * H; ++i) w.x[i] = Elem<D>::load(x_in, i);
  }
  int64_t pairs;
  const int32_t U = build_union(a, w, &pairs);
  const float* x = xf == TDA_X_Q8_0 ? nullptr : w.x;
  const DecodeCtx c{B, H, U, x, w.mask, w.rows, w.z, w.acc, a->gate_up_weight, a->down_weight_t, a->output, xq};
  const tda_weight_format_t wf = static_cast<tda_weight_format_t>(a->weight_format);
  // gate_up from the kernels of weight_format (reading x as x_format says), down from those of down_weight_t's
  // own format (ABI 6).
  const DecodeKernels k{select_kernels(isa, a->dtype, a->activation, wf, xf).gate_up,
                        select_kernels(isa, a->dtype, a->activation, down_format(a)).down};

  // Work: 3 multiply-adds per (pair, column), plus the union rows' reads.
  const int64_t work = 3 * (pairs + U) * int64_t(H);
  const int nt = int(std::min<int64_t>(omp_get_max_threads(), std::max<int64_t>(1, work / work_per_thread())));
  // Column slices are multiples of 16 floats (64 bytes), so threads never
  // share a cache line of acc/output; of 32 for block weights (whole blocks).
  const int32_t cw = wf == TDA_WEIGHTS_DTYPE ? 16 : kQuantBlock;
  const int32_t Hc = (H + cw - 1) / cw;
  auto body = [&](int t, int n) {
    k.gate_up(c, int32_t(int64_t(U) * t / n), int32_t(int64_t(U) * (t + 1) / n));
  };
  auto cols = [&](int t, int n) {
    const int32_t c0 = int32_t(int64_t(Hc) * t / n) * cw, c1 = std::min(H, int32_t(int64_t(Hc) * (t + 1) / n) * cw);
    if (c0 < c1) k.down(c, c0, c1);
  };
  if (nt <= 1) {
    body(0, 1);
    cols(0, 1);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    body(t, n);
#pragma omp barrier
    cols(t, n);
  }
}

}  // namespace

Isa cpu_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      // F16C has no __builtin_cpu_supports name: CPUID.1:ECX bit 29.
      unsigned a, b, c, d;
      __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
      if (c >> 29 & 1) return kAvx2;
    }
    return kGeneric;
  }();
  // Read per call (a getenv is ~100 ns) so tests can switch variants.
  const char* cap = getenv("TDA_CPU_ISA");
  if (cap && strcmp(cap, "generic") == 0) return kGeneric;
  if (cap && strcmp(cap, "avx2") == 0) return std::min(best, kAvx2);
  return best;
}

bool cpu_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  if (!has || cpu_isa() != kAvx512) return false;
  const char* cap = getenv("TDA_CPU_ISA");
  return !(cap && strcmp(cap, "avx512") == 0);
}

}  // namespace cpu
}  // namespace tda

extern "C" size_t tda_sparse_gated_mlp_decode_workspace_size(const tda_decode_args_t* a) {
  // Batch 0 does nothing and needs nothing, as in the CUDA library.
  if (tda::check_decode_shape(a, /*runs_block_weights=*/true, /*runs_x_q8_0=*/true) != TDA_OK || a->batch == 0)
    return 0;
  return tda::cpu::carve(a, nullptr).bytes;
}

extern "C" tda_status_t tda_sparse_gated_mlp_decode(const tda_decode_args_t* a, void* ws, size_t ws_size,
                                                    void* /*stream*/) {
  const tda_status_t s =
      tda::check_decode(a, ws, ws_size, tda_sparse_gated_mlp_decode_workspace_size(a), /*runs_block_weights=*/true,
                        /*runs_x_q8_0=*/true);
  if (s != TDA_OK || a->batch == 0) return s;
  const tda::cpu::DecodeWs w = tda::cpu::carve(a, ws);
  switch (a->dtype) {
    case TDA_F32: tda::cpu::run<TDA_F32>(a, w); break;
    case TDA_F16: tda::cpu::run<TDA_F16>(a, w); break;
    case TDA_BF16: tda::cpu::run<TDA_BF16>(a, w); break;
  }
  return TDA_OK;
}
