// The stages of an HF tokenizer pipeline, each built from its tokenizer.json section:
//   added tokens -> normalizer -> pre-tokenizer -> model (BPE) -> post-processor;  ids -> decoder.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "json_fields.h"
#include "regex.h"

namespace tda::detail {

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  // `start_kept`, when given, is cleared if the output's first character no longer stands for the input's
  // first one (HF's alignments: a Replace deleted it), which Metaspace's prepend_scheme "first" tells apart.
  virtual std::string normalize(std::string text, bool* start_kept = nullptr) const = 0;
};
std::unique_ptr<Normalizer> make_normalizer(const Field& f);  // nullptr for null

// The pieces one normalized segment is split into (HF's PreTokenizedString). HF tracks each piece's offsets;
// the pipeline needs one fact from them: whether the first piece starts at byte 0 of the input text, which
// decides Metaspace's prepend_scheme "first".
struct Pieces {
  std::vector<std::string> text;
  bool first_at_input_start = false;
};

// Splits each piece further.
class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void pre_tokenize(Pieces& pieces) const = 0;
};
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const Field& f);  // nullptr for null

// HF's ByteLevel alphabet: every byte as a printable character (GPT-2's bytes_to_unicode).
struct ByteLevelAlphabet {
  std::array<std::string, 256> char_of_byte;  // UTF-8 of the character standing for each byte
  std::unordered_map<uint32_t, uint8_t> byte_of_char;
  static const ByteLevelAlphabet& get();
};

// The tokens' byte sequence and how HF turns it into text; `lossy` = false keeps raw bytes.
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual std::vector<std::string> decode_chain(std::vector<std::string> tokens, bool lossy) const = 0;
};
std::unique_ptr<Decoder> make_decoder(const Field& f);  // nullptr for null

class Bpe {
 public:
  explicit Bpe(const Field& model);
  void tokenize(std::string_view word, std::vector<int32_t>& out) const;
  std::optional<int32_t> token_to_id(std::string_view token) const;
  const std::string* id_to_token(int32_t id) const;
  const std::vector<std::string>& tokens() const { return id_to_token_; }

 private:
  struct PairHash {
    size_t operator()(uint64_t k) const { return std::hash<uint64_t>()(k * 0x9E3779B97F4A7C15ull); }
  };
  struct Merge {
    int32_t rank, new_id;
  };
  void add_char(std::string_view s, size_t byte_len, std::vector<int32_t>& ids, std::vector<uint32_t>& lens,
                std::optional<std::pair<int32_t, size_t>>& unk) const;

  std::vector<std::string> id_to_token_;  // "" for ids the vocab skips; views below point into it
  std::unordered_map<std::string_view, int32_t> vocab_;
  std::unordered_map<uint64_t, Merge, PairHash> merges_;
  std::array<int32_t, 256> byte_ids_{};         // <0xXX> tokens for byte_fallback, -1 where absent
  std::array<int32_t, 256> single_byte_ids_{};  // the token that is this one (ASCII) byte: a fast path
  std::optional<int32_t> unk_id_;
  std::optional<std::string> continuing_subword_prefix_, end_of_word_suffix_;
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
};

// TemplateProcessing's "single" template: ids before and after the sequence.
class PostProcessor {
 public:
  explicit PostProcessor(const Field& f);
  void apply(std::vector<int32_t>& ids) const;

 private:
  std::vector<int32_t> before_, after_;
};

// Added tokens, matched leftmost-longest in the raw text (normalized: false) or in the normalized text
// (normalized: true), as HF's AddedVocabulary does.
class AddedVocabulary {
 public:
  struct Token {
    int32_t id;
    std::string content;
    bool special, normalized;
    // What HF's decode and id_to_token give for it: since tokenizers 0.23 the normalizer's output for a
    // normalized token (the form its trie matches), else the content.
    std::string piece;
  };
  struct Segment {
    std::string_view text;  // empty for a token
    int32_t id;             // -1 for text
  };
  AddedVocabulary(const Field& list, const Normalizer* normalizer);
  // Splits `text` at the raw (normalized = false) or the normalized tokens.
  void split(std::string_view text, bool normalized, std::vector<Segment>& out) const;
  const Token* by_id(int32_t id) const;
  // HF's decode(skip_special_tokens) drops a token whose string is the content of a special added token; a
  // special normalized token whose normalized form differs is therefore kept, as in HF.
  bool is_special_content(const std::string& s) const { return special_contents_.count(s) > 0; }
  std::optional<int32_t> id_of(std::string_view content) const;
  const std::vector<Token>& tokens() const { return tokens_; }

 private:
  struct Trie {
    std::unordered_map<uint64_t, int32_t> edges;  // (node << 8 | byte) -> node
    std::vector<int32_t> token_at{-1};            // node -> token id ending there, or -1
    void insert(std::string_view s, int32_t id);
    size_t longest_at(std::string_view text, size_t i, int32_t* id) const;
  };
  std::vector<Token> tokens_;
  std::unordered_map<int32_t, size_t> index_of_id_;
  std::unordered_map<std::string, int32_t> id_of_content_;
  std::unordered_set<std::string> special_contents_;
  Trie raw_, normalized_;
};

}  // namespace tda::detail
