// The LibTorch guard on a real (tiny) model: it owns the schedule, keeps
// layer-wise LR ratios, measures the gradient norm as torch does, clips,
// reports to a real daemon, and applies the daemon's (or, embedded, its
// own) actions.

#include "lossguard/torch/guard.h"
#include "lossguard/torch/lr_range_test.h"

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lossguard/client/client.h"
#include "lossguard/service/service.h"
#include "lossguard/storage/run_store.h"
#include "lossguard/v1/lossguard.grpc.pb.h"

namespace lossguard::torch {
namespace {

// y = x w* + noise; a two-layer net, so there are two param groups.
struct Problem {
  Problem() {
    ::torch::manual_seed(0);
    x = ::torch::randn({256, 8});
    y = x.matmul(::torch::randn({8, 1})) + 0.1 * ::torch::randn({256, 1});
    l1 = ::torch::nn::Linear(8, 16);
    l2 = ::torch::nn::Linear(16, 1);
  }
  ::torch::Tensor Loss() {
    return ::torch::mse_loss(l2->forward(::torch::relu(l1->forward(x))), y);
  }
  std::unique_ptr<::torch::optim::SGD> Sgd(double lr) {
    std::vector<::torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(l1->parameters(),
                        std::make_unique<::torch::optim::SGDOptions>(lr));
    groups.emplace_back(l2->parameters(),
                        std::make_unique<::torch::optim::SGDOptions>(lr / 10));
    return std::make_unique<::torch::optim::SGD>(std::move(groups),
                                                 ::torch::optim::SGDOptions(lr));
  }
  ::torch::Tensor x, y;
  ::torch::nn::Linear l1{nullptr}, l2{nullptr};
};

double GroupLr(::torch::optim::Optimizer& opt, int i) {
  return opt.param_groups()[i].options().get_lr();
}

// Options that measure every step: the tiny model's steps are so short
// that the default overhead budget would measure few of them.
GuardOptions EveryStep() {
  GuardOptions o;
  o.max_overhead = 0.0;
  return o;
}

// A cosine from the optimizer's LR to 0 over `t_max` steps.
GuardOptions CosineOptions(int64_t t_max) {
  GuardOptions o = EveryStep();
  o.schedule.kind = schedule::ScheduleKind::kCosine;
  o.schedule.t_max = t_max;
  return o;
}

// A divergence from `onset` with an LR cut x0.1 that restores a snapshot.
v1::Advice DivergenceCutWithRollback(int64_t onset) {
  v1::Advice advice;
  advice.set_advice_id(1);
  advice.mutable_diagnosis()->set_kind(v1::DIVERGENCE);
  advice.mutable_diagnosis()->set_onset(onset);
  advice.mutable_action()->mutable_scale_lr()->set_factor(0.1);
  advice.mutable_action()->set_restore_checkpoint(true);
  return advice;
}

// One training step of `p` with `guard` around it; returns its loss.
::torch::Tensor GuardedStep(Problem& p, ::torch::optim::Optimizer& opt, Guard& guard,
                            int64_t step) {
  guard.BeforeStep(step);
  opt.zero_grad();
  ::torch::Tensor loss = p.Loss();
  loss.backward();
  guard.AfterBackward(step, loss);
  opt.step();
  return loss;
}

TEST(GuardTest, OwnsTheScheduleAndKeepsGroupRatios) {
  Problem p;
  auto opt = p.Sgd(0.1);
  Guard guard(*opt, CosineOptions(100));
  guard.BeforeStep(0);
  EXPECT_DOUBLE_EQ(GroupLr(*opt, 0), 0.1);
  EXPECT_DOUBLE_EQ(GroupLr(*opt, 1), 0.01);
  guard.BeforeStep(50);
  EXPECT_NEAR(GroupLr(*opt, 0), 0.05, 1e-12);
  EXPECT_NEAR(GroupLr(*opt, 1), 0.005, 1e-12);
}

TEST(GuardTest, GradNormIsTorchsAndClippingMatchesClipGradNorm) {
  Problem p;
  auto opt = p.Sgd(0.01);
  Guard guard(*opt, EveryStep());
  opt->zero_grad();
  ::torch::Tensor loss = p.Loss();
  loss.backward();
  // Reference: torch's own clip_grad_norm_ with an infinite bound.
  std::vector<::torch::Tensor> params;
  for (auto& g : opt->param_groups()) {
    for (auto& t : g.params()) params.push_back(t);
  }
  std::vector<::torch::Tensor> saved;
  for (auto& t : params) saved.push_back(t.grad().clone());
  const double want = ::torch::nn::utils::clip_grad_norm_(
      params, std::numeric_limits<double>::infinity());
  guard.AfterBackward(0, loss);
  // Not clipped: gradients unchanged.
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(::torch::allclose(params[i].grad(), saved[i]));
  }
  EXPECT_GT(want, 0.0);
  EXPECT_FALSE(guard.clip_max_norm().has_value());

  // Clipping at half the norm gives what clip_grad_norm_ gives.
  GuardOptions clip = EveryStep();
  clip.clip_max_norm = want / 2;
  Guard clipping(*opt, clip);
  for (size_t i = 0; i < params.size(); ++i) params[i].grad().copy_(saved[i]);
  clipping.AfterBackward(0, loss);
  std::vector<::torch::Tensor> ours;
  for (auto& t : params) ours.push_back(t.grad().clone());
  for (size_t i = 0; i < params.size(); ++i) params[i].grad().copy_(saved[i]);
  ::torch::nn::utils::clip_grad_norm_(params, want / 2);
  double norm_sq = 0.0;
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(::torch::allclose(ours[i], params[i].grad(), 1e-6, 1e-9));
    norm_sq += ours[i].pow(2).sum().item<double>();
  }
  EXPECT_NEAR(std::sqrt(norm_sq), want / 2, 1e-4 * want);
}

// lossguardd in-process, with a client in AUTO mode.
class GuardDaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = storage::NewMemoryStore();
    service::ServerOptions options;
    options.listen = "127.0.0.1:0";
    daemon_ = std::make_unique<service::Daemon>(options, store_.get());
    ASSERT_TRUE(daemon_->Start().ok());
  }
  void TearDown() override {
    EXPECT_TRUE(daemon_->Shutdown().ok());
  }
  ClientOptions Options(const std::string& run) {
    ClientOptions o;
    o.server = absl::StrCat("127.0.0.1:", daemon_->port());
    o.run_id = run;
    o.mode = v1::AUTO;
    o.max_batch_delay = absl::Milliseconds(1);
    return o;
  }
  v1::RunHealth Health(const std::string& run) {
    auto stub = v1::LossGuard::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", daemon_->port()),
        grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    v1::GetRunHealthRequest req;
    req.set_run_id(run);
    v1::RunHealth h;
    EXPECT_TRUE(stub->GetRunHealth(&ctx, req, &h).ok());
    return h;
  }
  std::unique_ptr<storage::RunStore> store_;
  std::unique_ptr<service::Daemon> daemon_;
};

// Trains with a far too large LR; the guard steps until the daemon's LR cut
// has been applied (or `max_steps`). Returns the step count.
int64_t TrainUntilCut(Problem& p, ::torch::optim::SGD& opt, Guard& guard,
                      Client* client, int64_t max_steps) {
  for (int64_t step = 0; step < max_steps; ++step) {
    GuardedStep(p, opt, guard, step);
    if (client != nullptr && step % 10 == 9) {
      client->Flush(absl::Seconds(30));  // the advice arrives in order
    }
    for (const GuardEvent& e : guard.events()) {
      if (e.applied) return step + 1;
    }
  }
  return max_steps;
}

TEST_F(GuardDaemonTest, AutoModeAppliesTheDaemonsLrCutToEveryGroup) {
  Problem p;
  auto opt = p.Sgd(10.0);  // diverges: the loss is NaN within steps
  Client client(Options("guard-auto"));
  Guard guard(&client, *opt, EveryStep());
  TrainUntilCut(p, *opt, guard, &client, 400);
  guard.Flush();
  ASSERT_TRUE(client.Flush(absl::Seconds(30)));
  ASSERT_FALSE(guard.events().empty());
  const GuardEvent& e = guard.events().front();
  ASSERT_TRUE(e.applied) << e.advice.DebugString();
  EXPECT_EQ(e.advice.diagnosis().kind(), v1::DIVERGENCE);
  ASSERT_TRUE(e.advice.action().has_scale_lr());
  const double f = e.advice.action().scale_lr().factor();
  guard.BeforeStep(e.step + 1);
  EXPECT_NEAR(GroupLr(*opt, 0), 10.0 * f, 1e-12);
  EXPECT_NEAR(GroupLr(*opt, 1), 1.0 * f, 1e-12);  // ratio kept
  // The daemon saw the ack.
  v1::RunHealth h = Health("guard-auto");
  ASSERT_GE(h.advice_size(), 1);
  EXPECT_EQ(h.advice(0).status(), v1::APPLIED);
  EXPECT_THAT(h.advice(0).ack_reason(), ::testing::HasSubstr("LR x"));
}

TEST_F(GuardDaemonTest, ValidationLossIsReportedWithItsStep) {
  Problem p;
  auto opt = p.Sgd(0.01);
  Client client(Options("guard-val"));
  Guard guard(&client, *opt, EveryStep());
  for (int64_t step = 0; step < 20; ++step) {
    GuardedStep(p, *opt, guard, step);
    if (step % 5 == 4) guard.ReportValidation(step, 0.5 + step);
  }
  guard.Flush();
  ASSERT_TRUE(client.Flush(absl::Seconds(30)));
  int vals = 0;
  ASSERT_TRUE(store_
                  ->ReadSteps("guard-val", 0, 100,
                              [&](const storage::StepRow& r) {
                                if (r.val_loss) {
                                  ++vals;
                                  EXPECT_EQ(r.step % 5, 4);
                                  EXPECT_DOUBLE_EQ(*r.val_loss, 0.5 + r.step);
                                }
                                EXPECT_TRUE(r.grad_norm.has_value());
                                EXPECT_GT(*r.grad_norm, 0.0);
                                return true;
                              })
                  .ok());
  EXPECT_EQ(vals, 4);
}

// set_lr scales the schedule to the LR asked for. Where the schedule's LR
// is 0 (here the end of a cosine to 0) no scale gets there: not applied,
// and the note says why, instead of "LR set to" an LR that was never set.
TEST(GuardTest, SetLrWhereTheScheduleIsZeroIsNotApplied) {
  Problem p;
  auto opt = p.Sgd(0.1);
  Guard guard(*opt, CosineOptions(10));
  v1::Advice advice;
  advice.set_advice_id(1);
  advice.mutable_action()->mutable_set_lr()->set_lr(0.05);
  guard.Apply(9, advice);  // for step 10, where the cosine is at 0
  ASSERT_EQ(guard.events().size(), 1u);
  EXPECT_FALSE(guard.events().back().applied);
  EXPECT_THAT(guard.events().back().note, ::testing::HasSubstr("LR is 0"));
  EXPECT_DOUBLE_EQ(guard.schedule().correction(), 1.0);
  advice.mutable_action()->mutable_set_lr()->set_lr(0.02);
  guard.Apply(4, advice);  // for step 5, halfway down (0.05)
  EXPECT_TRUE(guard.events().back().applied);
  guard.BeforeStep(5);
  EXPECT_NEAR(GroupLr(*opt, 0), 0.02, 1e-12);
  EXPECT_NEAR(GroupLr(*opt, 1), 0.002, 1e-12);
}

TEST(GuardEmbeddedTest, EmbeddedModeRunsTheAnalyzersInProcess) {
  Problem p;
  auto opt = p.Sgd(10.0);
  std::vector<std::string> seen;
  GuardOptions o = EveryStep();
  o.on_advice = [&](const v1::Advice& a, bool applied) {
    seen.push_back(absl::StrCat(v1::DiagnosisKind_Name(a.diagnosis().kind()),
                                applied ? " applied" : " not applied"));
  };
  Guard guard(*opt, o);
  TrainUntilCut(p, *opt, guard, nullptr, 400);
  ASSERT_FALSE(guard.events().empty());
  EXPECT_TRUE(guard.events().front().applied);
  EXPECT_THAT(seen, ::testing::Contains("DIVERGENCE applied"));
  EXPECT_LT(guard.schedule().correction(), 1.0);
}

// An LR ~1000x too small: the loss does not move, the gradients are intact,
// so the run is starved. It gets an LR ramp (an LR range test in the run),
// the guard grows the LR every step, and the run ends up learning.
TEST(GuardEmbeddedTest, StarvedRunIsRampedUntilItLearns) {
  Problem p;
  auto opt = p.Sgd(1e-4);
  GuardOptions o = EveryStep();
  Guard guard(*opt, o);
  const double lr0 = guard.lr();
  double first_loss = 0.0, last_loss = 0.0, max_lr = 0.0;
  bool ramped = false;
  for (int64_t step = 0; step < 400; ++step) {
    ::torch::Tensor loss = GuardedStep(p, *opt, guard, step);
    const double l = loss.item<double>();
    if (step == 0) first_loss = l;
    last_loss = l;
    max_lr = std::max(max_lr, guard.lr());
    ramped |= guard.ramping();
  }
  ASSERT_FALSE(guard.events().empty());
  const GuardEvent& e = guard.events().front();
  EXPECT_EQ(e.advice.diagnosis().kind(), v1::STAGNATION);
  ASSERT_TRUE(e.advice.action().has_ramp_lr()) << e.advice.DebugString();
  EXPECT_TRUE(e.applied);
  EXPECT_THAT(e.note, ::testing::HasSubstr("LR ramp x1.1 per step"));
  EXPECT_TRUE(ramped);
  EXPECT_GT(max_lr, 500 * lr0);
  // Layer-wise ratios survive the ramp.
  EXPECT_NEAR(GroupLr(*opt, 1) / GroupLr(*opt, 0), 0.1, 1e-9);
  EXPECT_LT(last_loss, 0.5 * first_loss);
}

// The same run planned for 400 steps at a constant LR: the ramp carries a
// decay to the planned end after its top (or, where the ramp blows up, the
// cut does), so the run ends at a small fraction of the largest LR.
TEST(GuardEmbeddedTest, StarvedRunOfKnownLengthDecaysToItsEnd) {
  Problem p;
  auto opt = p.Sgd(1e-4);
  GuardOptions o = EveryStep();
  o.planned_steps = 400;
  Guard guard(*opt, o);
  double first_loss = 0.0, last_loss = 0.0, max_lr = 0.0, last_lr = 0.0;
  for (int64_t step = 0; step < 400; ++step) {
    ::torch::Tensor loss = GuardedStep(p, *opt, guard, step);
    const double l = loss.item<double>();
    if (step == 0) first_loss = l;
    last_loss = l;
    last_lr = guard.lr();
    max_lr = std::max(max_lr, last_lr);
  }
  ASSERT_FALSE(guard.events().empty());
  const GuardEvent& e = guard.events().front();
  ASSERT_TRUE(e.advice.action().has_ramp_lr()) << e.advice.DebugString();
  EXPECT_GT(e.advice.action().ramp_lr().decay_steps(), 100);
  EXPECT_THAT(e.note, ::testing::HasSubstr("then a cosine decay"));
  EXPECT_GT(max_lr, 500 * 1e-4);
  EXPECT_LT(last_lr, 0.05 * max_lr);
  EXPECT_NEAR(GroupLr(*opt, 1) / GroupLr(*opt, 0), 0.1, 1e-9);
  EXPECT_LT(last_loss, 0.5 * first_loss);
}

TEST(GuardEmbeddedTest, AdviseModeAsksAndObserveModeOnlyWatches) {
  for (v1::Mode mode : {v1::ADVISE, v1::OBSERVE}) {
    Problem p;
    auto opt = p.Sgd(10.0);
    int asked = 0;
    GuardOptions o = EveryStep();
    o.mode = mode;
    o.accept = [&](const v1::Advice&) {
      ++asked;
      return false;
    };
    Guard guard(*opt, o);
    for (int64_t step = 0; step < 100; ++step) {
      GuardedStep(p, *opt, guard, step);
    }
    ASSERT_FALSE(guard.events().empty()) << v1::Mode_Name(mode);
    for (const GuardEvent& e : guard.events()) EXPECT_FALSE(e.applied);
    EXPECT_EQ(asked > 0, mode == v1::ADVISE);
    EXPECT_DOUBLE_EQ(guard.schedule().correction(), 1.0);
  }
}

TEST(GuardEmbeddedTest, RollbackRestoresFiniteWeightsWithTheLrCut) {
  Problem p;
  ::torch::nn::Sequential net(p.l1, ::torch::nn::ReLU(), p.l2);
  auto opt = p.Sgd(10.0);  // NaN weights within a few steps
  GuardOptions o = EveryStep();
  o.rollback_module = net.ptr().get();
  o.snapshot_every = 1;
  Guard guard(*opt, o);
  // Snapshot of the initial weights is taken when step 0 is reported.
  const ::torch::Tensor w0 = p.l1->weight.detach().clone();
  const int64_t steps = TrainUntilCut(p, *opt, guard, nullptr, 400);
  ASSERT_LT(steps, 400);
  const GuardEvent& e = guard.events().front();
  EXPECT_THAT(e.note, ::testing::HasSubstr("rolled back to step"));
  for (const auto& t : net->parameters()) {
    EXPECT_TRUE(::torch::isfinite(t).all().item<bool>());
  }
  // Training goes on. Where the lower LR is still too large the run blows
  // up again, and each time the guard cuts again and rolls back, until the
  // LR holds: the run ends with finite weights and finite losses.
  std::vector<double> losses;
  for (int64_t step = steps; step < steps + 300; ++step) {
    losses.push_back(GuardedStep(p, *opt, guard, step).item<double>());
  }
  for (size_t i = losses.size() - 50; i < losses.size(); ++i) {
    EXPECT_TRUE(std::isfinite(losses[i])) << i;
  }
  int cuts = 0;
  for (const GuardEvent& ev : guard.events()) cuts += ev.applied;
  EXPECT_GE(cuts, 1);
  EXPECT_LT(guard.lr(), 10.0);
  for (const auto& t : net->parameters()) {
    EXPECT_TRUE(::torch::isfinite(t).all().item<bool>());
  }
  // The first snapshot was the initial weights.
  EXPECT_EQ(w0.sizes(), p.l1->weight.sizes());
}

TEST(GuardEmbeddedTest, WithoutTheGradNormOnlyTheLossIsReported) {
  Problem p;
  auto opt = p.Sgd(0.01);
  for (const bool clip : {false, true}) {
    GuardOptions o = EveryStep();
    o.grad_norm = false;
    if (clip) o.clip_max_norm = 1e9;  // clipping measures the norm anyway
    std::vector<analyzers::StepRecord> seen;
    o.on_report = [&seen](const analyzers::StepRecord& r) { seen.push_back(r); };
    Guard guard(*opt, o);
    for (int64_t step = 0; step < 4; ++step) {
      GuardedStep(p, *opt, guard, step);
    }
    guard.Flush();
    ASSERT_EQ(seen.size(), 4u);
    for (size_t i = 0; i < seen.size(); ++i) {
      EXPECT_EQ(seen[i].step, static_cast<int64_t>(i));
      EXPECT_TRUE(std::isfinite(seen[i].loss));
      EXPECT_EQ(seen[i].grad_norm.has_value(), clip) << i;
    }
  }
}

// Over the overhead budget the guard skips steps, but it still measures the
// steps rollback judges its snapshots by, a step a validation loss is
// reported with, and the last one; the steps measured keep their numbers.
// (A budget of 1e-9 is spent by the first step's measurement and never
// earned back within the test, so which steps are measured is known.)
TEST(GuardEmbeddedTest, OverTheOverheadBudgetOnlyTheNeededStepsAreMeasured) {
  Problem p;
  ::torch::nn::Sequential net(p.l1, ::torch::nn::ReLU(), p.l2);
  auto opt = p.Sgd(0.01);
  GuardOptions o;
  o.max_overhead = 1e-9;
  o.dense_steps = 0;
  o.rollback_module = net.ptr().get();
  o.snapshot_every = 20;
  std::vector<analyzers::StepRecord> seen;
  o.on_report = [&seen](const analyzers::StepRecord& r) { seen.push_back(r); };
  Guard guard(*opt, o);
  for (int64_t step = 0; step < 100; ++step) {
    GuardedStep(p, *opt, guard, step);
    if (step == 49) guard.ReportValidation(step, 0.25);
  }
  guard.Flush();
  std::vector<int64_t> steps;
  for (const auto& r : seen) {
    steps.push_back(r.step);
    EXPECT_TRUE(std::isfinite(r.loss)) << r.step;
    EXPECT_EQ(r.val_loss.has_value(), r.step == 49) << r.step;
    // Measured at its step, the norm; staged later (validation, the end),
    // none: the gradients may be gone by then.
    EXPECT_EQ(r.grad_norm.has_value(), r.step != 49 && r.step != 99) << r.step;
  }
  EXPECT_THAT(steps, ::testing::ElementsAre(0, 1, 20, 21, 40, 41, 49, 60, 61,
                                            80, 81, 99));
  EXPECT_EQ(guard.measured_steps(), 12);
  EXPECT_EQ(guard.skipped_steps(), 88);
  // Rollback still finds judged snapshots (of the weights after steps 0,
  // 20, 40, 60, 80).
  guard.Apply(100, DivergenceCutWithRollback(70));
  EXPECT_THAT(guard.events().back().note, ::testing::HasSubstr("rolled back to step 60"));
}

// The run's first `dense_steps` steps, and as many after each action
// applied, are measured whatever the budget.
TEST(GuardEmbeddedTest, TheStartAndTheStepsAfterACorrectionAreMeasuredDensely) {
  Problem p;
  auto opt = p.Sgd(0.01);
  GuardOptions o;
  o.max_overhead = 1e-9;
  o.dense_steps = 10;
  std::vector<int64_t> steps;
  o.on_report = [&steps](const analyzers::StepRecord& r) { steps.push_back(r.step); };
  Guard guard(*opt, o);
  for (int64_t step = 5; step < 80; ++step) {  // a run resumed at step 5
    GuardedStep(p, *opt, guard, step);
    if (step == 40) {
      v1::Advice advice;
      advice.set_advice_id(1);
      advice.mutable_action()->mutable_scale_lr()->set_factor(0.5);
      guard.Apply(step, advice);
    }
  }
  guard.Flush();
  std::vector<int64_t> want;
  // Steps 5-14 dense; 15, the budget's first, costs what it never earns
  // back; 41-50 dense after the correction at 40; 79 the last.
  for (int64_t s = 5; s <= 15; ++s) want.push_back(s);
  for (int64_t s = 41; s < 51; ++s) want.push_back(s);
  want.push_back(79);
  EXPECT_EQ(steps, want);
  EXPECT_EQ(guard.measured_steps(), 22);
  EXPECT_EQ(guard.skipped_steps(), 53);
}

// With a budget larger than any cost, and with none (0), every step is
// measured.
TEST(GuardEmbeddedTest, WithinTheOverheadBudgetEveryStepIsMeasured) {
  Problem p;
  auto opt = p.Sgd(0.01);
  for (const double budget : {0.0, 1e9}) {
    GuardOptions o;
    o.max_overhead = budget;
    std::vector<int64_t> steps;
    o.on_report = [&steps](const analyzers::StepRecord& r) { steps.push_back(r.step); };
    Guard guard(*opt, o);
    for (int64_t step = 0; step < 30; ++step) GuardedStep(p, *opt, guard, step);
    guard.Flush();
    ASSERT_EQ(steps.size(), 30u) << budget;
    for (size_t i = 0; i < steps.size(); ++i) EXPECT_EQ(steps[i], static_cast<int64_t>(i));
    EXPECT_EQ(guard.measured_steps(), 30);
    EXPECT_EQ(guard.skipped_steps(), 0);
  }
}

// A snapshot of the weights after step s counts once step s + 1's loss,
// computed from them, is sound; a rollback restores exactly those weights.
TEST(GuardEmbeddedTest, RollbackRestoresTheWeightsItsSnapshotWasJudgedBy) {
  Problem p;
  ::torch::nn::Sequential net(p.l1, ::torch::nn::ReLU(), p.l2);
  auto opt = p.Sgd(0.01);
  GuardOptions o = EveryStep();
  o.rollback_module = net.ptr().get();
  o.snapshot_every = 2;
  Guard guard(*opt, o);
  std::vector<::torch::Tensor> after;  // l1's weight after each step
  for (int64_t step = 0; step < 6; ++step) {
    GuardedStep(p, *opt, guard, step);
    after.push_back(p.l1->weight.detach().clone());
  }
  // Reported: steps 0-4. The snapshots of the weights after steps 0 and 2
  // are judged (by the losses of steps 1 and 3); that of step 4 waits for
  // step 5's.
  guard.Apply(6, DivergenceCutWithRollback(5));
  ASSERT_FALSE(guard.events().empty());
  EXPECT_THAT(guard.events().back().note, ::testing::HasSubstr("rolled back to step 2"));
  EXPECT_TRUE(::torch::equal(p.l1->weight, after[2]));
}

TEST(LrRangeTestTest, RampsEveryGroupRestoresAndSuggests) {
  Problem p;
  auto opt = p.Sgd(10.0);  // groups at 10 and 1
  ::torch::nn::Module net;
  net.register_module("l1", p.l1);
  net.register_module("l2", p.l2);
  std::vector<::torch::Tensor> before;
  for (const auto& t : net.parameters()) before.push_back(t.detach().clone());
  std::vector<std::pair<double, double>> group_lrs;
  LrRangeTestOptions options;
  options.restore_module = &net;
  absl::StatusOr<LrRangeTest> test = RunLrRangeTest(
      *opt,
      [&](int64_t) {
        group_lrs.emplace_back(GroupLr(*opt, 0), GroupLr(*opt, 1));
        return p.Loss();
      },
      options);
  ASSERT_TRUE(test.ok()) << test.status();
  // The weights and the LRs are back.
  std::size_t i = 0;
  for (const auto& t : net.parameters()) EXPECT_TRUE(t.equal(before[i++]));
  EXPECT_DOUBLE_EQ(GroupLr(*opt, 0), 10.0);
  EXPECT_DOUBLE_EQ(GroupLr(*opt, 1), 1.0);
  // x1.06 a step from 1e-7, the second group at a tenth of the first,
  // until the loss blew up (long before lr 10).
  ASSERT_GT(test->lrs.size(), 100u);
  ASSERT_EQ(test->lrs.size(), test->losses.size());
  ASSERT_EQ(group_lrs.size(), test->lrs.size());
  EXPECT_DOUBLE_EQ(test->lrs[0], 1e-7);
  for (std::size_t k = 0; k < test->lrs.size(); ++k) {
    if (k > 0) {
      EXPECT_NEAR(test->lrs[k] / test->lrs[k - 1], 1.06, 1e-12);
    }
    EXPECT_DOUBLE_EQ(group_lrs[k].first, test->lrs[k]);
    EXPECT_NEAR(group_lrs[k].second, test->lrs[k] / 10, 1e-15 + 1e-12 * test->lrs[k]);
  }
  EXPECT_LT(test->lrs.back(), 10.0);
  EXPECT_THAT(test->stop_reason, ::testing::AnyOf(::testing::HasSubstr("smoothed loss"),
                                                  ::testing::HasSubstr("the loss was")));
  ASSERT_TRUE(test->suggestion.ok()) << test->suggestion.status();
  const double lr = test->suggestion->suggested_lr;
  EXPECT_GT(lr, test->lrs.front());
  EXPECT_LT(lr, test->lrs.back());
  // Training from the restored weights at the suggestion learns.
  opt->param_groups()[0].options().set_lr(lr);
  opt->param_groups()[1].options().set_lr(lr / 10);
  const double first = p.Loss().item<double>();
  double last = first;
  for (int step = 0; step < 100; ++step) {
    opt->zero_grad();
    ::torch::Tensor loss = p.Loss();
    loss.backward();
    opt->step();
    last = loss.item<double>();
  }
  EXPECT_LT(last, 0.5 * first);
}

TEST(LrRangeTestTest, RestoresTheOptimizerStateAndRejectsBadOptions) {
  Problem p;
  ::torch::optim::Adam adam(p.l1->parameters(), ::torch::optim::AdamOptions(1e-3));
  adam.zero_grad();
  p.Loss().backward();
  adam.step();  // Adam now has moments
  const ::torch::Tensor moment = ::torch::Tensor(
      static_cast<::torch::optim::AdamParamState&>(
          *adam.state().at(c10::guts::to_string(p.l1->weight.unsafeGetTensorImpl())))
          .exp_avg()).clone();
  LrRangeTestOptions options;
  options.max_steps = 50;
  absl::StatusOr<LrRangeTest> test =
      RunLrRangeTest(adam, [&](int64_t) { return p.Loss(); }, options);
  ASSERT_TRUE(test.ok()) << test.status();
  EXPECT_EQ(test->lrs.size(), 50u);
  EXPECT_EQ(test->stop_reason, "max_steps 50");
  EXPECT_DOUBLE_EQ(GroupLr(adam, 0), 1e-3);
  auto& state = static_cast<::torch::optim::AdamParamState&>(
      *adam.state().at(c10::guts::to_string(p.l1->weight.unsafeGetTensorImpl())));
  EXPECT_TRUE(state.exp_avg().equal(moment));
  EXPECT_EQ(state.step(), 1);
  // 50 steps up to lr ~2e-6 move nothing: no usable descent, said.
  EXPECT_EQ(test->suggestion.status().code(), absl::StatusCode::kFailedPrecondition);

  for (auto bad : {+[](LrRangeTestOptions& o) { o.start_lr = 0; },
                   +[](LrRangeTestOptions& o) { o.end_lr = 1e-8; },
                   +[](LrRangeTestOptions& o) { o.factor = 1.0; },
                   +[](LrRangeTestOptions& o) { o.stop_factor = 0.5; },
                   +[](LrRangeTestOptions& o) { o.max_steps = 0; }}) {
    LrRangeTestOptions o;
    bad(o);
    EXPECT_EQ(RunLrRangeTest(adam, [&](int64_t) { return p.Loss(); }, o).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace lossguard::torch
