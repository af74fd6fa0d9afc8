// Normalizers, pre-tokenizers and decoders: the text transforms around the model.
#include <algorithm>
#include <stdexcept>

#include "components.h"
#include "utf8.h"

namespace tda::detail {
namespace {

using Spans = std::vector<std::pair<size_t, size_t>>;

Pattern make_pattern(const Field& f) {
  f.object();
  if (f.has("String")) return Pattern::literal(f["String"].str());
  if (f.has("Regex")) {
    try {
      return Pattern::regex(f["Regex"].str());
    } catch (const std::invalid_argument& e) {
      f["Regex"].fail(std::string("is not a valid regex: ") + e.what());
    }
  }
  f.fail("must hold \"String\" or \"Regex\"");
}

std::string replace_all(const Pattern& pattern, const std::string& content, const std::string& text) {
  Spans spans;
  pattern.find_all(text, spans);
  if (spans.empty()) return text;
  std::string out;
  size_t last = 0;
  for (auto [b, e] : spans) {
    out.append(text, last, b - last);
    out += content;
    last = e;
  }
  out.append(text, last, std::string::npos);
  return out;
}

// ---- normalizers

class ReplaceNormalizer : public Normalizer {
 public:
  explicit ReplaceNormalizer(const Field& f) : pattern_(make_pattern(f["pattern"])), content_(f["content"].str()) {}
  std::string normalize(std::string text) const override { return replace_all(pattern_, content_, text); }

 private:
  Pattern pattern_;
  std::string content_;
};

class SequenceNormalizer : public Normalizer {
 public:
  explicit SequenceNormalizer(const Field& f) {
    const Field list = f["normalizers"];
    for (size_t i = 0; i < list.array().size(); ++i)
      if (auto n = make_normalizer(list[i])) stages_.push_back(std::move(n));
  }
  std::string normalize(std::string text) const override {
    for (const auto& s : stages_) text = s->normalize(std::move(text));
    return text;
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> stages_;
};

// ---- pre-tokenizers

// HF's SplitDelimiterBehavior applied to the pieces `matches` cut `text` into.
enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

void split_by(const std::string& text, const Spans& matches, Behavior behavior, bool invert,
              std::vector<std::string>& out) {
  // Every byte of text, as (span, is_match) in order.
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> parts;
  size_t last = 0;
  for (auto m : matches) {
    if (m.first > last) parts.push_back({{last, m.first}, invert});
    parts.push_back({m, !invert});
    last = m.second;
  }
  if (last < text.size()) parts.push_back({{last, text.size()}, invert});

  Spans spans;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::Removed:
      for (auto& [s, is_match] : parts)
        if (!is_match) spans.push_back(s);
      break;
    case Behavior::Isolated:
      for (auto& p : parts) spans.push_back(p.first);
      break;
    case Behavior::Contiguous:
      for (auto& [s, is_match] : parts) {
        if (is_match == previous_match && !spans.empty()) spans.back().second = s.second;
        else spans.push_back(s);
        previous_match = is_match;
      }
      break;
    case Behavior::MergedWithPrevious:
      for (auto& [s, is_match] : parts) {
        if (is_match && !previous_match && !spans.empty()) spans.back().second = s.second;
        else spans.push_back(s);
        previous_match = is_match;
      }
      break;
    case Behavior::MergedWithNext:
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (it->second && !previous_match && !spans.empty()) spans.back().first = it->first.first;
        else spans.push_back(it->first);
        previous_match = it->second;
      }
      std::reverse(spans.begin(), spans.end());
      break;
  }
  for (auto [b, e] : spans)
    if (e > b) out.emplace_back(text, b, e - b);
}

class SplitPreTokenizer : public PreTokenizer {
 public:
  explicit SplitPreTokenizer(const Field& f) : pattern_(make_pattern(f["pattern"])) {
    const Field b = f["behavior"];
    const std::string& name = b.str();
    if (name == "Removed") behavior_ = Behavior::Removed;
    else if (name == "Isolated") behavior_ = Behavior::Isolated;
    else if (name == "MergedWithPrevious") behavior_ = Behavior::MergedWithPrevious;
    else if (name == "MergedWithNext") behavior_ = Behavior::MergedWithNext;
    else if (name == "Contiguous") behavior_ = Behavior::Contiguous;
    else b.unsupported();
    invert_ = f.flag("invert", false);
  }
  void pre_tokenize(std::vector<std::string>& pieces) const override {
    std::vector<std::string> out;
    Spans matches;
    for (const auto& piece : pieces) {
      matches.clear();
      pattern_.find_all(piece, matches);
      split_by(piece, matches, behavior_, invert_, out);
    }
    pieces.swap(out);
  }

 private:
  Pattern pattern_;
  Behavior behavior_ = Behavior::Isolated;
  bool invert_ = false;
};

// GPT-2's word pattern, which HF's ByteLevel pre-tokenizer uses when use_regex is true.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  explicit ByteLevelPreTokenizer(const Field& f)
      : add_prefix_space_(f.flag("add_prefix_space", true)), use_regex_(f.flag("use_regex", true)) {
    if (use_regex_) regex_ = std::make_unique<Regex>(kGpt2Pattern);
  }
  void pre_tokenize(std::vector<std::string>& pieces) const override {
    const auto& alphabet = ByteLevelAlphabet::get();
    std::vector<std::string> out;
    Spans matches;
    for (auto& piece : pieces) {
      if (add_prefix_space_ && (piece.empty() || piece[0] != ' ')) piece.insert(0, 1, ' ');
      std::vector<std::string> words;
      if (use_regex_) {
        matches.clear();
        regex_->find_all(piece, matches);
        split_by(piece, matches, Behavior::Isolated, false, words);
      } else {
        words.push_back(piece);
      }
      for (const auto& w : words) {
        std::string mapped;
        mapped.reserve(w.size() * 2);
        for (unsigned char c : w) mapped += alphabet.char_of_byte[c];
        out.push_back(std::move(mapped));
      }
    }
    pieces.swap(out);
  }

 private:
  bool add_prefix_space_, use_regex_;
  std::unique_ptr<Regex> regex_;
};

class SequencePreTokenizer : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(const Field& f) {
    const Field list = f["pretokenizers"];
    for (size_t i = 0; i < list.array().size(); ++i)
      if (auto p = make_pre_tokenizer(list[i])) stages_.push_back(std::move(p));
  }
  void pre_tokenize(std::vector<std::string>& pieces) const override {
    for (const auto& s : stages_) s->pre_tokenize(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> stages_;
};

// ---- decoders

class ByteLevelDecoder : public Decoder {
 public:
  std::vector<std::string> decode_chain(std::vector<std::string> tokens, bool lossy) const override {
    const auto& alphabet = ByteLevelAlphabet::get();
    std::string bytes;
    for (const auto& t : tokens) {
      // A token with a character outside the alphabet (an added token) passes through as its UTF-8.
      const size_t before = bytes.size();
      bool mapped = true;
      for (size_t i = 0; i < t.size() && mapped;) {
        const size_t n = utf8_char_len(t[i]);
        uint32_t cp = n == 1 ? static_cast<unsigned char>(t[i]) : static_cast<unsigned char>(t[i]) & (0xFF >> (n + 1));
        for (size_t k = 1; k < n && i + k < t.size(); ++k) cp = cp << 6 | (static_cast<unsigned char>(t[i + k]) & 0x3F);
        auto it = alphabet.byte_of_char.find(cp);
        if (it == alphabet.byte_of_char.end()) mapped = false;
        else bytes += static_cast<char>(it->second);
        i += n;
      }
      if (!mapped) {
        bytes.resize(before);
        bytes += t;
      }
    }
    return {lossy ? utf8_lossy(bytes) : bytes};
  }
};

class ReplaceDecoder : public Decoder {
 public:
  explicit ReplaceDecoder(const Field& f) : pattern_(make_pattern(f["pattern"])), content_(f["content"].str()) {}
  std::vector<std::string> decode_chain(std::vector<std::string> tokens, bool) const override {
    for (auto& t : tokens)
      if (utf8_valid(t)) t = replace_all(pattern_, content_, t);
    return tokens;
  }

 private:
  Pattern pattern_;
  std::string content_;
};

// <0xXX> tokens become bytes; a run of them that is not valid UTF-8 becomes one U+FFFD per byte (HF).
class ByteFallbackDecoder : public Decoder {
 public:
  std::vector<std::string> decode_chain(std::vector<std::string> tokens, bool lossy) const override {
    std::vector<std::string> out;
    std::string run;
    size_t run_tokens = 0;
    auto flush = [&] {
      if (!run_tokens) return;
      if (!lossy || utf8_valid(run)) {
        out.push_back(run);
      } else {
        for (size_t i = 0; i < run_tokens; ++i) out.emplace_back(kReplacementChar);
      }
      run.clear();
      run_tokens = 0;
    };
    for (auto& t : tokens) {
      int byte = -1;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') byte = hex_byte(t[3], t[4]);
      if (byte >= 0) {
        run += static_cast<char>(byte);
        ++run_tokens;
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    return out;
  }

 private:
  static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  static int hex_byte(char hi, char lo) {
    const int h = hex_digit(hi), l = hex_digit(lo);
    return h < 0 || l < 0 ? -1 : h * 16 + l;
  }
};

class FuseDecoder : public Decoder {
 public:
  std::vector<std::string> decode_chain(std::vector<std::string> tokens, bool) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    return {all};
  }
};

class SequenceDecoder : public Decoder {
 public:
  explicit SequenceDecoder(const Field& f) {
    const Field list = f["decoders"];
    for (size_t i = 0; i < list.array().size(); ++i)
      if (auto d = make_decoder(list[i])) stages_.push_back(std::move(d));
  }
  std::vector<std::string> decode_chain(std::vector<std::string> tokens, bool lossy) const override {
    for (const auto& s : stages_) tokens = s->decode_chain(std::move(tokens), lossy);
    return tokens;
  }

 private:
  std::vector<std::unique_ptr<Decoder>> stages_;
};

}  // namespace

const ByteLevelAlphabet& ByteLevelAlphabet::get() {
  static const ByteLevelAlphabet alphabet = [] {
    ByteLevelAlphabet a;
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      const uint32_t cp = printable ? b : next++;
      append_utf8(a.char_of_byte[b], cp);
      a.byte_of_char[cp] = static_cast<uint8_t>(b);
    }
    return a;
  }();
  return alphabet;
}

std::unique_ptr<Normalizer> make_normalizer(const Field& f) {
  if (f.value.is_null()) return nullptr;
  const Field type = f["type"];
  if (type.str() == "Replace") return std::make_unique<ReplaceNormalizer>(f);
  if (type.str() == "Sequence") return std::make_unique<SequenceNormalizer>(f);
  type.unsupported();
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const Field& f) {
  if (f.value.is_null()) return nullptr;
  const Field type = f["type"];
  if (type.str() == "ByteLevel") return std::make_unique<ByteLevelPreTokenizer>(f);
  if (type.str() == "Split") return std::make_unique<SplitPreTokenizer>(f);
  if (type.str() == "Sequence") return std::make_unique<SequencePreTokenizer>(f);
  type.unsupported();
}

std::unique_ptr<Decoder> make_decoder(const Field& f) {
  if (f.value.is_null()) return nullptr;
  const Field type = f["type"];
  if (type.str() == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type.str() == "Replace") return std::make_unique<ReplaceDecoder>(f);
  if (type.str() == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type.str() == "Fuse") return std::make_unique<FuseDecoder>();
  if (type.str() == "Sequence") return std::make_unique<SequenceDecoder>(f);
  type.unsupported();
}

}  // namespace tda::detail
