/* tda/runtime.h: the C API of libtda_runtime, for embedding a TDA engine in any language.
 *
 * An engine is an exported directory (tda-export build): manifest.json (verified, sha256 of every
 * file), model.safetensors (weights, mmapped), calibration.json (per-request density). A session
 * holds one batch's KV cache and TDA state: prefill a left-padded batch, then decode one token per
 * sequence per call. Tokens in, float32 logits out; tokenization and sampling are the caller's
 * (tda-run does both).
 *
 * Executors: the CPU executor runs float32 engines (model.safetensors); the TensorRT executor runs
 * the engine's model.plan (builds configured with -DTDA_TENSORRT_INCLUDE). Both keep the same
 * session protocol below, so a caller's generation loop is the same for either.
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

#define TDA_RT_API_VERSION 3  /* 3: continuous batching (tda_rt_join, tda_rt_step, tda_rt_release) */

/* Threads: one OpenMP pool (libgomp) runs everything, OpenBLAS single-threaded inside it. Both read
 * their settings from the environment once, when they load, so set these before loading the library
 * (unless already set; tda-run and the Python binding do): OPENBLAS_NUM_THREADS=1, and
 * GOMP_SPINCOUNT=TDA_RT_GOMP_SPINCOUNT, a spin of ~5 us before an idle worker sleeps (it bridges
 * the gaps between a decode step's ~150 parallel regions without burning a core between requests),
 * or 0 (sleep at once) when the 1-minute load average exceeds TDA_RT_BUSY_LOAD_PER_CORE x the cores:
 * on an oversubscribed box any spin loses to sleeping (bench/RESULTS.md). GOMP_SPINCOUNT=0 (or
 * OMP_WAIT_POLICY=PASSIVE) sleeps at once, OMP_WAIT_POLICY=ACTIVE spins.
 * The CPU executor's threads are a ceiling: it times decode steps and runs them on fewer threads
 * while that is faster (next to busy processes a step's ~150 joins each wait for a descheduled
 * worker), probing now and then (cpp/src/parallel.h, bench/busy_box.py). Read when an engine opens:
 * TDA_NATIVE_ADAPTIVE_THREADS=0 runs every step on all threads; ..._TRACE=1 reports to stderr. */
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
 * threads <= 0: all cores. The executor is "auto" (see tda_rt_engine_options). */
tda_rt_status_t tda_rt_engine_open(const char* directory, int verify, int threads, tda_rt_engine** out);

typedef struct {
  int32_t verify;               /* != 0: sha256 of every listed file */
  int32_t threads;              /* CPU executor threads, <= 0: all cores */
  /* "auto" (or NULL): "tensorrt" when the manifest has a "tensorrt" section (model.plan), else "cpu";
   * "cpu"; "tensorrt" (TDA_RT_ERR_UNSUPPORTED when this build lacks it, see tda_rt_has_tensorrt). */
  const char* executor;
  /* TensorRT executor: the TensorRT library to dlopen; NULL: the soname of the flavour this build's
   * headers are (libnvinfer.so.N for "tensorrt", libtensorrt_rtx.so.N for "tensorrt-rtx"). */
  const char* tensorrt_library;
  /* TensorRT executor: libtda_trt_plugins.so; NULL: $TDA_TRT_PLUGIN_LIBRARY, else the manifest's
   * tensorrt.plugin.library next to model.plan, else that name on the loader's search path. */
  const char* plugin_library;
  int32_t device;               /* TensorRT executor: CUDA device ordinal */
} tda_rt_engine_options;
/* Defaults: verify 1, threads 0, executor "auto", libraries NULL, device 0. */
void tda_rt_engine_options_init(tda_rt_engine_options* options);
tda_rt_status_t tda_rt_engine_open_with(const char* directory, const tda_rt_engine_options* options,
                                        tda_rt_engine** out);
/* The executor an open engine runs on: "cpu" or "tensorrt" (NULL for a NULL engine). */
const char* tda_rt_engine_executor(const tda_rt_engine* engine);
/* 1 if this build has the TensorRT executor; its flavour ("tensorrt"/"tensorrt-rtx", "" without). */
int tda_rt_has_tensorrt(void);
const char* tda_rt_tensorrt_flavour(void);
void tda_rt_engine_close(tda_rt_engine* engine);

typedef struct {
  int32_t num_layers, hidden_size, intermediate_size, vocab_size, max_context;
  int32_t bos_token_id, eos_token_id, pad_token_id; /* -1 where the manifest has none */
  int64_t weight_bytes;       /* bytes of weights one decode step streams at density 1 */
  int64_t mlp_weight_bytes;   /* of those, the MLP weights' (all layers; what TDA thins out); -1: unknown */
} tda_rt_engine_info;
tda_rt_status_t tda_rt_engine_info_get(const tda_rt_engine* engine, tda_rt_engine_info* out);
/* The manifest's eos ids (one or several): writes up to capacity, sets *count to the total. */
tda_rt_status_t tda_rt_engine_eos_ids(const tda_rt_engine* engine, int32_t* ids, int32_t capacity, int32_t* count);

/* Per-layer thresholds for a request, the rule of tda_export.runtime.engine.Engine.thresholds:
 * density <= 0 means "the engine's default"; 1.0 is dense; prompt_len <= 0 means "no per-length
 * table". out has num_layers entries. */
tda_rt_status_t tda_rt_engine_thresholds(const tda_rt_engine* engine, double density, int32_t prompt_len,
                                         float* out);

/* Per-layer SelectActive density bounds [num_layers, 2] (lo, hi) for a request, the rule of
 * Engine.density_bounds: density +- the engine's density_margin; density <= 0 means "the engine's
 * default"; 1.0, or an engine exported before the clamp, gives (0, 1) = no clamp. */
tda_rt_status_t tda_rt_engine_density_bounds(const tda_rt_engine* engine, double density, float* out);

tda_rt_status_t tda_rt_session_new(tda_rt_engine* engine, tda_rt_session** out);
void tda_rt_session_free(tda_rt_session* session);

/* input_ids/attention_mask [batch, seq] row-major (left padded, seq >= 2), thresholds [num_layers]
 * (NULL: the engine's default at this prompt length). logits [batch, vocab_size] of the last position. */
tda_rt_status_t tda_rt_prefill(tda_rt_session* session, int32_t batch, int32_t seq, const int64_t* input_ids,
                               const int64_t* attention_mask, const float* thresholds, float* logits);
/* tda_rt_prefill with each layer's density bounds [num_layers, 2] (see tda_rt_engine_density_bounds).
 * NULL: the engine's default bounds when thresholds is NULL too, else no clamp (thresholds alone). */
tda_rt_status_t tda_rt_prefill_bounded(tda_rt_session* session, int32_t batch, int32_t seq, const int64_t* input_ids,
                                       const int64_t* attention_mask, const float* thresholds,
                                       const float* density_bounds, float* logits);
/* tokens [batch] (the batch of the last prefill) -> logits [batch, vocab_size]. */
tda_rt_status_t tda_rt_decode(tda_rt_session* session, const int64_t* tokens, float* logits);
/* counts [num_layers, batch]: active MLP neurons per layer and sequence after the last prefill. */
tda_rt_status_t tda_rt_active_counts(const tda_rt_session* session, int32_t* counts);
int32_t tda_rt_session_batch(const tda_rt_session* session);

/* Continuous (in-flight) batching. A session is also a KV cache of slots 0..TDA_RT_MAX_SLOTS-1, each
 * holding one sequence with its own length, positions, thresholds, density bounds and active neurons:
 * newcomers are prefilled into free slots (alone or together) and then decode in the same steps as the
 * sequences already there; a finished or cancelled sequence's slot is released at once and can take the
 * next newcomer. A sequence's tokens do not depend on which others share its steps.
 * tda_rt_prefill is tda_rt_join on slots 0..batch-1 of an emptied session (one threshold table for all
 * rows) and tda_rt_decode is tda_rt_step on those slots; releasing one of them ends tda_rt_decode
 * (TDA_RT_ERR_STATE). The CPU executor has these calls; the TensorRT executor answers
 * TDA_RT_ERR_UNSUPPORTED. */
#define TDA_RT_MAX_SLOTS 64
/* Prefill n newcomers into the free slots slots[n] (distinct): input_ids/attention_mask [n, seq] row-major
 * (left padded, seq >= 2), thresholds [n, num_layers] (each row's own table; NULL: the engine's default
 * at each row's prompt length), density_bounds [n, num_layers, 2] (NULL: the engine's default bounds when
 * thresholds is NULL too, else no clamp). logits [n, vocab_size] of each row's last position. A slot in
 * use is TDA_RT_ERR_STATE; on failure the slots stay free. */
tda_rt_status_t tda_rt_join(tda_rt_session* session, int32_t n, int32_t seq, const int32_t* slots,
                            const int64_t* input_ids, const int64_t* attention_mask, const float* thresholds,
                            const float* density_bounds, float* logits);
/* One decode step of the joined slots slots[n] (distinct, any subset, any order): tokens [n] -> logits
 * [n, vocab_size], row i for slots[i]. A free slot is TDA_RT_ERR_STATE; if the step fails, its slots are
 * released (half a step is no usable state). */
tda_rt_status_t tda_rt_step(tda_rt_session* session, int32_t n, const int32_t* slots, const int64_t* tokens,
                            float* logits);
/* Frees a slot (its cache is reused by the next join there). Releasing a free slot is not an error. */
tda_rt_status_t tda_rt_release(tda_rt_session* session, int32_t slot);
/* counts [num_layers]: the active MLP neurons per layer of a joined slot. */
tda_rt_status_t tda_rt_slot_active_counts(const tda_rt_session* session, int32_t slot, int32_t* counts);

/* The one copy-bandwidth probe behind every "% of the bandwidth floor" (tda-run --bench,
 * bench/native_decode.py, bench/RESULTS.md), in bytes/s: the best of `repeats` single-thread memcpy
 * of `bytes` between two buffers written beforehand, each copy counted as read + write (2 x bytes).
 * bytes <= 0: TDA_RT_COPY_PROBE_BYTES (512 MiB, past the caches); repeats <= 0: TDA_RT_COPY_PROBE_REPEATS.
 * The floor of a decode step is then (weight bytes the step reads) / this bandwidth. 0 if the
 * buffers cannot be allocated. */
#define TDA_RT_COPY_PROBE_BYTES (512ll << 20)
#define TDA_RT_COPY_PROBE_REPEATS 5
double tda_rt_copy_bandwidth(int64_t bytes, int32_t repeats);

#ifdef __cplusplus
}
#endif

#endif /* TDA_RUNTIME_H */
