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

// The one character a field names (Metaspace's replacement, Strip's content), as UTF-8.
std::string one_char(const Field& f) {
  const std::string& s = f.str();
  if (s.empty() || !utf8_valid(s) || utf8_char_len(static_cast<unsigned char>(s[0])) != s.size())
    f.fail("must be a single character");
  return s;
}

size_t count(const Field& f) {
  if (!f.value.is_number_unsigned() && !(f.value.is_number_integer() && f.value.get<int64_t>() >= 0))
    f.fail("must be a non-negative integer");
  return f.value.get<size_t>();
}

bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

// `start_kept` as Normalizer::normalize: cleared when a match at the start is deleted, so the output begins
// with a later character (a replacement's characters stand for the text they replace, as in HF).
std::string replace_all(const Pattern& pattern, const std::string& content, const std::string& text,
                        bool* start_kept = nullptr) {
  Spans spans;
  pattern.find_all(text, spans);
  if (spans.empty()) return text;
  if (start_kept && spans[0].first == 0 && spans[0].second > 0 && content.empty()) *start_kept = false;
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

// Prepends its string to every non-empty segment (Llama-2's "▁" before the text, and after each added token).
class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(const Field& f) : prepend_(f["prepend"].str()) {}
  std::string normalize(std::string text, bool* = nullptr) const override {
    if (!text.empty()) text.insert(0, prepend_);
    return text;
  }

 private:
  std::string prepend_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  explicit ReplaceNormalizer(const Field& f) : pattern_(make_pattern(f["pattern"])), content_(f["content"].str()) {}
  std::string normalize(std::string text, bool* start_kept = nullptr) const override {
    return replace_all(pattern_, content_, text, start_kept);
  }

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
  std::string normalize(std::string text, bool* start_kept = nullptr) const override {
    for (const auto& s : stages_) text = s->normalize(std::move(text), start_kept);
    return text;
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> stages_;
};

// ---- pre-tokenizers

// HF's SplitDelimiterBehavior applied to the pieces `matches` cut `text` into.
enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// Returns whether the first piece it appends starts at text[0] (false when it appends none).
bool split_by(const std::string& text, const Spans& matches, Behavior behavior, bool invert,
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
  bool first_at_start = false, first = true;
  for (auto [b, e] : spans) {
    if (e <= b) continue;  // HF drops empty pieces
    if (first) first_at_start = b == 0, first = false;
    out.emplace_back(text, b, e - b);
  }
  return first_at_start;
}

// Splits every piece with `split_one(piece, out)`, which returns split_by's answer, keeping track of whether
// the first piece still starts at the input's first byte.
template <class SplitOne>
void split_each(Pieces& pieces, SplitOne split_one) {
  std::vector<std::string> out;
  for (size_t i = 0; i < pieces.text.size(); ++i) {
    const bool first_at_start = split_one(pieces.text[i], out);
    if (i == 0) pieces.first_at_input_start = pieces.first_at_input_start && first_at_start;
  }
  if (pieces.text.empty()) pieces.first_at_input_start = false;
  pieces.text.swap(out);
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
  void pre_tokenize(Pieces& pieces) const override {
    Spans matches;
    split_each(pieces, [&](const std::string& piece, std::vector<std::string>& out) {
      matches.clear();
      pattern_.find_all(piece, matches);
      return split_by(piece, matches, behavior_, invert_, out);
    });
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
  void pre_tokenize(Pieces& pieces) const override {
    const auto& alphabet = ByteLevelAlphabet::get();
    Spans matches;
    std::vector<std::string> words;
    split_each(pieces, [&](std::string& piece, std::vector<std::string>& out) {
      if (add_prefix_space_ && (piece.empty() || piece[0] != ' ')) piece.insert(0, 1, ' ');
      words.clear();
      bool first_at_start = !piece.empty();
      if (use_regex_) {
        matches.clear();
        regex_->find_all(piece, matches);
        first_at_start = split_by(piece, matches, Behavior::Isolated, false, words);
      } else if (!piece.empty()) {
        words.push_back(piece);
      }
      for (const auto& w : words) {
        std::string mapped;
        mapped.reserve(w.size() * 2);
        for (unsigned char c : w) mapped += alphabet.char_of_byte[c];
        out.push_back(std::move(mapped));
      }
      return first_at_start;
    });
  }

 private:
  bool add_prefix_space_, use_regex_;
  std::unique_ptr<Regex> regex_;
};

// HF's PrependScheme, read as HF reads it: "prepend_scheme" (default "always"), and the older
// "add_prefix_space": false, which means "never" and is refused beside any other declared scheme.
enum class PrependScheme { Always, First, Never };

PrependScheme read_prepend_scheme(const Field& f) {
  PrependScheme scheme = PrependScheme::Always;
  if (f.present("prepend_scheme")) {
    const Field s = f["prepend_scheme"];
    if (s.str() == "always") scheme = PrependScheme::Always;
    else if (s.str() == "first") scheme = PrependScheme::First;
    else if (s.str() == "never") scheme = PrependScheme::Never;
    else s.unsupported();
  }
  if (f.present("add_prefix_space") && !f["add_prefix_space"].boolean()) {
    if (scheme != PrependScheme::Never)
      f["add_prefix_space"].fail("= false contradicts prepend_scheme (absent means \"always\"), as HF refuses it");
    scheme = PrependScheme::Never;
  }
  return scheme;
}

// SentencePiece's whitespace rule: spaces become the replacement character ("▁"), which is prepended to
// every piece (always) or only to the one at the start of the input (first: not after an added token), then
// pieces are split before each replacement character when `split` is true (the default).
class MetaspacePreTokenizer : public PreTokenizer {
 public:
  explicit MetaspacePreTokenizer(const Field& f)
      : replacement_(one_char(f["replacement"])),
        scheme_(read_prepend_scheme(f)),
        split_(f.flag("split", true)),
        replacement_pattern_(Pattern::literal(replacement_)) {}
  void pre_tokenize(Pieces& pieces) const override {
    Spans matches;
    size_t index = 0;
    const bool input_start = pieces.first_at_input_start;
    split_each(pieces, [&](const std::string& original, std::vector<std::string>& out) {
      std::string piece = replace_all(space_, replacement_, original);
      const bool at_input_start = index++ == 0 && input_start;
      const bool prepend = scheme_ == PrependScheme::Always || (scheme_ == PrependScheme::First && at_input_start);
      if (prepend && !piece.empty() && !starts_with(piece, replacement_)) piece.insert(0, replacement_);
      if (!split_) {
        if (piece.empty()) return false;
        out.push_back(std::move(piece));
        return true;
      }
      matches.clear();
      replacement_pattern_.find_all(piece, matches);
      return split_by(piece, matches, Behavior::MergedWithNext, false, out);
    });
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
  Pattern replacement_pattern_, space_ = Pattern::literal(" ");
};

class SequencePreTokenizer : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(const Field& f) {
    const Field list = f["pretokenizers"];
    for (size_t i = 0; i < list.array().size(); ++i)
      if (auto p = make_pre_tokenizer(list[i])) stages_.push_back(std::move(p));
  }
  void pre_tokenize(Pieces& pieces) const override {
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

// Removes up to `start` leading and `stop` trailing `content` characters from each token (HF's Strip; the
// Llama-2 sequence ends with Strip(" ", 1, 0): the space that stood for the prepended "▁").
class StripDecoder : public Decoder {
 public:
  explicit StripDecoder(const Field& f)
      : content_(one_char(f["content"])), start_(count(f["start"])), stop_(count(f["stop"])) {}
  std::vector<std::string> decode_chain(std::vector<std::string> tokens, bool) const override {
    const size_t n = content_.size();
    for (auto& t : tokens) {
      size_t begin = 0, end = t.size();
      for (size_t k = 0; k < start_ && t.compare(begin, n, content_) == 0; ++k) begin += n;
      for (size_t k = 0; k < stop_ && end >= n && t.compare(end - n, n, content_) == 0; ++k) end -= n;
      t = end > begin ? t.substr(begin, end - begin) : std::string();  // HF panics where both ends overlap
    }
    return tokens;
  }

 private:
  std::string content_;
  size_t start_, stop_;
};

// The replacement character becomes a space; in the first token it is dropped (every one of them, as HF
// does) unless prepend_scheme is "never".
class MetaspaceDecoder : public Decoder {
 public:
  explicit MetaspaceDecoder(const Field& f)
      : replacement_(Pattern::literal(one_char(f["replacement"]))), scheme_(read_prepend_scheme(f)) {}
  std::vector<std::string> decode_chain(std::vector<std::string> tokens, bool) const override {
    for (size_t i = 0; i < tokens.size(); ++i)
      tokens[i] = replace_all(replacement_, i == 0 && scheme_ != PrependScheme::Never ? "" : " ", tokens[i]);
    return tokens;
  }

 private:
  Pattern replacement_;
  PrependScheme scheme_;
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
  if (type.str() == "Prepend") return std::make_unique<PrependNormalizer>(f);
  if (type.str() == "Sequence") return std::make_unique<SequenceNormalizer>(f);
  type.unsupported();
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const Field& f) {
  if (f.value.is_null()) return nullptr;
  const Field type = f["type"];
  if (type.str() == "ByteLevel") return std::make_unique<ByteLevelPreTokenizer>(f);
  if (type.str() == "Split") return std::make_unique<SplitPreTokenizer>(f);
  if (type.str() == "Metaspace") return std::make_unique<MetaspacePreTokenizer>(f);
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
  if (type.str() == "Strip") return std::make_unique<StripDecoder>(f);
  if (type.str() == "Metaspace") return std::make_unique<MetaspaceDecoder>(f);
  if (type.str() == "Sequence") return std::make_unique<SequenceDecoder>(f);
  type.unsupported();
}

}  // namespace tda::detail
