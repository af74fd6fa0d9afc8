// PCRE2 (UTF + UCP, JIT) for the patterns tokenizer.json declares: HF compiles them with Oniguruma, whose
// \s, \p{L}, \p{N} and lookahead PCRE2's Unicode mode matches.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tda::detail {

class Regex {
 public:
  // Throws std::invalid_argument with PCRE2's message on a bad pattern.
  explicit Regex(const std::string& pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Non-overlapping matches, left to right, as [begin, end) byte offsets. `text` must be valid UTF-8.
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;

 private:
  struct Code;
  std::unique_ptr<Code> code_;
};

// A pattern of tokenizer.json: {"String": s} (literal) or {"Regex": r}.
class Pattern {
 public:
  static Pattern literal(std::string s) { return Pattern(std::move(s), nullptr); }
  static Pattern regex(const std::string& r) { return Pattern({}, std::make_shared<Regex>(r)); }
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;

 private:
  Pattern(std::string lit, std::shared_ptr<Regex> re) : literal_(std::move(lit)), regex_(std::move(re)) {}
  std::string literal_;
  std::shared_ptr<Regex> regex_;
};

}  // namespace tda::detail
