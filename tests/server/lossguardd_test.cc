// The built lossguardd binary end to end: it listens on a port the OS picks,
// serves health checks, takes a run, shuts down on SIGTERM (ending the
// stream with UNAVAILABLE and exiting 0), and a restart on the same
// database has the run back.

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "lossguard/v1/lossguard.grpc.pb.h"
#include "tests/server/daemon_process.h"

namespace {

namespace v1 = ::lossguard::v1;
using ::testing::HasSubstr;

constexpr auto kDeadline = std::chrono::seconds(60);

using lossguard::testing::DaemonProcess;

TEST(LossguarddTest, ServesShutsDownOnSigtermAndRestarts) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) /
      absl::StrCat("lossguardd_bin_", getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string db = (dir / "lossguard.db").string();

  {
    DaemonProcess daemon(db);
    ASSERT_GT(daemon.port(), 0);
    auto channel = grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", daemon.port()),
        grpc::InsecureChannelCredentials());

    auto health = grpc::health::v1::Health::NewStub(channel);
    grpc::ClientContext hctx;
    hctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    grpc::health::v1::HealthCheckRequest hreq;
    grpc::health::v1::HealthCheckResponse hresp;
    ASSERT_TRUE(health->Check(&hctx, hreq, &hresp).ok());
    EXPECT_EQ(hresp.status(), grpc::health::v1::HealthCheckResponse::SERVING);

    auto stub = v1::LossGuard::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    auto stream = stub->Attach(&ctx);
    v1::AttachRequest start;
    start.mutable_start()->set_run_id("bin-run");
    start.mutable_start()->set_mode(v1::AUTO);
    ASSERT_TRUE(stream->Write(start));
    v1::AttachResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    ASSERT_TRUE(resp.has_accepted());
    v1::AttachRequest batch;
    for (int i = 0; i < 30; ++i) {
      v1::Step* s = batch.mutable_steps()->add_steps();
      s->set_step(i);
      s->set_lr(0.01);
      s->set_loss(2.0 - 0.01 * i);
    }
    ASSERT_TRUE(stream->Write(batch));
    // The batch is in once the server says so.
    do {
      ASSERT_TRUE(stream->Read(&resp));
    } while (!resp.has_received());
    EXPECT_EQ(resp.received().last_step(), 29);

    // The trainer sees its stream end, as a client's reader thread would;
    // the daemon then exits at once (an unresponsive client would hold it
    // for at most the shutdown grace period).
    daemon.SendSigterm();
    while (stream->Read(&resp)) {
    }
    grpc::Status s = stream->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(s.error_message(), HasSubstr("reconnect"));
    // An idle sync client polls its connection only every few seconds (the
    // daemon waits for it up to the grace period): close it.
    stream.reset();
    stub.reset();
    health.reset();
    channel.reset();
    EXPECT_EQ(daemon.Wait(), 0);
  }
  {
    DaemonProcess daemon(db);
    ASSERT_GT(daemon.port(), 0);
    v1::RunHealth h;
    {
      auto stub = v1::LossGuard::NewStub(grpc::CreateChannel(
          absl::StrCat("127.0.0.1:", daemon.port()),
          grpc::InsecureChannelCredentials()));
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
      v1::GetRunHealthRequest req;
      req.set_run_id("bin-run");
      ASSERT_TRUE(stub->GetRunHealth(&ctx, req, &h).ok());
    }
    EXPECT_EQ(h.summary().steps_stored(), 30);
    EXPECT_EQ(h.summary().last_step(), 29);
    EXPECT_EQ(h.summary().state(), v1::DETACHED);
    EXPECT_EQ(daemon.Terminate(), 0);
  }
  std::filesystem::remove_all(dir);
}

TEST(LossguarddTest, UnwritableDatabaseIsAClearError) {
  DaemonProcess daemon("/nonexistent-dir/lossguard.db");
  EXPECT_EQ(daemon.port(), 0);
  EXPECT_EQ(daemon.Terminate(), 1);
}

}  // namespace
