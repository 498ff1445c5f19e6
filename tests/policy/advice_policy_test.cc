#include "lossguard/policy/advice_policy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>

namespace lossguard::policy {
namespace {

using analyzers::Diagnosis;
using analyzers::DiagnosisKind;
using ::testing::DoubleEq;
using ::testing::HasSubstr;
using ::testing::Not;

Diagnosis Diag(DiagnosisKind kind, int64_t step = 500) {
  return {.kind = kind,
          .step = step,
          .onset = step - 20,
          .severity = 0.8,
          .confidence = 0.9,
          .evidence = "test"};
}

// A run at step 500 with a constant LR of 0.1 and no action yet.
RunContext Ctx() {
  return {.step = 500,
          .lr = 0.1,
          .max_lr_seen = 0.1,
          .steps_seen = 501,
          .schedule = ScheduleHint::kConstant};
}

TEST(AdvicePolicyTest, DivergenceCutsLrTenfold) {
  Advice a = Decide(Diag(DiagnosisKind::kDivergence), Ctx());
  EXPECT_EQ(a.action, ActionKind::kScaleLr);
  EXPECT_EQ(a.diagnosis, DiagnosisKind::kDivergence);
  EXPECT_EQ(a.at_step, 500);
  EXPECT_DOUBLE_EQ(a.lr_factor, 0.1);
  EXPECT_DOUBLE_EQ(a.lr_from, 0.1);
  EXPECT_DOUBLE_EQ(a.lr_to, 0.01);
  EXPECT_EQ(a.clip_max_norm, 0.0);
  EXPECT_EQ(a.explanation,
            "divergence at step 500 (onset 480, severity 0.80): scale the LR "
            "x0.1, from 0.1 to 0.01.");
}

TEST(AdvicePolicyTest, DivergenceAfterGradientExplosionAlsoClips) {
  RunContext ctx = Ctx();
  ctx.grad_explosion_seen = true;
  ctx.grad_norm_level = 1.5;
  Advice a = Decide(Diag(DiagnosisKind::kDivergence), ctx);
  EXPECT_EQ(a.action, ActionKind::kScaleLr);
  EXPECT_DOUBLE_EQ(a.lr_to, 0.01);
  EXPECT_DOUBLE_EQ(a.clip_max_norm, 3.0);
  EXPECT_THAT(a.explanation, HasSubstr("gradient explosion preceded it"));
  EXPECT_THAT(a.explanation, HasSubstr("clip the gradient norm at 3"));

  // The diagnosis's own level wins over the context's.
  Diagnosis d = Diag(DiagnosisKind::kDivergence);
  d.grad_norm_level = 4.0;
  EXPECT_DOUBLE_EQ(Decide(d, ctx).clip_max_norm, 8.0);
}

TEST(AdvicePolicyTest, DivergenceAtMinLrStillClips) {
  RunContext ctx = Ctx();
  ctx.lr = 1e-7;
  ctx.grad_explosion_seen = true;
  ctx.grad_norm_level = 1.0;
  Advice a = Decide(Diag(DiagnosisKind::kDivergence), ctx);
  EXPECT_EQ(a.action, ActionKind::kEnableGradClip);
  EXPECT_DOUBLE_EQ(a.clip_max_norm, 2.0);
  EXPECT_EQ(a.blocked_by, GuardRail::kNone);
}

TEST(AdvicePolicyTest, OscillationHalvesLr) {
  Advice a = Decide(Diag(DiagnosisKind::kOscillation), Ctx());
  EXPECT_EQ(a.action, ActionKind::kScaleLr);
  EXPECT_DOUBLE_EQ(a.lr_factor, 0.5);
  EXPECT_DOUBLE_EQ(a.lr_to, 0.05);
}

TEST(AdvicePolicyTest, StagnationAtConstantLrRaisesIt) {
  Advice a = Decide(Diag(DiagnosisKind::kStagnation), Ctx());
  EXPECT_EQ(a.action, ActionKind::kScaleLr);
  EXPECT_DOUBLE_EQ(a.lr_factor, 3.0);
  EXPECT_THAT(a.lr_to, DoubleEq(0.3));
  EXPECT_THAT(a.explanation, HasSubstr("constant at 0.1"));
}

TEST(AdvicePolicyTest, StagnationAfterEarlyDecayRaisesLr) {
  // A step schedule cut the LR from 1.0 to 0.1 before the stall; it has
  // been flat since the onset.
  RunContext ctx = Ctx();
  ctx.max_lr_seen = 1.0;
  ctx.schedule = ScheduleHint::kDecaying;
  Diagnosis d = Diag(DiagnosisKind::kStagnation);
  d.lr_at_onset = 0.1;
  Advice a = Decide(d, ctx);
  EXPECT_EQ(a.action, ActionKind::kScaleLr);
  EXPECT_DOUBLE_EQ(a.lr_factor, 3.0);
  EXPECT_THAT(a.explanation, HasSubstr("decayed early"));
}

TEST(AdvicePolicyTest, StagnationWhileDecayingRestartsCosine) {
  RunContext ctx = Ctx();
  ctx.max_lr_seen = 1.0;
  ctx.lr = 0.1;
  ctx.steps_seen = 1000;
  ctx.schedule = ScheduleHint::kDecaying;
  Diagnosis d = Diag(DiagnosisKind::kStagnation);
  d.lr_at_onset = 0.2;  // still falling since the onset
  Advice a = Decide(d, ctx);
  EXPECT_EQ(a.action, ActionKind::kRestartCosine);
  EXPECT_DOUBLE_EQ(a.eta_max, 1.0);
  EXPECT_DOUBLE_EQ(a.eta_min, 0.01);
  EXPECT_EQ(a.t_0, 500);
  EXPECT_THAT(a.explanation,
              HasSubstr("t_0 500 steps, eta_max 1, eta_min 0.01"));

  // The restart's eta_max respects max_lr, and t_0 has a floor.
  PolicyOptions o;
  o.max_lr = 0.5;
  o.restart_min_t0 = 800;
  a = Decide(d, ctx, o);
  EXPECT_EQ(a.action, ActionKind::kRestartCosine);
  EXPECT_DOUBLE_EQ(a.eta_max, 0.5);
  EXPECT_EQ(a.t_0, 800);
}

TEST(AdvicePolicyTest, OverfittingLowersLrThenStopsEarly) {
  Advice a = Decide(Diag(DiagnosisKind::kOverfitting), Ctx());
  EXPECT_EQ(a.action, ActionKind::kScaleLr);
  EXPECT_DOUBLE_EQ(a.lr_factor, 0.5);

  RunContext ctx = Ctx();
  ctx.overfitting_advised = true;
  a = Decide(Diag(DiagnosisKind::kOverfitting), ctx);
  EXPECT_EQ(a.action, ActionKind::kEarlyStop);
  EXPECT_THAT(a.explanation, HasSubstr("stop early"));
}

TEST(AdvicePolicyTest, GradientExplosionEnablesClipping) {
  Diagnosis d = Diag(DiagnosisKind::kGradientExplosion);
  d.grad_norm_level = 0.75;
  Advice a = Decide(d, Ctx());
  EXPECT_EQ(a.action, ActionKind::kEnableGradClip);
  EXPECT_DOUBLE_EQ(a.clip_max_norm, 1.5);
  EXPECT_THAT(a.explanation, HasSubstr("at 1.5 (2x the typical 0.75)"));

  PolicyOptions o;
  o.clip_level_multiple = 3.0;
  EXPECT_DOUBLE_EQ(Decide(d, Ctx(), o).clip_max_norm, 2.25);
}

TEST(AdvicePolicyTest, GradientExplosionWithoutLevelDoesNothing) {
  Advice a = Decide(Diag(DiagnosisKind::kGradientExplosion), Ctx());
  EXPECT_EQ(a.action, ActionKind::kNone);
  EXPECT_THAT(a.reason, HasSubstr("grad-norm level"));
}

TEST(AdvicePolicyTest, LossSpikeNeedsNoAction) {
  Advice a = Decide(Diag(DiagnosisKind::kLossSpike), Ctx());
  EXPECT_EQ(a.action, ActionKind::kNone);
  EXPECT_EQ(a.blocked_by, GuardRail::kNone);
  EXPECT_FALSE(a.reason.empty());
}

TEST(AdvicePolicyTest, MinStepsSeenBlocks) {
  RunContext ctx = Ctx();
  ctx.steps_seen = 10;
  Advice a = Decide(Diag(DiagnosisKind::kDivergence), ctx);
  EXPECT_EQ(a.action, ActionKind::kNone);
  EXPECT_EQ(a.blocked_by, GuardRail::kMinStepsSeen);
  EXPECT_THAT(a.reason, HasSubstr("only 10 steps"));
  EXPECT_THAT(a.explanation, HasSubstr("no action, because only 10 steps"));
}

TEST(AdvicePolicyTest, MaxActionsBlocks) {
  RunContext ctx = Ctx();
  ctx.actions_taken = 5;
  Advice a = Decide(Diag(DiagnosisKind::kDivergence), ctx);
  EXPECT_EQ(a.action, ActionKind::kNone);
  EXPECT_EQ(a.blocked_by, GuardRail::kMaxActions);
}

TEST(AdvicePolicyTest, CooldownBlocksUntilItEnds) {
  RunContext ctx = Ctx();
  ctx.actions_taken = 1;
  ctx.last_action_step = 450;
  Advice a = Decide(Diag(DiagnosisKind::kOscillation), ctx);
  EXPECT_EQ(a.action, ActionKind::kNone);
  EXPECT_EQ(a.blocked_by, GuardRail::kCooldown);
  EXPECT_THAT(a.reason, HasSubstr("50 steps ago"));

  ctx.last_action_step = 400;
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kOscillation), ctx).action,
            ActionKind::kScaleLr);
}

TEST(AdvicePolicyTest, LrMovesStopAtTheBounds) {
  PolicyOptions o;
  o.min_lr = 0.02;
  o.max_lr = 0.2;
  // x0.1 would reach 0.01: set the bound instead.
  Advice a = Decide(Diag(DiagnosisKind::kDivergence), Ctx(), o);
  EXPECT_EQ(a.action, ActionKind::kSetLr);
  EXPECT_DOUBLE_EQ(a.lr_to, 0.02);
  EXPECT_THAT(a.explanation, HasSubstr("min_lr"));
  // x3 would reach 0.3.
  a = Decide(Diag(DiagnosisKind::kStagnation), Ctx(), o);
  EXPECT_EQ(a.action, ActionKind::kSetLr);
  EXPECT_DOUBLE_EQ(a.lr_to, 0.2);
}

TEST(AdvicePolicyTest, LrAtBoundBlocks) {
  PolicyOptions o;
  o.min_lr = 0.1;
  o.max_lr = 0.1;
  Advice a = Decide(Diag(DiagnosisKind::kOscillation), Ctx(), o);
  EXPECT_EQ(a.action, ActionKind::kNone);
  EXPECT_EQ(a.blocked_by, GuardRail::kLrBound);
  a = Decide(Diag(DiagnosisKind::kStagnation), Ctx(), o);
  EXPECT_EQ(a.action, ActionKind::kNone);
  EXPECT_EQ(a.blocked_by, GuardRail::kLrBound);
  EXPECT_THAT(a.reason, HasSubstr("max_lr 0.1"));
}

TEST(AdvicePolicyTest, UnknownLrBlocksLrMoves) {
  RunContext ctx = Ctx();
  ctx.lr = std::nan("");
  ctx.schedule = ScheduleHint::kUnknown;
  Advice a = Decide(Diag(DiagnosisKind::kDivergence), ctx);
  EXPECT_EQ(a.action, ActionKind::kNone);
  EXPECT_THAT(a.reason, HasSubstr("the LR is not logged"));
  EXPECT_THAT(a.explanation, Not(HasSubstr("nan")));
}

TEST(AdvicePolicyTest, StagnationWithoutLoggedLrSaysSo) {
  // A log without an LR column: the LR is NaN at every step.
  for (double max_lr_seen : {0.0, 0.1}) {
    RunContext ctx = Ctx();
    ctx.lr = std::nan("");
    ctx.max_lr_seen = max_lr_seen;
    ctx.schedule = ScheduleHint::kUnknown;
    Diagnosis d = Diag(DiagnosisKind::kStagnation);
    d.lr_at_onset = std::nan("");
    Advice a = Decide(d, ctx);
    EXPECT_EQ(a.action, ActionKind::kNone);
    EXPECT_EQ(a.blocked_by, GuardRail::kNone);
    EXPECT_THAT(a.reason, HasSubstr("not logged (schedule unknown)"));
    EXPECT_THAT(a.explanation, Not(HasSubstr("nan")));
    EXPECT_THAT(a.explanation, Not(HasSubstr("constant")));
    EXPECT_EQ(a.lr_to, 0.0);
    EXPECT_EQ(a.eta_max, 0.0);
  }
  // Oscillation and overfitting move the LR too: nothing from NaN.
  RunContext ctx = Ctx();
  ctx.lr = std::nan("");
  ctx.schedule = ScheduleHint::kUnknown;
  for (DiagnosisKind kind :
       {DiagnosisKind::kOscillation, DiagnosisKind::kOverfitting}) {
    Advice a = Decide(Diag(kind), ctx);
    EXPECT_EQ(a.action, ActionKind::kNone);
    EXPECT_THAT(a.reason, HasSubstr("not logged"));
  }
}

TEST(AdvicePolicyTest, CooldownSurvivesExtremeSteps) {
  // Steps jump from near INT64_MIN to near INT64_MAX: the distance does not
  // fit an int64, and the cooldown is long over.
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  RunContext ctx = Ctx();
  ctx.step = kMax - 100;
  ctx.actions_taken = 1;
  ctx.last_action_step = kMin + 10;
  Advice a = Decide(Diag(DiagnosisKind::kDivergence, kMax - 100), ctx);
  EXPECT_EQ(a.action, ActionKind::kScaleLr) << a.explanation;
  EXPECT_EQ(a.blocked_by, GuardRail::kNone);

  // Near the top of the range the cooldown still counts right.
  ctx.last_action_step = kMax - 140;
  a = Decide(Diag(DiagnosisKind::kDivergence, kMax - 100), ctx);
  EXPECT_EQ(a.blocked_by, GuardRail::kCooldown);
  EXPECT_THAT(a.reason, HasSubstr("was 40 steps ago"));
  // ...and near the bottom.
  ctx.step = kMin + 150;
  ctx.last_action_step = kMin + 10;
  a = Decide(Diag(DiagnosisKind::kDivergence, kMin + 150), ctx);
  EXPECT_EQ(a.action, ActionKind::kScaleLr) << a.explanation;
}

TEST(AdvicePolicyTest, RestartCycleLengthSaturates) {
  RunContext ctx = Ctx();
  ctx.max_lr_seen = 1.0;
  ctx.steps_seen = std::numeric_limits<int64_t>::max();
  ctx.schedule = ScheduleHint::kDecaying;
  Diagnosis d = Diag(DiagnosisKind::kStagnation);
  d.lr_at_onset = 0.2;
  PolicyOptions o;
  o.restart_t0_fraction = 2.0;
  Advice a = Decide(d, ctx, o);
  ASSERT_EQ(a.action, ActionKind::kRestartCosine);
  EXPECT_EQ(a.t_0, std::numeric_limits<int64_t>::max());
}

TEST(AdvicePolicyTest, StagnationRaiseStopsAtTheLargestLrSeen) {
  // A step schedule cut the LR from 0.15 to 0.1: x3 would be 0.3, twice
  // the largest LR the run ever used.
  RunContext ctx = Ctx();
  ctx.max_lr_seen = 0.15;
  ctx.schedule = ScheduleHint::kDecaying;
  Diagnosis d = Diag(DiagnosisKind::kStagnation);
  d.lr_at_onset = 0.1;  // flat since the onset
  Advice a = Decide(d, ctx);
  EXPECT_EQ(a.action, ActionKind::kSetLr);
  EXPECT_DOUBLE_EQ(a.lr_from, 0.1);
  EXPECT_DOUBLE_EQ(a.lr_to, 0.15);
  EXPECT_EQ(a.lr_bound, "max LR seen");
  EXPECT_THAT(a.explanation,
              HasSubstr("set the LR from 0.1 to 0.15, the max LR seen bound"));

  // max_lr still applies when it is lower.
  PolicyOptions o;
  o.max_lr = 0.12;
  a = Decide(d, ctx, o);
  EXPECT_EQ(a.action, ActionKind::kSetLr);
  EXPECT_DOUBLE_EQ(a.lr_to, 0.12);
  EXPECT_EQ(a.lr_bound, "max_lr");
  EXPECT_THAT(a.explanation, HasSubstr("the max_lr bound"));
}

// LR of a linear warmup over `warmup` steps to `peak`, then a cosine decay
// to 0 over `decay` steps.
double WarmupCosineLr(int64_t step, int64_t warmup, int64_t decay,
                      double peak) {
  if (step < warmup) {
    return peak * static_cast<double>(step) / static_cast<double>(warmup);
  }
  const double t = std::min(
      1.0, static_cast<double>(step - warmup) / static_cast<double>(decay));
  return 0.5 * peak * (1.0 + std::cos(std::numbers::pi * t));
}

TEST(AdvicePolicyTest, WarmupCosineStagnatingMidDecayRestartsCosine) {
  // 500 warmup steps to 0.1, then a cosine over 2000 steps. The loss stalls
  // from step 504 and the analyzer decides at step 1007, with lr_at_onset
  // the LR at the start of the stagnant stretch.
  constexpr int64_t kWarmup = 500;
  constexpr int64_t kDecay = 2000;
  constexpr double kPeak = 0.1;
  PolicyOptions o;
  RunContext ctx;
  for (int64_t step = 0; step <= 1007; ++step) {
    ObserveStep({.step = step,
                 .lr = WarmupCosineLr(step, kWarmup, kDecay, kPeak),
                 .loss = 2.3},
                o, &ctx);
  }
  ASSERT_EQ(ctx.schedule, ScheduleHint::kDecaying);
  EXPECT_DOUBLE_EQ(ctx.max_lr_seen, kPeak);

  Diagnosis d = Diag(DiagnosisKind::kStagnation, 1007);
  d.onset = 504;
  d.lr_at_onset = WarmupCosineLr(504, kWarmup, kDecay, kPeak);
  Advice a = Decide(d, ctx, o);
  ASSERT_EQ(a.action, ActionKind::kRestartCosine) << a.explanation;
  EXPECT_DOUBLE_EQ(a.eta_max, kPeak);
  EXPECT_DOUBLE_EQ(a.eta_min, 0.01 * kPeak);
  EXPECT_EQ(a.t_0, 504);  // half the 1008 steps seen
  EXPECT_THAT(a.explanation, HasSubstr("the LR is still decaying"));
  EXPECT_THAT(a.explanation, HasSubstr("restart the cosine cycle"));

  // Had the LR been flat since the onset (a step schedule), the policy
  // raises it instead, and no higher than the peak.
  d.lr_at_onset = ctx.lr;
  a = Decide(d, ctx, o);
  EXPECT_EQ(a.action, ActionKind::kSetLr) << a.explanation;
  EXPECT_DOUBLE_EQ(a.lr_to, kPeak);
}

TEST(AdvicePolicyTest, InferSchedule) {
  EXPECT_EQ(InferSchedule(0.0, 0.0, 0.05), ScheduleHint::kUnknown);
  EXPECT_EQ(InferSchedule(0.1, 0.1, 0.05), ScheduleHint::kConstant);
  EXPECT_EQ(InferSchedule(0.1, 0.097, 0.05), ScheduleHint::kConstant);
  EXPECT_EQ(InferSchedule(0.1, 0.05, 0.05), ScheduleHint::kDecaying);
  EXPECT_EQ(InferSchedule(0.1, std::nan(""), 0.05), ScheduleHint::kUnknown);
}

TEST(AdvicePolicyTest, ObserveKeepsTheContext) {
  PolicyOptions o;
  RunContext ctx;
  ObserveStep({.step = 0, .lr = 0.1, .loss = 2.0}, o, &ctx);
  ObserveStep({.step = 1, .lr = 0.01, .loss = 1.9}, o, &ctx);
  EXPECT_EQ(ctx.step, 1);
  EXPECT_EQ(ctx.steps_seen, 2);
  EXPECT_DOUBLE_EQ(ctx.lr, 0.01);
  EXPECT_DOUBLE_EQ(ctx.max_lr_seen, 0.1);
  EXPECT_EQ(ctx.schedule, ScheduleHint::kDecaying);

  Diagnosis explosion = Diag(DiagnosisKind::kGradientExplosion, 1);
  explosion.grad_norm_level = 2.0;
  Advice none;  // blocked: no action
  ObserveAdvice(explosion, none, &ctx);
  EXPECT_TRUE(ctx.grad_explosion_seen);
  EXPECT_DOUBLE_EQ(ctx.grad_norm_level, 2.0);
  EXPECT_EQ(ctx.actions_taken, 0);
  EXPECT_FALSE(ctx.last_action_step.has_value());

  Advice act{.at_step = 1, .action = ActionKind::kScaleLr};
  ObserveAdvice(Diag(DiagnosisKind::kOverfitting, 1), act, &ctx);
  EXPECT_EQ(ctx.actions_taken, 1);
  EXPECT_EQ(ctx.last_action_step, 1);
  EXPECT_TRUE(ctx.overfitting_advised);
}

TEST(AdvicePolicyTest, Names) {
  EXPECT_EQ(ActionName(ActionKind::kRestartCosine), "restart_cosine");
  EXPECT_EQ(ActionName(ActionKind::kEnableGradClip), "enable_grad_clip");
  EXPECT_EQ(GuardRailName(GuardRail::kCooldown), "cooldown");
  EXPECT_EQ(ScheduleName(ScheduleHint::kDecaying), "decaying");
}


// --- JudgeOutcome ---------------------------------------------------------

TEST(JudgeOutcomeTest, LowerLossAfterIsImproved) {
  OutcomeWindow w{.loss_before = 2.0, .loss_after = 1.0, .steps_after = 100};
  OutcomeJudgement j = JudgeOutcome(DiagnosisKind::kDivergence, w);
  EXPECT_EQ(j.outcome, Outcome::kImproved);
  EXPECT_THAT(j.evidence, HasSubstr("x0.500"));
}

TEST(JudgeOutcomeTest, SmallMoveIsNoChange) {
  OutcomeWindow w{.loss_before = 1.0, .loss_after = 1.02, .steps_after = 100};
  EXPECT_EQ(JudgeOutcome(DiagnosisKind::kOscillation, w).outcome,
            Outcome::kNoChange);
}

TEST(JudgeOutcomeTest, HigherLossOrNonFiniteIsWorsened) {
  OutcomeWindow w{.loss_before = 1.0, .loss_after = 1.5, .steps_after = 100};
  EXPECT_EQ(JudgeOutcome(DiagnosisKind::kStagnation, w).outcome,
            Outcome::kWorsened);
  w.loss_after = 0.5;
  w.nonfinite_after = true;
  OutcomeJudgement j = JudgeOutcome(DiagnosisKind::kDivergence, w);
  EXPECT_EQ(j.outcome, Outcome::kWorsened);
  EXPECT_THAT(j.evidence, HasSubstr("non-finite"));
}

TEST(JudgeOutcomeTest, OverfittingIsJudgedOnValidationLoss) {
  // The training loss keeps falling (as it does while overfitting); the
  // validation loss decides.
  OutcomeWindow w{.loss_before = 0.5,
                  .loss_after = 0.3,
                  .val_before = 0.8,
                  .val_after = 0.95,
                  .steps_after = 100};
  OutcomeJudgement j = JudgeOutcome(DiagnosisKind::kOverfitting, w);
  EXPECT_EQ(j.outcome, Outcome::kWorsened);
  EXPECT_THAT(j.evidence, HasSubstr("validation loss"));
  // Without validation medians the training loss decides.
  w.val_after.reset();
  EXPECT_EQ(JudgeOutcome(DiagnosisKind::kOverfitting, w).outcome,
            Outcome::kImproved);
}

TEST(JudgeOutcomeTest, NonPositiveLossesCompareBySign) {
  OutcomeWindow w{.loss_before = -1.0, .loss_after = -2.0, .steps_after = 10};
  EXPECT_EQ(JudgeOutcome(DiagnosisKind::kStagnation, w).outcome,
            Outcome::kImproved);
}

TEST(AdvicePolicyTest, NonFiniteDivergenceIsActedOnEvenEarly) {
  RunContext ctx;
  ctx.step = 3;
  ctx.lr = 3.0;
  ctx.max_lr_seen = 3.0;
  ctx.steps_seen = 4;
  ctx.schedule = ScheduleHint::kConstant;
  Diagnosis d = Diag(DiagnosisKind::kDivergence, 3);
  Advice blocked = Decide(d, ctx);
  EXPECT_EQ(blocked.blocked_by, GuardRail::kMinStepsSeen);
  d.nonfinite = true;
  Advice acted = Decide(d, ctx);
  EXPECT_EQ(acted.action, ActionKind::kScaleLr);
  EXPECT_DOUBLE_EQ(acted.lr_to, 0.3);
  // Blown up again right after that action: no cooldown either.
  ObserveAdvice(d, acted, &ctx);
  ctx.step = 5;
  ctx.lr = 0.3;
  ctx.steps_seen = 6;
  d.step = 5;
  Advice again = Decide(d, ctx);
  EXPECT_EQ(again.action, ActionKind::kScaleLr);
  EXPECT_NEAR(again.lr_to, 0.03, 1e-15);
  // A finite divergence still waits out the cooldown.
  d.nonfinite = false;
  ctx.steps_seen = 500;
  EXPECT_EQ(Decide(d, ctx).blocked_by, GuardRail::kCooldown);
}

TEST(AdvicePolicyTest, StuckAtInitialLossAfterABlowUpIsDamageNotStarvation) {
  PolicyOptions o;
  RunContext ctx;
  for (int64_t s = 0; s < 100; ++s) {
    // 2.30 at first, a blow-up to 34.5 at step 8, then stuck at ~2.30.
    const double loss = s == 8 ? 34.5 : 2.30;
    ObserveStep({.step = s, .lr = 1.5, .loss = loss}, o, &ctx);
  }
  EXPECT_DOUBLE_EQ(ctx.initial_loss, 2.30);
  EXPECT_DOUBLE_EQ(ctx.peak_loss, 34.5);
  Diagnosis d = Diag(DiagnosisKind::kStagnation, 99);
  d.loss_at_onset = 2.31;
  Advice a = Decide(d, ctx, o);
  EXPECT_EQ(a.action, ActionKind::kScaleLr);
  EXPECT_DOUBLE_EQ(a.lr_factor, 0.1);
  EXPECT_TRUE(a.restore_checkpoint);
  EXPECT_THAT(a.explanation, HasSubstr("damaged the model"));

  // Without the blow-up it is starvation: raise the LR.
  RunContext calm;
  for (int64_t s = 0; s < 100; ++s) {
    ObserveStep({.step = s, .lr = 1e-5, .loss = 2.30}, o, &calm);
  }
  Advice b = Decide(d, calm, o);
  EXPECT_EQ(b.action, ActionKind::kScaleLr);
  EXPECT_DOUBLE_EQ(b.lr_factor, 3.0);
  EXPECT_FALSE(b.restore_checkpoint);
  // After that cut, a later stagnation never raises the LR back above the
  // LR the cut set (the run blew up above it): flat at that LR, it is
  // lowered instead.
  ObserveAdvice(d, a, &ctx);
  EXPECT_DOUBLE_EQ(ctx.lr_ceiling, 0.15);
  ctx.step = 400;
  ctx.steps_seen = 401;
  ctx.lr = 0.15;
  ctx.schedule = ScheduleHint::kDecaying;
  Diagnosis later = Diag(DiagnosisKind::kStagnation, 400);
  later.loss_at_onset = 0.57;  // progress since: not "stuck at the start"
  later.lr_at_onset = 0.15;
  Advice c = Decide(later, ctx, o);
  EXPECT_EQ(c.action, ActionKind::kScaleLr);
  EXPECT_NEAR(c.lr_to, 0.015, 1e-12);
  EXPECT_FALSE(c.restore_checkpoint);
  EXPECT_THAT(c.explanation, HasSubstr("still too large to descend"));
}

// A cut for a blow-up that was not enough: the run is still stuck at its
// initial loss, or diverges again, at the LR the cut set. The second cut
// does not wait out the cooldown, only min_steps_seen steps.
TEST(AdvicePolicyTest, SecondCutAfterABlowUpDoesNotWaitForTheCooldown) {
  PolicyOptions o;
  RunContext ctx;
  for (int64_t s = 0; s < 82; ++s) {
    ObserveStep({.step = s, .lr = 15.0, .loss = s == 8 ? 34.5 : 2.30}, o,
                &ctx);
  }
  Diagnosis first = Diag(DiagnosisKind::kStagnation, 81);
  first.loss_at_onset = 2.30;
  Advice cut = Decide(first, ctx, o);
  ASSERT_EQ(cut.action, ActionKind::kScaleLr);
  ASSERT_TRUE(cut.restore_checkpoint);
  ObserveAdvice(first, cut, &ctx);
  ctx.actions_taken = 1;
  ctx.last_action_step = 81;
  for (int64_t s = 82; s < 108; ++s) {
    ObserveStep({.step = s, .lr = 1.5, .loss = 2.30}, o, &ctx);
  }
  ASSERT_DOUBLE_EQ(ctx.lr_ceiling, 1.5);

  Diagnosis again = Diag(DiagnosisKind::kStagnation, 107);
  again.loss_at_onset = 2.30;
  Advice second = Decide(again, ctx, o);
  EXPECT_EQ(second.action, ActionKind::kScaleLr);
  EXPECT_NEAR(second.lr_to, 0.15, 1e-12);
  EXPECT_TRUE(second.restore_checkpoint);
  // A finite divergence at the cut's LR too.
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kDivergence, 107), ctx, o).action,
            ActionKind::kScaleLr);

  // Not before min_steps_seen steps have shown the cut's effect...
  RunContext early = ctx;
  early.step = 95;
  again.step = 95;
  EXPECT_EQ(Decide(again, early, o).blocked_by, GuardRail::kCooldown);
  again.step = 107;
  // ...nor for a run that made progress (not damaged) or oscillates...
  Diagnosis progress = again;
  progress.loss_at_onset = 1.2;
  EXPECT_EQ(Decide(progress, ctx, o).blocked_by, GuardRail::kCooldown);
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kOscillation, 107), ctx, o).blocked_by,
            GuardRail::kCooldown);
  // ...nor once the LR has moved above the cut's level (a raise since).
  RunContext raised = ctx;
  raised.lr = 3.0;
  EXPECT_EQ(Decide(again, raised, o).blocked_by, GuardRail::kCooldown);
}

TEST(AdvicePolicyTest, StuckWithCollapsedGradientsIsDamage) {
  PolicyOptions o;
  RunContext ctx;
  for (int64_t s = 0; s < 100; ++s) {
    // No 4x blow-up, but the gradient norm fell 0.6 -> 0.13 (dead units).
    ObserveStep({.step = s, .lr = 0.5, .loss = s == 3 ? 7.3 : 2.30,
                 .grad_norm = s == 0 ? 0.6 : 0.13},
                o, &ctx);
  }
  Diagnosis d = Diag(DiagnosisKind::kStagnation, 99);
  d.loss_at_onset = 2.31;
  d.grad_norm_level = 0.135;
  Advice a = Decide(d, ctx, o);
  EXPECT_DOUBLE_EQ(a.lr_factor, 0.1);
  EXPECT_TRUE(a.restore_checkpoint);
  EXPECT_THAT(a.explanation, HasSubstr("gradient norm collapsed"));
  // A starved run keeps its gradient norm: raise.
  d.grad_norm_level = 0.69;
  RunContext starved;
  for (int64_t s = 0; s < 100; ++s) {
    ObserveStep({.step = s, .lr = 5e-5, .loss = 2.30, .grad_norm = 0.7}, o,
                &starved);
  }
  Advice raise = Decide(d, starved, o);
  EXPECT_EQ(raise.action, ActionKind::kRampLr);  // starved: an in-run range test
  EXPECT_THAT(raise.explanation, HasSubstr("starved"));
  o.starved_ramp = false;
  raise = Decide(d, starved, o);
  EXPECT_DOUBLE_EQ(raise.lr_factor, 10.0);  // or the bolder plain raise
}

// A plateau far from converged at a constant LR is an LR too small (x3)...
// unless the very first updates raised the loss: then the LR overshoots
// from the start (measured: Adam at 100x its LR, stuck at 85% of its
// initial loss with swings, raised x3 to 0.3 and lost what it had), and
// the remedy is the cut.
TEST(AdvicePolicyTest, StagnationAfterFirstUpdatesRaisedTheLossIsACut) {
  PolicyOptions o;
  auto run = [&](double rise) {
    RunContext ctx;
    const double first[] = {2.30, 2.30 * rise, 2.30 * rise * 1.05,
                            2.30 * rise * 0.97, 2.30 * rise};
    for (int64_t s = 0; s < 100; ++s) {
      const double loss = s < 5 ? first[s] : 1.95;
      ObserveStep({.step = s, .lr = 0.1, .loss = loss, .grad_norm = 1.0}, o, &ctx);
    }
    Diagnosis d = Diag(DiagnosisKind::kStagnation, 99);
    d.loss_at_onset = 1.95;
    return std::make_pair(ctx, Decide(d, ctx, o));
  };
  const auto [overshot_ctx, cut] = run(1.17);
  EXPECT_NEAR(overshot_ctx.early_rise, 1.17, 1e-9);
  ASSERT_EQ(cut.action, ActionKind::kScaleLr) << cut.explanation;
  EXPECT_DOUBLE_EQ(cut.lr_factor, o.divergence_lr_factor);
  EXPECT_THAT(cut.explanation, HasSubstr("the first updates raised the loss"));
  EXPECT_THAT(cut.explanation, HasSubstr("1.17x the first"));
  // With a rollback, and the cut LR a ceiling: a later plateau is not read
  // as an early decay to raise back.
  EXPECT_TRUE(cut.restore_checkpoint);
  RunContext after = overshot_ctx;
  ObserveAdvice(Diag(DiagnosisKind::kStagnation, 99), cut, &after);
  EXPECT_DOUBLE_EQ(after.lr_ceiling, 0.01);
  for (int64_t s = 100; s < 400; ++s) {
    ObserveStep({.step = s, .lr = 0.01, .loss = 1.95, .grad_norm = 1.0}, o, &after);
  }
  Diagnosis again = Diag(DiagnosisKind::kStagnation, 399);
  again.loss_at_onset = 1.95;
  again.lr_at_onset = 0.01;
  const Advice later = Decide(again, after, o);
  EXPECT_FALSE(later.action == ActionKind::kScaleLr && later.lr_factor > 1.0)
      << later.explanation;
  const auto [flat_ctx, raise] = run(0.99);
  ASSERT_EQ(raise.action, ActionKind::kScaleLr) << raise.explanation;
  EXPECT_DOUBLE_EQ(raise.lr_factor, o.stagnation_lr_factor);
}

// A plain LR raise (a stagnation at a constant LR, x3) is watched like a
// ramp: the blow-up it causes is answered at once, not after the cooldown,
// for half a cooldown, by going back to the LR before the raise (which
// becomes the ceiling), not x0.1 from the raised LR; a cut gets no such
// window, and a stagnation in the window still waits.
TEST(AdvicePolicyTest, BlowUpRightAfterARaiseIsNotHeldBack) {
  PolicyOptions o;
  RunContext ctx = Ctx();
  Advice raise = Decide(Diag(DiagnosisKind::kStagnation, 500), ctx, o);
  ASSERT_EQ(raise.action, ActionKind::kScaleLr) << raise.explanation;
  ASSERT_DOUBLE_EQ(raise.lr_factor, 3.0);
  EXPECT_TRUE(RaisesLr(raise, ctx));
  EXPECT_EQ(raise.ramp_until, 500 + o.cooldown_steps / 2);
  ObserveAdvice(Diag(DiagnosisKind::kStagnation, 500), raise, &ctx);
  EXPECT_EQ(ctx.ramp_until, 550);
  for (int64_t s = 501; s <= 530; ++s) {
    ObserveStep({.step = s, .lr = 0.3, .loss = 1.0}, o, &ctx);
  }
  EXPECT_DOUBLE_EQ(ctx.raise_from_lr, 0.1);
  Advice cut = Decide(Diag(DiagnosisKind::kDivergence, 530), ctx, o);
  EXPECT_EQ(cut.action, ActionKind::kSetLr) << cut.explanation;
  EXPECT_DOUBLE_EQ(cut.lr_from, 0.3);
  EXPECT_DOUBLE_EQ(cut.lr_to, 0.1);
  EXPECT_TRUE(cut.restore_checkpoint);
  EXPECT_THAT(cut.explanation,
              HasSubstr("30 steps after lossguard raised the LR from 0.1 to "
                        "0.3, so set the LR back from 0.3 to 0.1"));
  EXPECT_FALSE(RaisesLr(cut, ctx));
  EXPECT_EQ(cut.ramp_until, 0);
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kStagnation, 530), ctx, o).blocked_by,
            GuardRail::kCooldown);
  // Past the window, the cooldown holds.
  RunContext later = ctx;
  for (int64_t s = 531; s <= 560; ++s) {
    ObserveStep({.step = s, .lr = 0.3, .loss = 1.0}, o, &later);
  }
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kDivergence, 560), later, o).blocked_by,
            GuardRail::kCooldown);
  // Past the window, a divergence gets the plain x0.1 cut.
  RunContext after_window = later;
  after_window.last_action_step = 400;
  const Advice plain =
      Decide(Diag(DiagnosisKind::kDivergence, 560), after_window, o);
  EXPECT_EQ(plain.action, ActionKind::kScaleLr) << plain.explanation;
  EXPECT_DOUBLE_EQ(plain.lr_factor, 0.1);
  // The cut ends the window and the raise's memory; the LR before the
  // raise is the ceiling; an oscillation right after it waits.
  ObserveAdvice(Diag(DiagnosisKind::kDivergence, 530), cut, &ctx);
  EXPECT_EQ(ctx.ramp_until, 0);
  EXPECT_DOUBLE_EQ(ctx.raise_from_lr, 0.0);
  EXPECT_DOUBLE_EQ(ctx.lr_ceiling, 0.1);
  ObserveStep({.step = 531, .lr = 0.1, .loss = 1.0}, o, &ctx);
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kOscillation, 531), ctx, o).blocked_by,
            GuardRail::kCooldown);
}

// Going back to the LR before a raise is only for a blow-up the raise can
// have caused: not when the raise was not applied (the LR is still the one
// before it), not when something else took the LR above what the raise set,
// and never up to min_lr. The words count from the raise, not from a later
// clip.
TEST(AdvicePolicyTest, SetBackOnlyAfterTheRaiseThatWasApplied) {
  PolicyOptions o;
  RunContext ctx = Ctx();
  const Advice raise = Decide(Diag(DiagnosisKind::kStagnation, 500), ctx, o);
  ASSERT_EQ(raise.action, ActionKind::kScaleLr) << raise.explanation;
  ObserveAdvice(Diag(DiagnosisKind::kStagnation, 500), raise, &ctx);
  // A clip on the way does not end the raise's window.
  Advice clip;
  clip.diagnosis = DiagnosisKind::kGradientExplosion;
  clip.at_step = 510;
  clip.action = ActionKind::kEnableGradClip;
  clip.clip_max_norm = 2.0;
  ObserveAdvice(Diag(DiagnosisKind::kGradientExplosion, 510), clip, &ctx);
  auto at_lr = [&](double lr) {
    RunContext c = ctx;
    for (int64_t s = 501; s <= 520; ++s) {
      ObserveStep({.step = s, .lr = lr, .loss = 1.0}, o, &c);
    }
    return Decide(Diag(DiagnosisKind::kDivergence, 520), c, o);
  };
  const Advice back = at_lr(0.3);
  EXPECT_EQ(back.action, ActionKind::kSetLr) << back.explanation;
  EXPECT_DOUBLE_EQ(back.lr_to, 0.1);
  EXPECT_THAT(back.explanation, HasSubstr("20 steps after lossguard raised "
                                          "the LR from 0.1 to 0.3"));
  for (const double lr : {0.1, 0.9}) {
    SCOPED_TRACE(lr);
    const Advice plain = at_lr(lr);
    EXPECT_EQ(plain.action, ActionKind::kScaleLr) << plain.explanation;
    EXPECT_DOUBLE_EQ(plain.lr_factor, 0.1);
  }

  // Raised from below min_lr: "back" would be a raise to min_lr.
  RunContext low = Ctx();
  low.lr = 1e-8;
  low.max_lr_seen = 1e-8;
  const Advice tiny = Decide(Diag(DiagnosisKind::kStagnation, 500), low, o);
  ASSERT_TRUE(RaisesLr(tiny, low)) << tiny.explanation;
  ObserveAdvice(Diag(DiagnosisKind::kStagnation, 500), tiny, &low);
  ObserveStep({.step = 520, .lr = tiny.lr_to, .loss = 1.0}, o, &low);
  const Advice answer = Decide(Diag(DiagnosisKind::kDivergence, 520), low, o);
  EXPECT_FALSE(RaisesLr(answer, low)) << answer.explanation;
  EXPECT_NE(answer.action, ActionKind::kSetLr) << answer.explanation;
}

// A starved run gets a ramp up to starved_ramp_max_factor x its LR, never
// past max_lr or the LR a blow-up was cut from; its end (a divergence, an
// oscillation) is acted on at once, not after the cooldown.
// 80 steps at LR 5e-5 with the loss stuck at its initial 2.30 and the
// gradient norm intact, and the stagnation diagnosed at step 79: a starved
// run.
Diagnosis StarvedRun(const PolicyOptions& o, RunContext* ctx) {
  for (int64_t s = 0; s < 80; ++s) {
    ObserveStep({.step = s, .lr = 5e-5, .loss = 2.30, .grad_norm = 0.7}, o, ctx);
  }
  Diagnosis stag = Diag(DiagnosisKind::kStagnation, 79);
  stag.loss_at_onset = 2.30;
  stag.grad_norm_level = 0.7;
  return stag;
}

TEST(AdvicePolicyTest, StarvedRunGetsAnLrRampWhoseEndIsNotHeldBack) {
  PolicyOptions o;
  RunContext ctx;
  const Diagnosis stag = StarvedRun(o, &ctx);
  Advice ramp = Decide(stag, ctx, o);
  ASSERT_EQ(ramp.action, ActionKind::kRampLr) << ramp.explanation;
  EXPECT_DOUBLE_EQ(ramp.ramp_factor, 1.1);
  // 1.1^72 = 954 <= 1000 < 1.1^73.
  EXPECT_EQ(ramp.ramp_steps, 72);
  EXPECT_NEAR(ramp.lr_to, 5e-5 * std::pow(1.1, 72), 1e-12);
  EXPECT_EQ(ramp.ramp_until, 79 + 72 + 50);
  EXPECT_THAT(ramp.explanation, HasSubstr("ramp the LR x1.1 per step for 72 steps"));
  ObserveAdvice(stag, ramp, &ctx);
  EXPECT_EQ(ctx.ramp_until, 201);

  // The gradient norm explodes on the way: clipping, which does not end the
  // ramp (the guard keeps ramping)...
  for (int64_t s = 80; s <= 130; ++s) {
    ObserveStep({.step = s, .lr = 5e-5 * std::pow(1.1, s - 79), .loss = 2.0}, o, &ctx);
  }
  Diagnosis explosion = Diag(DiagnosisKind::kGradientExplosion, 130);
  explosion.grad_norm_level = 0.7;
  Advice clip = Decide(explosion, ctx, o);
  ASSERT_EQ(clip.action, ActionKind::kEnableGradClip) << clip.explanation;
  ObserveAdvice(explosion, clip, &ctx);
  EXPECT_EQ(ctx.ramp_until, 201);
  // ...and the loss blows up near the ramp's end, 60 steps after it was
  // advised: inside the cooldown (of both actions), acted on anyway.
  for (int64_t s = 131; s <= 140; ++s) {
    ObserveStep({.step = s, .lr = 5e-5 * std::pow(1.1, s - 79), .loss = 2.0}, o, &ctx);
  }
  Advice cut = Decide(Diag(DiagnosisKind::kDivergence, 140), ctx, o);
  EXPECT_EQ(cut.action, ActionKind::kScaleLr) << cut.explanation;
  EXPECT_DOUBLE_EQ(cut.lr_factor, 0.1);
  EXPECT_TRUE(cut.restore_checkpoint);
  ObserveAdvice(Diag(DiagnosisKind::kDivergence, 140), cut, &ctx);
  EXPECT_EQ(ctx.ramp_until, 0);  // another action ends the ramp
  // ...and the cooldown holds again after it.
  ObserveStep({.step = 141, .lr = 1e-4, .loss = 2.0}, o, &ctx);
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kOscillation, 141), ctx, o).blocked_by,
            GuardRail::kCooldown);
  // A stagnation during a ramp still waits for the cooldown.
  RunContext during = ctx;
  during.ramp_until = 300;
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kStagnation, 141), during, o).blocked_by,
            GuardRail::kCooldown);

  // Bounded by max_lr (and by the LR a blow-up was cut to).
  RunContext high;
  for (int64_t s = 0; s < 80; ++s) {
    ObserveStep({.step = s, .lr = 0.1, .loss = 2.30, .grad_norm = 0.7}, o, &high);
  }
  Advice bounded = Decide(stag, high, o);
  ASSERT_EQ(bounded.action, ActionKind::kRampLr);
  EXPECT_LE(bounded.lr_to, o.max_lr);
  EXPECT_EQ(bounded.ramp_steps, 48);  // 1.1^48 = 97.0 <= 100 < 1.1^49
}

// A run at LR 15 that blew up at step 8 (2.30 -> 34.5) and is stuck at
// its initial loss: at step 81 the policy cuts it to 1.5 and restores a
// checkpoint (the context then holds the cut and its LR ceiling).
void BlowUpAndCut(const PolicyOptions& o, RunContext* ctx) {
  for (int64_t s = 0; s < 82; ++s) {
    ObserveStep({.step = s, .lr = 15.0, .loss = s == 8 ? 34.5 : 2.30}, o, ctx);
  }
  Diagnosis first = Diag(DiagnosisKind::kStagnation, 81);
  first.loss_at_onset = 2.30;
  Advice cut = Decide(first, *ctx, o);
  ASSERT_TRUE(cut.restore_checkpoint);
  ObserveAdvice(first, cut, ctx);
}

TEST(AdvicePolicyTest, StuckTooSoonAfterACutComesBackWhenTheCutHadItsSteps) {
  // A blow-up cut at step 81; the run is stuck at its initial loss again at
  // 94, before min_steps_seen (20) steps showed the cut's effect: blocked,
  // deferred, and decided again at 101, not after the 100-step cooldown.
  PolicyOptions o;
  RunContext ctx;
  ASSERT_NO_FATAL_FAILURE(BlowUpAndCut(o, &ctx));
  for (int64_t s = 82; s <= 94; ++s) {
    ObserveStep({.step = s, .lr = 1.5, .loss = 2.30}, o, &ctx);
  }
  Diagnosis early = Diag(DiagnosisKind::kStagnation, 94);
  early.loss_at_onset = 2.30;
  Advice blocked = Decide(early, ctx, o);
  ASSERT_EQ(blocked.blocked_by, GuardRail::kCooldown);
  ObserveAdvice(early, blocked, &ctx);
  for (int64_t s = 95; s <= 100; ++s) {
    ObserveStep({.step = s, .lr = 1.5, .loss = 2.30}, o, &ctx);
    EXPECT_FALSE(DeferredDue(ctx, o)) << s;
  }
  ObserveStep({.step = 101, .lr = 1.5, .loss = 2.30}, o, &ctx);
  ASSERT_TRUE(DeferredDue(ctx, o));
  std::vector<Diagnosis> due = TakeDeferred({early}, o, &ctx);
  ASSERT_EQ(due.size(), 1u);
  EXPECT_EQ(due[0].step, 101);
  EXPECT_THAT(due[0].evidence, HasSubstr("given its steps to show"));
  Advice second = Decide(due[0], ctx, o);
  EXPECT_EQ(second.action, ActionKind::kScaleLr);
  EXPECT_NEAR(second.lr_to, 0.15, 1e-12);
  EXPECT_FALSE(DeferredDue(ctx, o));

  // A deferred stagnation that is no longer damage (the run made progress)
  // or a deferred oscillation waits for the whole cooldown, as before.
  RunContext other = ctx;
  other.deferred_kinds =
      (1u << static_cast<unsigned>(DiagnosisKind::kStagnation)) |
      (1u << static_cast<unsigned>(DiagnosisKind::kOscillation));
  Diagnosis progress = early;
  progress.loss_at_onset = 1.2;
  EXPECT_TRUE(TakeDeferred({progress, Diag(DiagnosisKind::kOscillation, 94)},
                           o, &other)
                  .empty());
  EXPECT_NE(other.deferred_kinds, 0u);  // kept for the cooldown's end
}

TEST(AdvicePolicyTest, PlateauAtTheLrCutToAfterABlowUpCutsAgain) {
  // Blown up, cut to 1.5 at step 81; the loss then fell to a plateau far
  // from converged. A raise would head back to the LR that blew it up:
  // the policy lowers the LR instead, as ReduceLROnPlateau would.
  PolicyOptions o;
  RunContext ctx;
  ASSERT_NO_FATAL_FAILURE(BlowUpAndCut(o, &ctx));
  for (int64_t s = 82; s <= 200; ++s) {
    ObserveStep({.step = s, .lr = 1.5, .loss = 1.2}, o, &ctx);
  }
  Diagnosis plateau = Diag(DiagnosisKind::kStagnation, 200);
  plateau.loss_at_onset = 1.2;
  Advice a = Decide(plateau, ctx, o);
  EXPECT_EQ(a.action, ActionKind::kScaleLr);
  EXPECT_NEAR(a.lr_to, 0.15, 1e-12);
  EXPECT_FALSE(a.restore_checkpoint);  // nothing was damaged
  EXPECT_THAT(a.explanation, HasSubstr("still too large to descend"));
  // Below the ceiling (the LR was lowered since) a plateau is raised as
  // usual, up to the ceiling.
  RunContext lower = ctx;
  lower.lr = 0.5;
  Advice raise = Decide(plateau, lower, o);
  EXPECT_GT(raise.lr_to, 0.5);
  EXPECT_LE(raise.lr_to, 1.5);
}

TEST(AdvicePolicyTest, CooldownDefersAnActionItDoesNotCancelIt) {
  PolicyOptions o;
  RunContext ctx;
  for (int64_t s = 0; s <= 100; ++s) {
    ObserveStep({.step = s, .lr = 0.5, .loss = 1.0}, o, &ctx);
  }
  // (A cut: a raise's own outcome would not wait, see
  // BlowUpRightAfterARaiseIsNotHeldBack.)
  Diagnosis over = Diag(DiagnosisKind::kOverfitting, 100);
  Advice first = Decide(over, ctx, o);
  ASSERT_EQ(first.action, ActionKind::kScaleLr);
  ASSERT_LT(first.lr_factor, 1.0);
  ObserveAdvice(over, first, &ctx);
  // An oscillation 20 steps later is blocked by the cooldown...
  for (int64_t s = 101; s <= 120; ++s) {
    ObserveStep({.step = s, .lr = 0.25, .loss = 1.0}, o, &ctx);
  }
  Diagnosis osc = Diag(DiagnosisKind::kOscillation, 120);
  Advice blocked = Decide(osc, ctx, o);
  EXPECT_EQ(blocked.blocked_by, GuardRail::kCooldown);
  ObserveAdvice(osc, blocked, &ctx);
  EXPECT_FALSE(DeferredDue(ctx, o));
  // ...and comes back once the cooldown is over, if it still holds.
  for (int64_t s = 121; s <= 200; ++s) {
    ObserveStep({.step = s, .lr = 0.25, .loss = 1.0}, o, &ctx);
  }
  EXPECT_TRUE(DeferredDue(ctx, o));
  std::vector<Diagnosis> due = TakeDeferred({osc}, o, &ctx);
  ASSERT_EQ(due.size(), 1u);
  EXPECT_EQ(due[0].step, 200);
  EXPECT_THAT(due[0].evidence, HasSubstr("after the cooldown"));
  EXPECT_EQ(Decide(due[0], ctx, o).action, ActionKind::kScaleLr);
  EXPECT_FALSE(DeferredDue(ctx, o));  // taken once
  // A deferred kind that no longer holds is dropped.
  ctx.deferred_kinds = 1u << static_cast<unsigned>(DiagnosisKind::kOscillation);
  EXPECT_TRUE(TakeDeferred({}, o, &ctx).empty());
  EXPECT_EQ(ctx.deferred_kinds, 0u);
}

// With a constant LR and a known planned length, a cut by a factor decays
// to the planned end: a cosine from the cut LR over the steps left.
TEST(AdvicePolicyTest, CutInAPlannedConstantRunDecaysToTheEnd) {
  RunContext ctx = Ctx();  // step 500, LR 0.1, constant
  ctx.planned_steps = 2000;
  Advice a = Decide(Diag(DiagnosisKind::kDivergence), ctx);
  EXPECT_EQ(a.action, ActionKind::kRestartCosine);
  EXPECT_TRUE(a.anneal);
  EXPECT_DOUBLE_EQ(a.lr_from, 0.1);
  EXPECT_DOUBLE_EQ(a.lr_to, 0.01);
  EXPECT_DOUBLE_EQ(a.eta_max, 0.01);
  EXPECT_DOUBLE_EQ(a.eta_min, 0.0001);  // restart_eta_min_fraction
  EXPECT_EQ(a.t_0, 1499);               // steps 501..1999
  EXPECT_TRUE(a.restore_checkpoint);    // the divergence remedy's rollback
  EXPECT_FALSE(RaisesLr(a, ctx));
  EXPECT_THAT(a.explanation,
              HasSubstr("lower the LR from 0.1 to 0.01 and decay it along a "
                        "cosine to 0.0001 over the 1499 steps left"));
  // The cut LR is the ceiling after the blow-up, as with a plain cut.
  ObserveAdvice(Diag(DiagnosisKind::kDivergence), a, &ctx);
  EXPECT_DOUBLE_EQ(ctx.lr_ceiling, 0.01);

  // Oscillation's x0.5 and overfitting's first cut decay the same way.
  ctx = Ctx();
  ctx.planned_steps = 2000;
  Advice osc = Decide(Diag(DiagnosisKind::kOscillation), ctx);
  EXPECT_EQ(osc.action, ActionKind::kRestartCosine);
  EXPECT_DOUBLE_EQ(osc.eta_max, 0.05);
  EXPECT_FALSE(osc.restore_checkpoint);
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kOverfitting), ctx).action,
            ActionKind::kRestartCosine);
  // A raise is never a decay.
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kStagnation), ctx).action,
            ActionKind::kScaleLr);
}

TEST(AdvicePolicyTest, CutStaysPlainWithoutAPlanOrWithAScheduleOrNearTheEnd) {
  PolicyOptions o;
  RunContext ctx = Ctx();
  // Length unknown.
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kDivergence), ctx, o).action,
            ActionKind::kScaleLr);
  // Fewer than restart_min_t0 (100) steps left after the cut.
  ctx.planned_steps = 600;
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kDivergence), ctx, o).action,
            ActionKind::kScaleLr);
  ctx.planned_steps = 601;
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kDivergence), ctx, o).action,
            ActionKind::kRestartCosine);
  // The LR is already decaying (a schedule of the run's own, or a decay
  // lossguard started): the cut scales it, the decay goes on.
  ctx.lr = 0.05;
  ctx.schedule = ScheduleHint::kDecaying;
  Advice a = Decide(Diag(DiagnosisKind::kDivergence), ctx, o);
  EXPECT_EQ(a.action, ActionKind::kScaleLr);
  EXPECT_DOUBLE_EQ(a.lr_to, 0.005);
  // Turned off.
  ctx = Ctx();
  ctx.planned_steps = 2000;
  o.anneal_after_cut = false;
  EXPECT_EQ(Decide(Diag(DiagnosisKind::kDivergence), ctx, o).action,
            ActionKind::kScaleLr);
}

TEST(AdvicePolicyTest, SetBackAfterARaiseIsNotADecay) {
  // The LR before a raise lossguard advised was diagnosed as too small:
  // going back to it is not a cut by a factor, and is not decayed.
  RunContext ctx = Ctx();
  ctx.planned_steps = 5000;
  ctx.lr = 0.3;
  ctx.max_lr_seen = 0.3;
  ctx.raise_from_lr = 0.1;
  ctx.raise_to_lr = 0.3;
  ctx.raise_step = 480;
  ctx.ramp_until = 600;
  Advice a = Decide(Diag(DiagnosisKind::kDivergence), ctx);
  EXPECT_EQ(a.action, ActionKind::kSetLr);
  EXPECT_EQ(a.lr_bound, "LR before the raise");
  EXPECT_FALSE(a.anneal);
}

TEST(AdvicePolicyTest, StarvedRampInAPlannedConstantRunDecaysAfterItsTop) {
  PolicyOptions o;
  RunContext ctx;
  ctx.planned_steps = 400;
  const Diagnosis stag = StarvedRun(o, &ctx);
  Advice ramp = Decide(stag, ctx, o);
  ASSERT_EQ(ramp.action, ActionKind::kRampLr) << ramp.explanation;
  EXPECT_EQ(ramp.ramp_steps, 72);
  EXPECT_TRUE(ramp.anneal);
  EXPECT_EQ(ramp.t_0, 400 - 80 - 72);  // steps 152..399
  EXPECT_NEAR(ramp.eta_min, 0.01 * ramp.lr_to, 1e-15);
  EXPECT_THAT(ramp.explanation, HasSubstr("then decay it along a cosine to"));
  // Too little of the run left after the ramp for a decay: the plain ramp.
  ctx.planned_steps = 80 + 72 + 99;
  Advice plain = Decide(stag, ctx, o);
  ASSERT_EQ(plain.action, ActionKind::kRampLr);
  EXPECT_FALSE(plain.anneal);
}

}  // namespace
}  // namespace lossguard::policy
