// lossguardd over real loopback gRPC (port 0): live diagnosis and advice,
// acks and outcomes, resume, restart on the same database, bad input, the
// fleet and curve queries, health and reflection, graceful shutdown.

#include <grpcpp/grpcpp.h>
#include <sqlite3.h>

#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <iterator>
#include <set>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "lossguard/curvefile/curve_csv.h"
#include "lossguard/service/service.h"
#include "lossguard/storage/run_store.h"
#include "lossguard/v1/lossguard.grpc.pb.h"
#include "lossguard/analyzers/lr_range_test.h"
#include "lossguard/wire/convert.h"

namespace lossguard::service {
namespace {

namespace v1 = ::lossguard::v1;
using ::testing::HasSubstr;

constexpr char kDiverging[] = "digits-cnn-sgd-lr300-b32-ramp-s130.csv";
constexpr char kHealthy[] = "digits-mlp-sgdm-lr0.01-b32-s6.csv";
constexpr char kRangeTest[] = "digits-mlp-sgdm-lr1e-07-b32-exp-lrrange-s1.csv";

// Every call in these tests has a deadline: a bug fails a test, never hangs
// the suite.
constexpr auto kDeadline = std::chrono::seconds(60);

class FakeClock final : public runs::Clock {
 public:
  double Now() const override { return now_.fetch_add(1.0); }

 private:
  mutable std::atomic<double> now_{1.8e9};
};

std::vector<analyzers::StepRecord> LoadCurve(const std::string& name) {
  auto records = curvefile::ReadCurveCsv(
      absl::StrCat(LOSSGUARD_EXAMPLES_DIR, "/", name));
  EXPECT_TRUE(records.ok()) << records.status();
  return records.ok() ? *records : std::vector<analyzers::StepRecord>{};
}

int64_t FirstNonFiniteStep(const std::vector<analyzers::StepRecord>& curve) {
  for (const auto& r : curve) {
    if (!std::isfinite(r.loss)) return r.step;
  }
  return std::numeric_limits<int64_t>::max();
}

v1::AttachRequest StartRequest(const std::string& run_id, v1::Mode mode,
                               const std::string& project = "tests") {
  v1::AttachRequest req;
  v1::RunStart* start = req.mutable_start();
  start->set_run_id(run_id);
  start->set_name(run_id);
  start->set_project(project);
  start->set_mode(mode);
  (*start->mutable_tags())["model"] = "cnn";
  start->mutable_config()->set_optimizer("sgd");
  start->mutable_config()->set_base_lr(0.1);
  return req;
}

v1::AttachRequest Batch(const std::vector<analyzers::StepRecord>& curve,
                        size_t begin, size_t end) {
  v1::AttachRequest req;
  for (size_t i = begin; i < end && i < curve.size(); ++i) {
    *req.mutable_steps()->add_steps() = wire::ToProto(curve[i]);
  }
  return req;
}

// A trainer's Attach stream with a reader thread that collects responses.
class Trainer {
 public:
  explicit Trainer(v1::LossGuard::Stub* stub) {
    context_.set_deadline(std::chrono::system_clock::now() + kDeadline);
    stream_ = stub->Attach(&context_);
    reader_ = std::thread([this] {
      v1::AttachResponse resp;
      while (stream_->Read(&resp)) {
        absl::MutexLock lock(&mu_);
        responses_.push_back(resp);
      }
      absl::MutexLock lock(&mu_);
      closed_ = true;
    });
  }
  ~Trainer() {
    if (reader_.joinable()) {
      context_.TryCancel();
      reader_.join();
    }
  }

  bool Send(const v1::AttachRequest& req) { return stream_->Write(req); }

  // Waits until `n` responses arrived (or the stream closed); returns them.
  std::vector<v1::AttachResponse> WaitResponses(size_t n) {
    return WaitUntil([n](const std::vector<v1::AttachResponse>& got) {
      return got.size() >= n;
    });
  }

  // Sends a batch and waits until the server says it has seen it: every
  // advice it caused has arrived by then.
  std::vector<v1::AttachResponse> SendAndWait(const v1::AttachRequest& req) {
    EXPECT_TRUE(Send(req));
    const int64_t last = req.steps().steps().empty()
                             ? 0
                             : req.steps().steps().rbegin()->step();
    return WaitUntil([last](const std::vector<v1::AttachResponse>& got) {
      return !got.empty() && got.back().has_received() &&
             got.back().received().last_step() >= last;
    });
  }

  // The first advice response, waiting for it.
  std::optional<v1::Advice> WaitAdvice() {
    std::vector<v1::AttachResponse> got =
        WaitUntil([](const std::vector<v1::AttachResponse>& got) {
          for (const auto& r : got) {
            if (r.has_advice()) return true;
          }
          return false;
        });
    for (const auto& r : got) {
      if (r.has_advice()) return r.advice();
    }
    return std::nullopt;
  }

  // Waits (at most a minute) until `done(responses)` or the stream closed.
  std::vector<v1::AttachResponse> WaitUntil(
      std::function<bool(const std::vector<v1::AttachResponse>&)> done) {
    absl::MutexLock lock(&mu_);
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return closed_ || done(responses_);
    };
    mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Seconds(60));
    return responses_;
  }

  std::vector<v1::AttachResponse> Responses() {
    absl::MutexLock lock(&mu_);
    return responses_;
  }

  // Half-closes and returns the stream's status, after every response.
  grpc::Status Close() {
    stream_->WritesDone();
    reader_.join();
    return stream_->Finish();
  }

  // Half-closes without waiting for the end.
  void HalfClose() { stream_->WritesDone(); }

  // Waits for the server to end the stream (without half-closing first).
  grpc::Status AwaitEnd() {
    reader_.join();
    return stream_->Finish();
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::AttachRequest,
                                           v1::AttachResponse>>
      stream_;
  std::thread reader_;
  absl::Mutex mu_;
  std::vector<v1::AttachResponse> responses_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

// Streams `curve` from `*sent` in batches of 10, as a live trainer would,
// until the first advice with an action arrives (or the curve ends).
std::optional<v1::Advice> StreamUntilAction(
    Trainer& t, const std::vector<analyzers::StepRecord>& curve, size_t* sent) {
  std::optional<v1::Advice> advice;
  while (*sent < curve.size() && !advice) {
    for (const auto& r : t.SendAndWait(Batch(curve, *sent, *sent + 10))) {
      if (r.has_advice() && r.advice().has_action()) advice = r.advice();
    }
    *sent += 10;
  }
  return advice;
}

class DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_dir_ = std::filesystem::path(::testing::TempDir()) /
              absl::StrCat("lossguardd_test_", ::getpid(), "_",
                           ::testing::UnitTest::GetInstance()
                               ->current_test_info()
                               ->name());
    std::filesystem::remove_all(db_dir_);
    std::filesystem::create_directories(db_dir_);
    options_.listen = "127.0.0.1:0";
    options_.max_batch_steps = 1000;
  }
  void TearDown() override {
    StopDaemon();
    std::filesystem::remove_all(db_dir_);
  }

  std::string DbPath() const { return (db_dir_ / "lossguard.db").string(); }

  // Starts a daemon over a SQLite database in the test's directory.
  void StartDaemon(const storage::SqliteOptions& store_options = {}) {
    auto store = storage::OpenSqliteStore(DbPath(), store_options);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    daemon_ = std::make_unique<Daemon>(options_, store_.get(), &clock_);
    absl::Status s = daemon_->Start();
    ASSERT_TRUE(s.ok()) << s;
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", daemon_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::LossGuard::NewStub(channel_);
  }

  void StopDaemon() {
    if (daemon_ != nullptr) {
      EXPECT_TRUE(daemon_->Shutdown().ok());
      daemon_.reset();
    }
    store_.reset();
    stub_.reset();
    channel_.reset();
  }

  grpc::Status Health(const std::string& run_id, v1::RunHealth* out) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    v1::GetRunHealthRequest req;
    req.set_run_id(run_id);
    return stub_->GetRunHealth(&ctx, req, out);
  }

  v1::RunHealth MustHealth(const std::string& run_id) {
    v1::RunHealth h;
    grpc::Status s = Health(run_id, &h);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return h;
  }

  // Streams a whole curve in batches and half-closes; returns the responses.
  std::vector<v1::AttachResponse> StreamCurve(
      const std::string& run_id, v1::Mode mode,
      const std::vector<analyzers::StepRecord>& curve, bool finish = true) {
    Trainer t(stub_.get());
    EXPECT_TRUE(t.Send(StartRequest(run_id, mode)));
    for (size_t i = 0; i < curve.size(); i += 50) {
      EXPECT_TRUE(t.Send(Batch(curve, i, i + 50)));
    }
    if (finish) {
      v1::AttachRequest f;
      f.mutable_finish()->set_reason("done");
      EXPECT_TRUE(t.Send(f));
    }
    grpc::Status s = t.Close();
    EXPECT_TRUE(s.ok()) << s.error_message();
    return t.Responses();
  }

  std::filesystem::path db_dir_;
  ServerOptions options_;
  FakeClock clock_;
  std::unique_ptr<storage::RunStore> store_;
  std::unique_ptr<Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::LossGuard::Stub> stub_;
};

TEST_F(DaemonTest, AutoModeCutsTheLrOfADivergingRunBeforeItsLossTurnsNaN) {
  StartDaemon();
  const auto curve = LoadCurve(kDiverging);
  const int64_t nonfinite = FirstNonFiniteStep(curve);
  ASSERT_LT(nonfinite, std::numeric_limits<int64_t>::max());

  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("diverging", v1::AUTO)));
  std::vector<v1::AttachResponse> first = t.WaitResponses(1);
  ASSERT_FALSE(first.empty());
  ASSERT_TRUE(first[0].has_accepted());
  EXPECT_FALSE(first[0].accepted().has_steps());
  EXPECT_FALSE(first[0].accepted().resumed());

  // Stream until the first action arrives, as a live trainer would.
  size_t sent = 0;
  std::optional<v1::Advice> advice = StreamUntilAction(t, curve, &sent);
  ASSERT_TRUE(advice.has_value());
  EXPECT_EQ(advice->diagnosis().kind(), v1::DIVERGENCE);
  ASSERT_TRUE(advice->action().has_scale_lr()) << advice->DebugString();
  EXPECT_LT(advice->action().scale_lr().factor(), 1.0);
  EXPECT_LT(advice->at_step(), nonfinite);
  EXPECT_THAT(advice->diagnosis().evidence(), Not(::testing::IsEmpty()));
  EXPECT_FALSE(advice->explanation().empty());

  // The trainer applies it and acks; the rest of the (replayed) curve still
  // blows up, so the outcome is judged "worsened".
  v1::AttachRequest ack;
  ack.mutable_ack()->set_advice_id(advice->advice_id());
  ack.mutable_ack()->set_applied(true);
  ASSERT_TRUE(t.Send(ack));
  for (; sent < curve.size(); sent += 10) {
    ASSERT_TRUE(t.Send(Batch(curve, sent, sent + 10)));
  }
  grpc::Status s = t.Close();
  ASSERT_TRUE(s.ok()) << s.error_message();

  v1::RunHealth h = MustHealth("diverging");
  EXPECT_EQ(h.summary().state(), v1::DETACHED);
  EXPECT_EQ(h.summary().last_step(), curve.back().step);
  EXPECT_EQ(h.summary().steps_stored(), static_cast<int64_t>(curve.size()));
  EXPECT_THAT(h.summary().active(), ::testing::Contains(v1::DIVERGENCE));
  bool found = false;
  for (const v1::AdviceRecord& r : h.advice()) {
    if (r.advice().advice_id() != advice->advice_id()) continue;
    found = true;
    EXPECT_EQ(r.status(), v1::APPLIED);
    // Judged on the 100 steps after the ack: the loss rose (or blew up).
    EXPECT_EQ(r.outcome(), v1::WORSENED) << r.outcome_evidence();
    EXPECT_THAT(r.outcome_evidence(), HasSubstr("steps"));
  }
  EXPECT_TRUE(found);
}

// A trainer that reports one step late has sent losses computed before it
// applied an action; with the ack's effective_step the outcome window
// starts there, so those losses do not count against the action.
TEST_F(DaemonTest, OutcomeIsJudgedFromTheAcksEffectiveStep) {
  StartDaemon();
  auto run = [&](const std::string& id, bool give_effective_step) {
    std::vector<analyzers::StepRecord> curve;
    for (int i = 0; i < 200; ++i) {
      analyzers::StepRecord r;
      r.step = i;
      r.lr = 0.5;
      r.loss = i < 20 ? 2.3 + 0.01 * (i % 3) : 1.0 - 0.001 * i;
      curve.push_back(r);
    }
    curve[20].loss = std::numeric_limits<double>::quiet_NaN();  // blows up
    curve[21].loss = std::numeric_limits<double>::quiet_NaN();  // before the fix
    Trainer t(stub_.get());
    EXPECT_TRUE(t.Send(StartRequest(id, v1::AUTO)));
    std::optional<v1::Advice> advice;
    for (const auto& r : t.SendAndWait(Batch(curve, 0, 21))) {
      if (r.has_advice() && r.advice().has_action()) advice = r.advice();
    }
    EXPECT_TRUE(advice.has_value());
    if (!advice) return v1::OUTCOME_UNSPECIFIED;
    v1::AttachRequest ack;
    ack.mutable_ack()->set_advice_id(advice->advice_id());
    ack.mutable_ack()->set_applied(true);
    if (give_effective_step) ack.mutable_ack()->set_effective_step(22);
    EXPECT_TRUE(t.Send(ack));
    for (size_t i = 21; i < curve.size(); i += 10) {
      EXPECT_TRUE(t.Send(Batch(curve, i, i + 10)));
    }
    EXPECT_TRUE(t.Close().ok());
    const v1::RunHealth h = MustHealth(id);
    for (const v1::AdviceRecord& r : h.advice()) {
      if (r.advice().advice_id() == advice->advice_id()) {
        EXPECT_THAT(r.outcome_evidence(), Not(::testing::IsEmpty()));
        return r.outcome();
      }
    }
    return v1::OUTCOME_UNSPECIFIED;
  };
  EXPECT_EQ(run("late-reporter", /*give_effective_step=*/true), v1::IMPROVED);
  // Without it, the NaN computed before the fix counts as after it.
  EXPECT_EQ(run("no-effective-step", /*give_effective_step=*/false), v1::WORSENED);
}

// The HTTP port: /metrics counts what the daemon did; /api answers like
// the gRPC API (same errors); the dashboard's assets are built in.
TEST_F(DaemonTest, HttpPortServesMetricsApiAndDashboard) {
  options_.http_listen = "127.0.0.1:0";
  StartDaemon();
  ASSERT_GT(daemon_->http_port(), 0);
  const auto curve = LoadCurve(kDiverging);
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("metered", v1::AUTO)));
  size_t sent = 0;
  std::optional<v1::Advice> advice = StreamUntilAction(t, curve, &sent);
  ASSERT_TRUE(advice.has_value());
  v1::AttachRequest ack;
  ack.mutable_ack()->set_advice_id(advice->advice_id());
  ack.mutable_ack()->set_applied(true);
  ASSERT_TRUE(t.Send(ack));
  ASSERT_TRUE(t.Close().ok());

  httplib::Client http("127.0.0.1", daemon_->http_port());
  // The client hears the stream's end before the server has unregistered
  // it (OnDone comes after Finish): read until the gauge is back to 0.
  auto metrics = http.Get("/metrics");
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (metrics && metrics->body.find("lossguard_attach_streams 0\n") ==
                        std::string::npos &&
         absl::Now() < give_up) {
    std::this_thread::yield();
    metrics = http.Get("/metrics");
  }
  ASSERT_TRUE(metrics);
  EXPECT_EQ(metrics->status, 200);
  EXPECT_THAT(metrics->get_header_value("Content-Type"), HasSubstr("version=0.0.4"));
  const std::string& m = metrics->body;
  EXPECT_THAT(m, HasSubstr(absl::StrCat("\nlossguard_steps_ingested_total ", sent, "\n")));
  EXPECT_THAT(m, HasSubstr("lossguard_runs{state=\"detached\"} 1\n"));
  EXPECT_THAT(m, HasSubstr("lossguard_advice_total{kind=\"divergence\",action=\"scale_lr\"} 1\n"));
  EXPECT_THAT(m, HasSubstr("lossguard_diagnoses_total{kind=\"divergence\"} 1\n"));
  EXPECT_THAT(m, HasSubstr("lossguard_advice_acks_total{result=\"applied\"} 1\n"));
  EXPECT_THAT(m, HasSubstr(absl::StrCat("lossguard_ingest_latency_seconds_count ",
                                        (sent + 9) / 10, "\n")));
  EXPECT_THAT(m, HasSubstr("# TYPE lossguard_ingest_latency_seconds histogram"));
  EXPECT_THAT(m, HasSubstr("lossguard_store_write_lag_seconds "));
  EXPECT_THAT(m, HasSubstr("lossguard_attach_streams 0\n"));

  auto health = http.Get("/api/runs/metered");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  EXPECT_THAT(health->body, HasSubstr("\"run_id\":\"metered\""));
  EXPECT_THAT(health->body, HasSubstr("\"status\":\"APPLIED\""));
  auto curve_json = http.Get("/api/runs/metered/curve?max_points=100");
  ASSERT_TRUE(curve_json);
  EXPECT_EQ(curve_json->status, 200);
  EXPECT_THAT(curve_json->body, HasSubstr("\"points\":["));
  auto missing = http.Get("/api/runs/nope");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
  EXPECT_THAT(missing->body, HasSubstr("no run"));
  auto bad = http.Get("/api/runs?state=bogus");
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->status, 400);
  auto bad_points = http.Get("/api/runs/metered/curve?max_points=2");
  ASSERT_TRUE(bad_points);
  EXPECT_EQ(bad_points->status, 400);
  auto runs = http.Get("/api/runs?state=detached");
  ASSERT_TRUE(runs);
  EXPECT_THAT(runs->body, HasSubstr("\"metered\""));
  auto page = http.Get("/");
  ASSERT_TRUE(page);
  EXPECT_EQ(page->status, 200);
  EXPECT_THAT(page->body, HasSubstr("/assets/app.js"));
  auto uplot = http.Get("/assets/uPlot.iife.min.js");
  ASSERT_TRUE(uplot);
  EXPECT_EQ(uplot->status, 200);
  EXPECT_GT(uplot->body.size(), 10000u);
  EXPECT_EQ(http.Get("/assets/nope.js")->status, 404);
  // Not UTF-8 (a proto3 string must be): 400, not 500.
  EXPECT_EQ(http.Get("/api/runs/%FF%FE")->status, 400);
  EXPECT_EQ(http.Get("/api/runs?project=%C0%AF")->status, 400);  // overlong '/'
  EXPECT_EQ(http.Get("/api/runs/%E2%82%AC")->status, 404);  // a valid euro sign
  EXPECT_EQ(http.Get("/healthz")->body, "ok\n");
}

// Alerts go to a webhook (a local receiver here): the run turning
// UNHEALTHY, then the action applied; a receiver that fails once gets the
// alert again (backoff), and the daemon never waits for it.
TEST_F(DaemonTest, WebhookGetsUnhealthyAndActionAppliedAlertsWithRetry) {
  httplib::Server receiver;
  absl::Mutex mu;
  std::vector<std::string> bodies;
  int calls = 0;
  receiver.Post("/hook", [&](const httplib::Request& req, httplib::Response& res) {
    absl::MutexLock lock(&mu);
    if (++calls == 1) {
      res.status = 503;  // the first attempt fails
      return;
    }
    bodies.push_back(req.body);
  });
  const int port = receiver.bind_to_any_port("127.0.0.1");
  ASSERT_GT(port, 0);
  std::thread serving([&] { receiver.listen_after_bind(); });

  options_.alert_webhook = absl::StrCat("http://127.0.0.1:", port, "/hook");
  options_.alert_initial_backoff_s = 0.01;
  options_.http_listen = "127.0.0.1:0";
  StartDaemon();
  const auto curve = LoadCurve(kDiverging);
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("alerting", v1::AUTO, "vision")));
  size_t sent = 0;
  std::optional<v1::Advice> advice = StreamUntilAction(t, curve, &sent);
  ASSERT_TRUE(advice.has_value());
  v1::AttachRequest ack;
  ack.mutable_ack()->set_advice_id(advice->advice_id());
  ack.mutable_ack()->set_applied(true);
  ack.mutable_ack()->set_reason("LR x0.1");
  ASSERT_TRUE(t.Send(ack));
  ASSERT_TRUE(t.Close().ok());
  {
    absl::MutexLock lock(&mu);
    ASSERT_TRUE(mu.AwaitWithTimeout(
        absl::Condition(+[](std::vector<std::string>* b) { return b->size() >= 2; },
                        &bodies),
        absl::Seconds(30)));
  }
  httplib::Client http("127.0.0.1", daemon_->http_port());
  const std::string metrics = http.Get("/metrics")->body;
  StopDaemon();
  receiver.stop();
  serving.join();

  absl::MutexLock lock(&mu);
  EXPECT_EQ(calls, 3);  // one failed attempt, retried, then the second alert
  ASSERT_EQ(bodies.size(), 2u);
  const auto first = nlohmann::json::parse(bodies[0]);
  EXPECT_EQ(first["event"], "run_unhealthy");
  EXPECT_EQ(first["run"]["run_id"], "alerting");
  EXPECT_EQ(first["run"]["project"], "vision");
  EXPECT_EQ(first["run"]["state"], "unhealthy");
  EXPECT_EQ(first["diagnosis"]["kind"], "divergence");
  EXPECT_THAT(first["text"].get<std::string>(), HasSubstr("UNHEALTHY"));
  const auto second = nlohmann::json::parse(bodies[1]);
  EXPECT_EQ(second["event"], "action_applied");
  EXPECT_EQ(second["advice"]["advice_id"], advice->advice_id());
  EXPECT_THAT(second["advice"]["action"].get<std::string>(), HasSubstr("scale the LR x0.1"));
  EXPECT_EQ(second["advice"]["ack_reason"], "LR x0.1");
  // (The second alert's "sent" may be counted just after the receiver saw
  // it; nothing failed or was dropped either way.)
  EXPECT_THAT(metrics, ::testing::ContainsRegex("lossguard_alerts_total\\{result=\"sent\"\\} [12]\n"));
  EXPECT_THAT(metrics, HasSubstr("lossguard_alerts_total{result=\"failed\"} 0\n"));
  EXPECT_THAT(metrics, HasSubstr("lossguard_alerts_total{result=\"dropped\"} 0\n"));
}

TEST_F(DaemonTest, BadWebhookUrlIsAStartError) {
  for (const char* url : {"ftp://example.com/hook", "http://example.com:99999999999/hook",
                          "http://example.com:0/", "http://user:pw@example.com/hook",
                          "http://example.com:abc/", "example.com/hook"}) {
    options_.alert_webhook = url;
    auto store = storage::NewMemoryStore();
    Daemon d(options_, store.get(), &clock_);
    absl::Status s = d.Start();
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << url << ": " << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(url));
  }
}

// Shutdown right after Start never hangs on the HTTP port (its library's
// stop() is a no-op until its listen loop runs).
TEST_F(DaemonTest, HttpPortStartAndImmediateShutdown) {
  options_.http_listen = "127.0.0.1:0";
  for (int i = 0; i < 20; ++i) {
    auto store = storage::NewMemoryStore();
    Daemon d(options_, store.get(), &clock_);
    ASSERT_TRUE(d.Start().ok());
    EXPECT_TRUE(d.Shutdown().ok());
  }
}

TEST_F(DaemonTest, HealthyRunGetsNoActionAndFinishes) {
  StartDaemon();
  const auto curve = LoadCurve(kHealthy);
  std::vector<v1::AttachResponse> responses =
      StreamCurve("healthy", v1::AUTO, curve);
  ASSERT_FALSE(responses.empty());
  EXPECT_TRUE(responses[0].has_accepted());
  for (const auto& r : responses) {
    EXPECT_FALSE(r.has_advice() && r.advice().has_action())
        << r.DebugString();
  }
  v1::RunHealth h = MustHealth("healthy");
  EXPECT_EQ(h.summary().state(), v1::FINISHED);
  EXPECT_TRUE(h.active_diagnoses().empty());
  EXPECT_EQ(h.summary().steps_stored(), static_cast<int64_t>(curve.size()));
  EXPECT_EQ(h.summary().tags().at("model"), "cnn");
  EXPECT_EQ(h.config().optimizer(), "sgd");
}

TEST_F(DaemonTest, ObserveModeSendsDiagnosesWithoutActions) {
  StartDaemon();
  std::vector<v1::AttachResponse> responses =
      StreamCurve("observed", v1::OBSERVE, LoadCurve(kDiverging));
  int diagnoses = 0;
  for (const auto& r : responses) {
    if (!r.has_advice()) continue;
    ++diagnoses;
    EXPECT_FALSE(r.advice().has_action());
    EXPECT_THAT(r.advice().explanation(), HasSubstr("OBSERVE"));
  }
  EXPECT_GE(diagnoses, 1);
  v1::RunHealth h = MustHealth("observed");
  for (const v1::AdviceRecord& r : h.advice()) {
    EXPECT_EQ(r.status(), v1::INFORMATIONAL);
  }
}

TEST_F(DaemonTest, ReconnectResumesWithoutDuplicates) {
  StartDaemon();
  const auto curve = LoadCurve(kHealthy);
  {
    Trainer t(stub_.get());
    ASSERT_TRUE(t.Send(StartRequest("resume", v1::ADVISE)));
    ASSERT_TRUE(t.Send(Batch(curve, 0, 100)));
    ASSERT_TRUE(t.Close().ok());
  }
  EXPECT_EQ(MustHealth("resume").summary().state(), v1::DETACHED);
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("resume", v1::ADVISE)));
  std::vector<v1::AttachResponse> got = t.WaitResponses(1);
  ASSERT_FALSE(got.empty());
  ASSERT_TRUE(got[0].has_accepted());
  EXPECT_TRUE(got[0].accepted().resumed());
  EXPECT_TRUE(got[0].accepted().has_steps());
  EXPECT_EQ(got[0].accepted().last_step(), curve[99].step);
  // A client that does not trust the server resends an overlap.
  ASSERT_TRUE(t.Send(Batch(curve, 50, 150)));
  ASSERT_TRUE(t.Close().ok());
  v1::RunHealth h = MustHealth("resume");
  EXPECT_EQ(h.summary().steps_stored(), 150);
  EXPECT_EQ(h.summary().last_step(), curve[149].step);
  // The store holds each step once.
  ASSERT_TRUE(store_->Flush().ok());
  int64_t n = 0, prev = -1;
  ASSERT_TRUE(store_
                  ->ReadSteps("resume", 0, 1 << 30,
                              [&](const storage::StepRow& r) {
                                EXPECT_GT(r.step, prev);
                                prev = r.step;
                                ++n;
                                return true;
                              })
                  .ok());
  EXPECT_EQ(n, 150);
}

TEST_F(DaemonTest, RestartOnTheSameDatabaseKeepsHistoryAndResumes) {
  StartDaemon();
  const auto curve = LoadCurve(kDiverging);
  const size_t half = 260;  // past the divergence advice, before the NaNs
  {
    Trainer t(stub_.get());
    ASSERT_TRUE(t.Send(StartRequest("restart", v1::AUTO)));
    for (size_t i = 0; i < half; i += 20) {
      ASSERT_TRUE(t.Send(Batch(curve, i, std::min(i + 20, half))));
    }
    ASSERT_TRUE(t.Close().ok());
  }
  const v1::RunHealth before = MustHealth("restart");
  ASSERT_FALSE(before.advice().empty());
  StopDaemon();

  StartDaemon();
  const v1::RunHealth after = MustHealth("restart");
  EXPECT_EQ(after.summary().last_step(), before.summary().last_step());
  EXPECT_EQ(after.summary().steps_stored(), static_cast<int64_t>(half));
  EXPECT_EQ(after.summary().state(), v1::DETACHED);
  EXPECT_EQ(after.summary().last_loss(), before.summary().last_loss());
  ASSERT_EQ(after.advice_size(), before.advice_size());
  for (int i = 0; i < after.advice_size(); ++i) {
    EXPECT_EQ(after.advice(i).advice().SerializeAsString(),
              before.advice(i).advice().SerializeAsString());
  }
  ASSERT_EQ(after.active_diagnoses_size(), before.active_diagnoses_size());

  // The trainer re-attaches and continues where the server left off; the
  // advice ids go on from the stored ones.
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("restart", v1::AUTO)));
  auto got = t.WaitResponses(1);
  ASSERT_FALSE(got.empty());
  EXPECT_EQ(got[0].accepted().last_step(), curve[half - 1].step);
  ASSERT_TRUE(t.Send(Batch(curve, half, curve.size())));
  ASSERT_TRUE(t.Close().ok());
  const v1::RunHealth end = MustHealth("restart");
  EXPECT_EQ(end.summary().steps_stored(), static_cast<int64_t>(curve.size()));
  std::set<uint64_t> ids;
  for (const auto& r : end.advice()) {
    EXPECT_TRUE(ids.insert(r.advice().advice_id()).second);
  }
}

TEST_F(DaemonTest, FirstMessageMustBeStart) {
  StartDaemon();
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(Batch(LoadCurve(kHealthy), 0, 10)));
  grpc::Status s = t.AwaitEnd();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("must be start"));
}

TEST_F(DaemonTest, OutOfOrderStepsAreRejectedAndNothingIsLost) {
  StartDaemon();
  const auto curve = LoadCurve(kHealthy);
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("order", v1::AUTO)));
  ASSERT_TRUE(t.Send(Batch(curve, 0, 20)));
  v1::AttachRequest bad = Batch(curve, 20, 30);
  std::swap(*bad.mutable_steps()->mutable_steps(3),
            *bad.mutable_steps()->mutable_steps(6));
  t.Send(bad);
  grpc::Status s = t.AwaitEnd();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("must increase"));
  v1::RunHealth h = MustHealth("order");
  EXPECT_EQ(h.summary().steps_stored(), 20);
  EXPECT_EQ(h.summary().last_step(), curve[19].step);
}

TEST_F(DaemonTest, BadLrIsInvalidArgument) {
  StartDaemon();
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("badlr", v1::AUTO)));
  v1::AttachRequest req;
  v1::Step* s = req.mutable_steps()->add_steps();
  s->set_step(1);
  s->set_lr(-0.1);
  s->set_loss(1.0);
  t.Send(req);
  grpc::Status st = t.AwaitEnd();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("lr"));
}

TEST_F(DaemonTest, OversizedBatchIsResourceExhausted) {
  StartDaemon();
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("big", v1::AUTO)));
  v1::AttachRequest req;
  for (int i = 0; i <= options_.max_batch_steps; ++i) {
    v1::Step* s = req.mutable_steps()->add_steps();
    s->set_step(i);
    s->set_lr(0.1);
    s->set_loss(1.0);
  }
  t.Send(req);
  grpc::Status st = t.AwaitEnd();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(st.error_message(), HasSubstr("at most 1000"));
}

TEST_F(DaemonTest, BadRunIdsAreInvalidArgument) {
  StartDaemon();
  for (const std::string& id :
       {std::string(), std::string(10240, 'x'), std::string("run\n1"),
        std::string("a\0b", 3)}) {
    Trainer t(stub_.get());
    ASSERT_TRUE(t.Send(StartRequest(id, v1::AUTO)));
    grpc::Status st = t.AwaitEnd();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << id.size();
    EXPECT_THAT(st.error_message(), HasSubstr("run_id"));
  }
  grpc::ClientContext ctx;
  v1::ListRunsRequest req;
  v1::ListRunsResponse resp;
  ASSERT_TRUE(stub_->ListRuns(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.runs_size(), 0);
}

TEST_F(DaemonTest, NonFiniteValuesAreData) {
  StartDaemon();
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("nan", v1::AUTO)));
  v1::AttachRequest req;
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double values[] = {1.0, 0.9, 1e308, 4.9e-324, -inf, inf, nan};
  int64_t step = 0;
  for (double v : values) {
    v1::Step* s = req.mutable_steps()->add_steps();
    s->set_step(step++);
    s->set_lr(0.1);
    s->set_loss(v);
    s->set_val_loss(v);
    s->set_grad_norm(v);
  }
  ASSERT_TRUE(t.Send(req));
  std::optional<v1::Advice> advice = t.WaitAdvice();
  ASSERT_TRUE(t.Close().ok());
  ASSERT_TRUE(advice.has_value());
  EXPECT_EQ(advice->diagnosis().kind(), v1::DIVERGENCE);
  v1::RunHealth h = MustHealth("nan");
  EXPECT_EQ(h.summary().steps_stored(), 7);
  EXPECT_TRUE(std::isnan(h.summary().last_loss()));
  ASSERT_TRUE(store_->Flush().ok());
  std::vector<storage::StepRow> rows;
  ASSERT_TRUE(store_
                  ->ReadSteps("nan", 0, 100,
                              [&](const storage::StepRow& r) {
                                rows.push_back(r);
                                return true;
                              })
                  .ok());
  ASSERT_EQ(rows.size(), 7u);
  EXPECT_EQ(rows[2].loss, 1e308);
  EXPECT_EQ(rows[3].loss, 4.9e-324);
  EXPECT_EQ(rows[4].loss, -inf);
  EXPECT_EQ(rows[5].grad_norm, inf);
  EXPECT_TRUE(std::isnan(rows[6].loss));
  EXPECT_TRUE(std::isnan(*rows[6].val_loss));
}

// Extreme but legal input: negative steps, steps 2^62 apart and up to
// INT64_MAX, denormals, 1e308 and -0.0 in every numeric field, an empty
// batch. All of it is data: stored exactly, and every query over the run
// (health, a downsampled curve across a 2^63-step span, a re-attach)
// answers without crashing.
TEST_F(DaemonTest, ExtremeStepsAndValuesAreDataAndEveryQueryCopes) {
  StartDaemon();
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("extreme", v1::OBSERVE)));
  ASSERT_FALSE(t.WaitResponses(1).empty());
  v1::AttachRequest empty;
  empty.mutable_steps();  // a batch of no steps
  ASSERT_TRUE(t.Send(empty));

  const int64_t max = std::numeric_limits<int64_t>::max();
  const int64_t steps[] = {-(int64_t{1} << 62), -5, 0, int64_t{1} << 62,
                           (int64_t{1} << 62) + 1, max - 1, max};
  const double denormal = std::numeric_limits<double>::denorm_min();
  const double values[] = {denormal, 1e308, -0.0, 2.5, 1e-300, 7.0, 0.0};
  v1::AttachRequest req;
  for (size_t i = 0; i < std::size(steps); ++i) {
    v1::Step* s = req.mutable_steps()->add_steps();
    s->set_step(steps[i]);
    s->set_lr(values[i] >= 0 ? values[i] : 0.0);  // an LR must be >= 0
    s->set_loss(values[i]);
    s->set_val_loss(values[i]);
    s->set_grad_norm(values[i]);
    s->set_wall_time(values[i]);
  }
  std::vector<v1::AttachResponse> got = t.SendAndWait(req);
  ASSERT_FALSE(got.empty());
  ASSERT_TRUE(got.back().has_received()) << got.back().DebugString();
  EXPECT_EQ(got.back().received().last_step(), max);
  ASSERT_TRUE(t.Close().ok());

  v1::RunHealth h = MustHealth("extreme");
  EXPECT_EQ(h.summary().last_step(), max);
  EXPECT_EQ(h.summary().steps_stored(), 7);
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    v1::GetCurveRequest creq;
    creq.set_run_id("extreme");
    creq.set_max_points(4);
    v1::Curve curve;
    grpc::Status cs = stub_->GetCurve(&ctx, creq, &curve);
    ASSERT_TRUE(cs.ok()) << cs.error_message();
    EXPECT_GT(curve.points_size(), 0);
  }
  std::vector<storage::StepRow> rows;
  ASSERT_TRUE(store_
                  ->ReadSteps("extreme", std::numeric_limits<int64_t>::min(),
                              max,
                              [&](const storage::StepRow& r) {
                                rows.push_back(r);
                                return true;
                              })
                  .ok());
  ASSERT_EQ(rows.size(), std::size(steps));
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].step, steps[i]);
    EXPECT_EQ(std::bit_cast<uint64_t>(rows[i].loss),
              std::bit_cast<uint64_t>(values[i]));
    EXPECT_EQ(std::bit_cast<uint64_t>(*rows[i].grad_norm),
              std::bit_cast<uint64_t>(values[i]));
  }

  // Re-attaching: the daemon holds everything up to INT64_MAX.
  Trainer again(stub_.get());
  ASSERT_TRUE(again.Send(StartRequest("extreme", v1::OBSERVE)));
  std::vector<v1::AttachResponse> acc = again.WaitResponses(1);
  ASSERT_FALSE(acc.empty());
  EXPECT_EQ(acc[0].accepted().last_step(), max);
  ASSERT_TRUE(again.Close().ok());
}

TEST_F(DaemonTest, UnknownRunIsNotFound) {
  StartDaemon();
  v1::RunHealth h;
  EXPECT_EQ(Health("nope", &h).error_code(), grpc::StatusCode::NOT_FOUND);
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    v1::GetCurveRequest req;
    req.set_run_id("nope");
    v1::Curve curve;
    EXPECT_EQ(stub_->GetCurve(&ctx, req, &curve).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    v1::WatchRunRequest req;
    req.set_run_id("nope");
    auto reader = stub_->WatchRun(&ctx, req);
    v1::RunEvent e;
    EXPECT_FALSE(reader->Read(&e));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
}

TEST_F(DaemonTest, WatchRunSeesDiagnosesAdviceAndTheEnd) {
  StartDaemon();
  // The run must exist before it can be watched.
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("watched", v1::AUTO)));
  ASSERT_FALSE(t.WaitResponses(1).empty());

  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
  v1::WatchRunRequest req;
  req.set_run_id("watched");
  auto reader = stub_->WatchRun(&ctx, req);
  // The first event is the current state: the watch is subscribed once it
  // has arrived.
  v1::RunEvent first;
  ASSERT_TRUE(reader->Read(&first));
  EXPECT_TRUE(first.has_state());

  const auto curve = LoadCurve(kDiverging);
  for (size_t i = 0; i < curve.size(); i += 50) {
    ASSERT_TRUE(t.Send(Batch(curve, i, i + 50)));
  }
  v1::AttachRequest f;
  f.mutable_finish();
  ASSERT_TRUE(t.Send(f));
  ASSERT_TRUE(t.Close().ok());

  int diagnoses = 0, advice = 0;
  bool finished = false;
  v1::RunEvent e;
  while (reader->Read(&e)) {
    EXPECT_EQ(e.run_id(), "watched");
    diagnoses += e.has_diagnosis();
    advice += e.has_advice();
    if (e.has_state() && e.state().state() == v1::FINISHED) finished = true;
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_GE(diagnoses, 1);
  EXPECT_GE(advice, 1);
  EXPECT_TRUE(finished);
}

TEST_F(DaemonTest, ListRunsFiltersAndPages) {
  StartDaemon();
  const auto curve = LoadCurve(kHealthy);
  for (int i = 0; i < 5; ++i) {
    Trainer t(stub_.get());
    ASSERT_TRUE(t.Send(StartRequest(absl::StrCat("run", i), v1::OBSERVE,
                                    i % 2 ? "odd" : "even")));
    ASSERT_TRUE(t.Send(Batch(curve, 0, 30)));
    if (i == 0) {
      v1::AttachRequest f;
      f.mutable_finish();
      ASSERT_TRUE(t.Send(f));
    }
    ASSERT_TRUE(t.Close().ok());
  }
  auto list = [&](const std::string& project, std::vector<v1::RunState> states,
                  int page_size, const std::string& token) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    v1::ListRunsRequest req;
    req.set_project(project);
    for (auto s : states) req.add_states(s);
    req.set_page_size(page_size);
    req.set_page_token(token);
    v1::ListRunsResponse resp;
    EXPECT_TRUE(stub_->ListRuns(&ctx, req, &resp).ok());
    return resp;
  };
  EXPECT_EQ(list("", {}, 0, "").runs_size(), 5);
  EXPECT_EQ(list("even", {}, 0, "").runs_size(), 3);
  auto finished = list("", {v1::FINISHED}, 0, "");
  ASSERT_EQ(finished.runs_size(), 1);
  EXPECT_EQ(finished.runs(0).run_id(), "run0");
  // Pages of 2: newest first, every run once.
  std::vector<std::string> seen;
  std::string token;
  do {
    auto page = list("", {}, 2, token);
    EXPECT_LE(page.runs_size(), 2);
    for (const auto& r : page.runs()) seen.push_back(r.run_id());
    token = page.next_page_token();
  } while (!token.empty());
  EXPECT_THAT(seen, ::testing::ElementsAre("run4", "run3", "run2", "run1",
                                           "run0"));
  // A malformed token is the client's error.
  grpc::ClientContext ctx;
  v1::ListRunsRequest req;
  req.set_page_token("garbage");
  v1::ListRunsResponse resp;
  EXPECT_EQ(stub_->ListRuns(&ctx, req, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(DaemonTest, GetCurveDownsamplesAndKeepsTheBlowUp) {
  StartDaemon();
  const auto curve = LoadCurve(kDiverging);
  StreamCurve("curve", v1::AUTO, curve);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
  v1::GetCurveRequest req;
  req.set_run_id("curve");
  req.set_max_points(60);
  v1::Curve out;
  grpc::Status s = stub_->GetCurve(&ctx, req, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(out.total_points(), static_cast<int64_t>(curve.size()));
  EXPECT_LE(out.points_size(), 60);
  EXPECT_GE(out.points_size(), 30);
  bool nonfinite = false;
  double max_finite = 0.0, curve_max = 0.0;
  for (const auto& p : out.points()) {
    nonfinite |= !std::isfinite(p.loss());
    if (std::isfinite(p.loss())) max_finite = std::max(max_finite, p.loss());
  }
  for (const auto& r : curve) {
    if (std::isfinite(r.loss)) curve_max = std::max(curve_max, r.loss);
  }
  EXPECT_TRUE(nonfinite);
  // The highest finite loss of the run survives downsampling.
  EXPECT_EQ(max_finite, curve_max);
  EXPECT_GE(out.advice_size(), 1);
  EXPECT_GE(out.diagnoses_size(), 1);
}

TEST_F(DaemonTest, AnalyzeCurveMatchesTheLiveDiagnosis) {
  StartDaemon();
  const auto curve = LoadCurve(kDiverging);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
  v1::AnalyzeCurveRequest req;
  for (const auto& r : curve) *req.add_steps() = wire::ToProto(r);
  req.set_mode(v1::AUTO);
  v1::AnalyzeCurveResponse resp;
  ASSERT_TRUE(stub_->AnalyzeCurve(&ctx, req, &resp).ok());
  ASSERT_GE(resp.diagnoses_size(), 1);
  EXPECT_EQ(resp.diagnoses(0).kind(), v1::DIVERGENCE);
  ASSERT_EQ(resp.advice_size(), resp.diagnoses_size());
  EXPECT_TRUE(resp.advice(0).action().has_scale_lr());

  // Live, the same curve gives the same first diagnosis at the same step.
  StreamCurve("live", v1::AUTO, curve);
  v1::RunHealth h = MustHealth("live");
  ASSERT_GE(h.advice_size(), 1);
  EXPECT_EQ(h.advice(0).advice().diagnosis().step(),
            resp.diagnoses(0).step());

  // Steps that do not increase are the caller's error.
  grpc::ClientContext ctx2;
  v1::AnalyzeCurveRequest bad;
  *bad.add_steps() = wire::ToProto(curve[5]);
  *bad.add_steps() = wire::ToProto(curve[2]);
  EXPECT_EQ(stub_->AnalyzeCurve(&ctx2, bad, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(DaemonTest, SuggestLearningRateReadsARangeTestAsLrFindDoes) {
  StartDaemon();
  const auto curve = LoadCurve(kRangeTest);
  v1::SuggestLearningRateRequest req;
  std::vector<double> lrs;
  std::vector<double> losses;
  for (const auto& r : curve) {
    *req.add_steps() = wire::ToProto(r);
    lrs.push_back(r.lr);
    losses.push_back(r.loss);
  }
  absl::StatusOr<analyzers::LrSuggestion> local =
      analyzers::SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(local.ok()) << local.status();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
  v1::LrSuggestion got;
  ASSERT_TRUE(stub_->SuggestLearningRate(&ctx, req, &got).ok());
  EXPECT_EQ(got.suggested_lr(), local->suggested_lr);
  EXPECT_EQ(got.steep_mid_lr(), local->steep_mid_lr);
  EXPECT_EQ(got.basin_mid_lr(), local->basin_mid_lr);
  EXPECT_EQ(got.diverge_lr(), local->diverge_lr);
  EXPECT_EQ(got.points_used(), local->points_used);
  EXPECT_EQ(got.evidence(), local->evidence);
  EXPECT_GT(got.suggested_lr(), got.steep_mid_lr());
  EXPECT_LT(got.suggested_lr(), got.basin_mid_lr());

  // A flat curve has no descent: said, with the numbers, not guessed.
  v1::SuggestLearningRateRequest flat;
  double lr = 1e-7;
  for (int i = 0; i < 200; ++i, lr *= 1.06) {
    v1::Step* step = flat.add_steps();
    step->set_step(i);
    step->set_lr(lr);
    step->set_loss(2.3 + 0.01 * (i % 3));
  }
  grpc::ClientContext ctx2;
  grpc::Status status = stub_->SuggestLearningRate(&ctx2, flat, &got);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("no usable descent"));

  // An LR that does not grow, or too few points, is the caller's error.
  v1::SuggestLearningRateRequest shrinking = req;
  shrinking.mutable_steps(3)->set_lr(shrinking.steps(2).lr() / 2);
  grpc::ClientContext ctx3;
  status = stub_->SuggestLearningRate(&ctx3, shrinking, &got);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("must grow"));
  grpc::ClientContext ctx4;
  status = stub_->SuggestLearningRate(&ctx4, v1::SuggestLearningRateRequest(), &got);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(DaemonTest, HealthServiceAndReflection) {
  StartDaemon();
  auto health = grpc::health::v1::Health::NewStub(channel_);
  for (const char* service : {"", "lossguard.v1.LossGuard"}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    ASSERT_TRUE(health->Check(&ctx, req, &resp).ok()) << service;
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  }

  auto reflection =
      grpc::reflection::v1alpha::ServerReflection::NewStub(channel_);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
  auto stream = reflection->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest req;
  req.set_list_services("");
  ASSERT_TRUE(stream->Write(req));
  grpc::reflection::v1alpha::ServerReflectionResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  std::vector<std::string> names;
  for (const auto& s : resp.list_services_response().service()) {
    names.push_back(s.name());
  }
  EXPECT_THAT(names, ::testing::Contains("lossguard.v1.LossGuard"));
  // The contract itself can be fetched, so generic tools can call it.
  req.set_file_containing_symbol("lossguard.v1.LossGuard");
  ASSERT_TRUE(stream->Write(req));
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_GE(resp.file_descriptor_response().file_descriptor_proto_size(), 1);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(DaemonTest, ShutdownEndsStreamsWithUnavailableAndKeepsTheSteps) {
  StartDaemon();
  const auto curve = LoadCurve(kHealthy);
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("shutdown", v1::AUTO)));
  t.SendAndWait(Batch(curve, 0, 40));
  // Shut down while the stream is open.
  std::thread stopper([&] { EXPECT_TRUE(daemon_->Shutdown().ok()); });
  grpc::Status s = t.AwaitEnd();
  stopper.join();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("reconnect"));
  daemon_.reset();
  store_.reset();
  // Restart: the steps are there.
  StartDaemon();
  v1::RunHealth h = MustHealth("shutdown");
  EXPECT_EQ(h.summary().steps_stored(), 40);
  EXPECT_EQ(h.summary().state(), v1::DETACHED);
}

TEST_F(DaemonTest, HundredsOfRunsAtOnceAndASlowWatcherBlocksNobody) {
  options_.max_queued_events = 50;
  StartDaemon();
  const auto curve = LoadCurve(kDiverging);
  // A watcher that never reads: its events pile up until it is dropped,
  // and no trainer waits for it.
  {
    Trainer t(stub_.get());
    ASSERT_TRUE(t.Send(StartRequest("run0", v1::AUTO)));
    ASSERT_FALSE(t.WaitResponses(1).empty());
    ASSERT_TRUE(t.Close().ok());
  }
  grpc::ClientContext watch_ctx;
  watch_ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
  v1::WatchRunRequest wreq;
  wreq.set_run_id("run0");
  auto stuck = stub_->WatchRun(&watch_ctx, wreq);

  constexpr int kRuns = 200;
  std::vector<std::unique_ptr<Trainer>> trainers;
  for (int i = 0; i < kRuns; ++i) {
    trainers.push_back(std::make_unique<Trainer>(stub_.get()));
    ASSERT_TRUE(trainers.back()->Send(
        StartRequest(absl::StrCat("run", i), v1::AUTO)));
  }
  // Interleave the streams batch by batch.
  for (size_t b = 0; b < curve.size(); b += 25) {
    for (auto& t : trainers) ASSERT_TRUE(t->Send(Batch(curve, b, b + 25)));
  }
  for (auto& t : trainers) {
    grpc::Status s = t->Close();
    ASSERT_TRUE(s.ok()) << s.error_message();
    int actions = 0;
    for (const auto& r : t->Responses()) {
      actions += r.has_advice() && r.advice().has_action();
    }
    EXPECT_GE(actions, 1);
  }
  for (int i = 0; i < kRuns; ++i) {
    v1::RunHealth h = MustHealth(absl::StrCat("run", i));
    EXPECT_EQ(h.summary().steps_stored(), static_cast<int64_t>(curve.size()));
  }
  watch_ctx.TryCancel();
  v1::RunEvent e;
  while (stuck->Read(&e)) {
  }
  grpc::Status ws = stuck->Finish();
  EXPECT_TRUE(ws.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
              ws.error_code() == grpc::StatusCode::CANCELLED)
      << ws.error_message();
}

TEST_F(DaemonTest, StoreBackpressureParksReadsWithoutLosingSteps) {
  // Every batch waits until the store has committed everything before it.
  options_.max_store_backlog_steps = 0;
  StartDaemon();
  const auto curve = LoadCurve(kDiverging);
  std::vector<std::unique_ptr<Trainer>> trainers;
  for (int i = 0; i < 4; ++i) {
    trainers.push_back(std::make_unique<Trainer>(stub_.get()));
    ASSERT_TRUE(trainers.back()->Send(
        StartRequest(absl::StrCat("bp", i), v1::AUTO)));
    for (size_t b = 0; b < curve.size(); b += 10) {
      ASSERT_TRUE(trainers.back()->Send(Batch(curve, b, b + 10)));
    }
  }
  for (auto& t : trainers) ASSERT_TRUE(t->Close().ok());
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(MustHealth(absl::StrCat("bp", i)).summary().steps_stored(),
              static_cast<int64_t>(curve.size()));
  }
  // Streams parked on the store when the daemon shuts down end cleanly.
  std::vector<std::unique_ptr<Trainer>> more;
  for (int i = 0; i < 4; ++i) {
    more.push_back(std::make_unique<Trainer>(stub_.get()));
    ASSERT_TRUE(more.back()->Send(
        StartRequest(absl::StrCat("late", i), v1::AUTO)));
    for (size_t b = 0; b < curve.size(); b += 10) {
      more.back()->Send(Batch(curve, b, b + 10));
    }
  }
  std::thread stopper([&] { EXPECT_TRUE(daemon_->Shutdown().ok()); });
  for (auto& t : more) {
    grpc::Status s = t->AwaitEnd();
    // UNAVAILABLE as sent; a client whose writes are still in flight when
    // the server ends the call may see the stream reset (CANCELLED) instead.
    EXPECT_TRUE(s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                s.error_code() == grpc::StatusCode::CANCELLED)
        << s.error_message();
  }
  stopper.join();
}

// While the store cannot commit (another connection holds the database
// locked), batches are not confirmed, since they are not durable; the
// retry commits them and the confirmation follows. A trainer that
// half-closed waits for its last confirmations, but shutdown ends that
// wait: a failing store cannot hold a call, or the daemon, forever.
TEST_F(DaemonTest, ConfirmationsWaitForTheStoreAndShutdownEndsTheWait) {
  storage::SqliteOptions store_options;
  store_options.busy_timeout_ms = 0;
  store_options.retry_initial_backoff_s = 0.001;
  store_options.retry_max_backoff_s = 0.01;
  StartDaemon(store_options);
  const auto curve = LoadCurve(kHealthy);
  Trainer t(stub_.get());
  ASSERT_TRUE(t.Send(StartRequest("held", v1::ADVISE)));
  ASSERT_FALSE(t.WaitResponses(1).empty());

  sqlite3* blocker = nullptr;
  ASSERT_EQ(sqlite3_open_v2(DbPath().c_str(), &blocker, SQLITE_OPEN_READWRITE,
                            nullptr),
            SQLITE_OK);
  // The daemon's writer may still be storing the attach: the blocker waits
  // for that write to end rather than failing with SQLITE_BUSY (seen once
  // under TSan).
  sqlite3_busy_timeout(blocker, 60000);
  ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr),
            SQLITE_OK);
  ASSERT_TRUE(t.Send(Batch(curve, 0, 10)));
  // The writer has tried the batch and failed...
  while (!store_->Stats().failing) std::this_thread::yield();
  // ...so nothing confirms it.
  for (const v1::AttachResponse& r : t.Responses()) {
    EXPECT_FALSE(r.has_received()) << r.DebugString();
  }
  ASSERT_EQ(sqlite3_exec(blocker, "ROLLBACK", nullptr, nullptr, nullptr),
            SQLITE_OK);
  std::vector<v1::AttachResponse> got =
      t.WaitUntil([&](const std::vector<v1::AttachResponse>& r) {
        return !r.empty() && r.back().has_received();
      });
  ASSERT_FALSE(got.empty());
  ASSERT_TRUE(got.back().has_received());
  EXPECT_EQ(got.back().received().last_step(), curve[9].step);

  // Locked again: a batch, a half-close, and the stream waits for the
  // batch's confirmation. Shutdown ends it.
  ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr),
            SQLITE_OK);
  ASSERT_TRUE(t.Send(Batch(curve, 10, 20)));
  t.HalfClose();
  const absl::Status stopped = daemon_->Shutdown();
  EXPECT_EQ(stopped.code(), absl::StatusCode::kUnavailable) << stopped;
  daemon_.reset();
  EXPECT_EQ(t.AwaitEnd().error_code(), grpc::StatusCode::UNAVAILABLE);
  store_.reset();  // tries the batch once more, then gives it up
  ASSERT_EQ(sqlite3_exec(blocker, "ROLLBACK", nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close_v2(blocker);
}

}  // namespace
}  // namespace lossguard::service
