/* tda/runtime.h: the C API of libtda_runtime, for embedding a TDA engine in any language.
 *
 * An engine is an exported directory (tda-export build): manifest.json (verified, sha256 of every
 * file), model.safetensors (weights, mmapped), calibration.json (per-request density). A session
 * holds one batch's KV cache and TDA state: prefill a left-padded batch, then decode one token per
 * sequence per call. Tokens in, float32 logits out; tokenization and sampling are the caller's
 * (tda-run does both).
 *
 * Errors: every function returns a tda_rt_status_t (or NULL for constructors); the message of the
 * last failure on this thread is tda_rt_last_error(). Misuse (NULL pointers, wrong sizes, decode
 * before prefill, sessions of another engine) is reported, never undefined behaviour. Objects are
 * not thread-safe; distinct sessions of one engine may run on distinct threads.
 */
#ifndef TDA_RUNTIME_H
#define TDA_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TDA_RT_API_VERSION 1

/* Threads: one OpenMP pool (libgomp) runs everything, OpenBLAS single-threaded inside it. Both read
 * their settings from the environment once, when they load, so set these before loading the library
 * (unless already set; tda-run and the Python binding do): OPENBLAS_NUM_THREADS=1, and
 * GOMP_SPINCOUNT=TDA_RT_GOMP_SPINCOUNT, a spin of ~5 us before an idle worker sleeps (it bridges
 * the gaps between a decode step's ~150 parallel regions without burning a core between requests),
 * or 0 (sleep at once) when the 1-minute load average exceeds TDA_RT_BUSY_LOAD_PER_CORE x the cores:
 * on an oversubscribed box any spin loses to sleeping (bench/RESULTS.md). GOMP_SPINCOUNT=0 (or
 * OMP_WAIT_POLICY=PASSIVE) sleeps at once, OMP_WAIT_POLICY=ACTIVE spins. */
#define TDA_RT_GOMP_SPINCOUNT "300"
#define TDA_RT_BUSY_LOAD_PER_CORE 2

typedef enum {
  TDA_RT_OK = 0,
  TDA_RT_ERR_ARGUMENT = 1,   /* NULL pointer, size or value out of range; the message names it */
  TDA_RT_ERR_ENGINE = 2,     /* the engine directory is missing, malformed or fails verification */
  TDA_RT_ERR_STATE = 3,      /* call out of order (decode before prefill, context full) */
  TDA_RT_ERR_UNSUPPORTED = 4,/* the engine needs something this build lacks (dtype, family) */
  TDA_RT_ERR_INTERNAL = 5    /* a kernel or allocation failed */
} tda_rt_status_t;

typedef struct tda_rt_engine tda_rt_engine;
typedef struct tda_rt_session tda_rt_session;

int tda_rt_api_version(void);
/* Message of the last failed call on this thread ("" if none); valid until the next call. */
const char* tda_rt_last_error(void);
const char* tda_rt_status_string(tda_rt_status_t status);

/* verify != 0 checks the sha256 of every file the manifest lists (one clear error naming the file).
 * threads <= 0: all cores. */
tda_rt_status_t tda_rt_engine_open(const char* directory, int verify, int threads, tda_rt_engine** out);
void tda_rt_engine_close(tda_rt_engine* engine);

typedef struct {
  int32_t num_layers, hidden_size, intermediate_size, vocab_size, max_context;
  int32_t bos_token_id, eos_token_id, pad_token_id; /* -1 where the manifest has none */
  int64_t weight_bytes;       /* bytes of weights one decode step streams at density 1 */
} tda_rt_engine_info;
tda_rt_status_t tda_rt_engine_info_get(const tda_rt_engine* engine, tda_rt_engine_info* out);
/* The manifest's eos ids (one or several): writes up to capacity, sets *count to the total. */
tda_rt_status_t tda_rt_engine_eos_ids(const tda_rt_engine* engine, int32_t* ids, int32_t capacity, int32_t* count);

/* Per-layer thresholds for a request, the rule of tda_export.runtime.engine.Engine.thresholds:
 * density <= 0 means "the engine's default"; 1.0 is dense; prompt_len <= 0 means "no per-length
 * table". out has num_layers entries. */
tda_rt_status_t tda_rt_engine_thresholds(const tda_rt_engine* engine, double density, int32_t prompt_len,
                                         float* out);

tda_rt_status_t tda_rt_session_new(tda_rt_engine* engine, tda_rt_session** out);
void tda_rt_session_free(tda_rt_session* session);

/* input_ids/attention_mask [batch, seq] row-major (left padded, seq >= 2), thresholds [num_layers]
 * (NULL: the engine's default at this prompt length). logits [batch, vocab_size] of the last position. */
tda_rt_status_t tda_rt_prefill(tda_rt_session* session, int32_t batch, int32_t seq, const int64_t* input_ids,
                               const int64_t* attention_mask, const float* thresholds, float* logits);
/* tokens [batch] (the batch of the last prefill) -> logits [batch, vocab_size]. */
tda_rt_status_t tda_rt_decode(tda_rt_session* session, const int64_t* tokens, float* logits);
/* counts [num_layers, batch]: active MLP neurons per layer and sequence after the last prefill. */
tda_rt_status_t tda_rt_active_counts(const tda_rt_session* session, int32_t* counts);
int32_t tda_rt_session_batch(const tda_rt_session* session);

#ifdef __cplusplus
}
#endif

#endif /* TDA_RUNTIME_H */
