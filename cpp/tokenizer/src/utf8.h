// UTF-8 helpers the pipeline needs: validation (encode's input check), the length of one character
// (BPE splits words into characters), and HF's two lossy conversions of raw decoder bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace tda::detail {

// Offset of the first byte that does not start a well-formed UTF-8 sequence, or npos.
size_t utf8_invalid_offset(std::string_view s);
inline bool utf8_valid(std::string_view s) { return utf8_invalid_offset(s) == std::string_view::npos; }
// Byte length of the character led by `lead` in well-formed UTF-8.
inline size_t utf8_char_len(unsigned char lead) {
  return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
}
// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD (as Python's
// bytes.decode("utf-8", "replace")).
std::string utf8_lossy(std::string_view bytes);
void append_utf8(std::string& out, uint32_t codepoint);

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace tda::detail
