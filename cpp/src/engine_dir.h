// The engine directory read in C++: manifest (verified), decoder spec, safetensors weights (mmap),
// calibration (thresholds per request). Everything here throws EngineError naming the file.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace tda {

struct EngineError : std::runtime_error { using std::runtime_error::runtime_error; };
struct UnsupportedError : std::runtime_error { using std::runtime_error::runtime_error; };
struct ArgumentError : std::runtime_error { using std::runtime_error::runtime_error; };

struct LayerSpec {
  std::optional<int64_t> window;  // sliding window in tokens, none for global attention
  std::string rope;               // rope cache this layer uses
};

// export/spec.py DecoderSpec, as the manifest stores it (decoder_spec).
struct DecoderSpec {
  std::string family, activation, dtype;
  int64_t num_layers = 0, hidden = 0, intermediate = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0,
          max_context = 0;
  double rms_eps = 0, attn_scale = 0;
  std::optional<double> attn_softcap, final_softcap, embed_scale;
  bool sandwich_norms = false, qk_norm = false, tied_embeddings = false;
  std::vector<LayerSpec> layers;
  std::vector<std::string> rope_types;
};

struct TensorView {
  std::string dtype;           // safetensors dtype: F32, F16, BF16, ...
  std::vector<int64_t> shape;
  const void* data = nullptr;  // inside the mmap
  size_t nbytes = 0;
};

// model.safetensors, mmapped read-only for the engine's lifetime.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  const TensorView* find(const std::string& name) const;
  // The tensor `name` as float32 of `shape`; throws naming the file, tensor and mismatch.
  const float* f32(const std::string& name, const std::vector<int64_t>& shape) const;
  // The tensor `name` as bytes (U8) of `shape` (block-quantized weights); same errors.
  const uint8_t* u8(const std::string& name, const std::vector<int64_t>& shape) const;
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const std::string& path() const { return path_; }

 private:
  void unmap();
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorView> tensors_;
};

// calibration.json: density -> per-layer thresholds, optionally per prompt length.
struct Calibration {
  using Table = std::vector<std::pair<std::string, std::vector<float>>>;  // file order kept
  Table thresholds;
  std::vector<std::pair<int64_t, Table>> by_prompt_length;
  std::vector<double> default_densities;
  const Table& table(int64_t prompt_len) const;
};

struct EngineDir {
  std::string directory;
  nlohmann::json manifest;
  DecoderSpec spec;
  std::optional<Calibration> calibration;
  std::vector<float> built_thresholds;   // manifest calibration.thresholds (zeros if none)
  // SelectActive clamp: the manifest's calibration.density_bounds [L*2] and density_margin; an engine
  // exported before the clamp (no density_bounds_input) has none and is never clamped
  bool has_density_bounds = false;
  std::vector<float> built_density_bounds;
  double density_margin = 0.05;
  std::optional<double> selected_density;
  std::vector<int64_t> eos_ids;
  int64_t bos_id = -1, pad_id = -1;
  // manifest weight_formats: safetensors tensor name -> "float32" | "q8_0" | ... (empty for engines
  // built before it; every tensor is then in the engine dtype). Runtimes never guess formats from shapes.
  std::map<std::string, std::string> weight_formats;
  // manifest x_format (contract X_FORMATS): "dtype" (absent: engines built before it) or "q8_0"
  std::string x_format = "dtype";
  // The format of tensor `name`: weight_formats[name], else the engine dtype.
  std::string weight_format(const std::string& name) const;

  // verify: size and sha256 of every file in the manifest.
  static EngineDir open(const std::string& directory, bool verify);
  // Engine.thresholds(density, prompt_len): density nullopt = the engine's default.
  std::vector<float> thresholds(std::optional<double> density, std::optional<int64_t> prompt_len) const;
  // Engine.density_bounds(density): [L*2] (lo, hi) per layer; (0, 1) everywhere = no clamp.
  std::vector<float> density_bounds(std::optional<double> density) const;
};

std::string sha256_file(const std::string& path);

// obj[key] as T, or EngineError "<where>: field '<key>' missing / has the wrong type" (every manifest
// reader: engine_dir.cpp, trt_executor.cpp).
template <class T>
T field(const nlohmann::json& obj, const char* key, const std::string& where) {
  if (!obj.is_object() || !obj.contains(key)) throw EngineError(where + ": field '" + key + "' missing");
  try {
    return obj.at(key).get<T>();
  } catch (const std::exception&) {
    throw EngineError(where + ": field '" + key + "' has the wrong type");
  }
}

}  // namespace tda
