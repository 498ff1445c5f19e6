#include "lossguard/policy/advice_policy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

namespace lossguard::policy {
namespace {

using analyzers::Diagnosis;
using analyzers::DiagnosisKind;
using ::testing::DoubleEq;
using ::testing::HasSubstr;

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
  EXPECT_THAT(a.reason, HasSubstr("the LR is nan"));
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

}  // namespace
}  // namespace lossguard::policy
