// The pipeline HF's TokenizerImpl runs, assembled from tokenizer.json.
#include "tda/tokenizer.h"

#include <fstream>
#include <sstream>

#include "components.h"
#include "utf8.h"

namespace tda {
namespace detail {

PostProcessor::PostProcessor(const Field& f) {
  const Field type = f["type"];
  if (type.str() != "TemplateProcessing") type.unsupported();
  const Field single = f["single"];
  const Field specials = f["special_tokens"];
  specials.object();
  bool seen_sequence = false;
  for (size_t i = 0; i < single.array().size(); ++i) {
    const Field item = single[i];
    item.object();
    if (item.has("Sequence")) {
      const Field seq_id = item["Sequence"]["id"];
      if (seq_id.str() != "A" || seen_sequence) seq_id.fail("must be the one sequence \"A\" of a single template");
      seen_sequence = true;
    } else if (item.has("SpecialToken")) {
      const Field name = item["SpecialToken"]["id"];
      if (!specials.has(name.str().c_str())) name.fail("= " + name.str() + " is not in " + specials.path);
      const Field ids = specials[name.str().c_str()]["ids"];
      for (size_t k = 0; k < ids.array().size(); ++k) (seen_sequence ? after_ : before_).push_back(ids[k].id());
    } else {
      item.fail("must be a \"Sequence\" or a \"SpecialToken\"");
    }
  }
  if (!seen_sequence) single.fail("has no Sequence");
}

void PostProcessor::apply(std::vector<int32_t>& ids) const {
  ids.insert(ids.begin(), before_.begin(), before_.end());
  ids.insert(ids.end(), after_.begin(), after_.end());
}

struct TokenizerImpl {
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<Bpe> model;
  std::unique_ptr<PostProcessor> post_processor;
  std::unique_ptr<Decoder> decoder;
  std::unique_ptr<AddedVocabulary> added;
  size_t vocab_size = 0;

  void encode_text(std::string_view text, std::vector<int32_t>& ids) const {
    std::vector<AddedVocabulary::Segment> raw, normalized_parts;
    added->split(text, false, raw);
    Pieces pieces;
    for (const auto& seg : raw) {
      if (seg.id >= 0) {
        ids.push_back(seg.id);
        continue;
      }
      bool start_kept = true;
      const std::string normalized =
          normalizer ? normalizer->normalize(std::string(seg.text), &start_kept) : std::string(seg.text);
      normalized_parts.clear();
      added->split(normalized, true, normalized_parts);
      for (const auto& part : normalized_parts) {
        if (part.id >= 0) {
          ids.push_back(part.id);
          continue;
        }
        pieces.text.assign(1, std::string(part.text));
        // HF's offsets into the input, reduced to what Metaspace's prepend_scheme "first" asks of them.
        pieces.first_at_input_start =
            start_kept && seg.text.data() == text.data() && part.text.data() == normalized.data();
        if (pre_tokenizer) pre_tokenizer->pre_tokenize(pieces);
        for (const auto& p : pieces.text) model->tokenize(p, ids);
      }
    }
  }

  std::string decode(const std::vector<int32_t>& ids, bool skip_special, bool lossy) const {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      // HF: the added token's piece, else the model's token; skipped when that string is a special content.
      const std::string* t = nullptr;
      if (const auto* added_token = added->by_id(id)) t = &added_token->piece;
      else t = model->id_to_token(id);
      if (t && !(skip_special && added->is_special_content(*t))) tokens.push_back(*t);
    }
    std::string out;
    if (!decoder) {
      for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
      return out;
    }
    for (const auto& piece : decoder->decode_chain(std::move(tokens), lossy)) out += piece;
    return out;
  }
};

std::unique_ptr<TokenizerImpl> build(const json& doc, const std::string& file) {
  const Field root{doc, "", file};
  root.object();
  auto impl = std::make_unique<TokenizerImpl>();
  for (const char* unused : {"truncation", "padding"})
    if (root.present(unused)) root[unused].fail("must be null: encode() neither truncates nor pads");
  impl->normalizer = make_normalizer(root.has("normalizer") ? root["normalizer"] : Field{json(), "normalizer", file});
  impl->pre_tokenizer =
      make_pre_tokenizer(root.has("pre_tokenizer") ? root["pre_tokenizer"] : Field{json(), "pre_tokenizer", file});
  impl->model = std::make_unique<Bpe>(root["model"]);
  if (root.present("post_processor")) impl->post_processor = std::make_unique<PostProcessor>(root["post_processor"]);
  impl->decoder = make_decoder(root.has("decoder") ? root["decoder"] : Field{json(), "decoder", file});
  const json empty = json::array();
  impl->added = std::make_unique<AddedVocabulary>(
      root.present("added_tokens") ? root["added_tokens"] : Field{empty, "added_tokens", file}, impl->normalizer.get());

  impl->vocab_size = 0;
  for (const auto& t : impl->model->tokens()) impl->vocab_size += !t.empty();
  for (const auto& t : impl->added->tokens()) impl->vocab_size += !impl->model->token_to_id(t.content);
  return impl;
}

}  // namespace detail

Tokenizer::Tokenizer(std::unique_ptr<detail::TokenizerImpl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw TokenizerError(path + ": cannot open the tokenizer file");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw TokenizerError(path + ": cannot read the tokenizer file");
  return from_json(text.str(), path);
}

std::unique_ptr<Tokenizer> Tokenizer::from_json(std::string_view json_text, const std::string& origin) {
  detail::json doc;
  try {
    doc = detail::json::parse(json_text.begin(), json_text.end());
  } catch (const detail::json::parse_error& e) {
    throw TokenizerError(origin + ": not valid JSON (" + e.what() + ")");
  }
  try {
    return std::unique_ptr<Tokenizer>(new Tokenizer(detail::build(doc, origin)));
  } catch (const detail::json::exception& e) {  // a field of an unexpected JSON type deep inside
    throw TokenizerError(origin + ": unexpected content (" + e.what() + ")");
  } catch (const std::bad_alloc&) {
    throw TokenizerError(origin + ": out of memory while building the tokenizer");
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const size_t bad = detail::utf8_invalid_offset(text);
  if (bad != std::string_view::npos)
    throw TokenizerError("encode: the text is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  std::vector<int32_t> ids;
  impl_->encode_text(text, ids);
  if (add_special_tokens && impl_->post_processor) impl_->post_processor->apply(ids);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  return impl_->decode(ids, skip_special_tokens, true);
}

std::string Tokenizer::decode_bytes(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  return impl_->decode(ids, skip_special_tokens, false);
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (auto id = impl_->added->id_of(token)) return id;
  return impl_->model->token_to_id(token);
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (const auto* t = impl_->added->by_id(id)) return t->piece;
  if (const std::string* t = impl_->model->id_to_token(id)) return *t;
  return std::nullopt;
}

size_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

bool Tokenizer::is_special(int32_t id) const {
  const auto* t = impl_->added->by_id(id);
  return t && t->special;
}

DecodeStream::DecodeStream(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

// HF's step_decode_stream: decode the ids since the last emitted prefix, emit what follows that prefix
// once it does not end in U+FFFD, then keep only the ids that produced the new text as the next prefix.
std::optional<std::string> DecodeStream::step(int32_t id) {
  ids_.push_back(id);
  std::string text = tokenizer_.decode(ids_, skip_special_tokens_);
  const auto ends_incomplete = [](const std::string& s) {
    return s.size() >= detail::kReplacementChar.size() &&
           s.compare(s.size() - detail::kReplacementChar.size(), std::string::npos, detail::kReplacementChar) == 0;
  };
  if (text.size() <= prefix_.size() || ends_incomplete(text)) return std::nullopt;
  if (text.compare(0, prefix_.size(), prefix_) != 0)
    throw TokenizerError("DecodeStream: the decoded text no longer starts with the text already emitted");
  std::string new_text = text.substr(prefix_.size());
  const size_t new_prefix_index = ids_.size() - prefix_index_;
  ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(prefix_index_));
  prefix_ = tokenizer_.decode(ids_, skip_special_tokens_);
  prefix_index_ = new_prefix_index;
  return new_text;
}

}  // namespace tda
