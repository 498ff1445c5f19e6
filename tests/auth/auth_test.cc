// Tokens per project, TLS and mTLS, and the per-client and per-project
// limits: the auth library alone, then a real lossguardd (in process, over
// loopback gRPC and HTTP) configured with them. Certificates are made in the
// test with the openssl command.

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "lossguard/auth/auth.h"
#include "lossguard/client/client.h"
#include "lossguard/client/credentials.h"
#include "lossguard/service/service.h"
#include "lossguard/storage/run_store.h"
#include "lossguard/v1/lossguard.grpc.pb.h"

namespace lossguard {
namespace {

namespace v1 = ::lossguard::v1;
using ::testing::HasSubstr;

constexpr auto kDeadline = std::chrono::seconds(30);

// ------------------------------------------------------------ the library

TEST(AuthConfigTest, ParsesTokensAndRefusesMistakesNamingFileAndField) {
  const std::string h = auth::Sha256Hex("x");
  absl::StatusOr<auth::AuthConfig> ok = auth::ParseAuthConfig(
      absl::StrCat(R"({"tokens": [{"name": "a", "sha256": ")", h,
                   R"(", "project": "vision", "access": "write"}]})"),
      "auth.json");
  ASSERT_TRUE(ok.ok()) << ok.status();
  ASSERT_EQ(ok->tokens.size(), 1u);
  EXPECT_EQ(ok->tokens[0].project, "vision");
  EXPECT_EQ(ok->tokens[0].access, auth::Access::kWrite);

  struct Case {
    std::string json;
    std::string says;
  };
  const std::vector<Case> bad = {
      {"{\"tokens\": [\n{\"name\": \"a\",,}]}", "auth.json: [json.exception.parse_error"},
      {"{\"tokens\": [\n{\"name\": \"a\",,}]}", "line 2"},
      {"[]", "top level: expected a JSON object"},
      {"{\"tokenz\": []}", "tokenz: unknown field"},
      {"{\"tokens\": []}", "at least one token"},
      {R"({"tokens": [{"name": "a", "sha256": "abc", "project": "p", "access": "read"}]})",
       "tokens[0].sha256: expected 64 hex digits"},
      {absl::StrCat(R"({"tokens": [{"name": "a", "sha256": ")", h,
                    R"(", "access": "read"}]})"),
       "tokens[0].project: missing"},
      {absl::StrCat(R"({"tokens": [{"name": "a", "sha256": ")", h,
                    R"(", "project": "p", "access": "admin"}]})"),
       "tokens[0].access: must be \"read\" or \"write\""},
      {absl::StrCat(R"({"tokens": [{"name": "a", "sha256": ")", h,
                    R"(", "project": "p"}]})"),
       "tokens[0].access: missing"},
      {absl::StrCat(R"({"tokens": [{"name": "a", "sha256": ")", h,
                    R"(", "project": "p", "access": "read"}, {"name": "b", "sha256": ")", h,
                    R"(", "project": "q", "access": "read"}]})"),
       "tokens[1].sha256: the same token as \"a\""},
      {absl::StrCat(R"({"tokens": [{"name": "a", "sha256": ")", h,
                    R"(", "project": "p", "access": "read", "token": "plain"}]})"),
       "tokens[0].token: unknown field"},
  };
  for (const Case& c : bad) {
    absl::StatusOr<auth::AuthConfig> r = auth::ParseAuthConfig(c.json, "auth.json");
    ASSERT_FALSE(r.ok()) << c.json;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    EXPECT_THAT(r.status().message(), HasSubstr(c.says)) << c.json;
  }
  EXPECT_EQ(auth::LoadAuthConfig("/nonexistent/auth.json").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(AuthenticatorTest, KnowsOnlyItsTokensByHash) {
  EXPECT_EQ(auth::Sha256Hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string t1 = auth::NewToken(), t2 = auth::NewToken();
  EXPECT_NE(t1, t2);
  EXPECT_THAT(t1, ::testing::MatchesRegex("lg_[A-Za-z0-9_-]{43}"));
  auth::AuthConfig config;
  config.tokens.push_back({.name = "writer", .sha256 = auth::Sha256Hex(t1),
                           .project = "vision", .access = auth::Access::kWrite});
  config.tokens.push_back({.name = "reader", .sha256 = auth::Sha256Hex(t2),
                           .project = "*", .access = auth::Access::kRead});
  auth::Authenticator a(config);
  absl::StatusOr<const auth::Principal*> w = a.Authenticate("Bearer " + t1);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->name, "writer");
  EXPECT_TRUE((*w)->CanWrite("vision"));
  EXPECT_TRUE((*w)->CanRead("vision"));
  EXPECT_FALSE((*w)->CanRead("nlp"));
  absl::StatusOr<const auth::Principal*> r = a.Authenticate("bearer " + t2);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE((*r)->CanRead("anything"));
  EXPECT_FALSE((*r)->CanWrite("anything"));
  for (const std::string& bad : {std::string(), std::string("Bearer "), t1,
                                 std::string("Basic ") + t1, "Bearer " + t1 + "x",
                                 "Bearer " + auth::Sha256Hex(t1)}) {
    absl::StatusOr<const auth::Principal*> p = a.Authenticate(bad);
    EXPECT_EQ(p.status().code(), absl::StatusCode::kUnauthenticated) << bad;
  }
}

// ------------------------------------------------------------ the daemon

class AuthDaemonTest : public ::testing::Test {
 protected:
  void Start(service::ServerOptions o) {
    o.listen = "127.0.0.1:0";
    if (o.http_listen.empty()) o.http_listen = "127.0.0.1:0";
    store_ = storage::NewMemoryStore();
    daemon_ = std::make_unique<service::Daemon>(o, store_.get());
    absl::Status s = daemon_->Start();
    ASSERT_TRUE(s.ok()) << s;
    address_ = absl::StrCat("127.0.0.1:", daemon_->port());
    stub_ = v1::LossGuard::NewStub(
        grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
  }
  void StartWithTokens() {
    writer_ = auth::NewToken();
    other_writer_ = auth::NewToken();
    reader_ = auth::NewToken();
    fleet_reader_ = auth::NewToken();
    auth::AuthConfig config;
    config.tokens = {
        {.name = "vision-trainers", .sha256 = auth::Sha256Hex(writer_),
         .project = "vision", .access = auth::Access::kWrite},
        {.name = "nlp-trainers", .sha256 = auth::Sha256Hex(other_writer_),
         .project = "nlp", .access = auth::Access::kWrite},
        {.name = "vision-viewer", .sha256 = auth::Sha256Hex(reader_),
         .project = "vision", .access = auth::Access::kRead},
        {.name = "oncall", .sha256 = auth::Sha256Hex(fleet_reader_), .project = "*",
         .access = auth::Access::kRead},
    };
    service::ServerOptions o;
    o.auth = config;
    Start(o);
  }
  void TearDown() override {
    if (daemon_) {
      EXPECT_TRUE(daemon_->Shutdown().ok());
    }
  }

  static void Prepare(grpc::ClientContext* ctx, const std::string& token) {
    ctx->set_deadline(std::chrono::system_clock::now() + kDeadline);
    if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
  }

  // One Attach stream: start, then `steps` steps (confirmed), then a clean
  // end. The final status, and whether the start was accepted.
  struct AttachResult {
    bool accepted = false;
    grpc::Status status;
  };
  AttachResult Attach(const std::string& token, const std::string& run_id,
                      const std::string& project, int steps = 0) {
    grpc::ClientContext ctx;
    Prepare(&ctx, token);
    auto stream = stub_->Attach(&ctx);
    v1::AttachRequest start;
    start.mutable_start()->set_run_id(run_id);
    start.mutable_start()->set_project(project);
    start.mutable_start()->set_mode(v1::OBSERVE);
    AttachResult result;
    v1::AttachResponse resp;
    if (stream->Write(start) && stream->Read(&resp) && resp.has_accepted()) {
      result.accepted = true;
      const int64_t first = resp.accepted().has_steps() ? resp.accepted().last_step() + 1 : 0;
      if (steps > 0) {
        v1::AttachRequest batch;
        for (int i = 0; i < steps; ++i) {
          v1::Step* s = batch.mutable_steps()->add_steps();
          s->set_step(first + i);
          s->set_lr(0.1);
          s->set_loss(2.0 / (1.0 + 0.01 * static_cast<double>(first + i)));
        }
        EXPECT_TRUE(stream->Write(batch));
        while (stream->Read(&resp)) {
          if (resp.has_received() && resp.received().last_step() >= first + steps - 1) break;
        }
      }
    }
    stream->WritesDone();
    while (stream->Read(&resp)) {
    }
    result.status = stream->Finish();
    return result;
  }

  grpc::Status Health(const std::string& token, const std::string& run_id) {
    grpc::ClientContext ctx;
    Prepare(&ctx, token);
    v1::GetRunHealthRequest req;
    req.set_run_id(run_id);
    v1::RunHealth h;
    return stub_->GetRunHealth(&ctx, req, &h);
  }
  grpc::Status Curve(const std::string& token, const std::string& run_id) {
    grpc::ClientContext ctx;
    Prepare(&ctx, token);
    v1::GetCurveRequest req;
    req.set_run_id(run_id);
    v1::Curve c;
    return stub_->GetCurve(&ctx, req, &c);
  }
  grpc::Status Watch(const std::string& token, const std::string& run_id) {
    grpc::ClientContext ctx;
    Prepare(&ctx, token);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::WatchRunRequest req;
    req.set_run_id(run_id);
    req.set_replay(true);
    auto reader = stub_->WatchRun(&ctx, req);
    v1::RunEvent e;
    while (reader->Read(&e)) {
    }
    return reader->Finish();
  }
  // Run ids ListRuns shows `token`, or the error.
  absl::StatusOr<std::vector<std::string>> List(const std::string& token,
                                                const std::string& project = "") {
    grpc::ClientContext ctx;
    Prepare(&ctx, token);
    v1::ListRunsRequest req;
    req.set_project(project);
    v1::ListRunsResponse resp;
    grpc::Status s = stub_->ListRuns(&ctx, req, &resp);
    if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                                     s.error_message());
    std::vector<std::string> ids;
    for (const auto& r : resp.runs()) ids.push_back(r.run_id());
    std::sort(ids.begin(), ids.end());
    return ids;
  }

  std::unique_ptr<storage::RunStore> store_;
  std::unique_ptr<service::Daemon> daemon_;
  std::string address_;
  std::unique_ptr<v1::LossGuard::Stub> stub_;
  std::string writer_, other_writer_, reader_, fleet_reader_;
};

TEST_F(AuthDaemonTest, AWriteTokenAttachesRunsOfItsProjectOnly) {
  StartWithTokens();
  AttachResult r = Attach(writer_, "v1", "vision", 50);
  EXPECT_TRUE(r.accepted);
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();

  r = Attach("", "v2", "vision");
  EXPECT_FALSE(r.accepted);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(r.status.error_message(), HasSubstr("needs a token"));

  r = Attach("lg_not-a-token", "v2", "vision");
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);

  r = Attach(writer_, "n1", "nlp");
  EXPECT_FALSE(r.accepted);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(r.status.error_message(),
              HasSubstr("token \"vision-trainers\" may write project \"vision\", not "
                        "write project \"nlp\""));

  // A read token may not steer, even its own project.
  r = Attach(reader_, "v3", "vision");
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);

  // Nothing refused was created.
  absl::StatusOr<std::vector<std::string>> all = List(fleet_reader_);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_THAT(*all, ::testing::ElementsAre("v1"));
}

TEST_F(AuthDaemonTest, ARunCannotBeTakenOverByClaimingAnotherProject) {
  StartWithTokens();
  ASSERT_TRUE(Attach(other_writer_, "shared-id", "nlp", 30).status.ok());
  // The vision token claims the nlp run under its own project.
  AttachResult r = Attach(writer_, "shared-id", "vision", 10);
  EXPECT_FALSE(r.accepted);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(r.status.error_message(), HasSubstr("not write project \"nlp\""));
  // The run is as its owner left it: 30 steps, project nlp.
  grpc::ClientContext ctx;
  Prepare(&ctx, fleet_reader_);
  v1::GetRunHealthRequest req;
  req.set_run_id("shared-id");
  v1::RunHealth h;
  ASSERT_TRUE(stub_->GetRunHealth(&ctx, req, &h).ok());
  EXPECT_EQ(h.summary().project(), "nlp");
  EXPECT_EQ(h.summary().last_step(), 29);
  // Its owner resumes it.
  r = Attach(other_writer_, "shared-id", "nlp", 5);
  EXPECT_TRUE(r.accepted);
  EXPECT_TRUE(r.status.ok());
}

TEST_F(AuthDaemonTest, ReadsNeedATokenThatMayReadTheRunsProject) {
  StartWithTokens();
  ASSERT_TRUE(Attach(writer_, "v1", "vision", 20).status.ok());
  ASSERT_TRUE(Attach(other_writer_, "n1", "nlp", 20).status.ok());

  for (const std::string& token : {writer_, reader_, fleet_reader_}) {
    EXPECT_TRUE(Health(token, "v1").ok());
    EXPECT_TRUE(Curve(token, "v1").ok());
    EXPECT_EQ(Watch(token, "v1").error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
        << "a watch that was allowed runs until its deadline";
  }
  EXPECT_TRUE(Health(fleet_reader_, "n1").ok());
  for (const std::string& token : {writer_, reader_}) {
    EXPECT_EQ(Health(token, "n1").error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_EQ(Curve(token, "n1").error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_EQ(Watch(token, "n1").error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }
  EXPECT_EQ(Health("", "v1").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Curve("", "v1").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Watch("", "v1").error_code(), grpc::StatusCode::UNAUTHENTICATED);

  // ListRuns shows a project's token its project only.
  EXPECT_THAT(*List(reader_), ::testing::ElementsAre("v1"));
  EXPECT_THAT(*List(writer_, "vision"), ::testing::ElementsAre("v1"));
  EXPECT_EQ(List(reader_, "nlp").status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(*List(fleet_reader_), ::testing::ElementsAre("n1", "v1"));
  EXPECT_EQ(List("").status().code(), absl::StatusCode::kUnauthenticated);

  // AnalyzeCurve computes for any valid token, for none without.
  for (const std::string& token : {std::string(), reader_}) {
    grpc::ClientContext ctx;
    Prepare(&ctx, token);
    v1::AnalyzeCurveRequest req;
    v1::Step* s = req.add_steps();
    s->set_step(0);
    s->set_lr(0.1);
    s->set_loss(1.0);
    v1::AnalyzeCurveResponse resp;
    EXPECT_EQ(stub_->AnalyzeCurve(&ctx, req, &resp).error_code(),
              token.empty() ? grpc::StatusCode::UNAUTHENTICATED : grpc::StatusCode::OK);
  }
  // So does SuggestLearningRate (a one-point test is the caller's error,
  // which a valid token gets to see).
  for (const std::string& token : {std::string(), reader_}) {
    grpc::ClientContext ctx;
    Prepare(&ctx, token);
    v1::SuggestLearningRateRequest req;
    v1::Step* s = req.add_steps();
    s->set_step(0);
    s->set_lr(1e-7);
    s->set_loss(1.0);
    v1::LrSuggestion resp;
    EXPECT_EQ(stub_->SuggestLearningRate(&ctx, req, &resp).error_code(),
              token.empty() ? grpc::StatusCode::UNAUTHENTICATED
                            : grpc::StatusCode::INVALID_ARGUMENT);
  }
}

TEST_F(AuthDaemonTest, TheHealthCheckAndHealthzNeedNoTokenTheHttpApiAndMetricsDo) {
  StartWithTokens();
  ASSERT_TRUE(Attach(writer_, "v1", "vision", 10).status.ok());
  auto health = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  ASSERT_TRUE(health->Check(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);

  httplib::Client http("127.0.0.1", daemon_->http_port());
  auto get = [&](const std::string& path, const std::string& token) {
    httplib::Headers headers;
    if (!token.empty()) headers.emplace("Authorization", "Bearer " + token);
    auto r = http.Get(path, headers);
    return r ? r->status : -1;
  };
  EXPECT_EQ(get("/healthz", ""), 200);
  EXPECT_EQ(get("/", ""), 200);  // the dashboard's page holds no data
  EXPECT_EQ(get("/api/runs", ""), 401);
  EXPECT_EQ(get("/api/runs", "lg_wrong"), 401);
  EXPECT_EQ(get("/api/runs", reader_), 200);
  EXPECT_EQ(get("/api/runs/v1", reader_), 200);
  EXPECT_EQ(get("/api/runs/v1/curve", reader_), 200);
  EXPECT_EQ(get("/api/runs?project=nlp", reader_), 403);
  EXPECT_EQ(get("/metrics", ""), 401);
  EXPECT_EQ(get("/metrics", writer_), 403);  // one project's token: not the fleet's
  EXPECT_EQ(get("/metrics", fleet_reader_), 200);
  auto r = http.Get("/api/runs");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->get_header_value("WWW-Authenticate"), "Bearer");
}

TEST_F(AuthDaemonTest, StreamsPerClientAreLimited) {
  service::ServerOptions o;
  o.max_streams_per_client = 2;
  Start(o);
  struct Open {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<v1::AttachRequest, v1::AttachResponse>> stream;
  };
  auto open = [&](const std::string& id) {
    auto o = std::make_unique<Open>();
    Prepare(&o->ctx, "");
    o->stream = stub_->Attach(&o->ctx);
    v1::AttachRequest start;
    start.mutable_start()->set_run_id(id);
    o->stream->Write(start);
    return o;
  };
  auto a = open("a");
  auto b = open("b");
  v1::AttachResponse resp;
  ASSERT_TRUE(a->stream->Read(&resp));
  ASSERT_TRUE(b->stream->Read(&resp));
  AttachResult third = Attach("", "c", "p");
  EXPECT_FALSE(third.accepted);
  EXPECT_EQ(third.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(third.status.error_message(), HasSubstr("2 Attach streams open"));
  a->stream->WritesDone();
  while (a->stream->Read(&resp)) {
  }
  EXPECT_TRUE(a->stream->Finish().ok());
  // A closed stream frees its place (the server releases it when the call
  // is done, which can follow the client's Finish by a moment).
  AttachResult again;
  for (int i = 0; i < 200; ++i) {
    again = Attach("", "c", "p");
    if (again.accepted) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(again.accepted) << again.status.error_message();
  b->ctx.TryCancel();
}

TEST_F(AuthDaemonTest, RunsPerProjectAreLimited) {
  service::ServerOptions o;
  o.limits.max_runs_per_project = 2;
  Start(o);
  EXPECT_TRUE(Attach("", "a1", "a", 5).accepted);
  EXPECT_TRUE(Attach("", "a2", "a", 5).accepted);
  AttachResult r = Attach("", "a3", "a");
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(r.status.error_message(), HasSubstr("project \"a\" holds 2 runs"));
  EXPECT_TRUE(Attach("", "a1", "a", 5).accepted) << "an existing run resumes";
  EXPECT_TRUE(Attach("", "b1", "b", 5).accepted) << "another project is not affected";
}

// ------------------------------------------------------------ TLS

class TlsTest : public AuthDaemonTest {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           absl::StrCat("lossguard-tls-", getpid(), "-", ::testing::UnitTest::GetInstance()
                                                            ->current_test_info()
                                                            ->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    std::ofstream(dir_ / "san.ext") << "subjectAltName=IP:127.0.0.1,DNS:localhost\n";
    const std::string d = dir_.string();
    const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    auto run = [](const std::string& cmd) {
      ASSERT_EQ(std::system((cmd + " >/dev/null 2>&1").c_str()), 0) << cmd;
    };
    for (const char* ca : {"ca", "rogue-ca"}) {
      run(absl::StrCat("openssl req -x509 ", key, " -keyout ", d, "/", ca, ".key -out ", d,
                       "/", ca, ".pem -days 2 -subj /CN=", ca));
    }
    auto issue = [&](const std::string& name, const std::string& ca, const std::string& ext) {
      run(absl::StrCat("openssl req ", key, " -keyout ", d, "/", name, ".key -out ", d, "/",
                       name, ".csr -subj /CN=", name));
      run(absl::StrCat("openssl x509 -req -in ", d, "/", name, ".csr -CA ", d, "/", ca,
                       ".pem -CAkey ", d, "/", ca, ".key -CAcreateserial -days 2 -out ", d,
                       "/", name, ".pem", ext.empty() ? "" : " -extfile " + d + "/" + ext));
    };
    issue("server", "ca", "san.ext");
    issue("trainer", "ca", "");
    issue("intruder", "rogue-ca", "");
  }
  void TearDown() override {
    AuthDaemonTest::TearDown();
    std::filesystem::remove_all(dir_);
  }
  std::string F(const std::string& name) const { return (dir_ / name).string(); }

  // Whether a ListRuns over `c` succeeds, or its status.
  grpc::Status Probe(const Credentials& c) {
    absl::StatusOr<std::shared_ptr<grpc::Channel>> ch =
        CreateChannel(address_, c, grpc::ChannelArguments());
    if (!ch.ok()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                      std::string(ch.status().message()));
    auto stub = v1::LossGuard::NewStub(*ch);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::ListRunsResponse resp;
    return stub->ListRuns(&ctx, v1::ListRunsRequest(), &resp);
  }

  std::filesystem::path dir_;
};

TEST_F(TlsTest, TlsWithATokenCarriesARunAndPlaintextIsRefused) {
  service::ServerOptions o;
  o.tls_cert_file = F("server.pem");
  o.tls_key_file = F("server.key");
  const std::string token = auth::NewToken();
  auth::AuthConfig config;
  config.tokens = {{.name = "t", .sha256 = auth::Sha256Hex(token), .project = "tls",
                    .access = auth::Access::kWrite}};
  o.auth = config;
  Start(o);
  EXPECT_TRUE(Probe({.token = token, .tls_ca_file = F("ca.pem")}).ok());
  EXPECT_EQ(Probe({.token = "", .tls_ca_file = F("ca.pem")}).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Probe({.token = token}).error_code(), grpc::StatusCode::UNAVAILABLE)
      << "plaintext to a TLS port";
  EXPECT_EQ(Probe({.token = token, .tls_ca_file = F("rogue-ca.pem")}).error_code(),
            grpc::StatusCode::UNAVAILABLE)
      << "a server certificate from another CA is not trusted";
  EXPECT_EQ(Probe({.token = token, .tls_ca_file = F("missing.pem")}).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  // The C++ client streams a whole run over it.
  ClientOptions co;
  co.server = address_;
  co.credentials = {.token = token, .tls_ca_file = F("ca.pem")};
  co.run_id = "over-tls";
  co.project = "tls";
  {
    Client client(co);
    for (int i = 0; i < 200; ++i) client.Report(i, 0.1, 1.0 / (1 + i));
    EXPECT_TRUE(client.Finish("done", absl::Seconds(20)));
  }
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer " + token);
  auto ch = CreateChannel(address_, {.tls_ca_file = F("ca.pem")}, grpc::ChannelArguments());
  ASSERT_TRUE(ch.ok());
  v1::GetRunHealthRequest req;
  req.set_run_id("over-tls");
  v1::RunHealth h;
  ASSERT_TRUE(v1::LossGuard::NewStub(*ch)->GetRunHealth(&ctx, req, &h).ok());
  EXPECT_EQ(h.summary().last_step(), 199);
}

TEST_F(TlsTest, MutualTlsNeedsAClientCertificateFromItsCa) {
  service::ServerOptions o;
  o.tls_cert_file = F("server.pem");
  o.tls_key_file = F("server.key");
  o.tls_client_ca_file = F("ca.pem");
  Start(o);
  EXPECT_TRUE(Probe({.tls_ca_file = F("ca.pem"), .tls_cert_file = F("trainer.pem"),
                     .tls_key_file = F("trainer.key")})
                  .ok());
  EXPECT_EQ(Probe({.tls_ca_file = F("ca.pem")}).error_code(), grpc::StatusCode::UNAVAILABLE)
      << "no client certificate";
  EXPECT_EQ(Probe({.tls_ca_file = F("ca.pem"), .tls_cert_file = F("intruder.pem"),
                   .tls_key_file = F("intruder.key")})
                .error_code(),
            grpc::StatusCode::UNAVAILABLE)
      << "a client certificate from another CA";
  EXPECT_EQ(Probe({.tls_ca_file = F("ca.pem"), .tls_cert_file = F("trainer.pem")}).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT)
      << "a certificate without its key";
}

TEST_F(TlsTest, TheHttpPortSpeaksTlsAndAsksForClientCertificatesLikeTheGrpcPort) {
  service::ServerOptions o;
  o.tls_cert_file = F("server.pem");
  o.tls_key_file = F("server.key");
  o.tls_client_ca_file = F("ca.pem");
  const std::string token = auth::NewToken();
  auth::AuthConfig config;
  config.tokens = {{.name = "ops", .sha256 = auth::Sha256Hex(token), .project = "*",
                    .access = auth::Access::kRead}};
  o.auth = config;
  Start(o);
  const int port = daemon_->http_port();
  auto get = [&](httplib::Client& c, const std::string& path, bool with_token) {
    httplib::Headers h;
    if (with_token) h.emplace("Authorization", "Bearer " + token);
    auto r = c.Get(path, h);
    return r ? r->status : -1;
  };
  {
    httplib::Client with_cert(absl::StrCat("https://127.0.0.1:", port), F("trainer.pem"),
                              F("trainer.key"));
    with_cert.set_ca_cert_path(F("ca.pem").c_str());
    with_cert.enable_server_certificate_verification(true);
    EXPECT_EQ(get(with_cert, "/healthz", false), 200);
    EXPECT_EQ(get(with_cert, "/api/runs", false), 401);
    EXPECT_EQ(get(with_cert, "/api/runs", true), 200);
    EXPECT_EQ(get(with_cert, "/metrics", true), 200);
  }
  {
    httplib::Client no_cert(absl::StrCat("https://127.0.0.1:", port));
    no_cert.set_ca_cert_path(F("ca.pem").c_str());
    no_cert.enable_server_certificate_verification(true);
    EXPECT_EQ(get(no_cert, "/healthz", false), -1) << "mTLS: no client certificate";
    httplib::Client rogue(absl::StrCat("https://127.0.0.1:", port), F("intruder.pem"),
                          F("intruder.key"));
    rogue.set_ca_cert_path(F("ca.pem").c_str());
    EXPECT_EQ(get(rogue, "/healthz", false), -1) << "a certificate from another CA";
    httplib::Client plain("127.0.0.1", port);
    EXPECT_EQ(get(plain, "/healthz", false), -1) << "plain HTTP to an HTTPS port";
  }
}

TEST_F(TlsTest, BadTlsFilesAreAClearErrorAtStart) {
  for (auto [cert, key, ca, says] : std::vector<std::tuple<std::string, std::string,
                                                           std::string, std::string>>{
           {F("server.pem"), "", "", "both --tls_cert and --tls_key"},
           {F("nope.pem"), F("server.key"), "", "nope.pem: cannot read it"},
           {F("san.ext"), F("server.key"), "", "san.ext: not a PEM file"},
           {"", "", F("ca.pem"), "--tls_client_ca needs --tls_cert"},
       }) {
    service::ServerOptions o;
    o.listen = "127.0.0.1:0";
    o.tls_cert_file = cert;
    o.tls_key_file = key;
    o.tls_client_ca_file = ca;
    auto store = storage::NewMemoryStore();
    service::Daemon d(o, store.get());
    absl::Status s = d.Start();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << says;
    EXPECT_THAT(s.message(), HasSubstr(says));
  }
}

}  // namespace
}  // namespace lossguard
