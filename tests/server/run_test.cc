// Run on its own (no gRPC): batch validation, outcomes, recovery.

#include "lossguard/runs/run.h"

#include <atomic>
#include <cmath>
#include <functional>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lossguard/storage/run_store.h"

namespace lossguard::runs {
namespace {

using ::testing::HasSubstr;

class FakeClock final : public Clock {
 public:
  double Now() const override { return now_.fetch_add(1.0); }

 private:
  mutable std::atomic<double> now_{1.8e9};
};

class RunTest : public ::testing::Test {
 protected:
  RunTest() : store_(storage::NewMemoryStore()) {}

  // Attaches `run` (id "r") in AUTO mode; the session.
  static uint64_t AttachAuto(runs::Run* run) {
    v1::RunStart start;
    start.set_run_id("r");
    start.set_mode(v1::AUTO);
    v1::AttachAccepted acc;
    return run->Attach(start, &acc);
  }

  std::unique_ptr<runs::Run> NewRun(const std::string& id) {
    storage::RunRow row;
    row.run_id = id;
    row.created_time = clock_.Now();
    return std::make_unique<runs::Run>(row, v1::RunConfig(), &options_, store_.get(),
                                 &clock_);
  }

  // The store's one run as a restarted daemon recovers it (null, with a
  // test failure, if it cannot).
  std::unique_ptr<runs::Run> Restarted() {
    auto rows = store_->LoadRuns();
    EXPECT_TRUE(rows.ok()) << rows.status();
    if (!rows.ok() || rows->size() != 1) {
      ADD_FAILURE() << "expected one stored run";
      return nullptr;
    }
    auto run = std::make_unique<runs::Run>((*rows)[0], v1::RunConfig(), &options_,
                                           store_.get(), &clock_);
    const absl::Status s = run->Recover();
    EXPECT_TRUE(s.ok()) << s;
    return s.ok() ? std::move(run) : nullptr;
  }

  // Acks advice `advice_id` of `session` as applied at `step`, detaches,
  // and returns the run as a restarted daemon recovers it.
  std::unique_ptr<runs::Run> AppliedThenRestarted(std::unique_ptr<runs::Run> run,
                                                  uint64_t session,
                                                  uint64_t advice_id,
                                                  int64_t step) {
    v1::AdviceAck ack;
    ack.set_advice_id(advice_id);
    ack.set_applied(true);
    ack.set_effective_step(step);
    const absl::Status s = run->Ack(session, ack);
    EXPECT_TRUE(s.ok()) << s;
    run->Detach(session);
    run.reset();
    return Restarted();
  }

  static v1::StepBatch Steps(std::vector<int64_t> steps, double lr = 0.1,
                             double loss = 1.0) {
    v1::StepBatch b;
    for (int64_t s : steps) {
      v1::Step* p = b.add_steps();
      p->set_step(s);
      p->set_lr(lr);
      p->set_loss(loss);
    }
    return b;
  }

  // A run that diverges: flat, then the loss grows 2% per step.
  static v1::StepBatch Diverging(int64_t from, int64_t to) {
    v1::StepBatch b;
    for (int64_t s = from; s < to; ++s) {
      v1::Step* p = b.add_steps();
      p->set_step(s);
      p->set_lr(0.5);
      p->set_loss(s < 200 ? 2.0 - 0.001 * s : 1.8 * std::pow(1.02, s - 200));
      p->set_grad_norm(1.0);
    }
    return b;
  }

  // Steps at `lr` whose loss is loss(step) with 1% minibatch noise, no
  // trend of its own.
  static v1::StepBatch Noisy(int64_t from, int64_t to, double lr,
                             const std::function<double(int64_t)>& loss) {
    v1::StepBatch b;
    for (int64_t s = from; s < to; ++s) {
      v1::Step* p = b.add_steps();
      p->set_step(s);
      p->set_lr(lr);
      p->set_loss(loss(s) * (1.0 + 0.01 * std::sin(0.7 * static_cast<double>(s))));
    }
    return b;
  }

  RunOptions options_;
  FakeClock clock_;
  std::unique_ptr<storage::RunStore> store_;
};

TEST_F(RunTest, BatchesMustIncreaseEvenAmongResentSteps) {
  auto run = NewRun("r");
  v1::RunStart start;
  start.set_run_id("r");
  v1::AttachAccepted acc;
  const uint64_t session = run->Attach(start, &acc);
  std::vector<v1::Advice> advice;
  int64_t dups = 0;
  ASSERT_TRUE(run->Ingest(session, Steps({1, 2, 10}), &advice, &dups).ok());
  // 9, 3 and 7 are all at or below 10, but not in order.
  absl::Status s = run->Ingest(session, Steps({9, 3, 7, 11}), &advice, &dups);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("must increase"));
  ASSERT_TRUE(run->Ingest(session, Steps({2, 10, 11}), &advice, &dups).ok());
  EXPECT_EQ(dups, 2);
  EXPECT_EQ(run->last_step(), 11);
  // A duplicate's LR is not checked (it is not taken); a new one's is.
  EXPECT_EQ(run->Ingest(session, Steps({12}, -1.0), &advice, &dups).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run->last_step(), 11);
}

TEST_F(RunTest, SupersededSessionIsAborted) {
  auto run = NewRun("r");
  v1::RunStart start;
  start.set_run_id("r");
  v1::AttachAccepted acc;
  const uint64_t old_session = run->Attach(start, &acc);
  const uint64_t new_session = run->Attach(start, &acc);
  std::vector<v1::Advice> advice;
  int64_t dups = 0;
  EXPECT_EQ(run->Ingest(old_session, Steps({1}), &advice, &dups).code(),
            absl::StatusCode::kAborted);
  EXPECT_TRUE(run->Ingest(new_session, Steps({1}), &advice, &dups).ok());
  run->Detach(old_session);  // no effect on the new session
  EXPECT_NE(run->state(), v1::DETACHED);
}

TEST_F(RunTest, OutcomeIsStoredEvenWhenTheAdviceLeftMemory) {
  options_.max_advice_in_memory = 1;
  // A window long enough that the next diagnosis comes before it closes.
  options_.policy.outcome_steps = 400;
  options_.outcome_loss_points = 400;
  auto run = NewRun("r");
  const uint64_t session = AttachAuto(run.get());
  std::vector<v1::Advice> advice;
  int64_t dups = 0;
  int64_t step = 0;
  while (advice.empty() && step < 2000) {
    ASSERT_TRUE(
        run->Ingest(session, Diverging(step, step + 10), &advice, &dups).ok());
    step += 10;
  }
  ASSERT_FALSE(advice.empty());
  ASSERT_TRUE(advice[0].has_action());
  const uint64_t id = advice[0].advice_id();
  v1::AdviceAck ack;
  ack.set_advice_id(id);
  ack.set_applied(true);
  ASSERT_TRUE(run->Ack(session, ack).ok());
  const int64_t ack_step = step;
  // Acking again is the client's error.
  EXPECT_EQ(run->Ack(session, ack).code(),
            absl::StatusCode::kFailedPrecondition);
  ack.set_advice_id(999);
  EXPECT_EQ(run->Ack(session, ack).code(), absl::StatusCode::kNotFound);

  // More diagnoses push the acked advice out of memory; then its window
  // closes. (The loss grows 2% a step from step 200: it can overflow to inf
  // late in the run, which is fine.)
  advice.clear();
  while (advice.empty() && step < 2000) {
    ASSERT_TRUE(
        run->Ingest(session, Diverging(step, step + 10), &advice, &dups).ok());
    step += 10;
  }
  ASSERT_FALSE(advice.empty());
  // Evicted while its window is open: the outcome is still pending.
  {
    const v1::RunHealth health = run->Health();
    for (const auto& r : health.advice()) EXPECT_NE(r.advice().advice_id(), id);
  }
  ASSERT_LT(step, ack_step + 400);
  ASSERT_TRUE(
      run->Ingest(session, Diverging(step, ack_step + 410), &advice, &dups)
          .ok());
  // Its judged outcome is stored all the same.
  ASSERT_TRUE(store_->Flush().ok());
  auto events = store_->ReadEvents("r");
  ASSERT_TRUE(events.ok());
  bool found = false;
  for (const auto& e : *events) {
    if (e.type != storage::EventRow::Type::kAdvice || e.id != id) continue;
    found = true;
    v1::AdviceRecord r;
    ASSERT_TRUE(r.ParseFromString(e.payload));
    EXPECT_EQ(r.status(), v1::APPLIED);
    EXPECT_THAT(r.outcome(), ::testing::AnyOf(v1::IMPROVED, v1::NO_CHANGE,
                                              v1::WORSENED));
    EXPECT_THAT(r.outcome_evidence(), HasSubstr("400 steps after"));
  }
  EXPECT_TRUE(found);
}

// An LR raise (for a run that stagnates at a tiny LR) that makes the loss
// worse is rolled back: a SET_LR to the LR before it, naming the advice it
// undoes. A cut that is followed by a worse loss is not (see the policy's
// cut_not_enough).
TEST_F(RunTest, AnLrRaiseThatMadeThingsWorseIsRolledBack) {
  auto run = NewRun("r");
  const uint64_t session = AttachAuto(run.get());
  std::vector<v1::Advice> advice;
  int64_t dups = 0;
  int64_t step = 0;
  const double lr0 = 1e-5;
  auto flat = [](int64_t from, int64_t to, double lr, double loss) {
    return Noisy(from, to, lr, [loss](int64_t) { return loss; });
  };
  // Stuck at chance (ln 10) with a tiny LR: the policy raises the LR.
  while (step < 3000) {
    ASSERT_TRUE(run->Ingest(session, flat(step, step + 10, lr0, 2.303), &advice, &dups).ok());
    step += 10;
    bool acted = false;
    for (const auto& a : advice) acted = acted || a.has_action();
    if (acted) break;
  }
  const v1::Advice* raise = nullptr;
  for (const auto& a : advice) {
    if (a.has_action()) raise = &a;
  }
  ASSERT_NE(raise, nullptr) << "no action for a stagnating run";
  const uint64_t id = raise->advice_id();
  v1::AdviceAck ack;
  ack.set_advice_id(id);
  ack.set_applied(true);
  ack.set_effective_step(step);
  ASSERT_TRUE(run->Ack(session, ack).ok());
  advice.clear();
  // The raised LR makes it worse: the loss settles 30% higher.
  const int64_t window = options_.policy.outcome_steps;
  for (int64_t end = step + window + 20; step < end; step += 10) {
    ASSERT_TRUE(run->Ingest(session, flat(step, step + 10, 10 * lr0, 3.0), &advice, &dups).ok());
  }
  const v1::Advice* rollback = nullptr;
  for (const auto& a : advice) {
    if (a.rolls_back() == id) rollback = &a;
  }
  ASSERT_NE(rollback, nullptr) << "no rollback of advice " << id;
  ASSERT_TRUE(rollback->action().has_set_lr());
  EXPECT_DOUBLE_EQ(rollback->action().set_lr().lr(), lr0);
  EXPECT_THAT(rollback->explanation(), HasSubstr(absl::StrCat("Rolling back advice #", id)));
  EXPECT_THAT(rollback->diagnosis().evidence(), HasSubstr("made things worse"));
  const v1::RunHealth health = run->Health();
  bool judged = false;
  for (const auto& r : health.advice()) {
    if (r.advice().advice_id() == id) {
      judged = true;
      EXPECT_EQ(r.outcome(), v1::WORSENED);
    }
  }
  EXPECT_TRUE(judged);
}

// A raise that blew the run up, answered by a cut that was applied: the
// raise is judged WORSENED but not rolled back to the LR before it, which
// would undo the cut's answer too (as for an LR ramp that found the edge
// and was cut back: rolling it back to the starved LR cost the rescue
// benchmark a run).
TEST_F(RunTest, ARaiseAnsweredByALaterCutIsNotRolledBack) {
  auto run = NewRun("r");
  const uint64_t session = AttachAuto(run.get());
  std::vector<v1::Advice> advice;
  int64_t dups = 0;
  int64_t step = 0;
  const double lr0 = 1e-5;
  auto ack = [&](const v1::Advice& a) {
    v1::AdviceAck k;
    k.set_advice_id(a.advice_id());
    k.set_applied(true);
    k.set_effective_step(step);
    ASSERT_TRUE(run->Ack(session, k).ok());
  };
  auto first_action = [&]() -> const v1::Advice* {
    for (const auto& a : advice) {
      if (a.has_action()) return &a;
    }
    return nullptr;
  };
  // Stuck at chance with a tiny LR: raised.
  while (step < 3000 && first_action() == nullptr) {
    ASSERT_TRUE(run->Ingest(session, Noisy(step, step + 10, lr0,
                                           [](int64_t) { return 2.303; }),
                            &advice, &dups).ok());
    step += 10;
  }
  ASSERT_NE(first_action(), nullptr);
  const uint64_t raise_id = first_action()->advice_id();
  ack(*first_action());
  advice.clear();
  // At the raised LR the loss blows up: a cut (clipping may come first),
  // applied.
  auto first_cut = [&]() -> const v1::Advice* {
    for (const auto& a : advice) {
      if (a.action().has_scale_lr() || a.action().has_set_lr()) return &a;
    }
    return nullptr;
  };
  const int64_t blow = step;
  std::vector<v1::Advice> later;  // every advice after the raise
  while (step < blow + 300 && first_cut() == nullptr) {
    for (const auto& a : advice) {
      if (a.has_action()) ack(a);
    }
    later.insert(later.end(), advice.begin(), advice.end());
    advice.clear();
    ASSERT_TRUE(run->Ingest(
        session, Noisy(step, step + 10, 1000 * lr0,
                       [&](int64_t s) {
                         // Non-finite at once: a divergence that is acted
                         // on whatever the cooldown.
                         return s < blow + 5 ? 2.303 * std::pow(1.5, s - blow)
                                             : std::nan("");
                       }),
        &advice, &dups).ok());
    step += 10;
  }
  ASSERT_NE(first_cut(), nullptr) << "no cut for the blow-up";
  // The cut came while the raise's outcome window was still open.
  ASSERT_LT(first_cut()->at_step(), blow + options_.policy.outcome_steps);
  const int64_t cut_step = first_cut()->at_step();
  ack(*first_cut());
  later.insert(later.end(), advice.begin(), advice.end());
  // Then the raise's outcome window closes (worse than before it).
  for (int64_t end = step + options_.policy.outcome_steps + 20; step < end;
       step += 10) {
    advice.clear();
    ASSERT_TRUE(run->Ingest(session, Noisy(step, step + 10, 100 * lr0,
                                           [](int64_t) { return 3.0; }),
                            &advice, &dups).ok());
    later.insert(later.end(), advice.begin(), advice.end());
  }
  for (const auto& a : later) {
    EXPECT_NE(a.rolls_back(), raise_id) << "at step " << a.at_step() << " (blow-up at "
                                        << blow << ", cut at " << cut_step << ")";
  }
  bool judged = false;
  const v1::RunHealth health = run->Health();
  for (const auto& r : health.advice()) {
    if (r.advice().advice_id() == raise_id) {
      judged = r.outcome() != v1::PENDING;
    }
  }
  EXPECT_TRUE(judged);
}

TEST_F(RunTest, ACutFollowedByAWorseLossIsNotRolledBack) {
  auto run = NewRun("r");
  const uint64_t session = AttachAuto(run.get());
  std::vector<v1::Advice> advice;
  int64_t dups = 0;
  int64_t step = 0;
  while (advice.empty() && step < 2000) {
    ASSERT_TRUE(run->Ingest(session, Diverging(step, step + 10), &advice, &dups).ok());
    step += 10;
  }
  ASSERT_FALSE(advice.empty());
  ASSERT_TRUE(advice[0].has_action());
  const uint64_t id = advice[0].advice_id();
  v1::AdviceAck ack;
  ack.set_advice_id(id);
  ack.set_applied(true);
  ASSERT_TRUE(run->Ack(session, ack).ok());
  advice.clear();
  // The trainer keeps diverging (at a cut LR): WORSENED, but no rollback.
  for (int64_t end = step + options_.policy.outcome_steps + 20; step < end; step += 10) {
    v1::StepBatch b = Diverging(step, step + 10);
    for (auto& p : *b.mutable_steps()) p.set_lr(0.05);
    ASSERT_TRUE(run->Ingest(session, b, &advice, &dups).ok());
  }
  for (const auto& a : advice) EXPECT_EQ(a.rolls_back(), 0u) << a.explanation();
}

TEST_F(RunTest, RecoveryClosesPendingOutcomesAndKeepsThePolicysMemory) {
  auto run = NewRun("r");
  v1::RunStart start;
  start.set_run_id("r");
  start.set_mode(v1::AUTO);
  v1::AttachAccepted acc;
  uint64_t session = run->Attach(start, &acc);
  std::vector<v1::Advice> advice;
  int64_t dups = 0;
  int64_t step = 0;
  while (advice.empty() && step < 2000) {
    ASSERT_TRUE(
        run->Ingest(session, Diverging(step, step + 10), &advice, &dups).ok());
    step += 10;
  }
  ASSERT_FALSE(advice.empty());
  v1::AdviceAck ack;
  ack.set_advice_id(advice[0].advice_id());
  ack.set_applied(true);
  ASSERT_TRUE(run->Ack(session, ack).ok());
  run->Detach(session);
  const v1::RunHealth before = run->Health();
  run.reset();

  // "Restart": a new Run over the same store.
  std::unique_ptr<runs::Run> again_run = Restarted();
  ASSERT_NE(again_run, nullptr);
  runs::Run& again = *again_run;
  const v1::RunHealth after = again.Health();
  EXPECT_EQ(after.summary().last_step(), before.summary().last_step());
  ASSERT_EQ(after.advice_size(), before.advice_size());
  EXPECT_EQ(after.advice(0).status(), v1::APPLIED);
  EXPECT_EQ(after.advice(0).outcome(), v1::NOT_JUDGED);
  EXPECT_THAT(after.advice(0).outcome_evidence(), HasSubstr("restarted"));
  // Still within the cooldown of the action taken before the restart: the
  // next diagnosis is not acted on.
  session = again.Attach(start, &acc);
  std::vector<v1::Advice> more;
  ASSERT_TRUE(
      again.Ingest(session, Diverging(step, step + 5), &more, &dups).ok());
  for (const auto& a : more) EXPECT_FALSE(a.has_action()) << a.DebugString();
}

// A raise advised before a restart keeps its watch window (the policy's
// RunContext::ramp_until) and the LR before it across the restart: the
// blow-up it causes right after the restart is acted on at once, not held
// back by the cooldown, by going back to that LR.
TEST_F(RunTest, RecoveryKeepsTheWatchWindowOfARaise) {
  options_.policy.starved_ramp = false;  // a plain raise (x3), no ramp
  auto run = NewRun("r");
  uint64_t session = AttachAuto(run.get());
  std::vector<v1::Advice> advice;
  int64_t dups = 0;
  int64_t step = 0;
  const double lr0 = 1e-5;
  const v1::Advice* raise = nullptr;
  while (raise == nullptr && step < 3000) {
    advice.clear();
    ASSERT_TRUE(run->Ingest(session, Noisy(step, step + 5, lr0,
                                           [](int64_t) { return 2.303; }),
                            &advice, &dups)
                    .ok());
    step += 5;
    for (const auto& a : advice) {
      if (a.has_action()) raise = &a;
    }
  }
  ASSERT_NE(raise, nullptr) << "no action for a stagnating run";
  ASSERT_TRUE(raise->action().has_scale_lr()) << raise->DebugString();
  ASSERT_GT(raise->action().scale_lr().factor(), 1.0);
  const int64_t raised_at = raise->at_step();
  const double raised_lr = lr0 * raise->action().scale_lr().factor();
  std::unique_ptr<runs::Run> again_run = AppliedThenRestarted(
      std::move(run), session, raise->advice_id(), step);
  ASSERT_NE(again_run, nullptr);
  runs::Run& again = *again_run;
  session = AttachAuto(&again);
  // The raised LR blows the run up: 15% more loss per step.
  const v1::Advice* cut = nullptr;
  const int64_t window_end = raised_at + options_.policy.cooldown_steps / 2;
  for (int64_t from = step; cut == nullptr && from < window_end; from += 5) {
    advice.clear();
    ASSERT_TRUE(again.Ingest(session, Noisy(from, from + 5, raised_lr,
                                            [step](int64_t s) {
                                              return 2.303 * std::pow(1.15, s - step);
                                            }),
                             &advice, &dups)
                    .ok());
    for (const auto& a : advice) {
      if (a.diagnosis().kind() == v1::DIVERGENCE) {
        EXPECT_TRUE(a.has_action()) << a.DebugString();
        cut = &a;
      }
    }
  }
  ASSERT_NE(cut, nullptr) << "no divergence diagnosed within the raise's window";
  // The LR before the raise survived the restart too: the answer is to go
  // back to it, with the rollback.
  ASSERT_TRUE(cut->action().has_set_lr()) << cut->DebugString();
  EXPECT_DOUBLE_EQ(cut->action().set_lr().lr(), lr0);
  EXPECT_TRUE(cut->action().restore_checkpoint());
}

// The LR ceiling a blow-up cut sets (policy::RunContext::lr_ceiling) holds
// across a restart: a plateau after the restart at the LR the run was cut
// to gets no raise back towards the LR that blew it up.
TEST_F(RunTest, RecoveryKeepsTheLrCeilingOfABlowUpCut) {
  auto run = NewRun("r");
  uint64_t session = AttachAuto(run.get());
  std::vector<v1::Advice> advice;
  int64_t dups = 0;
  int64_t step = 0;
  // At LR 0.5 the loss rises from its initial 2.0 by 5% a step from step
  // 10 on, and stays at 1.5x: a divergence (not a blow-up of 4x, after
  // which a plateau would read as damage and be cut whatever the ceiling).
  const auto blows_up = [](int64_t s) {
    return s < 10 ? 2.0 : std::min(3.0, 2.0 * std::pow(1.05, s - 10));
  };
  const v1::Advice* cut = nullptr;
  while (cut == nullptr && step < 2000) {
    advice.clear();
    ASSERT_TRUE(run->Ingest(session, Noisy(step, step + 10, 0.5, blows_up),
                            &advice, &dups)
                    .ok());
    step += 10;
    for (const auto& a : advice) {
      if (a.has_action()) cut = &a;
    }
  }
  ASSERT_NE(cut, nullptr) << "no action for a diverging run";
  ASSERT_TRUE(cut->action().restore_checkpoint()) << cut->DebugString();
  ASSERT_TRUE(cut->action().has_scale_lr()) << cut->DebugString();
  const double cut_lr = 0.5 * cut->action().scale_lr().factor();
  std::unique_ptr<runs::Run> again_run = AppliedThenRestarted(
      std::move(run), session, cut->advice_id(), step);
  ASSERT_NE(again_run, nullptr);
  runs::Run& again = *again_run;
  session = AttachAuto(&again);
  // Rolled back to its initial weights and cut, the run sits at its
  // initial loss: a plateau far from converged, at the LR of the cut.
  // Without the ceiling it would read as an LR too small, and be raised.
  const v1::Advice* next = nullptr;
  for (int64_t from = step; next == nullptr && from < step + 2000; from += 10) {
    advice.clear();
    ASSERT_TRUE(again.Ingest(session, Noisy(from, from + 10, cut_lr,
                                            [](int64_t) { return 2.0; }),
                             &advice, &dups)
                    .ok());
    for (const auto& a : advice) {
      if (a.has_action()) next = &a;
    }
  }
  ASSERT_NE(next, nullptr) << "no action for the plateau after the cut";
  EXPECT_EQ(next->diagnosis().kind(), v1::STAGNATION) << next->DebugString();
  EXPECT_FALSE(next->action().has_ramp_lr()) << next->DebugString();
  EXPECT_FALSE(next->action().has_restart_cosine()) << next->DebugString();
  if (next->action().has_scale_lr()) {
    EXPECT_LT(next->action().scale_lr().factor(), 1.0) << next->DebugString();
  }
  if (next->action().has_set_lr()) {
    EXPECT_LE(next->action().set_lr().lr(), cut_lr) << next->DebugString();
  }
}

}  // namespace
}  // namespace lossguard::runs
