#ifndef LOSSGUARD_SERVICE_SRC_HTTP_FRONTEND_H_
#define LOSSGUARD_SERVICE_SRC_HTTP_FRONTEND_H_

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include "absl/status/status.h"

namespace grpc {
class Channel;
}  // namespace grpc
namespace httplib {
class Server;
}  // namespace httplib

namespace lossguard::service {

// lossguardd's HTTP port: the web dashboard (static assets built into the
// binary), a JSON view of the read API under /api, Prometheus /metrics and
// /healthz. /api calls the gRPC service over an in-process channel, so the
// two APIs answer alike (same validation, same errors: NOT_FOUND -> 404,
// INVALID_ARGUMENT -> 400, ...).
//
//   GET /                         the dashboard (runs list; #/run/ID)
//   GET /assets/NAME              its scripts and styles
//   GET /api/runs?project=&state=a,b&page_size=&page_token=
//   GET /api/runs/ID              RunHealth
//   GET /api/runs/ID/curve?max_points=&from_step=&to_step=
//   GET /metrics                  Prometheus text exposition format
//   GET /healthz                  "ok"
//
// Thread-safety: Start and Stop from one thread; requests are served on
// the HTTP library's own thread pool.
class HttpFrontend {
 public:
  // `metrics` renders /metrics, once `authorize_metrics` (given the
  // Authorization header; empty function: no check) says OK; both are called
  // on request threads. /api passes the Authorization header on to the
  // gRPC service as metadata; /healthz and the dashboard's assets are open.
  HttpFrontend(std::shared_ptr<grpc::Channel> channel,
               std::function<absl::Status(std::string_view)> authorize_metrics,
               std::function<std::string()> metrics);
  ~HttpFrontend();  // Stop()

  HttpFrontend(const HttpFrontend&) = delete;
  HttpFrontend& operator=(const HttpFrontend&) = delete;

  // HTTPS: PEM files of the certificate chain and key; with `client_ca`,
  // clients must present a certificate it signed. All empty: plain HTTP.
  struct Tls {
    std::string cert_file;
    std::string key_file;
    std::string client_ca_file;
  };
  // Listens on `listen` (host:port; port 0 picks a free one) and serves in
  // the background. Unavailable when it cannot bind; InvalidArgument when
  // the TLS files do not make a server.
  absl::Status Start(const std::string& listen, const Tls& tls = {});
  int port() const { return port_; }
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace lossguard::service

#endif  // LOSSGUARD_SERVICE_SRC_HTTP_FRONTEND_H_
