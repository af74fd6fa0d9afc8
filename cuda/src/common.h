// Argument checks and status text shared by the CPU and CUDA libraries, so
// both reject exactly the same calls with exactly the same status.
#pragma once

#include <stdint.h>
#include <stdlib.h>

#include <initializer_list>

#include "decode_version.h"
#include "tda_kernels.h"

namespace tda {

inline const char* status_text(tda_status_t s) {
  switch (s) {
    case TDA_OK: return "ok";
    case TDA_ERR_NULL_POINTER: return "a required pointer is NULL";
    case TDA_ERR_BAD_DTYPE:
      return "dtype is not TDA_F32, TDA_F16 or TDA_BF16, or weight_format / x_format is not one this library runs "
             "(x_format TDA_X_Q8_0 needs a block weight_format)";
    case TDA_ERR_BAD_ENUM: return "activation, score_norm or decode version value out of range";
    case TDA_ERR_BAD_SIZE:
      return "hidden/intermediate size must be a positive multiple of 8 (block-quantized weights: hidden a "
             "multiple of 32, any intermediate; block linear: K a positive multiple of 32, N > 0, "
             "0 <= n_begin <= n_end <= N, strides >= the row lengths)";
    case TDA_ERR_BAD_BATCH: return "batch must be in 0..TDA_MAX_BATCH (64) (block linear: M >= 0)";
    case TDA_ERR_MISALIGNED:
      return "a pointer is misaligned (16 bytes for data, 4 for indices, 256 for the workspace)";
    case TDA_ERR_WORKSPACE_TOO_SMALL: return "workspace is NULL or smaller than the workspace-size query";
    case TDA_ERR_CUDA: return "a CUDA runtime call failed";
  }
  return "unknown tda_status_t value";
}

inline bool size_ok(int32_t n) { return n > 0 && n % TDA_SIZE_MULTIPLE == 0; }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline int dtype_size(tda_dtype_t d) { return d == TDA_F32 ? 4 : 2; }

// The header promises 256-byte aligned workspaces and the kernels carve
// float4/uint4 arrays out of them, so a misaligned one is refused up front.
inline tda_status_t check_workspace(const void* ws, size_t ws_size, size_t ws_needed) {
  if (!ws_needed) return TDA_OK;
  if (!ws || ws_size < ws_needed) return TDA_ERR_WORKSPACE_TOO_SMALL;
  if (reinterpret_cast<uintptr_t>(ws) & 255u) return TDA_ERR_MISALIGNED;
  return TDA_OK;
}

// The decode algorithm a call asked for: its `version`, else
// $TDA_DECODE_VERSION (read per call, so one process can time both), else 1.
// Callers that size a workspace ahead (TensorRT plans) pass a non-zero version.
inline int32_t decode_version(const tda_decode_args_t* a) { return a->version ? a->version : env_decode_version(); }

inline bool block_weights(const tda_decode_args_t* a) { return a->weight_format != TDA_WEIGHTS_DTYPE; }

// The format down_weight_t is stored in (ABI 6: 0 = weight_format's).
inline tda_weight_format_t down_format(const tda_decode_args_t* a) {
  return static_cast<tda_weight_format_t>(a->down_weight_format ? a->down_weight_format : a->weight_format);
}

// x_format (ABI 7): 0 (x as is), or TDA_X_Q8_0 under block weights in a
// library that runs it (the CPU library; the CUDA one runs 0 only).
inline bool x_format_ok(int32_t x_format, bool block_weights, bool runs_x_q8_0) {
  return x_format == TDA_X_DTYPE || (x_format == TDA_X_Q8_0 && block_weights && runs_x_q8_0);
}

// Sizes/enums only: what the workspace queries may rely on. A library that
// runs the block-quantized weight formats says so (both do since ABI 5), and
// one that runs x_format TDA_X_Q8_0 (ABI 7: the CPU library).
inline tda_status_t check_decode_shape(const tda_decode_args_t* a, bool runs_block_weights = false,
                                       bool runs_x_q8_0 = false) {
  if (!a) return TDA_ERR_NULL_POINTER;
  if (a->dtype < TDA_F32 || a->dtype > TDA_BF16) return TDA_ERR_BAD_DTYPE;
  if (a->weight_format < TDA_WEIGHTS_DTYPE || a->weight_format > TDA_WEIGHTS_Q4_1) return TDA_ERR_BAD_DTYPE;
  if (block_weights(a) && !runs_block_weights) return TDA_ERR_BAD_DTYPE;
  // A down format of its own: a block format, only under block gate/up weights.
  if (a->down_weight_format != TDA_WEIGHTS_DTYPE &&
      (!block_weights(a) || a->down_weight_format < TDA_WEIGHTS_Q8_0 || a->down_weight_format > TDA_WEIGHTS_Q4_1))
    return TDA_ERR_BAD_DTYPE;
  if (!x_format_ok(a->x_format, block_weights(a), runs_x_q8_0)) return TDA_ERR_BAD_DTYPE;
  if (a->activation < TDA_ACT_SILU || a->activation > TDA_ACT_RELU) return TDA_ERR_BAD_ENUM;
  if (a->version < 0 || a->version > kMaxDecodeVersion) return TDA_ERR_BAD_ENUM;
  if (a->batch < 0 || a->batch > TDA_MAX_BATCH) return TDA_ERR_BAD_BATCH;
  if (block_weights(a) ? a->hidden <= 0 || a->hidden % TDA_QUANT_BLOCK != 0 || a->intermediate <= 0
                       : !size_ok(a->hidden) || !size_ok(a->intermediate))
    return TDA_ERR_BAD_SIZE;
  return TDA_OK;
}

inline tda_status_t check_decode(const tda_decode_args_t* a, const void* ws, size_t ws_size, size_t ws_needed,
                                 bool runs_block_weights = false, bool runs_x_q8_0 = false) {
  tda_status_t s = check_decode_shape(a, runs_block_weights, runs_x_q8_0);
  if (s != TDA_OK || a->batch == 0) return s;
  const void* ptrs[] = {a->hidden_states, a->gate_up_weight, a->down_weight_t, a->active_idx, a->active_count,
                        a->output};
  for (const void* p : ptrs)
    if (!p) return TDA_ERR_NULL_POINTER;
  // Only the tensors read or written with 16-byte vectors need alignment (blocks are read unaligned).
  for (const void* p : {a->hidden_states, static_cast<const void*>(a->output)})
    if (!aligned16(p)) return TDA_ERR_MISALIGNED;
  if (!block_weights(a) && !(aligned16(a->gate_up_weight) && aligned16(a->down_weight_t))) return TDA_ERR_MISALIGNED;
  if ((reinterpret_cast<uintptr_t>(a->active_idx) | reinterpret_cast<uintptr_t>(a->active_count)) & 3u)
    return TDA_ERR_MISALIGNED;
  return check_workspace(ws, ws_size, ws_needed);
}

// tda_block_linear / tda_block_dequantize (ABI 5): sizes always, pointers
// only when the call reads or writes something.
inline bool block_format(int32_t w) { return w >= TDA_WEIGHTS_Q8_0 && w <= TDA_WEIGHTS_Q4_1; }
inline bool aligned4(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 3u) == 0; }

inline tda_status_t check_block_linear(const tda_block_linear_args_t* a, bool runs_x_q8_0 = false) {
  if (!a) return TDA_ERR_NULL_POINTER;
  if (!block_format(a->weight_format)) return TDA_ERR_BAD_DTYPE;
  if (!x_format_ok(a->x_format, true, runs_x_q8_0)) return TDA_ERR_BAD_DTYPE;
  if (a->m < 0) return TDA_ERR_BAD_BATCH;
  if (a->n <= 0 || a->k <= 0 || a->k % TDA_QUANT_BLOCK != 0 || a->n_begin < 0 || a->n_begin > a->n_end ||
      a->n_end > a->n || a->ldx < a->k || a->ldy < a->n)
    return TDA_ERR_BAD_SIZE;
  if (a->m == 0 || a->n_begin == a->n_end) return TDA_OK;
  if (!a->x || !a->weight || !a->y) return TDA_ERR_NULL_POINTER;
  if (!aligned4(a->x) || !aligned4(a->y)) return TDA_ERR_MISALIGNED;
  return TDA_OK;
}

inline tda_status_t check_block_dequantize(int32_t w, int32_t k, int64_t rows, const void* weight, const float* out,
                                           int64_t ldo) {
  if (!block_format(w)) return TDA_ERR_BAD_DTYPE;
  if (k <= 0 || k % TDA_QUANT_BLOCK != 0 || rows < 0 || ldo < k) return TDA_ERR_BAD_SIZE;
  if (rows == 0) return TDA_OK;
  if (!weight || !out) return TDA_ERR_NULL_POINTER;
  if (!aligned4(out)) return TDA_ERR_MISALIGNED;
  return TDA_OK;
}

inline size_t block_bytes(int32_t w) {
  switch (w) {
    case TDA_WEIGHTS_Q8_0: return 34;
    case TDA_WEIGHTS_Q4_0: return 18;
    case TDA_WEIGHTS_Q4_1: return 20;
    default: return 0;
  }
}

inline tda_status_t check_select_shape(const tda_select_args_t* a) {
  if (!a) return TDA_ERR_NULL_POINTER;
  if (a->batch < 0 || a->batch > TDA_MAX_BATCH) return TDA_ERR_BAD_BATCH;
  if (a->intermediate < 0) return TDA_ERR_BAD_SIZE;
  return TDA_OK;
}

inline tda_status_t check_select(const tda_select_args_t* a, const void* ws, size_t ws_size, size_t ws_needed) {
  tda_status_t s = check_select_shape(a);
  if (s != TDA_OK || a->batch == 0) return s;
  if (!a->threshold || !a->active_count || (a->intermediate > 0 && (!a->scores || !a->active_idx)))
    return TDA_ERR_NULL_POINTER;
  return check_workspace(ws, ws_size, ws_needed);
}

inline tda_status_t check_prefill_shape(const tda_prefill_scores_args_t* a) {
  if (!a) return TDA_ERR_NULL_POINTER;
  if (a->dtype < TDA_F32 || a->dtype > TDA_BF16) return TDA_ERR_BAD_DTYPE;
  if (a->score_norm < TDA_SCORE_NORM_TOKEN_L2 || a->score_norm > TDA_SCORE_NORM_NONE) return TDA_ERR_BAD_ENUM;
  if (a->batch < 0 || a->seq_len < 0) return TDA_ERR_BAD_BATCH;
  if (!size_ok(a->intermediate)) return TDA_ERR_BAD_SIZE;
  return TDA_OK;
}

inline tda_status_t check_prefill(const tda_prefill_scores_args_t* a, const void* ws, size_t ws_size,
                                  size_t ws_needed) {
  tda_status_t s = check_prefill_shape(a);
  if (s != TDA_OK || a->batch == 0) return s;
  if (!a->scores_in || !a->scores_out || (a->seq_len > 0 && (!a->z || !a->token_valid)))
    return TDA_ERR_NULL_POINTER;
  return check_workspace(ws, ws_size, ws_needed);
}

// Carves 256-byte aligned pieces out of one workspace, so the size query and
// the kernels use the same layout by construction.
struct Carver {
  char* base;
  size_t used = 0;
  template <class T>
  T* take(size_t count) {
    used = (used + 255) & ~size_t(255);
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += count * sizeof(T);
    return p;
  }
};

inline int32_t clamp_count(int32_t c, int32_t n) { return c < 0 ? 0 : (c > n ? n : c); }

}  // namespace tda
