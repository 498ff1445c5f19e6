#include "lossguard/client/credentials.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/client_interceptor.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace lossguard {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  if (in) ss << in.rdbuf();
  if (!in || ss.str().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, ": cannot read it"));
  }
  if (ss.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, ": not a PEM file"));
  }
  return ss.str();
}

// Puts "authorization: Bearer TOKEN" in every call's initial metadata (call
// credentials would do it only on TLS channels; lossguardd on loopback may
// want a token over plaintext).
class TokenInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit TokenInterceptor(const std::string* value) : value_(value) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({"authorization", *value_});
    }
    methods->Proceed();
  }

 private:
  const std::string* value_;
};

class TokenInterceptorFactory
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit TokenInterceptorFactory(std::string token)
      : value_(absl::StrCat("Bearer ", token)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo*) override {
    return new TokenInterceptor(&value_);
  }

 private:
  const std::string value_;
};

}  // namespace

void CredentialsFromEnvironment(Credentials* c) {
  if (c->token.empty()) {
    if (const char* t = std::getenv("LOSSGUARD_TOKEN")) c->token = t;
  }
  if (c->tls_ca_file.empty()) {
    if (const char* ca = std::getenv("LOSSGUARD_TLS_CA")) c->tls_ca_file = ca;
  }
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFor(
    const Credentials& c) {
  if (!c.UsesTls()) return grpc::InsecureChannelCredentials();
  if (c.tls_cert_file.empty() != c.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate needs its key and the key its certificate (--tls_cert "
        "and --tls_key)");
  }
  grpc::SslCredentialsOptions ssl;
  if (!c.tls_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadPem(c.tls_ca_file, "--tls_ca");
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
  }
  if (!c.tls_cert_file.empty()) {
    absl::StatusOr<std::string> cert = ReadPem(c.tls_cert_file, "--tls_cert");
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadPem(c.tls_key_file, "--tls_key");
    if (!key.ok()) return key.status();
    ssl.pem_cert_chain = *cert;
    ssl.pem_private_key = *key;
  }
  return grpc::SslCredentials(ssl);
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateChannel(
    const std::string& target, const Credentials& c, const grpc::ChannelArguments& args) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds = ChannelCredentialsFor(c);
  if (!creds.ok()) return creds.status();
  if (c.token.empty()) return grpc::CreateCustomChannel(target, *creds, args);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>>
      interceptors;
  interceptors.push_back(std::make_unique<TokenInterceptorFactory>(c.token));
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, *creds, args,
                                                                 std::move(interceptors));
}

}  // namespace lossguard
