#include "lossguard/runs/curve_sampler.h"

#include <cmath>
#include <limits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lossguard::runs {
namespace {

storage::StepRow Row(int64_t step, double loss) {
  storage::StepRow r;
  r.step = step;
  r.loss = loss;
  return r;
}

TEST(CurveSamplerTest, FewPointsAreKeptAsTheyAre) {
  CurveSampler s(0, 9, 30);
  for (int i = 0; i < 10; ++i) s.Add(Row(i, 1.0 / (i + 1)));
  std::vector<storage::StepRow> out = s.Finish();
  ASSERT_EQ(out.size(), 10u);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(out[i].step, i);
  EXPECT_EQ(s.points_seen(), 10);
}

TEST(CurveSamplerTest, KeepsSpikesDipsAndNonFiniteWithinBudget) {
  const int n = 100000;
  CurveSampler s(0, n - 1, 300);
  for (int i = 0; i < n; ++i) {
    double loss = 1.0;
    if (i == 12345) loss = 50.0;  // a one-step spike
    if (i == 54321) loss = 0.01;  // a one-step dip
    if (i == 99000) loss = std::numeric_limits<double>::quiet_NaN();
    storage::StepRow r = Row(i, loss);
    if (i % 1000 == 999) r.val_loss = 2.0;
    s.Add(r);
  }
  std::vector<storage::StepRow> out = s.Finish();
  EXPECT_LE(out.size(), 300u);
  EXPECT_GE(out.size(), 150u);
  EXPECT_EQ(s.points_seen(), n);
  bool spike = false, dip = false, nan = false;
  int vals = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (i > 0) {
      EXPECT_LT(out[i - 1].step, out[i].step);
    }
    spike |= out[i].step == 12345 && out[i].loss == 50.0;
    dip |= out[i].step == 54321 && out[i].loss == 0.01;
    nan |= out[i].step == 99000 && std::isnan(out[i].loss);
    vals += out[i].val_loss.has_value();
  }
  EXPECT_TRUE(spike);
  EXPECT_TRUE(dip);
  EXPECT_TRUE(nan);
  // One validation point per 1000 steps, buckets of ~1000 steps: most kept.
  EXPECT_GE(vals, 50);
}

TEST(CurveSamplerTest, HugeStepRangeDoesNotOverflow) {
  const int64_t lo = std::numeric_limits<int64_t>::min();
  const int64_t hi = std::numeric_limits<int64_t>::max();
  CurveSampler s(lo, hi, 4);
  s.Add(Row(lo, 1.0));
  s.Add(Row(0, 5.0));
  s.Add(Row(1, 0.5));
  s.Add(Row(2, 0.7));
  s.Add(Row(hi, 2.0));
  std::vector<storage::StepRow> out = s.Finish();
  ASSERT_LE(out.size(), 4u);
  // One bucket holds everything: its lowest and highest losses are kept.
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].loss, 5.0);
  EXPECT_EQ(out[1].loss, 0.5);
  EXPECT_EQ(s.points_seen(), 5);
}

TEST(CurveSamplerTest, IgnoresPointsOutsideTheRange) {
  CurveSampler s(10, 20, 30);
  for (int i = 0; i < 30; ++i) s.Add(Row(i, 1.0));
  EXPECT_EQ(s.Finish().size(), 11u);
}

}  // namespace
}  // namespace lossguard::runs
