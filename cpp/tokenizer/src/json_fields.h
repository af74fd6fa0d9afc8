// Typed reads of tokenizer.json fields whose errors name the file and the field path.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "tda/tokenizer.h"

namespace tda::detail {

using json = nlohmann::json;

// One node of the document and where it is: "model.merges[12]".
struct Field {
  const json& value;
  std::string path;
  const std::string& file;

  [[noreturn]] void fail(const std::string& problem) const {
    throw TokenizerError(file + ": " + path + " " + problem);
  }
  bool has(const char* key) const { return value.is_object() && value.contains(key); }
  // A key that may be absent or null.
  bool present(const char* key) const { return has(key) && !value.at(key).is_null(); }
  Field operator[](const char* key) const {
    if (!value.is_object()) fail("must be an object");
    if (!value.contains(key)) Field{value, child(key), file}.fail("is missing");
    return Field{value.at(key), child(key), file};
  }
  Field operator[](size_t i) const { return Field{value.at(i), path + "[" + std::to_string(i) + "]", file}; }
  std::string child(const char* key) const { return path.empty() ? key : path + "." + key; }

  const json& object() const {
    if (!value.is_object()) fail("must be an object");
    return value;
  }
  const json& array() const {
    if (!value.is_array()) fail("must be an array");
    return value;
  }
  const std::string& str() const {
    if (!value.is_string()) fail("must be a string");
    return value.get_ref<const std::string&>();
  }
  bool boolean() const {
    if (!value.is_boolean()) fail("must be true or false");
    return value.get<bool>();
  }
  int32_t id() const {
    if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() > INT32_MAX)
      fail("must be a token id (an integer in [0, 2^31))");
    return static_cast<int32_t>(value.get<int64_t>());
  }
  // An optional boolean: absent or null reads as `fallback`.
  bool flag(const char* key, bool fallback) const {
    return present(key) ? (*this)[key].boolean() : fallback;
  }
  [[noreturn]] void unsupported() const {
    std::string shown = value.is_string() ? value.get<std::string>() : value.dump();
    throw TokenizerError(file + ": " + path + " = " + shown + " is not supported");
  }
};

}  // namespace tda::detail
