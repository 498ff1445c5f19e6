#ifndef LOSSGUARD_AUTH_AUTH_H_
#define LOSSGUARD_AUTH_AUTH_H_

// Bearer tokens per project for lossguardd.
//
// The daemon's auth config (lossguardd --auth_config FILE, JSON) lists the
// tokens it accepts, each stored as the SHA-256 of the token, never the
// token itself:
//
//   {
//     "tokens": [
//       {"name": "vision-trainers", "sha256": "<64 hex digits>",
//        "project": "vision", "access": "write"},
//       {"name": "oncall", "sha256": "<64 hex digits>",
//        "project": "*", "access": "read"}
//     ]
//   }
//
// A "write" token may attach, stream and steer the runs of its project and
// read them; a "read" token may only read. Project "*" means every project.
// `lossguard token new --project P` makes a token and prints its config
// entry. Tokens are 256 random bits, so one SHA-256 is enough to keep a
// stolen config file from giving them away (no salt or slow hash needed,
// unlike for passwords), and hashes are compared in constant time.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lossguard::auth {

enum class Access { kRead, kWrite };

struct TokenEntry {
  std::string name;     // who holds it, for logs and limits
  std::string sha256;   // lowercase hex of SHA-256(token)
  std::string project;  // "*": every project
  Access access = Access::kRead;
};

struct AuthConfig {
  std::vector<TokenEntry> tokens;
};

// Reads and checks an auth config. InvalidArgument naming the file and the
// line (JSON syntax) or the entry and field at fault; NotFound when the
// file cannot be read.
absl::StatusOr<AuthConfig> LoadAuthConfig(const std::string& path);
absl::StatusOr<AuthConfig> ParseAuthConfig(std::string_view json,
                                           std::string_view origin);

// Lowercase hex SHA-256 of `data`.
std::string Sha256Hex(std::string_view data);
// A new token: "lg_" and 43 base64url characters of 256 random bits
// (OpenSSL's RAND_bytes).
std::string NewToken();

// Who is calling.
struct Principal {
  std::string name;
  std::string project;  // "*": every project
  Access access = Access::kRead;

  bool CanRead(std::string_view run_project) const;
  bool CanWrite(std::string_view run_project) const;
};

// Thread-safety: immutable after construction; safe from any thread.
class Authenticator {
 public:
  explicit Authenticator(AuthConfig config);

  // The principal for an "authorization" header or metadata value
  // ("Bearer TOKEN"). Unauthenticated when it is missing, malformed or
  // names no known token. The returned pointer lives as long as this.
  absl::StatusOr<const Principal*> Authenticate(
      std::string_view authorization) const;

  const AuthConfig& config() const { return config_; }

 private:
  struct Entry {
    unsigned char hash[32];
    Principal principal;
  };
  AuthConfig config_;
  std::vector<Entry> entries_;
};

}  // namespace lossguard::auth

#endif  // LOSSGUARD_AUTH_AUTH_H_
