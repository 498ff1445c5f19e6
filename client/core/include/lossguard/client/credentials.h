#ifndef LOSSGUARD_CLIENT_CREDENTIALS_H_
#define LOSSGUARD_CLIENT_CREDENTIALS_H_

// How a client reaches a lossguardd that wants a token, TLS, or both
// (lossguardd --auth_config, --tls_cert/--tls_key, --tls_client_ca).

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace grpc {
class Channel;
class ChannelArguments;
class ChannelCredentials;
}  // namespace grpc

namespace lossguard {

struct Credentials {
  // Bearer token (`lossguard token new`); empty: none. Sent as the
  // "authorization" metadata of every call.
  std::string token;
  // TLS: on when any of these is set or `tls` is true. The CA that signed
  // the server's certificate (PEM file; empty: the system's roots), and for
  // mTLS the client's certificate chain and key.
  bool tls = false;
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;

  bool UsesTls() const {
    return tls || !tls_ca_file.empty() || !tls_cert_file.empty() || !tls_key_file.empty();
  }
};

// Fills the token from $LOSSGUARD_TOKEN and the CA from $LOSSGUARD_TLS_CA
// where they are empty.
void CredentialsFromEnvironment(Credentials* c);

// Channel credentials for `c`: InvalidArgument naming the file that cannot
// be read or is not PEM, or a certificate without its key.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFor(
    const Credentials& c);

// A channel to `target` with `c`: TLS as asked, and the token (if any) as
// the "authorization" metadata of every call made on it.
absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateChannel(
    const std::string& target, const Credentials& c, const grpc::ChannelArguments& args);

}  // namespace lossguard

#endif  // LOSSGUARD_CLIENT_CREDENTIALS_H_
