#include "components.h"

namespace tda::detail {

void AddedVocabulary::Trie::insert(std::string_view s, int32_t id) {
  int32_t node = 0;
  for (unsigned char c : s) {
    const uint64_t key = static_cast<uint64_t>(node) << 8 | c;
    auto it = edges.find(key);
    if (it == edges.end()) {
      it = edges.emplace(key, static_cast<int32_t>(token_at.size())).first;
      token_at.push_back(-1);
    }
    node = it->second;
  }
  token_at[node] = id;
}

// Length of the longest token starting at text[i] (0 if none), its id in *id.
size_t AddedVocabulary::Trie::longest_at(std::string_view text, size_t i, int32_t* id) const {
  size_t best = 0;
  int32_t node = 0;
  for (size_t k = i; k < text.size(); ++k) {
    auto it = edges.find(static_cast<uint64_t>(node) << 8 | static_cast<unsigned char>(text[k]));
    if (it == edges.end()) break;
    node = it->second;
    if (token_at[node] >= 0) {
      best = k + 1 - i;
      *id = token_at[node];
    }
  }
  return best;
}

AddedVocabulary::AddedVocabulary(const Field& list, const Normalizer* normalizer) {
  for (size_t i = 0; i < list.array().size(); ++i) {
    const Field t = list[i];
    Token token{t["id"].id(), t["content"].str(), t.flag("special", false), false, {}};
    token.normalized = t.flag("normalized", !token.special);  // HF's default
    for (const char* unsupported_flag : {"lstrip", "rstrip", "single_word"})
      if (t.flag(unsupported_flag, false)) t[unsupported_flag].unsupported();
    if (token.content.empty()) continue;  // HF never matches an empty token
    token.piece = token.normalized && normalizer ? normalizer->normalize(token.content) : token.content;
    (token.normalized ? normalized_ : raw_).insert(token.piece, token.id);
    if (token.special) special_contents_.insert(token.content);
    index_of_id_[token.id] = tokens_.size();
    id_of_content_[token.content] = token.id;
    tokens_.push_back(std::move(token));
  }
}

void AddedVocabulary::split(std::string_view text, bool normalized, std::vector<Segment>& out) const {
  const Trie& trie = normalized ? normalized_ : raw_;
  if (trie.edges.empty()) {
    if (!text.empty()) out.push_back({text, -1});
    return;
  }
  size_t last = 0;
  for (size_t i = 0; i < text.size();) {
    int32_t id = -1;
    const size_t len = trie.longest_at(text, i, &id);
    if (!len) {
      ++i;
      continue;
    }
    if (i > last) out.push_back({text.substr(last, i - last), -1});
    out.push_back({{}, id});
    i += len;
    last = i;
  }
  if (last < text.size()) out.push_back({text.substr(last), -1});
}

const AddedVocabulary::Token* AddedVocabulary::by_id(int32_t id) const {
  auto it = index_of_id_.find(id);
  return it == index_of_id_.end() ? nullptr : &tokens_[it->second];
}

std::optional<int32_t> AddedVocabulary::id_of(std::string_view content) const {
  auto it = id_of_content_.find(std::string(content));
  if (it == id_of_content_.end()) return std::nullopt;
  return it->second;
}

}  // namespace tda::detail
