#include "server/service/src/http_frontend.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <httplib.h>

#include <chrono>
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "lossguard/v1/lossguard.grpc.pb.h"
#include "server/service/src/assets.h"

namespace lossguard::service {
namespace {

constexpr auto kCallTimeout = std::chrono::seconds(10);

int HttpStatus(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return 200;
    case grpc::StatusCode::NOT_FOUND:
      return 404;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
      return 400;
    case grpc::StatusCode::UNAUTHENTICATED:
      return 401;
    case grpc::StatusCode::PERMISSION_DENIED:
      return 403;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return 429;
    case grpc::StatusCode::UNAVAILABLE:
      return 503;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return 504;
    default:
      return 500;
  }
}

std::string JsonEscape(std::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += absl::StrFormat("\\u%04x", c);
        } else {
          out += c;
        }
    }
  }
  return out;
}

// Whether `s` is well-formed UTF-8 (proto3 strings must be; httplib decodes
// %FF in a path or query into a raw byte).
bool ValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    int n;  // continuation bytes
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      n = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + static_cast<size_t>(n) >= s.size()) return false;
    for (int k = 1; k <= n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + static_cast<size_t>(k)]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((n == 1 && cp < 0x80) ||
        (n == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (n == 3 && (cp < 0x10000 || cp > 0x10FFFF))) {
      return false;  // overlong, a surrogate, or past U+10FFFF
    }
    i += static_cast<size_t>(n) + 1;
  }
  return true;
}

void Error(int status, std::string_view message, httplib::Response& res) {
  res.status = status;
  res.set_content(absl::StrCat("{\"error\": \"", JsonEscape(message), "\"}\n"),
                  "application/json");
}

void Reply(const grpc::Status& s, const google::protobuf::Message& m,
           httplib::Response& res) {
  if (!s.ok()) {
    if (s.error_code() == grpc::StatusCode::UNAUTHENTICATED) {
      res.set_header("WWW-Authenticate", "Bearer");
    }
    Error(HttpStatus(s.error_code()), s.error_message(), res);
    return;
  }
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  std::string text;
  auto st = google::protobuf::util::MessageToJsonString(m, &text, o);
  if (!st.ok()) {
    Error(500, st.ToString(), res);
    return;
  }
  res.set_header("Cache-Control", "no-store");
  res.set_content(text + "\n", "application/json");
}

// The call's deadline, and the caller's token passed on as gRPC metadata:
// /api answers exactly as the gRPC service would answer that token.
void Prepare(const httplib::Request& req, grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() + kCallTimeout);
  if (req.has_header("Authorization")) {
    ctx->AddMetadata("authorization", req.get_header_value("Authorization"));
  }
}

// A query parameter parsed as an integer in [lo, hi]; false (and a 400
// reply) when it is present and not one.
template <typename T>
bool IntParam(const httplib::Request& req, const char* name, T lo, T hi, T* out,
              httplib::Response& res) {
  if (!req.has_param(name)) return true;
  const std::string v = req.get_param_value(name);
  if (!absl::SimpleAtoi(v, out) || *out < lo || *out > hi) {
    Error(400, absl::StrCat(name, " must be an integer from ", lo, " to ", hi),
          res);
    return false;
  }
  return true;
}

}  // namespace

class HttpFrontend::Impl {
 public:
  Impl(std::shared_ptr<grpc::Channel> channel,
       std::function<absl::Status(std::string_view)> authorize_metrics,
       std::function<std::string()> metrics)
      : stub_(v1::LossGuard::NewStub(std::move(channel))),
        authorize_metrics_(std::move(authorize_metrics)),
        metrics_(std::move(metrics)) {}

  void Routes(httplib::Server& s) {
    // Every path and parameter reaches a proto3 string: refuse what is not
    // UTF-8 with a 400 (not a 500 and an error line per request).
    s.set_pre_routing_handler([](const httplib::Request& req, httplib::Response& res) {
      bool ok = ValidUtf8(req.path);
      for (const auto& [k, v] : req.params) ok = ok && ValidUtf8(k) && ValidUtf8(v);
      if (ok) return httplib::Server::HandlerResponse::Unhandled;
      Error(400, "the path or a parameter is not valid UTF-8", res);
      return httplib::Server::HandlerResponse::Handled;
    });
    s.Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("ok\n", "text/plain");
    });
    s.Get("/metrics", [this](const httplib::Request& req, httplib::Response& res) {
      if (authorize_metrics_) {
        absl::Status ok = authorize_metrics_(req.get_header_value("Authorization"));
        if (!ok.ok()) {
          if (ok.code() == absl::StatusCode::kUnauthenticated) {
            res.set_header("WWW-Authenticate", "Bearer");
          }
          Error(HttpStatus(static_cast<grpc::StatusCode>(ok.code())),
                std::string(ok.message()), res);
          return;
        }
      }
      res.set_content(metrics_(), "text/plain; version=0.0.4; charset=utf-8");
    });
    s.Get("/favicon.ico", [](const httplib::Request&, httplib::Response& res) {
      res.status = 204;  // none; spares browsers a 404
    });
    s.Get("/", [](const httplib::Request&, httplib::Response& res) {
      ServeAsset("/index.html", res);
    });
    s.Get(R"(/assets/([A-Za-z0-9._-]+))",
          [](const httplib::Request& req, httplib::Response& res) {
            ServeAsset(absl::StrCat("/assets/", req.matches[1].str()), res);
          });
    s.Get("/api/runs", [this](const httplib::Request& req, httplib::Response& res) {
      ListRuns(req, res);
    });
    s.Get(R"(/api/runs/(.+)/curve)",
          [this](const httplib::Request& req, httplib::Response& res) {
            Curve(req.matches[1].str(), req, res);
          });
    s.Get(R"(/api/runs/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
      grpc::ClientContext ctx;
      Prepare(req, &ctx);
      v1::GetRunHealthRequest r;
      r.set_run_id(req.matches[1].str());
      v1::RunHealth h;
      Reply(stub_->GetRunHealth(&ctx, r, &h), h, res);
    });
  }

 private:
  static void ServeAsset(const std::string& path, httplib::Response& res) {
    for (size_t i = 0; i < kAssetCount; ++i) {
      if (path == kAssets[i].path) {
        res.set_content(reinterpret_cast<const char*>(kAssets[i].data),
                        kAssets[i].size, kAssets[i].content_type);
        return;
      }
    }
    Error(404, absl::StrCat("no asset ", path), res);
  }

  void ListRuns(const httplib::Request& req, httplib::Response& res) {
    v1::ListRunsRequest r;
    r.set_project(req.get_param_value("project"));
    r.set_page_token(req.get_param_value("page_token"));
    int32_t page_size = 1000;
    if (!IntParam<int32_t>(req, "page_size", 1, 1000, &page_size, res)) return;
    r.set_page_size(page_size);
    const std::string states = req.get_param_value("state");
    if (!states.empty()) {
      for (absl::string_view name : absl::StrSplit(states, ',')) {
        v1::RunState st;
        const std::string upper =
            absl::AsciiStrToUpper(std::string(absl::StripAsciiWhitespace(name)));
        if (!v1::RunState_Parse(upper, &st) || st == v1::RUN_STATE_UNSPECIFIED) {
          Error(400,
                absl::StrCat("unknown state \"", std::string(name), "\" (healthy, "
                             "at_risk, unhealthy, finished, detached)"),
                res);
          return;
        }
        r.add_states(st);
      }
    }
    grpc::ClientContext ctx;
    Prepare(req, &ctx);
    v1::ListRunsResponse out;
    Reply(stub_->ListRuns(&ctx, r, &out), out, res);
  }

  void Curve(const std::string& run_id, const httplib::Request& req,
             httplib::Response& res) {
    v1::GetCurveRequest r;
    r.set_run_id(run_id);
    int32_t max_points = 2000;
    int64_t from = 0, to = 0;
    constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
    constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
    if (!IntParam<int32_t>(req, "max_points", 4, 100000, &max_points, res) ||
        !IntParam<int64_t>(req, "from_step", kMin, kMax, &from, res) ||
        !IntParam<int64_t>(req, "to_step", kMin, kMax, &to, res)) {
      return;
    }
    r.set_max_points(max_points);
    r.set_from_step(from);
    r.set_to_step(to);
    grpc::ClientContext ctx;
    Prepare(req, &ctx);
    v1::Curve out;
    Reply(stub_->GetCurve(&ctx, r, &out), out, res);
  }

  std::unique_ptr<v1::LossGuard::Stub> stub_;
  std::function<absl::Status(std::string_view)> authorize_metrics_;
  std::function<std::string()> metrics_;
};

HttpFrontend::HttpFrontend(std::shared_ptr<grpc::Channel> channel,
                           std::function<absl::Status(std::string_view)> authorize_metrics,
                           std::function<std::string()> metrics)
    : impl_(std::make_unique<Impl>(std::move(channel), std::move(authorize_metrics),
                                   std::move(metrics))) {}

HttpFrontend::~HttpFrontend() { Stop(); }

absl::Status HttpFrontend::Start(const std::string& listen, const Tls& tls) {
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos ||
      !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http ", listen, ": expected host:port"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (tls.cert_file.empty()) {
    server_ = std::make_unique<httplib::Server>();
  } else {
    auto ssl = std::make_unique<httplib::SSLServer>(
        tls.cert_file.c_str(), tls.key_file.c_str(),
        tls.client_ca_file.empty() ? nullptr : tls.client_ca_file.c_str());
    if (!ssl->is_valid()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--http ", listen, ": cannot serve HTTPS with --tls_cert ", tls.cert_file,
          " and --tls_key ", tls.key_file,
          tls.client_ca_file.empty() ? "" : " and --tls_client_ca " + tls.client_ca_file));
    }
    server_ = std::move(ssl);
  }
  impl_->Routes(*server_);
  server_->set_keep_alive_timeout(5);
  port_ = port == 0 ? server_->bind_to_any_port(host) :
                      (server_->bind_to_port(host, port) ? port : -1);
  if (port_ <= 0) {
    server_.reset();
    port_ = 0;
    return absl::UnavailableError(absl::StrCat("cannot listen on ", listen, " (HTTP)"));
  }
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  // httplib's stop() does nothing before the listen loop runs: wait for it,
  // so a Stop() right after Start() cannot leave the loop running forever.
  for (int i = 0; i < 5000 && !server_->is_running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return absl::OkStatus();
}

void HttpFrontend::Stop() {
  if (server_ == nullptr) return;
  server_->stop();
  if (thread_.joinable()) thread_.join();
  server_.reset();
}

}  // namespace lossguard::service
