/* tda_kernels.h: plain C ABI of the TDA sparse-MLP kernels.
 *
 * Two libraries implement exactly this header: libtda_kernels_cuda.so (GPU)
 * and libtda_kernels_cpu.so (C++/OpenMP, so the semantics are testable
 * without a GPU). Semantics are those of tda_export/ops/contract.py; enum
 * values equal the index of the name in the contract's lists (a test parses
 * this file to keep them equal).
 *
 * Conventions
 *  - All tensors are dense, row-major, contiguous. Pointers are device
 *    pointers for the CUDA library and host pointers for the CPU library;
 *    this includes `threshold`, which is a tensor in a graph, not a constant.
 *  - Decode's hidden_states, weights and output must be 16-byte aligned
 *    (vector loads); index/count arrays 4-byte aligned. Block-quantized
 *    weights (weight_format != TDA_WEIGHTS_DTYPE) are byte arrays with no
 *    alignment requirement.
 *  - `stream` is a cudaStream_t passed as void* (ignored by the CPU library),
 *    so this header needs no CUDA include. Nothing synchronises the host and
 *    nothing allocates, so every call can be captured in a CUDA graph.
 *  - Workspace: call the *_workspace_size query with the same arguments
 *    (only the sizes/dtype fields are read) and pass at least that many bytes,
 *    256-byte aligned. Contents need no initialisation and are not kept.
 *  - A non-OK status means nothing was launched / written.
 */
#ifndef TDA_KERNELS_H
#define TDA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 2: tda_decode_args_t gained `version` (last field).
 * 3: tda_select_args_t gained `density_bounds` (last field; NULL = no clamp, so a
 *    zero-initialised struct keeps version 2's results).
 * 4: tda_decode_args_t gained `weight_format` (last field; 0 = weights in
 *    dtype, so a zero-initialised struct keeps version 3's results).
 * 5: the dense block-quantized linear tda_block_linear (+ its workspace
 *    query), tda_block_dequantize and tda_block_bytes.
 * 6: tda_decode_args_t gained `down_weight_format` (last field; 0 = the same
 *    as weight_format, so a zero-initialised struct keeps version 5's results).
 * 7: tda_decode_args_t and tda_block_linear_args_t gained `x_format` (last
 *    field; 0 = x as is, so a zero-initialised struct keeps version 6's
 *    results). */
#define TDA_KERNELS_ABI_VERSION 7
/* Largest batch of one call: decode keeps one bit per sequence per neuron. */
#define TDA_MAX_BATCH 64
/* H and I must be multiples of this (16-byte vectors of 16-bit types). */
#define TDA_SIZE_MULTIPLE 8
/* Weights per block of the block-quantized formats, along a row's input
 * dimension; H must be a multiple of it for those formats (I need not be). */
#define TDA_QUANT_BLOCK 32

typedef enum {
  TDA_F32 = 0,
  TDA_F16 = 1,
  TDA_BF16 = 2
} tda_dtype_t;

typedef enum {
  TDA_ACT_SILU = 0,
  TDA_ACT_GELU_TANH = 1,
  TDA_ACT_GELU = 2,
  TDA_ACT_RELU = 3
} tda_activation_t;

typedef enum {
  TDA_SCORE_NORM_TOKEN_L2 = 0,
  TDA_SCORE_NORM_NONE = 1
} tda_score_norm_t;

/* How decode's gate_up_weight / down_weight_t are stored (contract
 * WEIGHT_FORMATS, docs/ops.md "Block-quantized weights"). DTYPE: in `dtype`,
 * as before version 4. The others: neuron-major rows as for float weights,
 * each row H/32 GGUF-compatible blocks of 32 weights along H:
 *   Q8_0 (34 bytes): fp16 d, 32 x int8 q;            w = d * q
 *   Q4_0 (18 bytes): fp16 d, 16 bytes of nibbles;    w = d * (q - 8)
 *   Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes;       w = d * q + m
 * (byte k of a 4-bit block holds weight k low, weight k + 16 high). The op is
 * the float op on these float32 weights: x is not quantized. */
typedef enum {
  TDA_WEIGHTS_DTYPE = 0,
  TDA_WEIGHTS_Q8_0 = 1,
  TDA_WEIGHTS_Q4_0 = 2,
  TDA_WEIGHTS_Q4_1 = 3
} tda_weight_format_t;

/* How gate/up (decode) and tda_block_linear read x (contract X_FORMATS,
 * docs/ops.md "Quantized activations"). DTYPE: as is. Q8_0: per block of 32
 * along the row, d = max|x| / 127, q = round-half-even(x * (1/d)) (0 when
 * d == 0; d = NaN for a block holding inf/NaN), and the products read
 * q * d; block weights then take int8 dot products. Only with block
 * weights; the CUDA library runs DTYPE only (Q8_0: TDA_ERR_BAD_DTYPE). */
typedef enum {
  TDA_X_DTYPE = 0,
  TDA_X_Q8_0 = 1
} tda_x_format_t;

typedef enum {
  TDA_OK = 0,
  TDA_ERR_NULL_POINTER = 1,
  TDA_ERR_BAD_DTYPE = 2,          /* dtype, or a weight_format / x_format this library does not run */
  TDA_ERR_BAD_ENUM = 3,          /* activation, score_norm or decode version out of range */
  TDA_ERR_BAD_SIZE = 4,          /* H or I not a positive multiple of 8 (block formats: H of 32, I > 0) */
  TDA_ERR_BAD_BATCH = 5,         /* batch < 0 or > TDA_MAX_BATCH */
  TDA_ERR_MISALIGNED = 6,        /* a decode pointer or a workspace not aligned (see Conventions) */
  TDA_ERR_WORKSPACE_TOO_SMALL = 7,
  TDA_ERR_CUDA = 8               /* a CUDA runtime call failed (launch, memset) */
} tda_status_t;

/* Static English text for a status; never NULL. */
const char* tda_status_string(tda_status_t status);
/* "cpu" or "cuda": which implementation of this header is loaded. */
const char* tda_backend(void);
int tda_abi_version(void);

/* ---- Decode: y[b] = sum_{k<count[b]} z[b,idx[b,k]] * down_weight_t[idx[b,k]] ----
 * z[b,j] = act(x[b].gate_j) * (x[b].up_j) computed in fp32 and rounded to
 * dtype; only active rows are read. For batch > 1 the union of the
 * sequences' active rows is read once and each sequence's own mask applied. */
typedef struct {
  tda_dtype_t dtype;
  tda_activation_t activation;
  int32_t batch;          /* B, 0..TDA_MAX_BATCH (0: nothing to do, no pointer is read, workspace 0) */
  int32_t hidden;         /* H */
  int32_t intermediate;   /* I */
  /* Non-zero: the down projection's split-K partial sums are added in a
   * fixed order, so equal inputs give bitwise-equal outputs. Zero: fp32
   * atomics (order varies run to run; fewer workspace bytes). */
  int32_t deterministic;
  const void* hidden_states;   /* [B, H] dtype */
  const void* gate_up_weight;  /* [I, 2, H] dtype, or [I, 2, H/32] blocks */
  const void* down_weight_t;   /* [I, H] dtype, or [I, H/32] blocks */
  const int32_t* active_idx;   /* [B, I] ascending, then 0-padding */
  const int32_t* active_count; /* [B] */
  void* output;                /* [B, H] dtype */
  /* Algorithm: 0 = the library's default (1, or $TDA_DECODE_VERSION=2),
   * 1 = v1, 2 = v2 (CUDA: fp16/bf16 at batch 1..8 and I <= 131072, other
   * calls run v1; always deterministic). Same result contract for all; the
   * CPU library has one algorithm and accepts 0..2. Query the workspace with
   * the same value. Zero-initialised structs get the default. */
  int32_t version;
  /* tda_weight_format_t of gate_up_weight and down_weight_t (ABI 4). Both
   * libraries run every format; the CUDA library needs block arrays 4-byte
   * aligned (TDA_ERR_MISALIGNED), the CPU library none. */
  int32_t weight_format;
  /* down_weight_t's own format (ABI 6, contract down_weight_format): 0 = the
   * same as weight_format; else a block tda_weight_format_t (Q8_0/Q4_0/Q4_1),
   * only with a block weight_format (otherwise TDA_ERR_BAD_DTYPE). Then
   * down_weight_t is [I, H/32] blocks of that format, e.g. q8_0 rows under
   * q4_1 gate/up rows. */
  int32_t down_weight_format;
  /* tda_x_format_t (ABI 7): how gate/up read hidden_states; 0 = as is.
   * TDA_X_Q8_0 only with a block weight_format (else TDA_ERR_BAD_DTYPE). */
  int32_t x_format;
} tda_decode_args_t;

size_t tda_sparse_gated_mlp_decode_workspace_size(const tda_decode_args_t* args);
tda_status_t tda_sparse_gated_mlp_decode(const tda_decode_args_t* args, void* workspace,
                                         size_t workspace_size, void* stream);

/* ---- Selection: scores + relative threshold + density bounds -> sorted active list ----
 * m = max_k scores[b,k]. If m == 0 every neuron is active (no clamp). Else
 * neuron j passes iff tau <= 0 or scores[b,j] >= (tau*tau) * m (float32),
 * c = #passing, and with (lo, hi) = density_bounds (float32 products):
 *   n_lo = clip(ceilf(lo*I), 0, I), n_hi = clip(floorf(hi*I), 0, I),
 *   k = max(n_lo, min(c, n_hi));
 * the active neurons are the k highest scores, equal scores by ascending
 * index (-0 == +0); k == c is exactly the passing set.
 * active_idx[b,:count] ascending, active_idx[b,count:] = 0. Any I >= 0. */
typedef struct {
  int32_t batch;
  int32_t intermediate;
  const float* scores;     /* [B, I] */
  const float* threshold;  /* scalar tau (device pointer for CUDA) */
  int32_t* active_idx;     /* [B, I] */
  int32_t* active_count;   /* [B] */
  /* [2] (lo, hi) fractions of I (device pointer for CUDA); NULL = no clamp
   * (same as (0, 1)). */
  const float* density_bounds;
} tda_select_args_t;

size_t tda_select_active_workspace_size(const tda_select_args_t* args);
tda_status_t tda_select_active(const tda_select_args_t* args, void* workspace,
                               size_t workspace_size, void* stream);

/* ---- Prefill statistics ----
 * scores_out[b,j] = scores_in[b,j] + sum_t token_valid[b,t] * z[b,t,j]^2 / n[b,t]
 * with n[b,t] = max(sum_j z[b,t,j]^2, NORM_FLOOR) for TOKEN_L2 and 1 for NONE.
 * z is the dense intermediate act(gate)*up [B, S, I] that the caller's dense
 * prefill MLP computes anyway (prefill is compute-bound: cuBLAS/oneDNN GEMMs
 * are the right tool there, this kernel only reduces their by-product).
 * Tokens are added in order t = 0..S-1, so results are reproducible.
 * scores_out may alias scores_in. */
typedef struct {
  tda_dtype_t dtype;           /* of z */
  tda_score_norm_t score_norm;
  int32_t batch;               /* B >= 0 (no upper limit) */
  int32_t seq_len;             /* S >= 0 */
  int32_t intermediate;        /* I */
  const void* z;               /* [B, S, I] dtype */
  const float* token_valid;    /* [B, S] */
  const float* scores_in;      /* [B, I] */
  float* scores_out;           /* [B, I] */
} tda_prefill_scores_args_t;

size_t tda_prefill_scores_workspace_size(const tda_prefill_scores_args_t* args);
tda_status_t tda_prefill_scores(const tda_prefill_scores_args_t* args, void* workspace,
                                size_t workspace_size, void* stream);

/* ---- Dense block-quantized linear (ABI 5) ----
 * y[m, n] = sum_k x[m, k] * W[n, k]   for m < M and n_begin <= n < n_end,
 * W = the exact float32 dequantization of `weight`: N rows (output features),
 * each K/32 blocks of weight_format (Q8_0 / Q4_0 / Q4_1 as above) along the
 * input, i.e. GGUF's own layout. x is float32, read as is (x_format 0) or
 * quantized per block of 32 along K (x_format TDA_X_Q8_0, ABI 7); sums are fp32 (order is the library's, fixed for a
 * given library, ISA and arguments). Columns outside [n_begin, n_end) of y
 * are not touched, so a caller's own thread pool splits N across threads by
 * calling this once per row range; the CPU library runs each call on the
 * calling thread only (no OpenMP inside), the CUDA library launches on
 * `stream`. M = 0 or n_begin == n_end: nothing is read or written (x, weight
 * and y may be NULL). x and y are 4-byte aligned; weight has no alignment
 * requirement in the CPU library and must be 4-byte aligned for the CUDA
 * one. y must not overlap x or weight.
 * Statuses: weight_format not a block format -> TDA_ERR_BAD_DTYPE; M < 0 ->
 * TDA_ERR_BAD_BATCH; N <= 0, K not a positive multiple of 32, a row range or
 * stride out of bounds -> TDA_ERR_BAD_SIZE (sizes are checked even when
 * nothing is read); a NULL x/weight/y that would be used ->
 * TDA_ERR_NULL_POINTER; x or y not 4-byte aligned -> TDA_ERR_MISALIGNED.
 * The CPU library needs no workspace (the query returns 0). */
typedef struct {
  int32_t weight_format;  /* TDA_WEIGHTS_Q8_0 / Q4_0 / Q4_1 (DTYPE: TDA_ERR_BAD_DTYPE) */
  int32_t m;              /* M >= 0 rows of x and y (no upper limit) */
  int32_t n;              /* N > 0 rows of weight (output features) */
  int32_t k;              /* K > 0, a multiple of TDA_QUANT_BLOCK (input features) */
  int32_t n_begin;        /* 0 <= n_begin <= n_end <= N: the output columns this call writes */
  int32_t n_end;
  int64_t ldx;            /* row stride of x in floats, >= K */
  int64_t ldy;            /* row stride of y in floats, >= N */
  const float* x;         /* [M, ldx] */
  const void* weight;     /* [N, K/32 * tda_block_bytes(weight_format)] bytes */
  float* y;               /* [M, ldy] */
  int32_t x_format;       /* tda_x_format_t (ABI 7); 0 = x as is */
} tda_block_linear_args_t;

size_t tda_block_linear_workspace_size(const tda_block_linear_args_t* args);
tda_status_t tda_block_linear(const tda_block_linear_args_t* args, void* workspace, size_t workspace_size,
                              void* stream);

/* out[r, :] = the exact float32 dequantization of rows [0, rows) of `weight`
 * (each K/32 blocks of weight_format), row stride ldo >= K floats (e.g. an
 * embedding lookup: pass the token's row). rows == 0: nothing is read.
 * Same statuses as tda_block_linear (rows < 0 -> TDA_ERR_BAD_SIZE). */
tda_status_t tda_block_dequantize(int32_t weight_format, int32_t k, int64_t rows, const void* weight, float* out,
                                  int64_t ldo, void* stream);

/* Bytes of one block of weight_format (34, 18, 20), or 0 for anything else. */
size_t tda_block_bytes(int32_t weight_format);

#ifdef __cplusplus
}
#endif

#endif /* TDA_KERNELS_H */
