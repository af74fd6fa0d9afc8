// Driver for tests and benchmarks of tda_tokenizer.
//   tda_tokenize TOKENIZER_JSON ids FILE [--no-special]   ids of FILE's text on one line, then the decoded text
//   tda_tokenize TOKENIZER_JSON cases FILE                 one JSON object per input line (see run_cases)
//   tda_tokenize TOKENIZER_JSON bench FILE REPEATS         encode/decode timings of FILE's text, as JSON
//   tda_tokenize TOKENIZER_JSON info [TOKEN...]            vocab_size and token_to_id of each TOKEN, as JSON
// Errors: the TokenizerError message on stderr, exit code 2.
#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tda/tokenizer.h"

using nlohmann::json;

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw tda::TokenizerError(path + ": cannot open");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string hex(const std::string& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

std::string unhex(const std::string& h) {
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out += static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16));
  return out;
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::strict); }

// Each input line is {"hex": TEXT_BYTES, "add_special": bool} (encode), {"ids": [...], "skip": bool}
// (decode) or {"tokens": [...], "of_ids": [...]} (vocabulary). Encode answers {"ids", "decoded",
// "decoded_all"}; decode answers {"text", "bytes_hex", "stream"} where "stream" holds DecodeStream's steps
// ("" for none), or "stream_error" in its place when DecodeStream refuses; vocabulary answers
// {"vocab_size", "ids", "tokens"}: token_to_id of "tokens" and id_to_token of "of_ids", null for an unknown
// one. Failures answer {"error"}.
void run_cases(const tda::Tokenizer& tok, const std::string& path) {
  std::istringstream lines(read_file(path));
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    const json in = json::parse(line);
    json out;
    try {
      if (in.contains("hex")) {
        const auto ids = tok.encode(unhex(in["hex"].get<std::string>()), in.value("add_special", true));
        out["ids"] = ids;
        out["decoded"] = tok.decode(ids, true);
        out["decoded_all"] = tok.decode(ids, false);
      } else if (in.contains("tokens")) {
        json ids = json::array();
        for (const auto& t : in["tokens"]) {
          const auto id = tok.token_to_id(t.get<std::string>());
          ids.push_back(id ? json(*id) : json(nullptr));
        }
        json tokens = json::array();
        for (const auto& id : in.value("of_ids", json::array())) {
          const auto t = tok.id_to_token(id.get<int32_t>());
          tokens.push_back(t ? json(*t) : json(nullptr));
        }
        out["vocab_size"] = tok.vocab_size();
        out["ids"] = ids;
        out["tokens"] = tokens;
      } else {
        const auto ids = in["ids"].get<std::vector<int32_t>>();
        const bool skip = in.value("skip", true);
        out["text"] = tok.decode(ids, skip);
        out["bytes_hex"] = hex(tok.decode_bytes(ids, skip));
        try {  // HF's DecodeStream too refuses some id sequences: the text and bytes above still count
          tda::DecodeStream stream(tok, skip);
          json steps = json::array();
          for (int32_t id : ids) steps.push_back(stream.step(id).value_or(""));
          out["stream"] = steps;
        } catch (const tda::TokenizerError& e) {
          out["stream_error"] = e.what();
        }
      }
    } catch (const tda::TokenizerError& e) {
      out = json{{"error", e.what()}};
    }
    std::cout << dump(out) << "\n";
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: tda_tokenize TOKENIZER_JSON ids|cases|bench|info ...\n";
    return 1;
  }
  try {
    const std::string mode = argv[2];
    const auto t0 = std::chrono::steady_clock::now();
    const auto tok = tda::Tokenizer::from_file(argv[1]);
    const double load_s = seconds_since(t0);
    if (mode == "ids" && argc >= 4) {
      const bool special = !(argc >= 5 && std::string(argv[4]) == "--no-special");
      const auto ids = tok->encode(read_file(argv[3]), special);
      for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
      std::cout << "\n" << tok->decode(ids);
    } else if (mode == "cases" && argc >= 4) {
      run_cases(*tok, argv[3]);
    } else if (mode == "bench" && argc >= 5) {
      const std::string text = read_file(argv[3]);
      const int repeats = std::max(1, std::atoi(argv[4]));
      std::vector<double> encode_s, decode_s;
      std::vector<int32_t> ids;
      for (int r = 0; r < repeats; ++r) {
        auto t = std::chrono::steady_clock::now();
        ids = tok->encode(text, false);
        encode_s.push_back(seconds_since(t));
        t = std::chrono::steady_clock::now();
        const std::string back = tok->decode(ids);
        decode_s.push_back(seconds_since(t));
      }
      std::sort(encode_s.begin(), encode_s.end());
      std::sort(decode_s.begin(), decode_s.end());
      std::cout << dump(json{{"bytes", text.size()}, {"tokens", ids.size()}, {"load_s", load_s},
                             {"encode_s", encode_s}, {"decode_s", decode_s}})
                << "\n";
    } else if (mode == "info") {
      json ids = json::object();
      for (int i = 3; i < argc; ++i) {
        const auto id = tok->token_to_id(argv[i]);
        ids[argv[i]] = id ? json(*id) : json(nullptr);
      }
      std::cout << dump(json{{"vocab_size", tok->vocab_size()}, {"token_to_id", ids}, {"load_s", load_s}}) << "\n";
    } else {
      std::cerr << "tda_tokenize: unknown mode or missing arguments: " << mode << "\n";
      return 1;
    }
  } catch (const tda::TokenizerError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
