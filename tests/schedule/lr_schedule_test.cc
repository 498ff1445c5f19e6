#include "lossguard/schedule/lr_schedule.h"

#include <cmath>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lossguard::schedule {
namespace {

TEST(LrScheduleTest, ValidationNamesTheField) {
  ScheduleConfig c;
  c.kind = ScheduleKind::kCosine;
  c.t_max = 0;
  EXPECT_THAT(std::string(ValidateSchedule(c).message()),
              ::testing::HasSubstr("t_max"));
  c = ScheduleConfig();
  c.base_lr = -1;
  EXPECT_FALSE(ValidateSchedule(c).ok());
  c = ScheduleConfig();
  c.kind = ScheduleKind::kOneCycle;
  c.warmup_steps = 10;
  EXPECT_THAT(std::string(ValidateSchedule(c).message()),
              ::testing::HasSubstr("warms up by itself"));
  EXPECT_TRUE(ValidateSchedule(ScheduleConfig()).ok());
}

TEST(LrScheduleTest, NamesRoundTrip) {
  for (ScheduleKind k :
       {ScheduleKind::kConstant, ScheduleKind::kStep, ScheduleKind::kCosine,
        ScheduleKind::kCosineWarmRestarts, ScheduleKind::kOneCycle,
        ScheduleKind::kPlateau}) {
    EXPECT_EQ(ScheduleKindFromName(ScheduleKindName(k)), k);
  }
  EXPECT_FALSE(ScheduleKindFromName("linear").has_value());
}

TEST(LrScheduleTest, CosineEndpoints) {
  ScheduleConfig c;
  c.kind = ScheduleKind::kCosine;
  c.base_lr = 0.1;
  c.t_max = 100;
  c.eta_min = 0.001;
  LrSchedule s(c);
  EXPECT_DOUBLE_EQ(s.LrAt(0), 0.1);
  EXPECT_NEAR(s.LrAt(50), 0.0505, 1e-12);
  EXPECT_NEAR(s.LrAt(100), 0.001, 1e-12);
}

TEST(LrScheduleTest, ScaleComposesWithTheSchedule) {
  ScheduleConfig c;
  c.kind = ScheduleKind::kStep;
  c.base_lr = 1.0;
  c.step_size = 10;
  c.gamma = 0.5;
  LrSchedule s(c);
  s.Scale(0.1);
  EXPECT_DOUBLE_EQ(s.LrAt(0), 0.1);
  EXPECT_DOUBLE_EQ(s.LrAt(10), 0.05);  // the decay goes on, corrected
  s.Scale(0.5);
  EXPECT_DOUBLE_EQ(s.LrAt(25), 1.0 * 0.25 * 0.05);
  EXPECT_DOUBLE_EQ(s.correction(), 0.05);
}

TEST(LrScheduleTest, RestartCosineReplacesTheScheduleFromItsStep) {
  ScheduleConfig c;
  c.kind = ScheduleKind::kCosine;
  c.base_lr = 0.1;
  c.t_max = 100;
  LrSchedule s(c);
  s.Scale(0.5);
  const double before = s.LrAt(79);
  s.RestartCosine(80, 20, 0.08, 0.001);
  EXPECT_DOUBLE_EQ(s.LrAt(79), before / 0.5 * 1.0);  // correction reset
  EXPECT_DOUBLE_EQ(s.LrAt(80), 0.08);
  EXPECT_NEAR(s.LrAt(90), (0.08 + 0.001) / 2, 1e-12);
  EXPECT_DOUBLE_EQ(s.LrAt(100), 0.08);  // warm restart every t_0 steps
}

TEST(LrScheduleTest, PlateauReducesAfterPatienceAndRespectsMinLr) {
  ScheduleConfig c;
  c.kind = ScheduleKind::kPlateau;
  c.base_lr = 0.1;
  c.plateau_patience = 1;
  c.plateau_factor = 0.1;
  c.plateau_min_lr = 0.005;
  LrSchedule s(c);
  EXPECT_FALSE(s.ObserveMetric(1.0));
  EXPECT_FALSE(s.ObserveMetric(1.0));  // 1 bad epoch: within patience
  EXPECT_TRUE(s.ObserveMetric(1.0));   // 2 > patience: x0.1
  EXPECT_NEAR(s.LrAt(0), 0.01, 1e-15);
  EXPECT_FALSE(s.ObserveMetric(std::nan("")));
  EXPECT_TRUE(s.ObserveMetric(std::nan("")));  // NaN is never better
  EXPECT_DOUBLE_EQ(s.LrAt(0), 0.005);          // clamped at min_lr
  EXPECT_FALSE(s.ObserveMetric(1.0));
  EXPECT_FALSE(s.ObserveMetric(1.0));  // at min_lr: nothing to reduce
  EXPECT_DOUBLE_EQ(s.LrAt(0), 0.005);
}

TEST(LrScheduleTest, OneCycleHoldsItsLastValuePastTheEnd) {
  ScheduleConfig c;
  c.kind = ScheduleKind::kOneCycle;
  c.max_lr = 1.0;
  c.total_steps = 100;
  LrSchedule s(c);
  EXPECT_NEAR(s.LrAt(0), 1.0 / 25, 1e-15);
  EXPECT_NEAR(s.LrAt(29), 1.0, 1e-15);
  EXPECT_NEAR(s.LrAt(99), 1.0 / 25 / 1e4, 1e-15);
  EXPECT_DOUBLE_EQ(s.LrAt(500), s.LrAt(99));
}

}  // namespace
}  // namespace lossguard::schedule
