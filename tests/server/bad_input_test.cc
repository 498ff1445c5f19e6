// The rows of the bad-input matrix that daemon_test.cc does not cover:
// bytes that are not a protobuf on every method, a message over the size
// limit, a stream that never sends start, slow-drip batches, and thousands
// of runs from one client. Each: the exact status, no crash, nothing stored
// lost, and the daemon answers afterwards.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lossguard/service/service.h"
#include "lossguard/storage/run_store.h"
#include "lossguard/v1/lossguard.grpc.pb.h"

namespace lossguard::service {
namespace {

namespace v1 = ::lossguard::v1;
using ::testing::HasSubstr;

constexpr auto kDeadline = std::chrono::seconds(60);

class BadInputTest : public ::testing::Test {
 protected:
  void Start(ServerOptions o = ServerOptions()) {
    o.listen = "127.0.0.1:0";
    o.http_listen = "";
    store_ = storage::NewMemoryStore();
    daemon_ = std::make_unique<Daemon>(o, store_.get());
    absl::Status s = daemon_->Start();
    ASSERT_TRUE(s.ok()) << s;
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", daemon_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::LossGuard::NewStub(channel_);
  }
  void TearDown() override {
    if (daemon_) {
      EXPECT_TRUE(daemon_->Shutdown().ok());
    }
  }

  static void SetDeadline(grpc::ClientContext* ctx) {
    ctx->set_deadline(std::chrono::system_clock::now() + kDeadline);
  }

  // Number of runs ListRuns shows (all pages); -1 when it fails. Adds
  // their stored steps to `steps`.
  int CountRuns(int64_t* steps = nullptr) {
    int n = 0;
    std::string token;
    do {
      grpc::ClientContext ctx;
      SetDeadline(&ctx);
      v1::ListRunsRequest req;
      req.set_page_size(1000);
      req.set_page_token(token);
      v1::ListRunsResponse resp;
      if (!stub_->ListRuns(&ctx, req, &resp).ok()) return -1;
      n += resp.runs_size();
      for (const auto& r : resp.runs()) {
        if (steps != nullptr) *steps += r.steps_stored();
      }
      token = resp.next_page_token();
    } while (!token.empty());
    return n;
  }

  int64_t StepsStored(const std::string& run_id) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    v1::GetRunHealthRequest req;
    req.set_run_id(run_id);
    v1::RunHealth h;
    grpc::Status s = stub_->GetRunHealth(&ctx, req, &h);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return h.summary().steps_stored();
  }

  static v1::AttachRequest Start(const std::string& run_id) {
    v1::AttachRequest r;
    r.mutable_start()->set_run_id(run_id);
    r.mutable_start()->set_project("bad-input");
    r.mutable_start()->set_mode(v1::OBSERVE);
    return r;
  }
  static v1::AttachRequest Steps(int64_t from, int64_t n) {
    v1::AttachRequest r;
    for (int64_t i = 0; i < n; ++i) {
      v1::Step* s = r.mutable_steps()->add_steps();
      s->set_step(from + i);
      s->set_lr(0.1);
      s->set_loss(2.0 / (1.0 + 0.001 * static_cast<double>(from + i)));
    }
    return r;
  }

  std::unique_ptr<storage::RunStore> store_;
  std::unique_ptr<Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::LossGuard::Stub> stub_;
};

// Waits for the completion queue's next event (ops are issued one at a
// time, so it is the one just started).
bool Await(grpc::CompletionQueue* cq) {
  void* tag = nullptr;
  bool ok = false;
  EXPECT_TRUE(cq->Next(&tag, &ok));
  return ok;
}

TEST_F(BadInputTest, BytesThatAreNotAProtobufFailEveryMethodAndTheDaemonServesOn) {
  Start();
  // Field 1 (length-delimited) claiming 2^35 bytes, then junk: no message
  // of the contract parses from it.
  const std::string garbage("\x0a\xff\xff\xff\xff\x7f\x01\x02junk\xff", 12);
  grpc::GenericStub generic(channel_);
  grpc::CompletionQueue cq;
  {
    // The Attach stream: gRPC tells the server only that the read failed,
    // as for a half-close. Before `start` either is the client's error.
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    auto call = generic.PrepareCall(&ctx, "/lossguard.v1.LossGuard/Attach", &cq);
    call->StartCall(nullptr);
    ASSERT_TRUE(Await(&cq));
    grpc::Slice slice(garbage);
    grpc::ByteBuffer bytes(&slice, 1);
    call->Write(bytes, nullptr);
    Await(&cq);  // may fail if the server ended the call already
    grpc::ByteBuffer reply;
    call->Read(&reply, nullptr);
    EXPECT_FALSE(Await(&cq)) << "no answer to garbage";
    grpc::Status status;
    call->Finish(&status, nullptr);
    ASSERT_TRUE(Await(&cq));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("before start"));
  }
  for (const char* method : {"GetRunHealth", "ListRuns", "GetCurve", "AnalyzeCurve",
                             "SuggestLearningRate", "WatchRun"}) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    grpc::Slice slice(garbage);
    grpc::ByteBuffer bytes(&slice, 1);
    auto call = generic.PrepareUnaryCall(
        &ctx, absl::StrCat("/lossguard.v1.LossGuard/", method), bytes, &cq);
    call->StartCall();
    grpc::ByteBuffer reply;
    grpc::Status status;
    call->Finish(&reply, &status, nullptr);
    Await(&cq);
    EXPECT_FALSE(status.ok()) << method;
    EXPECT_NE(status.error_code(), grpc::StatusCode::UNKNOWN) << method;
  }
  // A method that does not exist.
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    grpc::ByteBuffer empty;
    auto call = generic.PrepareUnaryCall(&ctx, "/lossguard.v1.LossGuard/DropTables", empty,
                                         &cq);
    call->StartCall();
    grpc::ByteBuffer reply;
    grpc::Status status;
    call->Finish(&reply, &status, nullptr);
    Await(&cq);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  }
  cq.Shutdown();
  EXPECT_EQ(CountRuns(), 0);
}

TEST_F(BadInputTest, AMessageOverTheSizeLimitIsResourceExhaustedAndStoredStepsStay) {
  ServerOptions o;
  o.max_message_bytes = 128 << 10;
  Start(o);
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  auto stream = stub_->Attach(&ctx);
  ASSERT_TRUE(stream->Write(Start("big")));
  v1::AttachResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_TRUE(resp.has_accepted());
  ASSERT_TRUE(stream->Write(Steps(0, 100)));
  while (stream->Read(&resp) && !resp.has_received()) {
  }
  ASSERT_TRUE(resp.has_received());
  // 10,000 steps (the batch limit): about 230 KB, over 128 KiB.
  const v1::AttachRequest big = Steps(100, 10000);
  ASSERT_GT(big.ByteSizeLong(), 128u << 10);
  stream->Write(big);
  while (stream->Read(&resp)) {
  }
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_EQ(StepsStored("big"), 100);
}

TEST_F(BadInputTest, AStreamThatNeverSendsStartHoldsNothingAndEndsAtShutdown) {
  Start();
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  auto silent = stub_->Attach(&ctx);
  // Others are served while it waits.
  {
    grpc::ClientContext c2;
    SetDeadline(&c2);
    auto s = stub_->Attach(&c2);
    ASSERT_TRUE(s->Write(Start("other")));
    ASSERT_TRUE(s->Write(Steps(0, 10)));
    s->WritesDone();
    v1::AttachResponse r;
    while (s->Read(&r)) {
    }
    EXPECT_TRUE(s->Finish().ok());
  }
  EXPECT_EQ(CountRuns(), 1);
  // Shutdown ends the silent stream within its grace, as any other.
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(daemon_->Shutdown().ok());
  daemon_.reset();
  v1::AttachResponse r;
  EXPECT_FALSE(silent->Read(&r));
  EXPECT_EQ(silent->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(30));
}

TEST_F(BadInputTest, SlowDripBatchesOfOneStepAreAllTakenAndConfirmed) {
  Start();
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  auto stream = stub_->Attach(&ctx);
  ASSERT_TRUE(stream->Write(Start("drip")));
  v1::AttachResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  int confirmed = 0;
  for (int i = 0; i < 40; ++i) {
    ASSERT_TRUE(stream->Write(Steps(i, 1)));
    // Each one-step batch is confirmed on its own.
    while (stream->Read(&resp) && !resp.has_received()) {
    }
    ASSERT_TRUE(resp.has_received());
    EXPECT_EQ(resp.received().last_step(), i);
    ++confirmed;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // the drip, not a sync
  }
  stream->WritesDone();
  while (stream->Read(&resp)) {
  }
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(confirmed, 40);
  EXPECT_EQ(StepsStored("drip"), 40);
}

TEST_F(BadInputTest, ThousandsOfRunsFromOneClientUpToTheDaemonsLimit) {
  ServerOptions o;
  o.limits.max_runs = 1500;
  Start(o);
  constexpr int kRuns = 2000;
  constexpr int kThreads = 8;
  std::atomic<int> next{0}, ok{0}, exhausted{0}, other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = next++; i < kRuns; i = next++) {
        grpc::ClientContext ctx;
        SetDeadline(&ctx);
        auto stream = stub_->Attach(&ctx);  // one channel for all
        stream->Write(Start(absl::StrCat("many-", i)));
        stream->Write(Steps(0, 5));
        stream->WritesDone();
        v1::AttachResponse r;
        while (stream->Read(&r)) {
        }
        grpc::Status s = stream->Finish();
        if (s.ok()) {
          ++ok;
        } else if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED &&
                   s.error_message().find("limit") != std::string::npos) {
          ++exhausted;
        } else {
          ++other;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 1500);
  EXPECT_EQ(exhausted.load(), kRuns - 1500);
  EXPECT_EQ(other.load(), 0);
  int64_t steps = 0;
  EXPECT_EQ(CountRuns(&steps), 1500);
  EXPECT_EQ(steps, 1500 * 5);
}

}  // namespace
}  // namespace lossguard::service
