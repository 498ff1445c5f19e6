#include "lossguard/auth/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace lossguard::auth {
namespace {

bool Sha256(std::string_view data, unsigned char out[32]) {
  unsigned int len = 0;
  return EVP_Digest(data.data(), data.size(), out, &len, EVP_sha256(), nullptr) == 1 &&
         len == 32;
}

bool FromHex(std::string_view hex, unsigned char out[32]) {
  if (hex.size() != 64) return false;
  for (size_t i = 0; i < 32; ++i) {
    int v = 0;
    for (int k = 0; k < 2; ++k) {
      const char c = hex[2 * i + k];
      int d;
      if (c >= '0' && c <= '9') {
        d = c - '0';
      } else if (c >= 'a' && c <= 'f') {
        d = c - 'a' + 10;
      } else if (c >= 'A' && c <= 'F') {
        d = c - 'A' + 10;
      } else {
        return false;
      }
      v = v * 16 + d;
    }
    out[i] = static_cast<unsigned char>(v);
  }
  return true;
}

}  // namespace

std::string Sha256Hex(std::string_view data) {
  unsigned char h[32];
  if (!Sha256(data, h)) return "";
  std::string out;
  out.reserve(64);
  static const char kHex[] = "0123456789abcdef";
  for (unsigned char c : h) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out;
}

std::string NewToken() {
  unsigned char bytes[32];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) return "";
  return absl::StrCat(
      "lg_", absl::WebSafeBase64Escape(std::string(
                 reinterpret_cast<const char*>(bytes), sizeof(bytes))));
}

absl::StatusOr<AuthConfig> ParseAuthConfig(std::string_view text,
                                           std::string_view origin) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(origin), ": ", e.what()));
  }
  auto bad = [&](const std::string& where, const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(origin), ": ", where, ": ", why));
  };
  if (!j.is_object()) return bad("top level", "expected a JSON object");
  AuthConfig config;
  for (const auto& [key, value] : j.items()) {
    if (key != "tokens") return bad(key, "unknown field");
    if (!value.is_array()) return bad("tokens", "expected an array");
  }
  if (!j.contains("tokens") || j["tokens"].empty()) {
    return bad("tokens", "at least one token is needed (no token: run without --auth_config)");
  }
  int i = 0;
  for (const auto& t : j["tokens"]) {
    const std::string where = absl::StrCat("tokens[", i++, "]");
    if (!t.is_object()) return bad(where, "expected an object");
    TokenEntry e;
    for (const auto& [key, value] : t.items()) {
      if (!value.is_string()) return bad(absl::StrCat(where, ".", key), "expected a string");
      const std::string v = value.get<std::string>();
      if (key == "name") {
        e.name = v;
      } else if (key == "sha256") {
        e.sha256 = absl::AsciiStrToLower(v);
      } else if (key == "project") {
        e.project = v;
      } else if (key == "access") {
        if (v == "read") {
          e.access = Access::kRead;
        } else if (v == "write") {
          e.access = Access::kWrite;
        } else {
          return bad(absl::StrCat(where, ".access"), "must be \"read\" or \"write\"");
        }
      } else {
        return bad(absl::StrCat(where, ".", key), "unknown field");
      }
    }
    unsigned char h[32];
    if (!FromHex(e.sha256, h)) {
      return bad(absl::StrCat(where, ".sha256"),
                 "expected 64 hex digits, the SHA-256 of the token (lossguard token new "
                 "prints it)");
    }
    if (e.name.empty()) return bad(absl::StrCat(where, ".name"), "missing");
    if (e.project.empty()) {
      return bad(absl::StrCat(where, ".project"), "missing (\"*\" for every project)");
    }
    if (!t.contains("access")) {
      return bad(absl::StrCat(where, ".access"), "missing (\"read\" or \"write\")");
    }
    for (const TokenEntry& other : config.tokens) {
      if (other.sha256 == e.sha256) {
        return bad(absl::StrCat(where, ".sha256"),
                   absl::StrCat("the same token as \"", other.name, "\""));
      }
    }
    config.tokens.push_back(std::move(e));
  }
  return config;
}

absl::StatusOr<AuthConfig> LoadAuthConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open the auth config"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseAuthConfig(ss.str(), path);
}

bool Principal::CanRead(std::string_view run_project) const {
  return project == "*" || project == run_project;
}

bool Principal::CanWrite(std::string_view run_project) const {
  return access == Access::kWrite && CanRead(run_project);
}

Authenticator::Authenticator(AuthConfig config) : config_(std::move(config)) {
  for (const TokenEntry& t : config_.tokens) {
    Entry e;
    FromHex(t.sha256, e.hash);
    e.principal = Principal{.name = t.name, .project = t.project, .access = t.access};
    entries_.push_back(std::move(e));
  }
}

absl::StatusOr<const Principal*> Authenticator::Authenticate(
    std::string_view authorization) const {
  if (authorization.empty()) {
    return absl::UnauthenticatedError(
        "this lossguardd needs a token: authorization: Bearer TOKEN (--token or "
        "$LOSSGUARD_TOKEN)");
  }
  constexpr std::string_view kBearer = "Bearer ";
  if (authorization.size() <= kBearer.size() ||
      !absl::EqualsIgnoreCase(std::string(authorization.substr(0, kBearer.size())),
                              std::string(kBearer))) {
    return absl::UnauthenticatedError("authorization must be \"Bearer TOKEN\"");
  }
  unsigned char h[32];
  const std::string token(
      absl::StripAsciiWhitespace(std::string(authorization.substr(kBearer.size()))));
  if (!Sha256(token, h)) {
    return absl::InternalError("SHA-256 failed");
  }
  // Every entry is compared, in constant time, whatever matches.
  const Principal* found = nullptr;
  for (const Entry& e : entries_) {
    if (CRYPTO_memcmp(e.hash, h, sizeof(h)) == 0) found = &e.principal;
  }
  if (found == nullptr) return absl::UnauthenticatedError("unknown token");
  return found;
}

}  // namespace lossguard::auth
