// HF's BPE model: a word's characters (or their <0xXX> byte tokens) merged by rank, lowest first, leftmost
// among equals -- the order of tokenizers' Word::merge_all.
#include <queue>

#include "components.h"
#include "utf8.h"

namespace tda::detail {
namespace {

uint64_t pair_key(int32_t a, int32_t b) { return static_cast<uint64_t>(a) << 32 | static_cast<uint32_t>(b); }

}  // namespace

Bpe::Bpe(const Field& model) {
  const Field type = model["type"];
  if (type.str() != "BPE") type.unsupported();
  if (model.present("dropout")) {
    const Field dropout = model["dropout"];
    if (!dropout.value.is_number() || dropout.value.get<double>() != 0.0) dropout.unsupported();
  }
  byte_fallback_ = model.flag("byte_fallback", false);
  fuse_unk_ = model.flag("fuse_unk", false);
  ignore_merges_ = model.flag("ignore_merges", false);
  if (model.present("continuing_subword_prefix")) continuing_subword_prefix_ = model["continuing_subword_prefix"].str();
  if (model.present("end_of_word_suffix")) end_of_word_suffix_ = model["end_of_word_suffix"].str();
  if (continuing_subword_prefix_ && continuing_subword_prefix_->empty()) continuing_subword_prefix_.reset();
  if (end_of_word_suffix_ && end_of_word_suffix_->empty()) end_of_word_suffix_.reset();

  const Field vocab = model["vocab"];
  int32_t max_id = -1;
  for (const auto& [token, id] : vocab.object().items()) {
    const Field entry{id, vocab.path + "[\"" + token + "\"]", vocab.file};
    max_id = std::max(max_id, entry.id());
  }
  id_to_token_.assign(static_cast<size_t>(max_id + 1), std::string());
  for (const auto& [token, id] : vocab.object().items()) {
    const Field entry{id, vocab.path + "[\"" + token + "\"]", vocab.file};
    const int32_t i = id.get<int32_t>();
    if (token.empty()) entry.fail("is an empty token");
    if (!id_to_token_[i].empty()) entry.fail("repeats id " + std::to_string(i) + " (also " + id_to_token_[i] + ")");
    id_to_token_[i] = token;
  }
  vocab_.reserve(id_to_token_.size());
  for (size_t i = 0; i < id_to_token_.size(); ++i)
    if (!id_to_token_[i].empty()) vocab_.emplace(id_to_token_[i], static_cast<int32_t>(i));

  byte_ids_.fill(-1);
  static const char* hex = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) {
    const std::string name = std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">";
    if (auto id = token_to_id(name)) byte_ids_[b] = *id;
  }

  if (model.present("unk_token")) {
    const Field unk = model["unk_token"];
    unk_id_ = token_to_id(unk.str());
    if (!unk_id_) unk.fail("= " + unk.str() + " is not in model.vocab");
  }

  const Field merges = model["merges"];
  const size_t prefix_len = continuing_subword_prefix_ ? continuing_subword_prefix_->size() : 0;
  merges_.reserve(merges.array().size());
  for (size_t rank = 0; rank < merges.value.size(); ++rank) {
    const Field m = merges[rank];
    std::string a, b;
    if (m.value.is_array() && m.value.size() == 2 && m.value[0].is_string() && m.value[1].is_string()) {
      a = m.value[0].get<std::string>();
      b = m.value[1].get<std::string>();
    } else if (m.value.is_string()) {  // the older "a b" form
      const std::string& s = m.str();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
        m.fail("must be two tokens separated by one space");
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else {
      m.fail("must be a pair of tokens");
    }
    const auto a_id = token_to_id(a), b_id = token_to_id(b);
    if (!a_id || !b_id) m.fail("names a token that is not in model.vocab: " + (a_id ? b : a));
    if (b.size() < prefix_len) m.fail("is shorter than continuing_subword_prefix");
    const auto new_id = token_to_id(a + b.substr(prefix_len));
    if (!new_id) m.fail("merges into a token that is not in model.vocab: " + a + b.substr(prefix_len));
    // Later duplicates win, as in HF (its merge map is collected from the list in order).
    merges_[pair_key(*a_id, *b_id)] = Merge{static_cast<int32_t>(rank), *new_id};
  }
}

std::optional<int32_t> Bpe::token_to_id(std::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* Bpe::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || id_to_token_[id].empty()) return nullptr;
  return &id_to_token_[id];
}

void Bpe::add_char(std::string_view s, size_t byte_len, std::vector<int32_t>& ids, std::vector<uint32_t>& lens,
                   std::optional<std::pair<int32_t, size_t>>& unk) const {
  if (auto id = token_to_id(s)) {
    if (unk) {
      ids.push_back(unk->first);
      lens.push_back(static_cast<uint32_t>(unk->second));
      unk.reset();
    }
    ids.push_back(*id);
    lens.push_back(static_cast<uint32_t>(byte_len));
    return;
  }
  if (byte_fallback_) {
    bool all = true;
    for (unsigned char c : s) all = all && byte_ids_[c] >= 0;
    if (all) {
      for (unsigned char c : s) {
        ids.push_back(byte_ids_[c]);
        lens.push_back(1);
      }
      return;
    }
  }
  if (!unk_id_) return;  // HF drops a character it can neither find nor replace
  if (unk && fuse_unk_) {
    unk->second += byte_len;
  } else {
    if (unk) {
      ids.push_back(unk->first);
      lens.push_back(static_cast<uint32_t>(unk->second));
    }
    unk = std::make_pair(*unk_id_, byte_len);
  }
}

void Bpe::tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto id = token_to_id(word)) {
      out.push_back(*id);
      return;
    }
  }
  std::vector<int32_t> ids;
  std::vector<uint32_t> lens;
  std::optional<std::pair<int32_t, size_t>> unk;
  std::string decorated;
  for (size_t i = 0; i < word.size();) {
    const size_t n = utf8_char_len(static_cast<unsigned char>(word[i]));
    std::string_view s = word.substr(i, n);
    const bool first = i == 0, last = i + n >= word.size();
    if ((!first && continuing_subword_prefix_) || (last && end_of_word_suffix_)) {
      decorated.clear();
      if (!first && continuing_subword_prefix_) decorated += *continuing_subword_prefix_;
      decorated += s;
      if (last && end_of_word_suffix_) decorated += *end_of_word_suffix_;
      s = decorated;
    }
    add_char(s, n, ids, lens, unk);
    i += n;
  }
  if (unk) {
    ids.push_back(unk->first);
    lens.push_back(static_cast<uint32_t>(unk->second));
  }

  // Doubly linked symbols, merged in place; a merged-away symbol has len 0.
  const int n = static_cast<int>(ids.size());
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int32_t rank;
    int pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push = [&](int pos) {
    auto it = merges_.find(pair_key(ids[pos], ids[next[pos]]));
    if (it != merges_.end()) queue.push({it->second.rank, pos, it->second.new_id});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    if (lens[top.pos] == 0 || next[top.pos] < 0) continue;
    const int right = next[top.pos];
    auto it = merges_.find(pair_key(ids[top.pos], ids[right]));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;  // a stale entry
    ids[top.pos] = top.new_id;
    lens[top.pos] += lens[right];
    lens[right] = 0;
    next[top.pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = top.pos;
    if (prev[top.pos] >= 0) push(prev[top.pos]);
    if (next[top.pos] >= 0) push(top.pos);
  }
  for (int i = 0; i < n; ++i)
    if (lens[i]) out.push_back(ids[i]);
}

}  // namespace tda::detail
