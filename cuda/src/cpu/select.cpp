// CPU SelectActive: exact contract comparison in fp32, one sequence per
// thread iteration (each sequence is an independent scan). Where the clamp
// binds, a radix select finds the k-th largest key and the list keeps every
// larger key plus the lowest-index ties.
#include "../common.h"
#include "../select_rank.h"

extern "C" size_t tda_select_active_workspace_size(const tda_select_args_t*) { return 0; }

namespace {

// The key K of the k-th largest score (k >= 1) and how many of the scores equal to K to keep.
void kth_key(const float* sc, int32_t inter, int32_t k, uint32_t& key, int32_t& ties) {
  uint32_t prefix = 0, mask = 0;
  int32_t remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    uint32_t hist[256] = {};
    for (int32_t j = 0; j < inter; ++j) {
      const uint32_t u = tda::rank_key(sc[j]);
      if ((u & mask) == prefix) ++hist[(u >> shift) & 255u];
    }
    tda::radix_step(hist, shift, prefix, mask, remaining);
  }
  key = prefix;
  ties = remaining;
}

}  // namespace

extern "C" tda_status_t tda_select_active(const tda_select_args_t* a, void* ws, size_t ws_size, void* /*stream*/) {
  const tda_status_t s = tda::check_select(a, ws, ws_size, 0);
  if (s != TDA_OK || a->batch == 0) return s;
  const int32_t I = a->intermediate;
  const float tau = *a->threshold;
  const float t2 = tau * tau;
#pragma omp parallel for schedule(static)
  for (int32_t b = 0; b < a->batch; ++b) {
    const float* sc = a->scores + int64_t(b) * I;
    int32_t* idx = a->active_idx + int64_t(b) * I;
    float m = I > 0 ? sc[0] : 0.0f;  // the contract's max_k scores, even if all were negative
    for (int32_t j = 1; j < I; ++j) m = sc[j] > m ? sc[j] : m;
    const bool all = tau <= 0.0f || m == 0.0f;
    const float cut = t2 * m;
    int32_t n = 0;
    for (int32_t j = 0; j < I; ++j)
      if (all || sc[j] >= cut) idx[n++] = j;
    const int32_t k = m == 0.0f ? n : tda::clamp_count(n, I, a->density_bounds);
    if (k != n) {  // the clamp binds: the k best by rank instead
      uint32_t key = 0;
      int32_t ties = 0;
      if (k > 0) kth_key(sc, I, k, key, ties);
      n = 0;
      for (int32_t j = 0; j < I && n < k; ++j) {
        const uint32_t u = tda::rank_key(sc[j]);
        if (u > key || (u == key && ties-- > 0)) idx[n++] = j;
      }
    }
    a->active_count[b] = n;
    for (int32_t j = n; j < I; ++j) idx[j] = 0;
  }
  return TDA_OK;
}
