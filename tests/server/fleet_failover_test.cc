// Several lossguardd processes sharing one PostgreSQL database (issue 8):
// a run is served by the daemon holding its lease; a trainer attaching to
// another live daemon is sent to the owner; when the owner dies, its runs
// move to the daemons the trainers reach next, resume from the last stored
// step, and lose nothing; every daemon answers reads about every run.
//
// Needs the pg_server ctest fixture (tests/pg/pg_server.sh).

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lossguard/client/client.h"
#include "lossguard/storage/run_store.h"
#include "lossguard/v1/lossguard.grpc.pb.h"
#include "tests/pg/pg_test_db.h"
#include "tests/server/daemon_process.h"

namespace lossguard {
namespace {

using ::lossguard::testing::DaemonProcess;

constexpr int kRuns = 20;
constexpr int64_t kSteps = 3000;
constexpr int64_t kBeforeKill = kSteps / 2;

// Smooth training, except every fourth run blows up from step 600, so that
// diagnoses and advice are stored before the owner dies.
double Loss(int run, int64_t step) {
  const double base = 2.3 / std::sqrt(1.0 + static_cast<double>(step) / 50.0);
  if (run % 4 == 0 && step > 600) {
    return base * std::exp(std::min(50.0, (step - 600) / 40.0));
  }
  return base * (1.0 + 0.05 * std::sin(static_cast<double>(step)));
}

std::string RunId(int run) { return absl::StrCat("fleet-", run); }

std::vector<std::string> DaemonFlags() {
  // Short leases: a dead daemon's runs move within about 2 s.
  return {"--http=", "--lease_s=2"};
}

std::unique_ptr<v1::LossGuard::Stub> Stub(int port) {
  return v1::LossGuard::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
}

// GetRunHealth of `run_id` at the daemon on `port`, or nullopt.
std::optional<v1::RunHealth> Health(int port, const std::string& run_id) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::GetRunHealthRequest req;
  req.set_run_id(run_id);
  v1::RunHealth health;
  if (!Stub(port)->GetRunHealth(&ctx, req, &health).ok()) return std::nullopt;
  return health;
}

// Polls `done` (a condition on the daemons' answers, not a timer) until it
// holds or 30 s pass.
template <typename F>
bool Eventually(F done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (absl::Now() < deadline) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return done();
}

class FleetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!testing_pg::Available()) {
      GTEST_SKIP() << "no PostgreSQL test server (run under ctest)";
    }
    db_ = std::make_unique<testing_pg::TestDatabase>();
    ASSERT_FALSE(db_->conninfo().empty());
  }

  std::unique_ptr<DaemonProcess> StartDaemon() {
    auto d = std::make_unique<DaemonProcess>(db_->uri(), "127.0.0.1:0",
                                             DaemonFlags());
    EXPECT_GT(d->port(), 0);
    return d;
  }

  std::unique_ptr<testing_pg::TestDatabase> db_;
};

TEST_F(FleetTest, AnAttachAtANonOwnerIsSentToTheOwner) {
  auto a = StartDaemon();
  auto b = StartDaemon();
  ASSERT_GT(a->port(), 0);
  ASSERT_GT(b->port(), 0);
  const std::string addr_a = absl::StrCat("127.0.0.1:", a->port());

  // A trainer attached at A holds the run there.
  auto stub_a = Stub(a->port());
  grpc::ClientContext held_ctx;
  auto held = stub_a->Attach(&held_ctx);
  v1::AttachRequest start;
  start.mutable_start()->set_run_id("r");
  ASSERT_TRUE(held->Write(start));
  v1::AttachResponse accepted;
  ASSERT_TRUE(held->Read(&accepted));
  ASSERT_TRUE(accepted.has_accepted());

  // B refuses the run and names A.
  {
    auto stub_b = Stub(b->port());
    grpc::ClientContext ctx;
    auto stream = stub_b->Attach(&ctx);
    ASSERT_TRUE(stream->Write(start));
    v1::AttachResponse resp;
    EXPECT_FALSE(stream->Read(&resp));
    const grpc::Status status = stream->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(status.error_message(), ::testing::HasSubstr(addr_a));
    const auto& trailers = ctx.GetServerTrailingMetadata();
    auto owner = trailers.find("lossguard-owner");
    ASSERT_NE(owner, trailers.end());
    EXPECT_EQ(std::string(owner->second.data(), owner->second.size()), addr_a);
  }

  // lossguard::Client pointed at B follows the redirect and trains at A
  // (its stream supersedes the first one's session).
  ClientOptions o;
  o.server = absl::StrCat("127.0.0.1:", b->port());
  o.run_id = "r";
  o.initial_backoff = absl::Milliseconds(20);
  o.max_backoff = absl::Milliseconds(200);
  Client client(o);
  for (int64_t s = 0; s < 50; ++s) client.Report(s, 0.01, 1.0, std::nullopt, 1.0);
  ASSERT_TRUE(Eventually([&] { return client.stats().confirmed_step == 49; }))
      << client.stats().last_error;
  EXPECT_GE(client.stats().redirects, 1);
  // B answers about the run from its read-only copy.
  ASSERT_TRUE(Eventually([&] {
    std::optional<v1::RunHealth> h = Health(b->port(), "r");
    return h.has_value() && h->summary().last_step() == 49;
  }));
  EXPECT_TRUE(client.Finish("done", absl::Seconds(10)));
  held_ctx.TryCancel();
  held->Finish().IgnoreError();
}

TEST_F(FleetTest, ARunWhoseDaemonDiedReadsDetachedElsewhere) {
  auto a = StartDaemon();
  auto b = StartDaemon();
  ASSERT_GT(a->port(), 0);
  ASSERT_GT(b->port(), 0);
  auto stub_a = Stub(a->port());
  grpc::ClientContext ctx;
  auto stream = stub_a->Attach(&ctx);
  v1::AttachRequest start;
  start.mutable_start()->set_run_id("lonely");
  ASSERT_TRUE(stream->Write(start));
  v1::AttachResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  v1::AttachRequest steps;
  for (int64_t i = 0; i < 20; ++i) {
    v1::Step* st = steps.mutable_steps()->add_steps();
    st->set_step(i);
    st->set_lr(0.01);
    st->set_loss(2.0 / (1.0 + static_cast<double>(i)));
  }
  ASSERT_TRUE(stream->Write(steps));
  // B sees the run served (attached at A), then, once A is dead and its
  // lease has expired, nobody serving it.
  ASSERT_TRUE(Eventually([&] {
    std::optional<v1::RunHealth> h = Health(b->port(), "lonely");
    return h.has_value() && h->summary().last_step() == 19 &&
           h->summary().state() != v1::DETACHED;
  }));
  EXPECT_EQ(a->Kill(), 128 + SIGKILL);
  ASSERT_TRUE(Eventually([&] {
    std::optional<v1::RunHealth> h = Health(b->port(), "lonely");
    return h.has_value() && h->summary().state() == v1::DETACHED;
  }));
  ctx.TryCancel();
  stream->Finish().IgnoreError();
}

TEST_F(FleetTest, KillingTheOwnerOf20RunsMovesThemAndLosesNothing) {
  auto a = StartDaemon();
  auto b = StartDaemon();
  auto c = StartDaemon();
  ASSERT_GT(a->port(), 0);
  ASSERT_GT(b->port(), 0);
  ASSERT_GT(c->port(), 0);
  const std::string addr_a = absl::StrCat("127.0.0.1:", a->port());
  const std::string addr_b = absl::StrCat("127.0.0.1:", b->port());
  const std::string addr_c = absl::StrCat("127.0.0.1:", c->port());

  // Every trainer knows all three daemons and uses the first that answers
  // (gRPC's pick_first over an address list): A, then B or C.
  std::vector<std::unique_ptr<Client>> clients;
  for (int r = 0; r < kRuns; ++r) {
    ClientOptions o;
    o.server = r % 2 == 0 ? absl::StrCat("ipv4:", addr_a, ",", addr_b, ",", addr_c)
                          : absl::StrCat("ipv4:", addr_a, ",", addr_c, ",", addr_b);
    o.run_id = RunId(r);
    o.project = "fleet";
    o.mode = v1::ADVISE;
    o.initial_backoff = absl::Milliseconds(20);
    o.max_backoff = absl::Milliseconds(300);
    o.close_timeout = absl::Seconds(30);
    clients.push_back(std::make_unique<Client>(std::move(o)));
  }

  absl::BlockingCounter halfway(kRuns);
  absl::Notification killed;
  std::vector<std::thread> trainers;
  for (int r = 0; r < kRuns; ++r) {
    trainers.emplace_back([&, r] {
      Client& cl = *clients[r];
      for (int64_t s = 0; s < kBeforeKill; ++s) {
        cl.Report(s, 0.05, Loss(r, s), std::nullopt, 1.0);
      }
      halfway.DecrementCount();
      killed.WaitForNotification();
      for (int64_t s = kBeforeKill; s < kSteps; ++s) {
        cl.Report(s, 0.05, Loss(r, s), std::nullopt, 1.0);
      }
    });
  }
  halfway.Wait();
  // Every run is being served by A, with part of it stored.
  absl::StatusOr<std::unique_ptr<storage::RunStore>> store =
      storage::OpenPostgresStore(db_->conninfo());
  ASSERT_TRUE(store.ok()) << store.status();
  storage::LeaseTable* leases = (*store)->leases();
  ASSERT_TRUE(Eventually([&] {
    for (int r = 0; r < kRuns; ++r) {
      if (!clients[r]->stats().confirmed_step.has_value()) return false;
    }
    return true;
  }));
  for (int r = 0; r < kRuns; ++r) {
    absl::StatusOr<std::optional<storage::LeaseHolder>> h =
        leases->Holder(RunId(r));
    ASSERT_TRUE(h.ok()) << h.status();
    ASSERT_TRUE(h->has_value()) << RunId(r);
    EXPECT_EQ((*h)->address, addr_a) << RunId(r);
  }
  std::vector<std::set<uint64_t>> advice_before(kRuns);
  for (int r = 0; r < kRuns; r += 4) {
    // Wait for the blow-up's diagnosis to be stored before the kill.
    ASSERT_TRUE(Eventually([&] {
      absl::StatusOr<std::vector<storage::EventRow>> ev =
          (*store)->ReadEvents(RunId(r));
      return ev.ok() && !ev->empty();
    })) << RunId(r);
    absl::StatusOr<std::vector<storage::EventRow>> ev =
        (*store)->ReadEvents(RunId(r));
    ASSERT_TRUE(ev.ok());
    for (const storage::EventRow& e : *ev) {
      advice_before[r].insert(e.id * 2 + static_cast<int>(e.type));
    }
  }

  EXPECT_EQ(a->Kill(), 128 + SIGKILL);
  killed.Notify();
  for (std::thread& t : trainers) t.join();

  // The runs move to B and C once A's leases expire, and every step lands.
  for (int r = 0; r < kRuns; ++r) {
    ASSERT_TRUE(Eventually([&] {
      return clients[r]->stats().confirmed_step == kSteps - 1;
    })) << RunId(r) << ": " << clients[r]->stats().last_error;
  }
  std::set<std::string> new_owners;
  for (int r = 0; r < kRuns; ++r) {
    absl::StatusOr<std::optional<storage::LeaseHolder>> h =
        leases->Holder(RunId(r));
    ASSERT_TRUE(h.ok()) << h.status();
    ASSERT_TRUE(h->has_value()) << RunId(r);
    EXPECT_NE((*h)->address, addr_a) << RunId(r);
    new_owners.insert((*h)->address);
  }
  EXPECT_THAT(new_owners, ::testing::UnorderedElementsAre(addr_b, addr_c));

  // Any daemon answers about any run, up to its last step.
  for (int r = 0; r < kRuns; ++r) {
    for (int port : {b->port(), c->port()}) {
      EXPECT_TRUE(Eventually([&] {
        std::optional<v1::RunHealth> h = Health(port, RunId(r));
        return h.has_value() && h->summary().last_step() == kSteps - 1;
      })) << RunId(r) << " at port " << port;
    }
  }
  for (int r = 0; r < kRuns; r += 7) {
    // The curve too, at a daemon that does not serve the run.
    absl::StatusOr<std::optional<storage::LeaseHolder>> h =
        leases->Holder(RunId(r));
    ASSERT_TRUE(h.ok() && h->has_value()) << RunId(r);
    const int port = (*h)->address == addr_b ? c->port() : b->port();
    ASSERT_TRUE(Eventually([&] {
      grpc::ClientContext ctx;
      v1::GetCurveRequest req;
      req.set_run_id(RunId(r));
      req.set_max_points(100000);
      v1::Curve curve;
      return Stub(port)->GetCurve(&ctx, req, &curve).ok() &&
             curve.total_points() == kSteps && curve.points_size() == kSteps &&
             curve.points(kSteps - 1).step() == kSteps - 1;
    })) << RunId(r) << " at port " << port;
  }
  {
    grpc::ClientContext ctx;
    v1::ListRunsRequest req;
    req.set_project("fleet");
    v1::ListRunsResponse resp;
    ASSERT_TRUE(Stub(c->port())->ListRuns(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.runs_size(), kRuns);
  }

  for (int r = 0; r < kRuns; ++r) {
    EXPECT_TRUE(clients[r]->Finish("done", absl::Seconds(60))) << RunId(r);
    const ClientStats st = clients[r]->stats();
    EXPECT_EQ(st.dropped_steps, 0);
    EXPECT_EQ(st.rejected_steps, 0);
  }
  clients.clear();
  EXPECT_EQ(b->Terminate(), 0);
  EXPECT_EQ(c->Terminate(), 0);

  // Every step of every run, once, in order, with the values sent; the
  // events stored by A are still there.
  for (int r = 0; r < kRuns; ++r) {
    SCOPED_TRACE(RunId(r));
    int64_t expect = 0;
    bool same = true;
    absl::Status s = (*store)->ReadSteps(
        RunId(r), 0, kSteps, [&](const storage::StepRow& row) {
          if (row.step != expect || row.loss != Loss(r, row.step)) {
            same = false;
            return false;
          }
          ++expect;
          return true;
        });
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_TRUE(same) << "at step " << expect;
    EXPECT_EQ(expect, kSteps);
    absl::StatusOr<std::vector<storage::EventRow>> ev =
        (*store)->ReadEvents(RunId(r));
    ASSERT_TRUE(ev.ok());
    std::set<uint64_t> after;
    for (const storage::EventRow& e : *ev) {
      after.insert(e.id * 2 + static_cast<int>(e.type));
    }
    for (uint64_t key : advice_before[r]) EXPECT_TRUE(after.count(key));
  }
}

}  // namespace
}  // namespace lossguard
