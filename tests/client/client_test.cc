// lossguard::Client against a real lossguardd (in-process Daemon on
// loopback): streaming, advice and acks, a daemon that is down, restarts,
// the bounded buffer, refused reports, finishing.

#include "lossguard/client/client.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lossguard/curvefile/curve_csv.h"
#include "lossguard/service/service.h"
#include "lossguard/storage/run_store.h"
#include "lossguard/v1/lossguard.grpc.pb.h"

namespace lossguard {
namespace {

// Generous: only a bug makes a test wait this long.
const absl::Duration kWait = absl::Seconds(60);

std::vector<analyzers::StepRecord> LoadCurve(const std::string& name) {
  auto records = curvefile::ReadCurveCsv(
      absl::StrCat(LOSSGUARD_EXAMPLES_DIR, "/", name));
  EXPECT_TRUE(records.ok()) << records.status();
  return records.ok() ? *records : std::vector<analyzers::StepRecord>{};
}

class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           absl::StrCat("lossguard_client_test_", ::getpid(), "_",
                        ::testing::UnitTest::GetInstance()
                            ->current_test_info()
                            ->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    StopDaemon();
    std::filesystem::remove_all(dir_);
  }

  // Starts lossguardd on `port` (0: any) over the test's SQLite file.
  void StartDaemon(int port = 0) {
    auto store = storage::OpenSqliteStore((dir_ / "lossguard.db").string());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    service::ServerOptions options;
    options.listen = absl::StrCat("127.0.0.1:", port);
    daemon_ = std::make_unique<service::Daemon>(options, store_.get());
    absl::Status s = daemon_->Start();
    ASSERT_TRUE(s.ok()) << s;
    port_ = daemon_->port();
    stub_ = v1::LossGuard::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_),
                            grpc::InsecureChannelCredentials()));
  }

  void StopDaemon() {
    if (daemon_ != nullptr) {
      EXPECT_TRUE(daemon_->Shutdown().ok());
      daemon_.reset();
    }
    store_.reset();
    stub_.reset();
  }

  ClientOptions Options(const std::string& run_id) {
    ClientOptions o;
    o.server = absl::StrCat("127.0.0.1:", port_);
    o.run_id = run_id;
    o.project = "client-tests";
    o.mode = v1::AUTO;
    o.initial_backoff = absl::Milliseconds(10);
    o.max_backoff = absl::Milliseconds(100);
    return o;
  }

  v1::RunHealth Health(const std::string& run_id) {
    grpc::ClientContext ctx;
    v1::GetRunHealthRequest req;
    req.set_run_id(run_id);
    v1::RunHealth h;
    grpc::Status s = stub_->GetRunHealth(&ctx, req, &h);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return h;
  }

  int64_t StoredSteps(const std::string& run_id) {
    EXPECT_TRUE(store_->Flush().ok());
    int64_t n = 0, prev = std::numeric_limits<int64_t>::min();
    EXPECT_TRUE(store_
                    ->ReadSteps(run_id, std::numeric_limits<int64_t>::min(),
                                std::numeric_limits<int64_t>::max(),
                                [&](const storage::StepRow& r) {
                                  EXPECT_GT(r.step, prev);
                                  prev = r.step;
                                  ++n;
                                  return true;
                                })
                    .ok());
    return n;
  }

  std::filesystem::path dir_;
  std::unique_ptr<storage::RunStore> store_;
  std::unique_ptr<service::Daemon> daemon_;
  std::unique_ptr<v1::LossGuard::Stub> stub_;
  int port_ = 0;
};

TEST_F(ClientTest, StreamsStepsAndAppliesAdvice) {
  StartDaemon();
  std::atomic<int> callbacks{0};
  ClientOptions o = Options("stream");
  o.on_advice = [&](const v1::Advice&) { ++callbacks; };
  Client client(o);
  const auto curve = LoadCurve("digits-cnn-sgd-lr300-b32-ramp-s130.csv");
  for (const auto& r : curve) {
    ASSERT_TRUE(client.Report(r.step, r.lr, r.loss, r.val_loss, r.grad_norm));
  }
  ASSERT_TRUE(client.Flush(kWait));
  ClientStats st = client.stats();
  EXPECT_TRUE(st.connected);
  EXPECT_EQ(st.connects, 1);
  EXPECT_EQ(st.buffered_steps, 0);
  EXPECT_EQ(st.confirmed_step, curve.back().step);
  ASSERT_GE(st.advice_received, 1);

  std::optional<v1::Advice> advice = client.PollAdvice();
  ASSERT_TRUE(advice.has_value());
  EXPECT_EQ(advice->diagnosis().kind(), v1::DIVERGENCE);
  ASSERT_TRUE(advice->action().has_scale_lr());
  client.Ack(advice->advice_id(), /*applied=*/true, "scaled");
  ASSERT_TRUE(client.Flush(kWait));
  EXPECT_EQ(callbacks.load(), st.advice_received);
  ASSERT_TRUE(client.Finish("done", kWait));

  v1::RunHealth h = Health("stream");
  EXPECT_EQ(h.summary().state(), v1::FINISHED);
  EXPECT_EQ(h.summary().steps_stored(), static_cast<int64_t>(curve.size()));
  ASSERT_GE(h.advice_size(), 1);
  EXPECT_EQ(h.advice(0).status(), v1::APPLIED);
  EXPECT_EQ(h.advice(0).ack_reason(), "scaled");
  EXPECT_FALSE(client.Report(100000, 0.1, 1.0));  // finished
}

// Strings that are not UTF-8 (a name, a tag, the finish reason) are sent
// with U+FFFD in place of the bad bytes: the daemon could not parse them,
// and would see the finish as a mere end of stream.
// A daemon of a fleet that does not serve any run: it records the run-id
// header of each Attach and refuses it, naming `owner` (when set) in the
// trailer a fleet daemon sends.
class RefusingService final : public v1::LossGuard::CallbackService {
 public:
  explicit RefusingService(std::string owner) : owner_(std::move(owner)) {}

  grpc::ServerBidiReactor<v1::AttachRequest, v1::AttachResponse>* Attach(
      grpc::CallbackServerContext* context) override {
    {
      absl::MutexLock lock(&mu_);
      auto it = context->client_metadata().find("lossguard-run-id");
      headers_.push_back(it == context->client_metadata().end()
                             ? std::string("(none)")
                             : std::string(it->second.data(), it->second.size()));
    }
    class Refuse final
        : public grpc::ServerBidiReactor<v1::AttachRequest, v1::AttachResponse> {
     public:
      Refuse(grpc::CallbackServerContext* context, const std::string& owner) {
        if (!owner.empty()) context->AddTrailingMetadata("lossguard-owner", owner);
        Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "served elsewhere"));
      }
      void OnDone() override { delete this; }
    };
    return new Refuse(context, owner_);
  }

  std::vector<std::string> headers() {
    absl::MutexLock lock(&mu_);
    return headers_;
  }

 private:
  const std::string owner_;
  absl::Mutex mu_;
  std::vector<std::string> headers_ ABSL_GUARDED_BY(mu_);
};

TEST_F(ClientTest, FollowsAFleetRedirectAndSendsTheRunIdHeader) {
  StartDaemon();
  RefusingService refusing(absl::StrCat("127.0.0.1:", port_));
  grpc::ServerBuilder builder;
  int other_port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                           &other_port);
  builder.RegisterService(&refusing);
  std::unique_ptr<grpc::Server> other = builder.BuildAndStart();
  ASSERT_GT(other_port, 0);

  // Pointed at the refusing daemon, the client goes where it is told.
  const std::string run_id = "r \xc3\xbc%";  // "r", space, u-umlaut, "%"
  ClientOptions o = Options(run_id);
  o.server = absl::StrCat("127.0.0.1:", other_port);
  Client client(o);
  for (int i = 0; i < 30; ++i) client.Report(i, 0.01, 1.0 / (1 + i));
  ASSERT_TRUE(client.Flush(kWait)) << client.stats().last_error;
  EXPECT_GE(client.stats().redirects, 1);
  EXPECT_EQ(Health(run_id).summary().last_step(), 29);
  // The header: printable ASCII as is, other bytes and "%" percent-encoded.
  ASSERT_FALSE(refusing.headers().empty());
  EXPECT_EQ(refusing.headers().front(), "r %C3%BC%25");
  other->Shutdown();
}

TEST_F(ClientTest, StringsThatAreNotUtf8AreSentRepaired) {
  StartDaemon();
  ClientOptions o = Options("latin1");
  o.name = "caf\xe9";             // Latin-1 e-acute
  o.tags = {{"note", "\xff\xfe"}};
  {
    Client c(o);
    for (int i = 0; i < 50; ++i) c.Report(i, 0.1, 1.0 / (1 + i));
    EXPECT_TRUE(c.Finish("done \xc3", absl::Seconds(20)));
  }
  const v1::RunHealth h = Health("latin1");
  EXPECT_EQ(h.summary().state(), v1::FINISHED);
  EXPECT_EQ(h.summary().name(), "caf\xef\xbf\xbd");
  EXPECT_EQ(h.summary().tags().at("note"), "\xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ(h.summary().last_step(), 49);
}

TEST_F(ClientTest, BuffersWhileTheDaemonIsDownAndCatchesUp) {
  StartDaemon();
  const int port = port_;
  StopDaemon();  // the port is known, nobody listens on it

  Client client(Options("late"));
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(client.Report(i, 0.01, 2.0 - 0.01 * i));
  EXPECT_FALSE(client.Flush(absl::Milliseconds(50)));
  ClientStats st = client.stats();
  EXPECT_FALSE(st.connected);
  EXPECT_EQ(st.buffered_steps, 100);

  StartDaemon(port);
  ASSERT_EQ(port_, port);
  ASSERT_TRUE(client.Flush(kWait));
  EXPECT_EQ(client.stats().connects, 1);
  EXPECT_EQ(Health("late").summary().steps_stored(), 100);
  EXPECT_EQ(StoredSteps("late"), 100);
}

TEST_F(ClientTest, SurvivesADaemonRestartWithoutLosingOrDuplicatingSteps) {
  StartDaemon();
  const int port = port_;
  Client client(Options("restart"));
  for (int i = 0; i < 150; ++i) ASSERT_TRUE(client.Report(i, 0.01, 2.0 - 0.005 * i));
  ASSERT_TRUE(client.Flush(kWait));
  StopDaemon();
  // Training goes on while the daemon is away.
  for (int i = 150; i < 300; ++i) {
    ASSERT_TRUE(client.Report(i, 0.01, 2.0 - 0.005 * i));
  }
  StartDaemon(port);
  ASSERT_TRUE(client.Flush(kWait));
  EXPECT_GE(client.stats().connects, 2);
  EXPECT_EQ(client.stats().dropped_steps, 0);
  EXPECT_EQ(StoredSteps("restart"), 300);
  EXPECT_EQ(Health("restart").summary().last_step(), 299);
}

TEST_F(ClientTest, BoundedBufferDropsTheOldestAndCountsThem) {
  StartDaemon();
  const int port = port_;
  StopDaemon();
  ClientOptions o = Options("bounded");
  o.max_buffered_steps = 50;
  Client client(o);
  for (int i = 0; i < 200; ++i) ASSERT_TRUE(client.Report(i, 0.01, 1.0));
  ClientStats st = client.stats();
  EXPECT_EQ(st.dropped_steps, 150);
  EXPECT_EQ(st.buffered_steps, 50);
  StartDaemon(port);
  ASSERT_TRUE(client.Flush(kWait));
  // The newest 50 arrived.
  EXPECT_EQ(StoredSteps("bounded"), 50);
  v1::RunHealth h = Health("bounded");
  EXPECT_EQ(h.summary().last_step(), 199);
}

TEST_F(ClientTest, RefusesStepsTheDaemonWouldRefuse) {
  StartDaemon();
  Client client(Options("refuse"));
  EXPECT_TRUE(client.Report(5, 0.1, 1.0));
  EXPECT_FALSE(client.Report(5, 0.1, 1.0));  // not increasing
  EXPECT_FALSE(client.Report(3, 0.1, 1.0));
  EXPECT_FALSE(client.Report(6, -0.1, 1.0));  // negative lr
  EXPECT_FALSE(client.Report(6, std::numeric_limits<double>::infinity(), 1.0));
  EXPECT_TRUE(client.Report(6, std::numeric_limits<double>::quiet_NaN(), 1.0));
  EXPECT_TRUE(client.Report(7, 0.1, std::numeric_limits<double>::infinity()));
  ASSERT_TRUE(client.Flush(kWait));
  ClientStats st = client.stats();
  EXPECT_EQ(st.rejected_steps, 4);
  EXPECT_EQ(st.reported_steps, 3);
  EXPECT_EQ(st.connects, 1);  // nothing the daemon refused
  EXPECT_EQ(StoredSteps("refuse"), 3);
}

TEST_F(ClientTest, DestroyingAClientWithTheDaemonDownReturnsPromptly) {
  ClientOptions o = Options("nobody");
  o.server = "127.0.0.1:1";  // nothing listens on port 1
  o.close_timeout = absl::Milliseconds(10);
  const absl::Time start = absl::Now();
  {
    Client client(o);
    for (int i = 0; i < 10; ++i) client.Report(i, 0.1, 1.0);
  }
  // Bounded by close_timeout plus one connection attempt, not by backoff.
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
}

}  // namespace
}  // namespace lossguard
