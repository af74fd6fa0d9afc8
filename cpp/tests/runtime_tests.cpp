// C API misuse and bad engine directories: every call returns a status and a message, never crashes.
// Run with an engine directory (a tiny model) as argv[1]; built under ASan+UBSan in CI.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "tda/runtime.h"

static int failures = 0;
#define EXPECT(cond)                                                      \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "FAIL %s:%d: %s (last error: %s)\n", __FILE__, \
                   __LINE__, #cond, tda_rt_last_error());                 \
      ++failures;                                                         \
    }                                                                     \
  } while (0)

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s ENGINE_DIR\n", argv[0]);
    return 2;
  }
  tda_rt_engine* e = nullptr;
  EXPECT(tda_rt_engine_open(nullptr, 1, 1, &e) == TDA_RT_ERR_ARGUMENT && e == nullptr);
  EXPECT(tda_rt_engine_open(argv[1], 1, 1, nullptr) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_engine_open("/nonexistent/engine", 1, 1, &e) == TDA_RT_ERR_ENGINE && e == nullptr);
  EXPECT(std::strstr(tda_rt_last_error(), "/nonexistent/engine") != nullptr);
  EXPECT(tda_rt_engine_info_get(nullptr, nullptr) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_session_new(nullptr, nullptr) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_prefill(nullptr, 1, 2, nullptr, nullptr, nullptr, nullptr) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_decode(nullptr, nullptr, nullptr) == TDA_RT_ERR_ARGUMENT);
  tda_rt_engine_close(nullptr);
  tda_rt_session_free(nullptr);
  EXPECT(tda_rt_session_batch(nullptr) == 0);

  EXPECT(tda_rt_engine_open(argv[1], 1, 2, &e) == TDA_RT_OK && e != nullptr);
  if (!e) return 1;
  tda_rt_engine_info info{};
  EXPECT(tda_rt_engine_info_get(e, &info) == TDA_RT_OK && info.num_layers > 0);
  std::vector<float> ths(static_cast<size_t>(info.num_layers));
  EXPECT(tda_rt_engine_thresholds(e, 1.5, 0, ths.data()) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_engine_thresholds(e, 0.37, 0, ths.data()) == TDA_RT_ERR_ARGUMENT);
  EXPECT(std::strstr(tda_rt_last_error(), "0.37") != nullptr);
  EXPECT(tda_rt_engine_thresholds(e, 1.0, 0, ths.data()) == TDA_RT_OK && ths[0] == 0.0f);

  tda_rt_session* s = nullptr;
  EXPECT(tda_rt_session_new(e, &s) == TDA_RT_OK);
  std::vector<float> logits(static_cast<size_t>(info.vocab_size) * 2);
  int64_t tok = 1;
  EXPECT(tda_rt_decode(s, &tok, logits.data()) == TDA_RT_ERR_STATE);
  std::vector<int32_t> counts(static_cast<size_t>(info.num_layers) * 2);
  EXPECT(tda_rt_active_counts(s, counts.data()) == TDA_RT_ERR_STATE);
  const int64_t ids[] = {1, 2, 3, 4}, mask[] = {1, 1, 1, 1}, bad_ids[] = {1, -5, 3, 4}, bad_mask[] = {1, 2, 1, 1};
  EXPECT(tda_rt_prefill(s, 1, 1, ids, mask, nullptr, logits.data()) == TDA_RT_ERR_ARGUMENT);   // seq < 2
  EXPECT(tda_rt_prefill(s, 0, 4, ids, mask, nullptr, logits.data()) == TDA_RT_ERR_ARGUMENT);   // batch 0
  EXPECT(tda_rt_prefill(s, 65, 4, ids, mask, nullptr, logits.data()) == TDA_RT_ERR_ARGUMENT);  // batch > 64
  EXPECT(tda_rt_prefill(s, 1, 4, bad_ids, mask, nullptr, logits.data()) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_prefill(s, 1, 4, ids, bad_mask, nullptr, logits.data()) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_prefill(s, 1, 4, ids, mask, nullptr, logits.data()) == TDA_RT_OK);
  EXPECT(tda_rt_session_batch(s) == 1);
  int64_t oov = info.vocab_size;
  EXPECT(tda_rt_decode(s, &oov, logits.data()) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_decode(s, &tok, logits.data()) == TDA_RT_OK);
  EXPECT(tda_rt_active_counts(s, counts.data()) == TDA_RT_OK);
  // a batch of two with left padding, then decode
  const int64_t ids2[] = {0, 5, 6, 7, 8, 9}, mask2[] = {0, 1, 1, 1, 1, 1}, toks2[] = {3, 4};
  EXPECT(tda_rt_prefill(s, 2, 3, ids2, mask2, nullptr, logits.data()) == TDA_RT_OK);
  for (int i = 0; i < 3; ++i) EXPECT(tda_rt_decode(s, toks2, logits.data()) == TDA_RT_OK);
  bool finite = true;
  for (float x : logits) finite = finite && x == x && x - x == 0;
  EXPECT(finite);
  // continuous batching: joins into free slots, steps of any subset, releases; misuse is an error code
  EXPECT(tda_rt_join(nullptr, 1, 2, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_step(nullptr, 1, nullptr, nullptr, nullptr) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_release(nullptr, 0) == TDA_RT_ERR_ARGUMENT);
  const int32_t slots2[] = {5, 3}, slot5[] = {5}, slot9[] = {9}, one[] = {1}, twice[] = {7, 7},
                out_of_range[] = {TDA_RT_MAX_SLOTS};
  std::vector<float> ths2(static_cast<size_t>(info.num_layers) * 2, 0.0f);  // dense rows
  EXPECT(tda_rt_join(s, 2, 3, slots2, ids2, mask2, ths2.data(), nullptr, logits.data()) == TDA_RT_OK);
  EXPECT(tda_rt_session_batch(s) == 2);  // tda_rt_prefill's batch (slots 0 and 1) is still there ...
  EXPECT(tda_rt_join(s, 1, 3, one, ids2, mask2, nullptr, nullptr, logits.data()) == TDA_RT_ERR_STATE);  // in use
  EXPECT(tda_rt_join(s, 2, 3, twice, ids2, mask2, nullptr, nullptr, logits.data()) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_join(s, 1, 3, out_of_range, ids2, mask2, nullptr, nullptr, logits.data()) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_join(s, 0, 3, slot9, ids2, mask2, nullptr, nullptr, logits.data()) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_step(s, 1, slot9, toks2, logits.data()) == TDA_RT_ERR_STATE);  // free slot
  EXPECT(std::strstr(tda_rt_last_error(), "slot 9 holds no sequence") != nullptr);
  EXPECT(tda_rt_step(s, 0, slot9, toks2, logits.data()) == TDA_RT_ERR_ARGUMENT);  // batch 0
  EXPECT(tda_rt_step(s, 1, slot5, &oov, logits.data()) == TDA_RT_ERR_ARGUMENT);
  for (int i = 0; i < 3; ++i) EXPECT(tda_rt_step(s, 2, slots2, toks2, logits.data()) == TDA_RT_OK);
  EXPECT(tda_rt_step(s, 1, slot5, toks2, logits.data()) == TDA_RT_OK);  // a subset
  EXPECT(tda_rt_slot_active_counts(s, 5, counts.data()) == TDA_RT_OK && counts[0] == info.intermediate_size);
  EXPECT(tda_rt_slot_active_counts(s, 9, counts.data()) == TDA_RT_ERR_STATE);
  EXPECT(tda_rt_decode(s, toks2, logits.data()) == TDA_RT_OK);
  EXPECT(tda_rt_release(s, 1) == TDA_RT_OK);  // ... until one of its slots is released
  EXPECT(tda_rt_decode(s, toks2, logits.data()) == TDA_RT_ERR_STATE);
  EXPECT(tda_rt_release(s, 1) == TDA_RT_OK);  // a free slot: nothing to do
  EXPECT(tda_rt_release(s, -1) == TDA_RT_ERR_ARGUMENT);
  EXPECT(tda_rt_join(s, 1, 3, slot9, ids2, mask2, nullptr, nullptr, logits.data()) == TDA_RT_OK);  // default table
  const int32_t both[] = {9, 5};
  EXPECT(tda_rt_step(s, 2, both, toks2, logits.data()) == TDA_RT_OK);
  finite = true;
  for (float x : logits) finite = finite && x == x && x - x == 0;
  EXPECT(finite);
  tda_rt_session_free(s);
  EXPECT(std::strcmp(tda_rt_engine_executor(e), "cpu") == 0);
  EXPECT(tda_rt_engine_executor(nullptr) == nullptr);
  tda_rt_engine_close(e);

  // choosing the executor: a bad name, a float32 engine (no model.plan) asked for TensorRT
  tda_rt_engine_options o;
  tda_rt_engine_options_init(&o);
  EXPECT(o.verify == 1 && o.executor == nullptr && o.device == 0);
  EXPECT(tda_rt_engine_open_with(argv[1], nullptr, &e) == TDA_RT_ERR_ARGUMENT && e == nullptr);
  o.executor = "gpu";
  EXPECT(tda_rt_engine_open_with(argv[1], &o, &e) == TDA_RT_ERR_ARGUMENT && e == nullptr);
  EXPECT(std::strstr(tda_rt_last_error(), "'gpu'") != nullptr);
  o.executor = "tensorrt";
  EXPECT(tda_rt_engine_open_with(argv[1], &o, &e) == TDA_RT_ERR_ENGINE && e == nullptr);
  EXPECT(std::strstr(tda_rt_last_error(), "no 'tensorrt' section") != nullptr);
  o.executor = "cpu";
  o.device = -1;
  EXPECT(tda_rt_engine_open_with(argv[1], &o, &e) == TDA_RT_ERR_ARGUMENT && e == nullptr);
  o.device = 0;
  o.verify = 0;
  EXPECT(tda_rt_engine_open_with(argv[1], &o, &e) == TDA_RT_OK && e != nullptr);
  if (e) EXPECT(std::strcmp(tda_rt_engine_executor(e), "cpu") == 0);
  tda_rt_engine_close(e);
  EXPECT(tda_rt_has_tensorrt() == 0 || tda_rt_has_tensorrt() == 1);
  EXPECT((tda_rt_has_tensorrt() != 0) == (tda_rt_tensorrt_flavour()[0] != 0));
  if (failures) return 1;
  std::puts("runtime_tests: all passed");
  return 0;
}
