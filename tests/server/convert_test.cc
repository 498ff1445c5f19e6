#include "lossguard/wire/convert.h"

#include <gtest/gtest.h>

namespace lossguard::wire {
namespace {

using analyzers::Diagnosis;
using analyzers::DiagnosisKind;
using policy::ActionKind;
using policy::Advice;
using policy::PolicyOptions;

Advice RoundTrip(const Advice& a, double lr_when_sent,
                 const PolicyOptions& options) {
  Diagnosis d;
  d.kind = a.diagnosis;
  d.step = a.at_step;
  return FromProto(ToProto(a, d, 7), lr_when_sent, options);
}

// What the policy remembers of its advice (policy::ObserveAdvice) comes back
// from the stored wire advice: the action, the LR it set, the rollback, and
// the watch window of a raise.
TEST(ConvertTest, AdviceReadBackKeepsWhatThePolicyRemembers) {
  const PolicyOptions options;
  {
    Advice cut;
    cut.diagnosis = DiagnosisKind::kDivergence;
    cut.at_step = 40;
    cut.action = ActionKind::kScaleLr;
    cut.lr_factor = 0.1;
    cut.lr_from = 0.5;
    cut.lr_to = 0.05;
    cut.restore_checkpoint = true;
    cut.clip_max_norm = 2.5;
    const Advice back = RoundTrip(cut, 0.5, options);
    EXPECT_EQ(back.diagnosis, DiagnosisKind::kDivergence);
    EXPECT_EQ(back.at_step, 40);
    EXPECT_EQ(back.action, ActionKind::kScaleLr);
    EXPECT_DOUBLE_EQ(back.lr_from, 0.5);
    EXPECT_DOUBLE_EQ(back.lr_to, 0.05);
    EXPECT_TRUE(back.restore_checkpoint);
    EXPECT_DOUBLE_EQ(back.clip_max_norm, 2.5);
    EXPECT_EQ(back.ramp_until, 0);  // a cut is not watched
  }
  {
    Advice raise;
    raise.diagnosis = DiagnosisKind::kStagnation;
    raise.at_step = 300;
    raise.action = ActionKind::kSetLr;
    raise.lr_from = 0.01;
    raise.lr_to = 0.02;
    const Advice back = RoundTrip(raise, 0.01, options);
    EXPECT_EQ(back.action, ActionKind::kSetLr);
    EXPECT_DOUBLE_EQ(back.lr_from, 0.01);
    EXPECT_DOUBLE_EQ(back.lr_to, 0.02);
    EXPECT_EQ(back.ramp_until, policy::RampUntil(300, 0, options));
    // The same set_lr sent at a larger LR lowered it: no watch window.
    EXPECT_EQ(RoundTrip(raise, 0.04, options).ramp_until, 0);
  }
  {
    Advice ramp;
    ramp.diagnosis = DiagnosisKind::kStagnation;
    ramp.at_step = 60;
    ramp.action = ActionKind::kRampLr;
    ramp.ramp_factor = 1.1;
    ramp.ramp_steps = 72;
    const Advice back = RoundTrip(ramp, 1e-4, options);
    EXPECT_EQ(back.action, ActionKind::kRampLr);
    EXPECT_DOUBLE_EQ(back.ramp_factor, 1.1);
    EXPECT_EQ(back.ramp_steps, 72);
    EXPECT_EQ(back.ramp_until, policy::RampUntil(60, 72, options));
    EXPECT_FALSE(back.anneal);
    // With a decay to the planned end after its top.
    ramp.anneal = true;
    ramp.t_0 = 268;
    ramp.eta_min = 1e-3;
    const Advice decay = RoundTrip(ramp, 1e-4, options);
    EXPECT_TRUE(decay.anneal);
    EXPECT_EQ(decay.t_0, 268);
    EXPECT_DOUBLE_EQ(decay.eta_min, 1e-3);
    EXPECT_EQ(decay.ramp_until, policy::RampUntil(60, 72, options));
  }
  {
    Advice restart;
    restart.diagnosis = DiagnosisKind::kStagnation;
    restart.at_step = 900;
    restart.action = ActionKind::kRestartCosine;
    restart.t_0 = 500;
    restart.eta_max = 0.1;
    restart.eta_min = 0.001;
    const Advice back = RoundTrip(restart, 0.01, options);
    EXPECT_EQ(back.action, ActionKind::kRestartCosine);
    EXPECT_DOUBLE_EQ(back.lr_from, 0.01);
    EXPECT_EQ(back.t_0, 500);
    EXPECT_DOUBLE_EQ(back.eta_max, 0.1);
    EXPECT_DOUBLE_EQ(back.eta_min, 0.001);
    EXPECT_EQ(back.ramp_until, policy::RampUntil(900, 0, options));
    EXPECT_FALSE(back.anneal);
  }
  {
    // A cut's decay to the planned end (a restart below the LR it was sent
    // at, with a rollback) comes back as the cut it is: no raise, and the
    // cut LR as lr_to, the ceiling ObserveAdvice sets again.
    Advice decay;
    decay.diagnosis = DiagnosisKind::kDivergence;
    decay.at_step = 15;
    decay.action = ActionKind::kRestartCosine;
    decay.anneal = true;
    decay.t_0 = 384;
    decay.eta_max = 0.15;
    decay.eta_min = 0.0015;
    decay.restore_checkpoint = true;
    const Advice back = RoundTrip(decay, 1.5, options);
    EXPECT_EQ(back.action, ActionKind::kRestartCosine);
    EXPECT_TRUE(back.anneal);
    EXPECT_TRUE(back.restore_checkpoint);
    EXPECT_DOUBLE_EQ(back.lr_to, 0.15);
    EXPECT_EQ(back.ramp_until, 0);
    policy::RunContext ctx;
    policy::ObserveAdvice(analyzers::Diagnosis{.kind = DiagnosisKind::kDivergence},
                          back, &ctx);
    EXPECT_DOUBLE_EQ(ctx.lr_ceiling, 0.15);
  }
  {
    // Stored before AdviceRecord.lr_when_sent existed (0): a x3 scale is
    // still known as a raise, with no LR to go back to and no ceiling.
    Advice raise;
    raise.diagnosis = DiagnosisKind::kStagnation;
    raise.at_step = 300;
    raise.action = ActionKind::kScaleLr;
    raise.lr_factor = 3.0;
    const Advice back = RoundTrip(raise, 0.0, options);
    EXPECT_EQ(back.ramp_until, policy::RampUntil(300, 0, options));
    EXPECT_DOUBLE_EQ(back.lr_from, 0.0);
    EXPECT_DOUBLE_EQ(back.lr_to, 0.0);
  }
  {
    // A guard rail's advice carries no action, and its deferral is not
    // brought back.
    Advice blocked;
    blocked.diagnosis = DiagnosisKind::kOscillation;
    blocked.at_step = 120;
    blocked.blocked_by = policy::GuardRail::kCooldown;
    blocked.reason = "the last action was 20 steps ago";
    const Advice back = RoundTrip(blocked, 0.1, options);
    EXPECT_EQ(back.diagnosis, DiagnosisKind::kOscillation);
    EXPECT_EQ(back.action, ActionKind::kNone);
    EXPECT_EQ(back.blocked_by, policy::GuardRail::kNone);
  }
}

}  // namespace
}  // namespace lossguard::wire
