// Hugging Face `tokenizer.json` tokenizers in C++17, token-for-token equal to the `tokenizers` library.
//
// Supported (what SmolLM2, Gemma-3 and the Llama-2 / Mistral sentencepiece conversions declare, plus the
// generic pieces they need):
//   model:          BPE (vocab + merges, byte_fallback, unk_token, fuse_unk, ignore_merges)
//   normalizer:     null | Replace | Prepend | Sequence
//   pre_tokenizer:  null | ByteLevel | Split (String or Regex pattern) | Metaspace (prepend_scheme
//                   always/first/never, split) | Sequence
//   post_processor: null | TemplateProcessing (the "single" template)
//   decoder:        null | ByteLevel | Replace | ByteFallback | Fuse | Strip | Metaspace | Sequence
//   added_tokens:   matched (leftmost-longest) before the model runs, as HF does; lstrip/rstrip/single_word
//                   must be false.
// Anything else raises TokenizerError naming the file and the field, e.g.
//   "tokenizer.json: pre_tokenizer.type = Whitespace is not supported".
//
// Text in and out is UTF-8. encode() rejects input that is not valid UTF-8 (TokenizerError naming the byte
// offset): HF cannot receive such input (a Python str / Rust &str is always valid), so there is no HF
// behaviour to copy, and silently replacing bytes would change the prompt.
//
// decode() returns exactly what HF's Tokenizer.decode returns, including for byte-level / byte-fallback
// pieces that do not form complete UTF-8: ByteLevel decoding replaces each invalid or truncated sequence
// with U+FFFD (Rust's from_utf8_lossy), ByteFallback replaces each byte of an invalid run with U+FFFD.
// A decoded string that ends in U+FFFD therefore may just be waiting for the rest of a character:
// DecodeStream (below) reproduces HF's tokenizers.decoders.DecodeStream, which holds such text back,
// and decode_bytes() gives the raw bytes when a caller wants to do its own buffering.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace tda {

struct TokenizerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
struct TokenizerImpl;
}

class Tokenizer {
 public:
  // Reads and validates the file; throws TokenizerError (naming the file and field) on any problem.
  static std::unique_ptr<Tokenizer> from_file(const std::string& tokenizer_json_path);
  // Same, from the JSON text; `origin` names the source in error messages.
  static std::unique_ptr<Tokenizer> from_json(std::string_view json_text, const std::string& origin);

  // HF Tokenizer.encode(text, add_special_tokens).ids. Throws TokenizerError on invalid UTF-8.
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  // HF Tokenizer.decode(ids, skip_special_tokens). Ids the tokenizer does not know are dropped, as HF does
  // (models often pad the embedding past the vocabulary).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = true) const;
  // The bytes the decoder produces before HF's lossy UTF-8 conversion: byte-level / byte-fallback
  // pieces are raw bytes, so a truncated character stays truncated instead of becoming U+FFFD.
  std::string decode_bytes(const std::vector<int32_t>& ids, bool skip_special_tokens = true) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  // HF id_to_token: for an added token with normalized: true, the normalizer's output (tokenizers >= 0.23).
  std::optional<std::string> id_to_token(int32_t id) const;
  // HF get_vocab_size(with_added_tokens=True): distinct tokens of the model and the added vocabulary.
  size_t vocab_size() const;
  // Whether `id` is an added token marked special (skipped by decode(..., skip_special_tokens=true)).
  bool is_special(int32_t id) const;

  virtual ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

 private:
  explicit Tokenizer(std::unique_ptr<detail::TokenizerImpl> impl);
  std::unique_ptr<detail::TokenizerImpl> impl_;
};

// Incremental detokenization with the semantics of HF tokenizers.decoders.DecodeStream: step() returns the
// new text once it no longer ends in U+FFFD (an incomplete character), else std::nullopt. Concatenating
// the returned pieces gives decode(ids) whenever decode(ids) does not end in U+FFFD.
class DecodeStream {
 public:
  explicit DecodeStream(const Tokenizer& tokenizer, bool skip_special_tokens = true);
  std::optional<std::string> step(int32_t id);

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::vector<int32_t> ids_;
  std::string prefix_;
  size_t prefix_index_ = 0;
};

}  // namespace tda
