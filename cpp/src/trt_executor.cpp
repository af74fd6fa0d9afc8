// The TensorRT executor (trt_executor.h).
//
// Why dlopen: linking libnvinfer/libtensorrt_rtx would make libtda_runtime unloadable wherever
// TensorRT is absent (CI, CPU users) and would tie one build to one install path. TensorRT's C++ API
// is virtual calls on objects, so the only symbols we need are two C entry points
// (getInferLibVersion, createInferRuntime_INTERNAL), resolved at run time from the library of the
// flavour the headers are. The C++ ABI is the headers' own, so the library's major version must
// equal theirs, and a plan's flavour must be the headers' flavour (TensorRT-RTX ships its own
// headers; its ABI is not full TensorRT's). The CUDA runtime is linked statically: it looks for the
// driver only when first used, so a machine without one gets an error, not a loader failure.
#include "trt_executor.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

namespace tda {
namespace {

using json = nlohmann::json;
using nvinfer1::DataType;

#ifdef TRT_MAJOR_RTX
constexpr const char* kFlavour = "tensorrt-rtx";
const char* const kLibraryStem = "libtensorrt_rtx.so.";
const char* const kInstallHint = "pip install tensorrt-rtx-cu13 and pass its tensorrt_rtx_libs/libtensorrt_rtx.so.1";
#else
constexpr const char* kFlavour = "tensorrt";
const char* const kLibraryStem = "libnvinfer.so.";
const char* const kInstallHint = "install TensorRT (SDK or pip tensorrt) and put its lib/ on LD_LIBRARY_PATH or pass";
#endif
constexpr int32_t kHeaderVersion = NV_TENSORRT_VERSION;

std::string version_string(int64_t v) {  // TensorRT's integer version: major * 10000 + minor * 100 + patch
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

std::string default_library() { return kLibraryStem + std::to_string(kHeaderVersion / 10000); }

// TensorRT's messages: the last error goes into the exception that follows; TDA_TRT_LOG=1 prints all.
class Logger final : public nvinfer1::ILogger {
 public:
  Logger() : print_(std::getenv("TDA_TRT_LOG") != nullptr) {}
  void log(Severity severity, const char* msg) noexcept override {
    try {
      std::lock_guard<std::mutex> g(mu_);
      if (severity <= Severity::kERROR) last_error_ = msg ? msg : "";
      if (print_ && severity <= Severity::kINFO) std::fprintf(stderr, "tensorrt: %s\n", msg ? msg : "");
    } catch (...) {
    }
  }
  // `what`, with TensorRT's last error if it logged one since the last call
  std::string explain(const std::string& what) {
    std::lock_guard<std::mutex> g(mu_);
    std::string out = last_error_.empty() ? what : what + " (TensorRT: " + last_error_ + ")";
    last_error_.clear();
    return out;
  }

 private:
  std::mutex mu_;
  std::string last_error_;
  bool print_;
};

void cuda_check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess)
    throw std::runtime_error(what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  void* reserve(size_t bytes) {  // grow-only
    if (bytes > size_ || !ptr_) {
      if (ptr_) cudaFree(ptr_);
      ptr_ = nullptr;
      size_ = 0;
      cuda_check(cudaMalloc(&ptr_, std::max<size_t>(bytes, 256)), "cudaMalloc(" + std::to_string(bytes) + " bytes)");
      size_ = std::max<size_t>(bytes, 256);
    }
    return ptr_;
  }
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

class Stream {  // destroyed with the executor, also when its constructor throws half-way
 public:
  Stream() = default;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  void create() { cuda_check(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "cudaStreamCreate"); }
  operator cudaStream_t() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// model.plan mapped read-only for the deserialization (no copy of a multi-GB plan on the heap).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw EngineError(path + ": cannot be opened (" + std::strerror(errno) + ")");
    struct stat st {};
    if (fstat(fd, &st) != 0 || st.st_size == 0) {
      ::close(fd);
      throw EngineError(path + ": empty or unreadable");
    }
    size_ = static_cast<size_t>(st.st_size);
    data_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (data_ == MAP_FAILED) {
      data_ = nullptr;
      throw EngineError(path + ": mmap failed (" + std::strerror(errno) + ")");
    }
  }
  ~MappedFile() {
    if (data_) munmap(data_, size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

size_t element_size(DataType t) {
  switch (t) {
    case DataType::kFLOAT: case DataType::kINT32: return 4;
    case DataType::kHALF: case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    case DataType::kINT8: case DataType::kUINT8: case DataType::kBOOL: case DataType::kFP8: return 1;
    default: return 0;
  }
}

// major.minor.patch of "1.7.1.116" as TensorRT's integer version (-1 if unparsable)
int64_t parse_version(const std::string& s) {
  int a = 0, b = 0, c = 0;
  if (std::sscanf(s.c_str(), "%d.%d.%d", &a, &b, &c) != 3) return -1;
  return int64_t(a) * 10000 + b * 100 + c;
}

// ---- the state protocol: names and shapes from the manifest's io tables -------------------------
enum class Role { kIds, kMask, kPositions, kThresholds, kDensityBounds, kPast, kLogits, kPresent };

struct Tensor {
  std::string name;
  json shape;        // ints and the symbols batch / sequence / past_sequence / total_sequence
  DataType type{};
  Role role{};
  int pair = -1;     // index of its past/present pair
};

struct Sizes { int64_t batch, sequence, past; };

nvinfer1::Dims dims_of(const Tensor& t, const Sizes& s, const std::string& where) {
  nvinfer1::Dims d{};
  if (!t.shape.is_array() || t.shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS))
    throw EngineError(where + ": io shape of '" + t.name + "' is not a list of at most 8 dims");
  d.nbDims = static_cast<int32_t>(t.shape.size());
  for (size_t i = 0; i < t.shape.size(); ++i) {
    const json& x = t.shape[i];
    int64_t v = -1;
    if (x.is_number_integer()) v = x.get<int64_t>();
    else if (x == "batch") v = s.batch;
    else if (x == "sequence") v = s.sequence;
    else if (x == "past_sequence") v = s.past;
    else if (x == "total_sequence") v = s.past + s.sequence;
    else throw EngineError(where + ": io shape of '" + t.name + "' has the unknown dimension " + x.dump());
    d.d[i] = v;
  }
  return d;
}

int64_t volume(const nvinfer1::Dims& d) {
  int64_t v = 1;
  for (int32_t i = 0; i < d.nbDims; ++i) v *= d.d[i];
  return v;
}

std::string dims_string(const nvinfer1::Dims& d) {
  std::string s = "[";
  for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + "]";
}

std::string past_name(const std::string& present) {  // as tda_export.runtime.ort_backend.past_name
  if (present.rfind("present_tda.", 0) == 0) return "past_tda." + present.substr(12);
  return "past_key_values." + present.substr(8);
}

struct TrtState : ExecutorState {
  int64_t batch = 0, len = 0;      // sequences, tokens in the cache (= mask columns)
  bool prefilled = false;
  int cur = 0;                     // which buffer of each pair holds the pasts
  std::vector<std::array<DeviceBuffer, 2>> pairs;
  DeviceBuffer ids, mask, positions, thresholds, density_bounds, logits;
  std::vector<int64_t> host_mask, host_positions;
  std::vector<float> host_bounds;    // [L, 2], kept until the copy has run
  std::vector<int32_t> host_narrow;  // int64 -> int32 inputs when the plan takes int32
  std::vector<int32_t> counts;     // [L, B] after the prefill
};

class TrtExecutor final : public Executor {
 public:
  TrtExecutor(const EngineDir& dir, const TrtOptions& options);
  ~TrtExecutor() override;
  const char* name() const override { return "tensorrt"; }
  int64_t decode_bytes() const override { return weight_bytes_; }
  std::unique_ptr<ExecutorState> new_state() const override {
    auto s = std::make_unique<TrtState>();
    s->pairs = std::vector<std::array<DeviceBuffer, 2>>(static_cast<size_t>(n_pairs_));
    return s;
  }
  void prefill(ExecutorState& s, int64_t batch, int64_t seq, const int64_t* ids, const int64_t* mask,
               const float* thresholds, const float* density_bounds, float* logits) override;
  void decode(ExecutorState& s, const int64_t* tokens, float* logits) override;
  void active_counts(const ExecutorState& state, int32_t* counts) const override {
    const auto& s = static_cast<const TrtState&>(state);
    if (!s.prefilled) throw StateError("active counts: no prefill yet");
    std::copy(s.counts.begin(), s.counts.end(), counts);
  }
  int64_t batch(const ExecutorState& s) const override {
    return static_cast<const TrtState&>(s).prefilled ? static_cast<const TrtState&>(s).batch : 0;
  }

 private:
  void load_tensorrt(const std::string& library);
  void load_plugins(const std::string& path);
  void require_device(int device);
  void read_io();
  void check_profile(int profile, const Sizes& s) const;
  void upload(DeviceBuffer& dst, const int64_t* src, int64_t n, DataType type, TrtState& st);
  void run(TrtState& st, const Sizes& sz, const int64_t* ids, float* logits);

  std::string where_;              // manifest.json path, for messages
  std::string thresholds_name_;    // manifest thresholds_input (contract.THRESHOLDS_INPUT)
  std::string bounds_name_;        // manifest density_bounds_input (contract.DENSITY_BOUNDS_INPUT); "" before the clamp
  int device_ = 0;
  int32_t library_version_ = 0;
  std::string plan_path_;
  DecoderSpec spec_;
  json section_;                   // manifest "tensorrt"
  json io_;                        // manifest "io"
  int64_t max_seq_len_ = 0, max_prompt_ = 0, weight_bytes_ = 0;
  Logger logger_;
  void* (*create_runtime_)(void*, int32_t) = nullptr;
  Stream stream_;                  // declared before the TensorRT objects: destroyed after them
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  // The contexts' activation memory: one block for both (see the constructor), destroyed after them.
  DeviceBuffer activations_;
  std::vector<std::unique_ptr<nvinfer1::IExecutionContext>> contexts_;  // one per profile
  DeviceBuffer empty_;             // the address of zero-volume tensors (an empty past)
  std::vector<Tensor> tensors_;
  int n_pairs_ = 0;
  std::vector<int> count_pairs_;   // per layer: the pair of present_tda.N.active_count
  std::mutex run_mu_;              // the contexts are shared: a session's call runs alone
};

TrtExecutor::TrtExecutor(const EngineDir& dir, const TrtOptions& options)
    : where_(dir.directory + "/manifest.json"),
      thresholds_name_(dir.manifest.value("thresholds_input", std::string("tda_thresholds"))),
      bounds_name_(dir.manifest.value("density_bounds_input", std::string())),
      device_(options.device),
      spec_(dir.spec) {
  section_ = dir.manifest.at("tensorrt");
  const std::string w = where_ + " tensorrt";
  const auto flavour = field<std::string>(section_, "flavour", w);
  if (flavour != kFlavour)
    throw UnsupportedError(dir.directory + "/model.plan is a " + flavour + " plan, and this TensorRT executor was compiled "
                           "against " + kFlavour + " " + version_string(kHeaderVersion) + " headers, whose C++ ABI is not " +
                           flavour + "'s: configure cpp/ with -DTDA_TENSORRT_INCLUDE=<the " + flavour + " SDK's include/>");
  plan_path_ = dir.directory + "/" + field<std::string>(section_, "plan_file", w);
  const json limits = section_.contains("limits") ? section_.at("limits") : json();
  field<int64_t>(limits, "max_batch", w + ".limits");  // validated; the profiles enforce it
  max_seq_len_ = field<int64_t>(limits, "max_seq_len", w + ".limits");
  max_prompt_ = field<int64_t>(limits, "max_prompt", w + ".limits");
  const json& profiles = section_.contains("profiles") ? section_.at("profiles") : json();
  if (!profiles.is_array() || profiles.size() != 2 || field<std::string>(profiles[0], "name", w + ".profiles[0]") != "prefill" ||
      field<std::string>(profiles[1], "name", w + ".profiles[1]") != "decode")
    throw EngineError(w + ".profiles: expected [prefill, decode]");
  if (!dir.manifest.contains("io")) throw EngineError(where_ + ": field 'io' missing");
  io_ = dir.manifest.at("io");
  const json& files = dir.manifest.at("files");
  if (files.contains("model.safetensors")) weight_bytes_ = files.at("model.safetensors").value("bytes", int64_t(0));

  // Host-side checks first, then TensorRT, the plugin library, the GPU, and only then the plan.
  std::string plugins = options.plugin_library;
  if (plugins.empty() && std::getenv("TDA_TRT_PLUGIN_LIBRARY")) plugins = std::getenv("TDA_TRT_PLUGIN_LIBRARY");
  if (plugins.empty()) {
    const std::string name = field<std::string>(section_.contains("plugin") ? section_.at("plugin") : json(), "library", w + ".plugin");
    struct stat st {};
    plugins = stat((dir.directory + "/" + name).c_str(), &st) == 0 ? dir.directory + "/" + name : name;
  }
  load_tensorrt(options.tensorrt_library.empty() ? default_library() : options.tensorrt_library);
  // A plan deserializes only in the TensorRT version that built it (build number aside).
  const auto built = field<std::string>(section_, "version", w);
  if (parse_version(built) != library_version_)
    throw EngineError(plan_path_ + ": built by " + flavour + " " + built + ", and the loaded library is " +
                      version_string(library_version_) + "; rebuild the plan with this TensorRT (or load that one)");
  void* handle = dlopen(plugins.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle)
    throw UnsupportedError("the plugin library " + plugins + " cannot be loaded (" + dlerror() + "); build it from plugins/ "
                           "(plugins/README.md) and pass plugin_library / --plugin-library, set TDA_TRT_PLUGIN_LIBRARY, "
                           "or put it next to model.plan");
  if (!dlsym(handle, "getCreators"))
    throw EngineError(plugins + ": not a TensorRT plugin library (no getCreators)");
  // TensorRT and CUDA keep process-wide state (plugin registry, contexts): the libraries stay loaded.
  require_device(options.device);
  stream_.create();
  runtime_.reset(static_cast<nvinfer1::IRuntime*>(create_runtime_(&logger_, kHeaderVersion)));
  if (!runtime_) throw UnsupportedError(logger_.explain("createInferRuntime failed"));
  load_plugins(plugins);
  {
    MappedFile plan(plan_path_);
    engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
  }
  if (!engine_) throw EngineError(logger_.explain(plan_path_ + ": TensorRT could not deserialize the plan"));
  if (engine_->getNbOptimizationProfiles() < 2)
    throw EngineError(plan_path_ + ": " + std::to_string(engine_->getNbOptimizationProfiles()) +
                      " optimization profile(s), the manifest lists 2 (prefill, decode)");
  read_io();
  // The two contexts never run at once (run_mu_, one stream), so they share one activation block sized
  // for the larger profile, instead of each holding its own (prefill's is ~1.4 GB at Mistral 8x2048).
  int64_t activation_bytes = 0;
  for (int32_t p = 0; p < 2; ++p)
    activation_bytes = std::max(activation_bytes, engine_->getDeviceMemorySizeForProfileV2(p));
  void* activations = activations_.reserve(size_t(activation_bytes));  // cudaMalloc: 256-byte aligned
  for (int32_t p = 0; p < 2; ++p) {
    std::unique_ptr<nvinfer1::IExecutionContext> ctx(
        engine_->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED));
    if (!ctx) throw std::runtime_error(logger_.explain("createExecutionContext failed"));
    if (!ctx->setOptimizationProfileAsync(p, stream_))
      throw std::runtime_error(logger_.explain("setOptimizationProfileAsync(" + std::to_string(p) + ") failed"));
    ctx->setDeviceMemoryV2(activations, activation_bytes);
    contexts_.push_back(std::move(ctx));
  }
  empty_.reserve(256);
  cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
}

TrtExecutor::~TrtExecutor() = default;  // members go in reverse: contexts, their activations, engine, runtime, stream, logger

void TrtExecutor::load_tensorrt(const std::string& library) {
  void* h = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h)
    throw UnsupportedError(library + ": cannot be loaded (" + dlerror() + "); the TensorRT executor needs " + kFlavour + " " +
                           std::to_string(kHeaderVersion / 10000) + ".x: " + kInstallHint +
                           " its path as tensorrt_library / --tensorrt-library");
  auto version = reinterpret_cast<int32_t (*)()>(dlsym(h, "getInferLibVersion"));
  create_runtime_ = reinterpret_cast<void* (*)(void*, int32_t)>(dlsym(h, "createInferRuntime_INTERNAL"));
  if (!version || !create_runtime_)
    throw UnsupportedError(library + ": not a TensorRT library (no getInferLibVersion/createInferRuntime_INTERNAL)");
  const int32_t v = library_version_ = version();
  if (v / 10000 != kHeaderVersion / 10000)
    throw UnsupportedError(library + " is TensorRT " + version_string(v) + ", and this executor was compiled against " +
                           kFlavour + " " + version_string(kHeaderVersion) + " headers: the C++ ABI differs across "
                           "major versions, load a " + std::to_string(kHeaderVersion / 10000) + ".x library");
}

void TrtExecutor::require_device(int device) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0)
    throw UnsupportedError(std::string("the TensorRT executor needs a CUDA GPU, and cudaGetDeviceCount found none (") +
                           (e != cudaSuccess ? std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e) : "0 devices") + ")");
  if (device >= n)
    throw ArgumentError("device " + std::to_string(device) + ": this machine has " + std::to_string(n) + " CUDA device(s)");
  cuda_check(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
  int major = 0, minor = 0;
  cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  cuda_check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  // TensorRT-RTX plans list their targets; datacenter TensorRT builds for the GPU it ran on (empty list)
  const json ccs = section_.value("compute_capabilities", json::array());
  const std::string sm = "SM" + std::to_string(major) + std::to_string(minor);
  if (ccs.is_array() && !ccs.empty() && std::find(ccs.begin(), ccs.end(), sm) == ccs.end())
    throw UnsupportedError(plan_path_ + " was built for " + ccs.dump() + ", and CUDA device " + std::to_string(device) +
                           " is " + sm + ": rebuild with --compute-capability " + std::to_string(major) + "." +
                           std::to_string(minor) + " if TensorRT-RTX supports it (not Hopper), or use --target tensorrt");
}

void TrtExecutor::load_plugins(const std::string& path) {
  const std::string w = where_ + " tensorrt.plugin";
  const json plugin = section_.at("plugin");
  const auto ns = field<std::string>(plugin, "namespace", w);
  const auto version = field<std::string>(plugin, "version", w);
  const json creators = plugin.contains("creators") ? plugin.at("creators") : json();
  if (!creators.is_object() || creators.empty()) throw EngineError(w + ": field 'creators' missing or empty");
  nvinfer1::IPluginRegistry& registry = runtime_->getPluginRegistry();
  auto missing = [&]() {
    std::vector<std::string> out;
    for (auto it = creators.begin(); it != creators.end(); ++it)
      if (!registry.getCreator(it.key().c_str(), version.c_str(), ns.c_str())) out.push_back(ns + "::" + it.key() + "/" + version);
    return out;
  };
  if (missing().empty()) return;  // registered already (another engine of this process loaded it)
  if (!registry.loadLibrary(path.c_str()))
    throw EngineError(logger_.explain(path + ": TensorRT could not load it as a plugin library"));
  const auto still = missing();
  if (!still.empty())
    throw EngineError(path + " does not provide " + still.front() + ", which model.plan needs (" + w + ".creators)");
}

void TrtExecutor::read_io() {
  const std::string w = where_ + " io";
  std::vector<std::string> names;
  for (const char* side : {"inputs", "outputs"}) {
    const json& list = io_.contains(side) ? io_.at(side) : json();
    if (!list.is_array()) throw EngineError(w + ": field '" + side + "' missing");
    for (const json& v : list) {
      Tensor t;
      t.name = field<std::string>(v, "name", w);
      t.shape = v.contains("shape") ? v.at("shape") : json();
      const bool input = std::string(side) == "inputs";
      const auto mode = engine_->getTensorIOMode(t.name.c_str());
      if (mode != (input ? nvinfer1::TensorIOMode::kINPUT : nvinfer1::TensorIOMode::kOUTPUT))
        throw EngineError(plan_path_ + ": has no " + (input ? "input" : "output") + " '" + t.name + "' (" + w + " lists it)");
      t.type = engine_->getTensorDataType(t.name.c_str());
      if (!element_size(t.type)) throw UnsupportedError(plan_path_ + ": tensor '" + t.name + "' has a data type this executor does not move");
      if (t.name == "input_ids") t.role = Role::kIds;
      else if (t.name == "attention_mask") t.role = Role::kMask;
      else if (t.name == "position_ids") t.role = Role::kPositions;
      else if (t.name == thresholds_name_) t.role = Role::kThresholds;
      else if (!bounds_name_.empty() && t.name == bounds_name_) t.role = Role::kDensityBounds;
      else if (t.name == "logits") t.role = Role::kLogits;
      else if (input && t.name.rfind("past", 0) == 0) t.role = Role::kPast;
      else if (!input && t.name.rfind("present", 0) == 0) t.role = Role::kPresent;
      else throw EngineError(w + ": '" + t.name + "' is no tensor of the TDA state protocol (docs/export.md)");
      if ((t.role == Role::kIds || t.role == Role::kMask || t.role == Role::kPositions) &&
          t.type != DataType::kINT64 && t.type != DataType::kINT32)
        throw UnsupportedError(plan_path_ + ": input '" + t.name + "' is neither int64 nor int32");
      if ((t.role == Role::kThresholds || t.role == Role::kDensityBounds || t.role == Role::kLogits) &&
          t.type != DataType::kFLOAT)
        throw UnsupportedError(plan_path_ + ": '" + t.name + "' is not float32");
      names.push_back(t.name);
      tensors_.push_back(std::move(t));
    }
  }
  for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i)
    if (std::find(names.begin(), names.end(), engine_->getIOTensorName(i)) == names.end())
      throw EngineError(plan_path_ + ": tensor '" + engine_->getIOTensorName(i) + "' is not in " + w);
  for (const std::string& role : {std::string("input_ids"), std::string("attention_mask"), std::string("position_ids"),
                                  thresholds_name_, std::string("logits")})
    if (std::find(names.begin(), names.end(), role) == names.end()) throw EngineError(w + ": '" + role + "' missing");
  // pairs: each present* output and the past* input it becomes
  for (auto& t : tensors_) {
    if (t.role != Role::kPresent) continue;
    const std::string past = past_name(t.name);
    auto it = std::find_if(tensors_.begin(), tensors_.end(), [&](const Tensor& x) { return x.name == past; });
    if (it == tensors_.end() || it->role != Role::kPast) throw EngineError(w + ": output '" + t.name + "' has no input '" + past + "'");
    if (it->type != t.type) throw EngineError(plan_path_ + ": '" + past + "' and '" + t.name + "' differ in type");
    t.pair = it->pair = n_pairs_++;
  }
  for (const auto& t : tensors_)
    if (t.role == Role::kPast && t.pair < 0) throw EngineError(w + ": input '" + t.name + "' is fed by no present output");
  for (int64_t l = 0; l < spec_.num_layers; ++l) {
    const std::string name = "present_tda." + std::to_string(l) + ".active_count";
    auto it = std::find_if(tensors_.begin(), tensors_.end(), [&](const Tensor& x) { return x.name == name; });
    if (it == tensors_.end() || it->type != DataType::kINT32) throw EngineError(w + ": int32 output '" + name + "' missing");
    count_pairs_.push_back(it->pair);
  }
  // every shape evaluates (unknown symbols fail here, not on the first call)
  for (const auto& t : tensors_) dims_of(t, Sizes{1, 2, 0}, w);
}

void TrtExecutor::check_profile(int profile, const Sizes& s) const {
  const json& prof = section_.at("profiles").at(static_cast<size_t>(profile));
  const std::string pname = prof.value("name", std::string("?"));
  const json& shapes = prof.contains("shapes") ? prof.at("shapes") : json::object();
  for (const auto& t : tensors_) {
    if (t.role == Role::kLogits || t.role == Role::kPresent || !shapes.contains(t.name)) continue;
    const nvinfer1::Dims d = dims_of(t, s, where_);
    const auto lo = shapes.at(t.name).value("min", std::vector<int64_t>{});
    const auto hi = shapes.at(t.name).value("max", std::vector<int64_t>{});
    bool ok = lo.size() == static_cast<size_t>(d.nbDims) && hi.size() == lo.size();
    for (int32_t i = 0; ok && i < d.nbDims; ++i) ok = lo[static_cast<size_t>(i)] <= d.d[i] && d.d[i] <= hi[static_cast<size_t>(i)];
    if (!ok)
      throw ArgumentError("input " + t.name + " shape " + dims_string(d) + " is outside the plan's " + pname + " profile " +
                          json(lo).dump() + ".." + json(hi).dump() +
                          " (rebuild with larger --max-batch/--max-seq-len/--max-prompt)");
  }
}

void TrtExecutor::upload(DeviceBuffer& dst, const int64_t* src, int64_t n, DataType type, TrtState& st) {
  const void* from = src;
  size_t bytes = static_cast<size_t>(n) * sizeof(int64_t);
  if (type == DataType::kINT32) {
    st.host_narrow.assign(src, src + n);
    from = st.host_narrow.data();
    bytes = static_cast<size_t>(n) * sizeof(int32_t);
  }
  cuda_check(cudaMemcpyAsync(dst.reserve(bytes), from, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (inputs)");
  if (type == DataType::kINT32) cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // host_narrow is reused
}

// One call: ids [B, S] at past length s.past; host_mask [B, past + S] and host_positions [B, S] set.
void TrtExecutor::run(TrtState& st, const Sizes& sz, const int64_t* ids, float* logits) {
  const int profile = sz.sequence > 1 ? 0 : 1;
  check_profile(profile, sz);
  nvinfer1::IExecutionContext& ctx = *contexts_[static_cast<size_t>(profile)];
  const int64_t B = sz.batch, S = sz.sequence, V = spec_.vocab;
  for (const auto& t : tensors_) {
    const nvinfer1::Dims d = dims_of(t, sz, where_);
    const size_t bytes = static_cast<size_t>(volume(d)) * element_size(t.type);
    void* ptr = nullptr;
    switch (t.role) {
      case Role::kIds: upload(st.ids, ids, B * S, t.type, st); ptr = st.ids.get(); break;
      case Role::kMask: upload(st.mask, st.host_mask.data(), volume(d), t.type, st); ptr = st.mask.get(); break;
      case Role::kPositions: upload(st.positions, st.host_positions.data(), B * S, t.type, st); ptr = st.positions.get(); break;
      case Role::kThresholds: ptr = st.thresholds.get(); break;
      case Role::kDensityBounds: ptr = st.density_bounds.get(); break;
      case Role::kLogits: ptr = st.logits.reserve(bytes); break;
      case Role::kPast: ptr = bytes ? st.pairs[static_cast<size_t>(t.pair)][static_cast<size_t>(st.cur)].get() : empty_.get(); break;
      case Role::kPresent: ptr = st.pairs[static_cast<size_t>(t.pair)][static_cast<size_t>(1 - st.cur)].get(); break;
    }
    if (t.role != Role::kLogits && t.role != Role::kPresent && !ctx.setInputShape(t.name.c_str(), d))
      throw ArgumentError(logger_.explain("input " + t.name + " shape " + dims_string(d) + " refused by the plan"));
    if (!ctx.setTensorAddress(t.name.c_str(), ptr))
      throw std::runtime_error(logger_.explain("setTensorAddress(" + t.name + ") failed"));
  }
  if (!ctx.enqueueV3(stream_)) throw std::runtime_error(logger_.explain("TensorRT enqueueV3 failed"));
  // logits [B, S, V]: the last position of each row
  cuda_check(cudaMemcpy2DAsync(logits, static_cast<size_t>(V) * 4, static_cast<char*>(st.logits.get()) + (S - 1) * V * 4,
                               static_cast<size_t>(S * V) * 4, static_cast<size_t>(V) * 4, static_cast<size_t>(B),
                               cudaMemcpyDeviceToHost, stream_), "cudaMemcpy2DAsync (logits)");
  if (profile == 0) {
    st.counts.assign(static_cast<size_t>(spec_.num_layers * B), 0);
    for (size_t l = 0; l < count_pairs_.size(); ++l)
      cuda_check(cudaMemcpyAsync(st.counts.data() + l * static_cast<size_t>(B),
                                 st.pairs[static_cast<size_t>(count_pairs_[l])][static_cast<size_t>(1 - st.cur)].get(),
                                 static_cast<size_t>(B) * 4, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (active counts)");
  }
  cuda_check(cudaStreamSynchronize(stream_), "TensorRT execution");
  st.cur = 1 - st.cur;
  st.len = sz.past + S;
}

void TrtExecutor::prefill(ExecutorState& state, int64_t batch, int64_t seq, const int64_t* ids, const int64_t* mask,
                          const float* thresholds, const float* density_bounds, float* logits) {
  auto& st = static_cast<TrtState&>(state);
  check_profile(0, Sizes{batch, seq, 0});  // before anything is allocated for this batch
  std::lock_guard<std::mutex> g(run_mu_);
  cuda_check(cudaSetDevice(device_), "cudaSetDevice");  // the current device is per thread
  st.prefilled = false;
  st.batch = batch;
  st.len = 0;
  st.cur = 0;
  // every pair at its largest (prefill at max_prompt, or the full context), for this batch
  for (const auto& t : tensors_) {
    if (t.role != Role::kPresent) continue;
    const size_t elt = element_size(t.type);
    const int64_t n = std::max(volume(dims_of(t, Sizes{batch, max_prompt_, 0}, where_)),
                               volume(dims_of(t, Sizes{batch, 1, max_seq_len_ - 1}, where_)));
    for (auto& buf : st.pairs[static_cast<size_t>(t.pair)]) buf.reserve(static_cast<size_t>(n) * elt);
  }
  // the empty past: zero-length KV, zero scores and active sets (OrtBackend._empty_past)
  for (const auto& t : tensors_) {
    if (t.role != Role::kPast) continue;
    const size_t bytes = static_cast<size_t>(volume(dims_of(t, Sizes{batch, seq, 0}, where_))) * element_size(t.type);
    if (bytes) cuda_check(cudaMemsetAsync(st.pairs[static_cast<size_t>(t.pair)][0].get(), 0, bytes, stream_), "cudaMemsetAsync");
  }
  const size_t L = static_cast<size_t>(spec_.num_layers);
  cuda_check(cudaMemcpyAsync(st.thresholds.reserve(L * 4), thresholds, L * 4, cudaMemcpyHostToDevice, stream_),
             "cudaMemcpyAsync (thresholds)");
  if (!bounds_name_.empty()) {  // the plan's input has no default at run time: none asked = (0, 1), no clamp
    st.host_bounds.assign(2 * L, 0.0f);
    for (size_t l = 0; l < L; ++l) st.host_bounds[2 * l + 1] = 1.0f;
    if (density_bounds) st.host_bounds.assign(density_bounds, density_bounds + 2 * L);
    cuda_check(cudaMemcpyAsync(st.density_bounds.reserve(2 * L * 4), st.host_bounds.data(), 2 * L * 4,
                               cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (density bounds)");
  }
  st.host_mask.assign(mask, mask + batch * seq);
  st.host_positions.resize(static_cast<size_t>(batch * seq));
  for (int64_t b = 0; b < batch; ++b) {  // positions skip left padding (runtime/backend.py position_ids)
    int64_t c = 0;
    for (int64_t i = 0; i < seq; ++i) {
      c += mask[b * seq + i];
      st.host_positions[static_cast<size_t>(b * seq + i)] = std::max<int64_t>(c - 1, 0);
    }
  }
  run(st, Sizes{batch, seq, 0}, ids, logits);  // a failed call leaves the state unprefilled
  st.prefilled = true;
}

void TrtExecutor::decode(ExecutorState& state, const int64_t* tokens, float* logits) {
  auto& st = static_cast<TrtState&>(state);
  if (!st.prefilled) throw StateError("decode before prefill");
  if (st.len + 1 > max_seq_len_)
    throw StateError("sequence of " + std::to_string(st.len + 1) + " tokens exceeds the plan's max_seq_len of " +
                     std::to_string(max_seq_len_) + " (rebuild with a larger --max-seq-len)");
  std::lock_guard<std::mutex> g(run_mu_);
  cuda_check(cudaSetDevice(device_), "cudaSetDevice");
  const int64_t B = st.batch, T = st.len;
  std::vector<int64_t> mask(static_cast<size_t>(B * (T + 1)), 1);
  st.host_positions.resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {  // the next position of each row, then one more real column
    int64_t c = 0;
    for (int64_t i = 0; i < T; ++i) c += (mask[static_cast<size_t>(b * (T + 1) + i)] = st.host_mask[static_cast<size_t>(b * T + i)]);
    st.host_positions[static_cast<size_t>(b)] = c;
  }
  st.host_mask.swap(mask);
  st.prefilled = false;  // until this call has succeeded: half a step leaves no usable state
  run(st, Sizes{B, 1, T}, tokens, logits);
  st.prefilled = true;
}

}  // namespace

const char* trt_compiled_flavour() { return kFlavour; }

std::unique_ptr<Executor> make_trt_executor(const EngineDir& dir, const TrtOptions& options) {
  return std::make_unique<TrtExecutor>(dir, options);
}

}  // namespace tda
