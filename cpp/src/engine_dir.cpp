#include "engine_dir.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include <openssl/evp.h>

namespace tda {
namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

constexpr const char* kManifest = "manifest.json";
constexpr const char* kManifestFormat = "tda-export-manifest/1";
constexpr const char* kCalibration = "calibration.json";
constexpr const char* kCalibrationFormat = "tda-calibration/1";

std::string join(const std::string& dir, const std::string& name) { return dir + "/" + name; }

template <class J>
J read_json(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw EngineError(path + ": no such file or not readable");
  try {
    return J::parse(f);
  } catch (const std::exception& e) {
    throw EngineError(path + ": not valid JSON (" + e.what() + ")");
  }
}

template <class J>
std::optional<double> optional_number(const J& obj, const char* key, const std::string& where) {
  if (!obj.contains(key) || obj.at(key).is_null()) return std::nullopt;
  if (!obj.at(key).is_number()) throw EngineError(where + ": field '" + key + "' is not a number");
  return obj.at(key).template get<double>();
}

int64_t optional_id(const json& m, const char* key) {
  if (!m.contains(key)) return -1;
  const auto& v = m.at(key);
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_array() && !v.empty() && v[0].is_number_integer()) return v[0].get<int64_t>();
  return -1;
}

DecoderSpec read_spec(const json& m, const std::string& where) {
  if (!m.contains("decoder_spec"))
    throw EngineError(where + ": no decoder_spec (built by an older tda-export); rebuild the engine");
  const json& d = m.at("decoder_spec");
  std::string w = where + " decoder_spec";
  DecoderSpec s;
  s.family = field<std::string>(d, "family", w);
  s.activation = field<std::string>(d, "activation", w);
  s.dtype = field<std::string>(d, "dtype", w);
  s.num_layers = field<int64_t>(d, "num_layers", w);
  s.hidden = field<int64_t>(d, "hidden", w);
  s.intermediate = field<int64_t>(d, "intermediate", w);
  s.heads = field<int64_t>(d, "heads", w);
  s.kv_heads = field<int64_t>(d, "kv_heads", w);
  s.head_dim = field<int64_t>(d, "head_dim", w);
  s.vocab = field<int64_t>(d, "vocab", w);
  s.max_context = field<int64_t>(d, "max_context", w);
  s.rms_eps = field<double>(d, "rms_eps", w);
  s.attn_scale = field<double>(d, "attn_scale", w);
  s.attn_softcap = optional_number(d, "attn_softcap", w);
  s.final_softcap = optional_number(d, "final_softcap", w);
  s.embed_scale = optional_number(d, "embed_scale", w);
  s.sandwich_norms = field<bool>(d, "sandwich_norms", w);
  s.qk_norm = field<bool>(d, "qk_norm", w);
  s.tied_embeddings = field<bool>(d, "tied_embeddings", w);
  s.rope_types = field<std::vector<std::string>>(d, "rope_types", w);
  const json& layers = d.contains("layers") ? d.at("layers") : json();
  if (!layers.is_array() || static_cast<int64_t>(layers.size()) != s.num_layers)
    throw EngineError(w + ": field 'layers' must list num_layers entries");
  for (const auto& l : layers) {
    LayerSpec ls;
    if (auto win = optional_number(l, "window", w)) ls.window = static_cast<int64_t>(*win);
    ls.rope = field<std::string>(l, "rope", w);
    s.layers.push_back(ls);
  }
  auto positive = [&](int64_t v, const char* name) {
    if (v <= 0) throw EngineError(w + ": " + name + " must be positive, got " + std::to_string(v));
  };
  positive(s.num_layers, "num_layers"); positive(s.hidden, "hidden"); positive(s.intermediate, "intermediate");
  positive(s.heads, "heads"); positive(s.kv_heads, "kv_heads"); positive(s.head_dim, "head_dim");
  positive(s.vocab, "vocab"); positive(s.max_context, "max_context");
  if (s.heads % s.kv_heads != 0 || s.head_dim % 2 != 0)
    throw EngineError(w + ": heads must be a multiple of kv_heads and head_dim even");
  return s;
}

Calibration::Table read_table(const ordered_json& t, int64_t layers, const std::string& where) {
  if (!t.is_object()) throw EngineError(where + ": a thresholds table is not an object");
  Calibration::Table out;
  for (auto it = t.begin(); it != t.end(); ++it) {
    std::vector<float> ths;
    try {
      ths = it.value().get<std::vector<float>>();
    } catch (const std::exception&) {
      throw EngineError(where + ": thresholds[" + it.key() + "] is not a list of numbers");
    }
    if (static_cast<int64_t>(ths.size()) != layers)
      throw EngineError(where + ": thresholds[" + it.key() + "] has " + std::to_string(ths.size()) +
                        " entries, expected " + std::to_string(layers));
    out.emplace_back(it.key(), std::move(ths));
  }
  return out;
}

Calibration read_calibration(const std::string& path, int64_t layers) {
  auto c = read_json<ordered_json>(path);
  if (field<std::string>(c, "format", path) != kCalibrationFormat)
    throw EngineError(path + ": format is not " + std::string(kCalibrationFormat));
  Calibration cal;
  cal.thresholds = read_table(c.at("thresholds"), layers, path);
  if (c.contains("by_prompt_length") && c.at("by_prompt_length").is_object())
    for (auto it = c.at("by_prompt_length").begin(); it != c.at("by_prompt_length").end(); ++it) {
      int64_t n = 0;
      try {
        n = std::stoll(it.key());
      } catch (const std::exception&) {
        throw EngineError(path + ": by_prompt_length key '" + it.key() + "' is not a token count");
      }
      if (n <= 0) throw EngineError(path + ": by_prompt_length key '" + it.key() + "' must be positive");
      cal.by_prompt_length.emplace_back(n, read_table(it.value(), layers, path));
    }
  const auto& def = c.contains("default") ? c.at("default") : ordered_json::object();
  if (def.contains("densities")) {
    cal.default_densities = field<std::vector<double>>(def, "densities", path + " default");
    if (static_cast<int64_t>(cal.default_densities.size()) != layers)
      throw EngineError(path + ": default.densities has " + std::to_string(cal.default_densities.size()) +
                        " entries, expected " + std::to_string(layers));
  }
  return cal;
}

std::string density_key(double d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", d);
  return buf;
}

const std::vector<float>& lookup(const Calibration::Table& t, double density) {
  std::string key = density_key(density);
  for (const auto& [k, v] : t)
    if (k == key) return v;
  std::string have;
  std::vector<std::string> keys;
  for (const auto& kv : t) keys.push_back(kv.first);
  std::sort(keys.begin(), keys.end());
  for (const auto& k : keys) have += (have.empty() ? "" : ", ") + k;
  throw ArgumentError("calibration has no thresholds for density " + key + "; it has [" + have + "]");
}

}  // namespace

std::string EngineDir::weight_format(const std::string& name) const {
  auto it = weight_formats.find(name);
  return it == weight_formats.end() ? spec.dtype : it->second;
}

std::string sha256_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw EngineError(path + ": cannot be read");
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1) {
    EVP_MD_CTX_free(ctx);
    throw EngineError("sha256: OpenSSL init failed");
  }
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (f.gcount() > 0) EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(f.gcount()));
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, md, &len);
  EVP_MD_CTX_free(ctx);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

// ---- safetensors ------------------------------------------------------------------------------
SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw EngineError(path + ": cannot be opened (" + std::strerror(errno) + ")");
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size < 8) {
    ::close(fd);
    throw EngineError(path + ": not a safetensors file (shorter than its 8-byte header length)");
  }
  size_ = static_cast<size_t>(st.st_size);
  map_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw EngineError(path + ": mmap failed (" + std::strerror(errno) + ")");
  }
  const auto* base = static_cast<const unsigned char*>(map_);
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian hosts only (x86-64, aarch64)
  if (header_len > size_ - 8) {
    unmap();
    throw EngineError(path + ": header length " + std::to_string(header_len) + " exceeds the file size");
  }
  json header;
  try {
    header = json::parse(base + 8, base + 8 + header_len);
  } catch (const std::exception& e) {
    unmap();
    throw EngineError(path + ": header is not valid JSON (" + e.what() + ")");
  }
  const size_t data_start = 8 + header_len, data_size = size_ - data_start;
  static const std::map<std::string, size_t> kSizes = {{"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I32", 4},
                                                        {"I64", 8}, {"U8", 1}, {"I8", 1}, {"F64", 8}};
  try {
    if (!header.is_object()) throw EngineError("header is not an object");
    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") continue;
      const json& t = it.value();
      TensorView v;
      v.dtype = t.at("dtype").get<std::string>();
      v.shape = t.at("shape").get<std::vector<int64_t>>();
      auto offs = t.at("data_offsets").get<std::vector<uint64_t>>();
      if (offs.size() != 2 || offs[0] > offs[1] || offs[1] > data_size)
        throw EngineError("tensor " + it.key() + ": data_offsets out of the file");
      auto sz = kSizes.find(v.dtype);
      if (sz == kSizes.end()) throw EngineError("tensor " + it.key() + ": unknown dtype " + v.dtype);
      uint64_t n = sz->second;
      for (int64_t d : v.shape) {
        if (d < 0) throw EngineError("tensor " + it.key() + ": negative dimension");
        n *= static_cast<uint64_t>(d);
      }
      if (n != offs[1] - offs[0])
        throw EngineError("tensor " + it.key() + ": " + std::to_string(offs[1] - offs[0]) +
                          " bytes for its shape and dtype needing " + std::to_string(n));
      v.data = base + data_start + offs[0];
      v.nbytes = static_cast<size_t>(n);
      tensors_.emplace(it.key(), std::move(v));
    }
  } catch (const EngineError& e) {
    unmap();
    throw EngineError(path + ": " + e.what());
  } catch (const std::exception& e) {
    unmap();
    throw EngineError(path + ": malformed header (" + e.what() + ")");
  }
}

void SafetensorsFile::unmap() {
  if (map_) munmap(map_, size_);
  map_ = nullptr;
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

const float* SafetensorsFile::f32(const std::string& name, const std::vector<int64_t>& shape) const {
  const TensorView* v = find(name);
  if (!v) throw EngineError(path_ + ": tensor '" + name + "' missing");
  if (v->dtype != "F32") throw UnsupportedError(path_ + ": tensor '" + name + "' is " + v->dtype + ", the CPU executor runs F32");
  if (v->shape != shape) {
    std::string want, got;
    for (auto d : shape) want += std::to_string(d) + ",";
    for (auto d : v->shape) got += std::to_string(d) + ",";
    throw EngineError(path_ + ": tensor '" + name + "' has shape [" + got + "], the decoder spec needs [" + want + "]");
  }
  if (reinterpret_cast<uintptr_t>(v->data) % 16 != 0)
    throw EngineError(path_ + ": tensor '" + name + "' is not 16-byte aligned (rebuild the engine)");
  return static_cast<const float*>(v->data);
}

const uint8_t* SafetensorsFile::u8(const std::string& name, const std::vector<int64_t>& shape) const {
  const TensorView* v = find(name);
  if (!v) throw EngineError(path_ + ": tensor '" + name + "' missing");
  if (v->dtype != "U8")
    throw EngineError(path_ + ": tensor '" + name + "' is " + v->dtype + ", block-quantized weights are U8");
  if (v->shape != shape) {
    std::string want, got;
    for (auto d : shape) want += std::to_string(d) + ",";
    for (auto d : v->shape) got += std::to_string(d) + ",";
    throw EngineError(path_ + ": tensor '" + name + "' has shape [" + got + "], the decoder spec and its weight format "
                      "need [" + want + "]");
  }
  return static_cast<const uint8_t*>(v->data);
}

// ---- calibration ------------------------------------------------------------------------------
const Calibration::Table& Calibration::table(int64_t prompt_len) const {
  if (prompt_len <= 0 || by_prompt_length.empty()) return thresholds;
  // nearest in log scale; the first of equals wins, as Python's min() over the file's order
  const Table* best = nullptr;
  double best_d = 0;
  for (const auto& [n, t] : by_prompt_length) {
    double d = std::fabs(std::log(static_cast<double>(n) / static_cast<double>(std::max<int64_t>(prompt_len, 1))));
    if (!best || d < best_d) best = &t, best_d = d;
  }
  return *best;
}

std::vector<float> EngineDir::density_bounds(std::optional<double> density) const {
  if (density && !(*density > 0.0 && *density <= 1.0))
    throw ArgumentError("density must be in (0, 1], got " + std::to_string(*density));
  std::vector<float> out;
  for (int64_t n = 0; n < spec.num_layers; ++n) out.insert(out.end(), {0.0f, 1.0f});
  if (!has_density_bounds || !calibration || (density && *density >= 1.0)) return out;
  if (!density && !built_density_bounds.empty()) return built_density_bounds;
  for (int64_t n = 0; n < spec.num_layers; ++n) {  // contract.density_bounds: (d - margin, d + margin)
    const double d = density ? *density : (selected_density ? *selected_density : calibration->default_densities.at(n));
    if (d >= 1.0) continue;
    out[2 * n] = static_cast<float>(std::max(0.0, d - density_margin));
    out[2 * n + 1] = static_cast<float>(std::min(1.0, d + density_margin));
  }
  return out;
}

std::vector<float> EngineDir::thresholds(std::optional<double> density, std::optional<int64_t> prompt_len) const {
  const auto L = static_cast<size_t>(spec.num_layers);
  if (density && !(*density > 0.0 && *density <= 1.0))
    throw ArgumentError("density must be in (0, 1], got " + std::to_string(*density));
  if (density && *density == 1.0) return std::vector<float>(L, 0.0f);
  if (!calibration) {
    if (density) throw ArgumentError(directory + ": built without a calibration, so only density 1.0 is available");
    return built_thresholds;
  }
  const auto& table = calibration->table(prompt_len.value_or(0));
  if (density) return lookup(table, *density);
  std::vector<float> out(L);
  for (size_t l = 0; l < L; ++l) {
    double d = selected_density ? *selected_density : calibration->default_densities.at(l);
    out[l] = lookup(table, d)[l];
  }
  return out;
}

EngineDir EngineDir::open(const std::string& directory, bool verify) {
  EngineDir e;
  e.directory = directory;
  const std::string mpath = join(directory, kManifest);
  struct stat st {};
  if (stat(directory.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw EngineError(directory + ": no such engine directory");
  if (stat(mpath.c_str(), &st) != 0) throw EngineError(mpath + ": no such file (not an exported model directory?)");
  e.manifest = read_json<json>(mpath);
  const json& m = e.manifest;
  if (!m.is_object() || !m.contains("format") || m.at("format") != kManifestFormat)
    throw EngineError(mpath + ": format is not " + std::string(kManifestFormat));
  if (!m.contains("files") || !m.at("files").is_object()) throw EngineError(mpath + ": field 'files' missing");
  for (auto it = m.at("files").begin(); it != m.at("files").end(); ++it) {
    const std::string p = join(directory, it.key());
    if (stat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) throw EngineError(p + ": listed in manifest.json but missing");
    auto bytes = field<int64_t>(it.value(), "bytes", mpath + " files[" + it.key() + "]");
    if (st.st_size != bytes)
      throw EngineError(p + ": " + std::to_string(st.st_size) + " bytes, manifest.json says " + std::to_string(bytes));
    if (verify && sha256_file(p) != field<std::string>(it.value(), "sha256", mpath + " files[" + it.key() + "]"))
      throw EngineError(p + ": sha256 does not match manifest.json (file changed after the build)");
  }
  e.spec = read_spec(m, mpath);
  if (m.contains("weight_formats")) {
    const json& wf = m.at("weight_formats");
    if (!wf.is_object()) throw EngineError(mpath + ": field 'weight_formats' has the wrong type");
    for (auto it = wf.begin(); it != wf.end(); ++it) {
      if (!it.value().is_string())
        throw EngineError(mpath + ": weight_formats['" + it.key() + "'] is not a string");
      e.weight_formats[it.key()] = it.value().get<std::string>();
    }
  }
  if (m.contains("x_format")) {
    if (!m.at("x_format").is_string()) throw EngineError(mpath + ": field 'x_format' is not a string");
    e.x_format = m.at("x_format").get<std::string>();
    if (e.x_format != "dtype" && e.x_format != "q8_0")
      throw EngineError(mpath + ": x_format '" + e.x_format + "' is not one of dtype, q8_0");
  }
  const json cal = m.contains("calibration") && m.at("calibration").is_object() ? m.at("calibration") : json::object();
  e.built_thresholds.assign(static_cast<size_t>(e.spec.num_layers), 0.0f);
  if (cal.contains("thresholds")) {
    e.built_thresholds = field<std::vector<float>>(cal, "thresholds", mpath + " calibration");
    if (static_cast<int64_t>(e.built_thresholds.size()) != e.spec.num_layers)
      throw EngineError(mpath + ": calibration.thresholds must have num_layers entries");
  }
  e.has_density_bounds = m.value("density_bounds_input", "") == "tda_density_bounds";
  if (cal.contains("density_margin")) e.density_margin = field<double>(cal, "density_margin", mpath + " calibration");
  if (cal.contains("density_bounds")) {
    for (const auto& lh : field<std::vector<std::vector<float>>>(cal, "density_bounds", mpath + " calibration")) {
      if (lh.size() != 2) throw EngineError(mpath + ": calibration.density_bounds entries must be [lo, hi]");
      e.built_density_bounds.insert(e.built_density_bounds.end(), lh.begin(), lh.end());
    }
    if (static_cast<int64_t>(e.built_density_bounds.size()) != 2 * e.spec.num_layers)
      throw EngineError(mpath + ": calibration.density_bounds must have num_layers entries");
  }
  if (cal.contains("selected") && cal.at("selected").is_object()) {
    const json& sel = cal.at("selected");
    if (sel.value("kind", "") == "density" && sel.contains("density") && sel.at("density").is_number())
      e.selected_density = sel.at("density").get<double>();
  }
  const std::string cpath = join(directory, kCalibration);
  if (stat(cpath.c_str(), &st) == 0) {
    e.calibration = read_calibration(cpath, e.spec.num_layers);
    if (!e.selected_density && e.calibration->default_densities.empty())
      throw EngineError(cpath + ": default.densities missing");
  }
  if (m.contains("eos_token_id")) {
    const auto& v = m.at("eos_token_id");
    if (v.is_number_integer()) e.eos_ids.push_back(v.get<int64_t>());
    if (v.is_array())
      for (const auto& x : v)
        if (x.is_number_integer()) e.eos_ids.push_back(x.get<int64_t>());
  }
  e.bos_id = optional_id(m, "bos_token_id");
  e.pad_id = optional_id(m, "pad_token_id");
  return e;
}

}  // namespace tda
