// policy::Advisor: the analyzer and the policy fed together, and the LR
// ramp a starved run gets, ended by the range test over its own points.

#include "lossguard/policy/advisor.h"

#include <cmath>
#include <optional>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lossguard::policy {
namespace {

using analyzers::Diagnosis;
using analyzers::DiagnosisKind;
using analyzers::StepRecord;
using ::testing::HasSubstr;

// The loss of a model trained at `lr`: flat far below the right LR, a
// sigmoidal fall in log10(lr) centred on `centre`, with a little noise.
double RampLoss(double lr, double centre, int i) {
  const double x = std::log10(lr) - std::log10(centre);
  return 0.3 + 2.0 / (1.0 + std::exp(4.0 * x)) + 0.01 * std::sin(i * 1.7);
}

// A run stuck at its initial loss gets a ramp; the ramp runs its course
// (the loss falls on the way, never blows up) and the range test over its
// points lands the LR in its steepest descent, below the top of the ramp,
// at once (no cooldown).
TEST(AdvisorTest, RampEndsWithTheRangeTestsLr) {
  PolicyOptions options;
  options.ramp_range_test = true;
  Advisor advisor{analyzers::AnalyzerOptions(), options};
  std::vector<Diagnosis> decided;
  double lr = 1e-5;
  int64_t step = 0;
  std::optional<Advice> ramp;
  for (; step < 200 && !ramp; ++step) {
    decided.clear();
    ASSERT_TRUE(advisor.Feed({.step = step, .lr = lr, .loss = 2.3 + 0.01 * std::sin(step * 1.7),
                              .grad_norm = 0.7},
                             &decided)
                    .ok());
    for (const Diagnosis& d : decided) {
      Advice a = advisor.Decide(d);
      advisor.Record(d, a);
      if (a.action == ActionKind::kRampLr) ramp = a;
    }
  }
  ASSERT_TRUE(ramp.has_value());
  // The trainer ramps: x1.1 per step, then holds the top LR.
  std::optional<Advice> landing;
  std::optional<Diagnosis> why;
  for (int64_t i = 1; step < 400 && !landing; ++step, ++i) {
    if (i <= ramp->ramp_steps) lr *= ramp->ramp_factor;
    decided.clear();
    ASSERT_TRUE(advisor.Feed({.step = step, .lr = lr, .loss = RampLoss(lr, 3e-3, i),
                              .grad_norm = 0.7},
                             &decided)
                    .ok());
    for (const Diagnosis& d : decided) {
      Advice a = advisor.Decide(d);
      advisor.Record(d, a);
      if (a.action == ActionKind::kSetLr) {
        landing = a;
        why = d;
      }
    }
  }
  ASSERT_TRUE(landing.has_value());
  EXPECT_EQ(why->kind, DiagnosisKind::kStagnation);
  EXPECT_THAT(why->evidence, HasSubstr("LR range test over the ramp"));
  EXPECT_LT(landing->lr_to, landing->lr_from / 1.5);  // below the top
  // Within half a decade of the descent's centre.
  EXPECT_LT(std::fabs(std::log10(landing->lr_to / 3e-3)), 0.5) << landing->lr_to;
  EXPECT_FALSE(landing->restore_checkpoint);
  EXPECT_THAT(landing->explanation, HasSubstr("the LR ramp is over"));
  EXPECT_EQ(advisor.context().ramp_suggested_lr, 0.0);  // used up
}

}  // namespace
}  // namespace lossguard::policy
