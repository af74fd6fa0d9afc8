// tda-run: generate from an engine directory without Python (the flags of `tda-export run`), or
// benchmark its decode speed (--bench). Links libtda_runtime's C API only, as an embedder would.
#include <getopt.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <iterator>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tda/runtime.h"
#ifdef TDA_HAVE_TOKENIZER
#include "tda/tokenizer.h"
#endif

namespace {

struct Options {
  std::string engine, prompt, prompt_ids, densities, executor = "auto", tensorrt_library, plugin_library;
  bool have_prompt = false, bench = false, verify = true, print_ids = false;
  int max_new = 64, threads = 0, device = 0, top_k = 0, batch = 1, prompt_tokens = 128, new_tokens = 32, repeats = 3;
  double density = 0, temperature = 0, top_p = 1;
  long long seed = -1;
  std::vector<std::string> stop;
};

const char* kUsage = R"(usage: tda-run -e ENGINE_DIR [-p PROMPT | --prompt-ids 1,2,3] [options]
       tda-run -e ENGINE_DIR --bench [--batch B] [--prompt-tokens N] [--new-tokens N] [--densities 0.5,0.7]

Generate from an exported engine (tda-export build), streaming text to stdout; the prompt is read
from stdin when neither -p nor --prompt-ids is given. Same flags and greedy output as
`tda-export run --backend onnxruntime`.

  -e, --engine DIR        engine directory (manifest.json, model.safetensors, calibration.json)
  -p, --prompt TEXT       prompt text (needs the C++ tokenizer)
      --prompt-ids IDS    prompt as comma-separated token ids; output is then ids too
  -n, --max-new-tokens N  tokens to generate [64]
  -d, --density D         TDA density in (0, 1] (1 = dense) [the engine's default]
      --temperature T     0 = greedy [0]
      --top-k K           0 = no cut [0]
      --top-p P           nucleus mass in (0, 1] [1]
      --seed S            sampling seed [random]
      --stop TEXT         stop string (repeatable)
      --threads N         CPU threads [all cores]; decode steps run on fewer while that is faster,
                          e.g. next to a busy process (TDA_NATIVE_ADAPTIVE_THREADS=0: never;
                          TDA_NATIVE_ADAPTIVE_THREADS_TRACE=1: its moves and steps per count, to stderr)
      --no-verify         skip the sha256 check of the engine's files
      --executor E        auto | cpu | tensorrt [auto: tensorrt when the engine has a model.plan]
      --tensorrt-library PATH  TensorRT library to load [the soname of this build's TensorRT flavour]
      --plugin-library PATH    libtda_trt_plugins.so [$TDA_TRT_PLUGIN_LIBRARY, or next to model.plan]
      --device N          CUDA device of the TensorRT executor [0]
      --print-ids         print the generated token ids (JSON) to stderr at the end
      --bench             decode tok/s at density 1 and the engine's densities, % of the bandwidth floor
  -h, --help              this text
)";

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "tda-run: error: %s\n", msg.c_str());
  std::exit(2);
}

void check(tda_rt_status_t st) {
  if (st != TDA_RT_OK) die(tda_rt_last_error());
}

long long to_int(const char* s, const char* flag, long long lo) {
  char* end = nullptr;
  long long v = std::strtoll(s, &end, 10);
  if (!*s || *end || v < lo) die(std::string(flag) + ": expected an integer >= " + std::to_string(lo) + ", got '" + s + "'");
  return v;
}

double to_double(const char* s, const char* flag) {
  char* end = nullptr;
  double v = std::strtod(s, &end);
  if (!*s || *end || !std::isfinite(v)) die(std::string(flag) + ": expected a number, got '" + s + "'");
  return v;
}

std::vector<double> split_doubles(const std::string& s, const char* flag) {
  std::vector<double> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(to_double(item.c_str(), flag));
  return out;
}

Options parse(int argc, char** argv) {
  enum { kIds = 1000, kTemp, kTopK, kTopP, kSeed, kStop, kThreads, kNoVerify, kBench, kBatch, kPromptTokens,
         kNewTokens, kRepeats, kDensities, kPrintIds, kExecutor, kTrtLib, kPluginLib, kDevice };
  static const option longs[] = {
      {"engine", required_argument, nullptr, 'e'}, {"prompt", required_argument, nullptr, 'p'},
      {"prompt-ids", required_argument, nullptr, kIds}, {"max-new-tokens", required_argument, nullptr, 'n'},
      {"density", required_argument, nullptr, 'd'}, {"temperature", required_argument, nullptr, kTemp},
      {"top-k", required_argument, nullptr, kTopK}, {"top-p", required_argument, nullptr, kTopP},
      {"seed", required_argument, nullptr, kSeed}, {"stop", required_argument, nullptr, kStop},
      {"threads", required_argument, nullptr, kThreads}, {"no-verify", no_argument, nullptr, kNoVerify},
      {"bench", no_argument, nullptr, kBench}, {"batch", required_argument, nullptr, kBatch},
      {"prompt-tokens", required_argument, nullptr, kPromptTokens},
      {"new-tokens", required_argument, nullptr, kNewTokens}, {"repeats", required_argument, nullptr, kRepeats},
      {"densities", required_argument, nullptr, kDensities}, {"print-ids", no_argument, nullptr, kPrintIds},
      {"executor", required_argument, nullptr, kExecutor}, {"tensorrt-library", required_argument, nullptr, kTrtLib},
      {"plugin-library", required_argument, nullptr, kPluginLib}, {"device", required_argument, nullptr, kDevice},
      {"help", no_argument, nullptr, 'h'}, {nullptr, 0, nullptr, 0}};
  Options o;
  int c;
  opterr = 0;
  while ((c = getopt_long(argc, argv, "e:p:n:d:h", longs, nullptr)) != -1) {
    switch (c) {
      case 'e': o.engine = optarg; break;
      case 'p': o.prompt = optarg; o.have_prompt = true; break;
      case kIds: o.prompt_ids = optarg; break;
      case 'n': o.max_new = static_cast<int>(to_int(optarg, "--max-new-tokens", 1)); break;
      case 'd':
        o.density = to_double(optarg, "--density");
        if (!(o.density > 0 && o.density <= 1)) die("--density: must be in (0, 1], got " + std::string(optarg));
        break;
      case kTemp:
        o.temperature = to_double(optarg, "--temperature");
        if (o.temperature < 0) die("--temperature: must be >= 0");
        break;
      case kTopK: o.top_k = static_cast<int>(to_int(optarg, "--top-k", 0)); break;
      case kTopP:
        o.top_p = to_double(optarg, "--top-p");
        if (!(o.top_p > 0 && o.top_p <= 1)) die("--top-p: must be in (0, 1]");
        break;
      case kSeed: o.seed = to_int(optarg, "--seed", 0); break;
      case kStop: o.stop.emplace_back(optarg); break;
      case kThreads: o.threads = static_cast<int>(to_int(optarg, "--threads", 1)); break;
      case kNoVerify: o.verify = false; break;
      case kBench: o.bench = true; break;
      case kBatch: o.batch = static_cast<int>(to_int(optarg, "--batch", 1)); break;
      case kPromptTokens: o.prompt_tokens = static_cast<int>(to_int(optarg, "--prompt-tokens", 2)); break;
      case kNewTokens: o.new_tokens = static_cast<int>(to_int(optarg, "--new-tokens", 2)); break;
      case kRepeats: o.repeats = static_cast<int>(to_int(optarg, "--repeats", 1)); break;
      case kDensities: o.densities = optarg; break;
      case kPrintIds: o.print_ids = true; break;
      case kExecutor: o.executor = optarg; break;
      case kTrtLib: o.tensorrt_library = optarg; break;
      case kPluginLib: o.plugin_library = optarg; break;
      case kDevice: o.device = static_cast<int>(to_int(optarg, "--device", 0)); break;
      case 'h': std::fputs(kUsage, stdout); std::exit(0);
      default: die(std::string("unknown or incomplete option '") + argv[optind - 1] + "' (see --help)");
    }
  }
  if (optind < argc) die(std::string("unexpected argument '") + argv[optind] + "' (see --help)");
  if (o.engine.empty()) die("--engine/-e is required (see --help)");
  if (o.have_prompt && !o.prompt_ids.empty()) die("give -p or --prompt-ids, not both");
  return o;
}

// ---- sampling (runtime/sampling.py: greedy is numpy's argmax, first maximum) ----
int64_t choose(const float* logits, int64_t V, const Options& o, std::mt19937_64& rng) {
  if (o.temperature == 0) return std::max_element(logits, logits + V) - logits;
  std::vector<double> l(logits, logits + V);
  for (auto& x : l) x /= o.temperature;
  if (o.top_k > 0 && o.top_k < V) {
    std::vector<double> sorted(l);
    std::nth_element(sorted.begin(), sorted.begin() + (V - o.top_k), sorted.end());
    const double cut = sorted[static_cast<size_t>(V - o.top_k)];
    for (auto& x : l) if (x < cut) x = -INFINITY;
  }
  const double mx = *std::max_element(l.begin(), l.end());
  std::vector<double> p(l.size());
  double sum = 0;
  for (size_t i = 0; i < l.size(); ++i) sum += (p[i] = std::exp(l[i] - mx));
  for (auto& x : p) x /= sum;
  if (o.top_p < 1) {
    std::vector<int64_t> order(p.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    double cum = 0;
    size_t keep = 0;
    while (keep < order.size()) {
      cum += p[order[keep++]];
      if (cum >= o.top_p) break;
    }
    std::vector<double> q(p.size(), 0.0);
    for (size_t i = 0; i < keep; ++i) q[order[i]] = p[order[i]];
    p.swap(q);
  }
  std::discrete_distribution<int64_t> dist(p.begin(), p.end());
  return dist(rng);
}

struct Engine {
  tda_rt_engine* e = nullptr;
  tda_rt_engine_info info{};
  ~Engine() { tda_rt_engine_close(e); }
};

// Text safe to show: without a trailing incomplete UTF-8 sequence or U+FFFD from one.
size_t safe_prefix(const std::string& s) {
  size_t n = s.size();
  for (;;) {
    if (n >= 3 && s.compare(n - 3, 3, "\xEF\xBF\xBD") == 0) { n -= 3; continue; }
    size_t i = n, cont = 0;
    while (i > 0 && cont < 4 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) --i, ++cont;
    if (i > 0) {
      unsigned char lead = static_cast<unsigned char>(s[i - 1]);
      size_t need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
      if (need > cont) { n = i - 1; continue; }
    }
    return n;
  }
}

int generate(const Options& o, Engine& eng) {
  std::vector<int64_t> prompt;
  const bool text_mode = o.prompt_ids.empty();
#ifdef TDA_HAVE_TOKENIZER
  std::unique_ptr<tda::Tokenizer> tok;
  if (text_mode) {
    try {
      tok = tda::Tokenizer::from_file(o.engine + "/tokenizer.json");
    } catch (const std::exception& ex) {
      die(ex.what());
    }
    std::string text = o.prompt;
    if (!o.have_prompt) text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    for (int32_t id : tok->encode(text, true)) prompt.push_back(id);
  }
#else
  if (text_mode) die("this tda-run was built without the C++ tokenizer (cpp/tokenizer); pass --prompt-ids");
#endif
  if (!text_mode) {
    std::stringstream ss(o.prompt_ids);
    for (std::string item; std::getline(ss, item, ',');) prompt.push_back(to_int(item.c_str(), "--prompt-ids", 0));
  }
  if (!text_mode && !o.stop.empty()) die("--stop needs text output (a prompt, not --prompt-ids)");
  if (prompt.empty()) die("the prompt is empty");
  if (static_cast<int64_t>(prompt.size()) + o.max_new > eng.info.max_context)
    die("prompt has " + std::to_string(prompt.size()) + " tokens; with max_new_tokens=" + std::to_string(o.max_new) +
        " that exceeds the engine's context of " + std::to_string(eng.info.max_context));
  const int64_t width = std::max<int64_t>(2, static_cast<int64_t>(prompt.size()));
  const int64_t pad = eng.info.pad_token_id >= 0 ? eng.info.pad_token_id : 0;
  std::vector<int64_t> ids(static_cast<size_t>(width), pad), mask(static_cast<size_t>(width), 0);
  std::copy(prompt.begin(), prompt.end(), ids.end() - static_cast<int64_t>(prompt.size()));
  std::fill(mask.end() - static_cast<int64_t>(prompt.size()), mask.end(), 1);
  std::vector<float> ths(static_cast<size_t>(eng.info.num_layers));
  check(tda_rt_engine_thresholds(eng.e, o.density, static_cast<int32_t>(prompt.size()), ths.data()));
  std::vector<float> bounds(static_cast<size_t>(2 * eng.info.num_layers));  // the density clamp of the request
  check(tda_rt_engine_density_bounds(eng.e, o.density, bounds.data()));
  int32_t n_eos = 0;
  check(tda_rt_engine_eos_ids(eng.e, nullptr, 0, &n_eos));
  std::vector<int32_t> eos(static_cast<size_t>(n_eos));
  check(tda_rt_engine_eos_ids(eng.e, eos.data(), n_eos, &n_eos));

  tda_rt_session* s = nullptr;
  check(tda_rt_session_new(eng.e, &s));
  std::unique_ptr<tda_rt_session, void (*)(tda_rt_session*)> guard(s, tda_rt_session_free);
  const int64_t V = eng.info.vocab_size;
  std::vector<float> logits(static_cast<size_t>(V));
  auto t0 = std::chrono::steady_clock::now();
  check(tda_rt_prefill_bounded(s, 1, static_cast<int32_t>(width), ids.data(), mask.data(), ths.data(), bounds.data(),
                               logits.data()));
  const double ttft = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<int32_t> counts(static_cast<size_t>(eng.info.num_layers));
  check(tda_rt_active_counts(s, counts.data()));
  const double active = std::accumulate(counts.begin(), counts.end(), 0.0) / counts.size() / eng.info.intermediate_size;
  std::mt19937_64 rng(o.seed >= 0 ? static_cast<uint64_t>(o.seed) : std::random_device{}());
  std::vector<int32_t> out;
  size_t emitted = 0;
  size_t hold = 0;
  for (const auto& x : o.stop) hold = std::max(hold, x.size() - (x.empty() ? 0 : 1));
  int steps = 0;
  auto t1 = std::chrono::steady_clock::now();
  for (int step = 0; step < o.max_new; ++step) {
    const int64_t next = choose(logits.data(), V, o, rng);
    bool finish = std::find(eos.begin(), eos.end(), next) != eos.end();
    if (!finish) out.push_back(static_cast<int32_t>(next));
    if (static_cast<int>(out.size()) >= o.max_new) finish = true;
    if (text_mode) {
#ifdef TDA_HAVE_TOKENIZER
      std::string text = tok->decode(out, true);
      size_t cut = std::string::npos;
      for (const auto& x : o.stop) cut = std::min(cut, text.find(x));
      if (cut != std::string::npos) text.resize(cut), finish = true;
      size_t safe = finish ? text.size() : safe_prefix(text.size() >= hold ? text.substr(0, text.size() - hold) : std::string());
      if (safe > emitted) {
        std::fwrite(text.data() + emitted, 1, safe - emitted, stdout);
        std::fflush(stdout);
        emitted = safe;
      }
#endif
    } else if (!out.empty() && out.size() > emitted) {
      std::printf("%s%d", emitted ? " " : "", out.back());
      std::fflush(stdout);
      emitted = out.size();
    }
    if (finish) break;
    const int64_t t = next;
    check(tda_rt_decode(s, &t, logits.data()));
    ++steps;
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  std::fprintf(stderr, "\n[%zu tokens; first token %.0f ms; decode %.1f tok/s; MLP neurons active %.1f%%; backend native-%s]\n",
               out.size(), ttft * 1e3, dt > 0 ? steps / dt : 0.0, active * 100, tda_rt_engine_executor(eng.e));
  if (o.print_ids) {
    std::fprintf(stderr, "ids: [");
    for (size_t i = 0; i < out.size(); ++i) std::fprintf(stderr, "%s%d", i ? ", " : "", out[i]);
    std::fprintf(stderr, "]\n");
  }
  return 0;
}

// ---- --bench --------------------------------------------------------------------------------
int bench(const Options& o, Engine& eng) {
  const auto& in = eng.info;
  std::vector<double> dens{1.0};
  if (!o.densities.empty()) {
    for (double d : split_doubles(o.densities, "--densities")) if (d != 1.0) dens.push_back(d);
  } else {
    for (double d : {0.9, 0.7, 0.5}) {
      std::vector<float> t(static_cast<size_t>(in.num_layers));
      if (tda_rt_engine_thresholds(eng.e, d, o.prompt_tokens, t.data()) == TDA_RT_OK) dens.push_back(d);
    }
  }
  std::mt19937_64 rng(0);
  std::uniform_int_distribution<int64_t> pick(10, in.vocab_size - 2);
  const int64_t B = o.batch, S = o.prompt_tokens;
  std::vector<int64_t> ids(static_cast<size_t>(B * S)), mask(static_cast<size_t>(B * S), 1);
  for (auto& x : ids) x = pick(rng);
  const double bw = tda_rt_copy_bandwidth(0, 0);  // the one probe (runtime.h), as bench/native_decode.py
  tda_rt_session* s = nullptr;
  check(tda_rt_session_new(eng.e, &s));
  std::unique_ptr<tda_rt_session, void (*)(tda_rt_session*)> guard(s, tda_rt_session_free);
  std::vector<float> logits(static_cast<size_t>(B * in.vocab_size));
  std::vector<int32_t> counts(static_cast<size_t>(in.num_layers * B));
  struct Row { double density, active; std::vector<double> rates; };
  std::vector<Row> rows;
  for (double d : dens) rows.push_back({d, 0, {}});
  const int64_t mlp_bytes = in.mlp_weight_bytes >= 0 ? in.mlp_weight_bytes  // blocks where the engine stores blocks
                            : int64_t(3) * in.hidden_size * in.intermediate_size * 4 * in.num_layers;
  for (int r = 0; r < o.repeats; ++r)  // interleaved: every density once per repeat
    for (auto& row : rows) {
      std::vector<float> ths(static_cast<size_t>(in.num_layers));
      check(tda_rt_engine_thresholds(eng.e, row.density, static_cast<int32_t>(S), ths.data()));
      std::vector<float> bounds(static_cast<size_t>(2 * in.num_layers));
      check(tda_rt_engine_density_bounds(eng.e, row.density, bounds.data()));
      check(tda_rt_prefill_bounded(s, static_cast<int32_t>(B), static_cast<int32_t>(S), ids.data(), mask.data(),
                                   ths.data(), bounds.data(), logits.data()));
      check(tda_rt_active_counts(s, counts.data()));
      row.active = std::accumulate(counts.begin(), counts.end(), 0.0) / counts.size() / in.intermediate_size;
      std::vector<int64_t> next(static_cast<size_t>(B));
      auto t = std::chrono::steady_clock::now();
      for (int step = 0; step < o.new_tokens; ++step) {
        for (int64_t b = 0; b < B; ++b)
          next[static_cast<size_t>(b)] = std::max_element(&logits[static_cast<size_t>(b * in.vocab_size)],
                                                          &logits[static_cast<size_t>((b + 1) * in.vocab_size)]) -
                                         &logits[static_cast<size_t>(b * in.vocab_size)];
        check(tda_rt_decode(s, next.data(), logits.data()));
      }
      row.rates.push_back(B * o.new_tokens / std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
    }
  std::printf("engine %s  batch %lld  prompt %d  new %d  repeats %d  copy bandwidth %.1f GB/s\n", o.engine.c_str(),
              static_cast<long long>(B), o.prompt_tokens, o.new_tokens, o.repeats, bw / 1e9);
  std::printf("%% floor = tok/s / (copy bandwidth / weight bytes a token reads); copy bandwidth = tda_rt_copy_bandwidth: "
              "best of %d single-thread memcpy of %lld MiB, read + write (as bench/native_decode.py)\n",
              TDA_RT_COPY_PROBE_REPEATS, static_cast<long long>(TDA_RT_COPY_PROBE_BYTES >> 20));
  std::printf("%-8s %8s %10s %10s %10s %10s %10s\n", "density", "active", "tok/s min", "tok/s med", "tok/s max",
              "vs dense", "% floor");
  double dense_med = 0;
  for (auto& row : rows) {
    std::sort(row.rates.begin(), row.rates.end());
    const size_t n = row.rates.size();
    const double med = n % 2 ? row.rates[n / 2] : (row.rates[n / 2 - 1] + row.rates[n / 2]) / 2;
    if (row.density == 1.0) dense_med = med;
    // bytes one step must stream: all weights but the MLP's inactive share (the union over the batch
    // can only be larger, so this is the floor's lower bound for B > 1)
    const double bytes = static_cast<double>(in.weight_bytes - mlp_bytes) + mlp_bytes * std::min(1.0, row.active * 1.0);
    const double floor_steps = bw / bytes;  // steps per second at the bandwidth floor
    std::printf("%-8.2f %7.1f%% %10.1f %10.1f %10.1f %9.2fx %9.0f%%\n", row.density, row.active * 100,
                row.rates.front(), med, row.rates.back(), dense_med > 0 ? med / dense_med : 1.0,
                100.0 * (med / B) / floor_steps);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // One pool, OpenMP's, with OpenBLAS single-threaded inside it and a bounded spin, none on a busy
  // box (runtime.h says why). Both libraries read their settings when they load, before main, so set them and
  // re-execute once; a user's own GOMP_SPINCOUNT / OMP_WAIT_POLICY / OPENBLAS_NUM_THREADS stand.
  const bool set_spin = !std::getenv("GOMP_SPINCOUNT") && !std::getenv("OMP_WAIT_POLICY");
  if (set_spin || !std::getenv("OPENBLAS_NUM_THREADS")) {
    double load = 0;
    const bool busy = getloadavg(&load, 1) == 1 && load > TDA_RT_BUSY_LOAD_PER_CORE * sysconf(_SC_NPROCESSORS_ONLN);
    if (set_spin) setenv("GOMP_SPINCOUNT", busy ? "0" : TDA_RT_GOMP_SPINCOUNT, 1);
    setenv("OPENBLAS_NUM_THREADS", "1", 0);
    execv("/proc/self/exe", argv);  // on failure, carry on with the defaults
  }
  Options o = parse(argc, argv);
  Engine eng;
  tda_rt_engine_options opts;
  tda_rt_engine_options_init(&opts);
  opts.verify = o.verify ? 1 : 0;
  opts.threads = o.threads;
  opts.executor = o.executor.c_str();
  opts.tensorrt_library = o.tensorrt_library.empty() ? nullptr : o.tensorrt_library.c_str();
  opts.plugin_library = o.plugin_library.empty() ? nullptr : o.plugin_library.c_str();
  opts.device = o.device;
  check(tda_rt_engine_open_with(o.engine.c_str(), &opts, &eng.e));
  check(tda_rt_engine_info_get(eng.e, &eng.info));
  return o.bench ? bench(o, eng) : generate(o, eng);
}
