#include "lossguard/analyzers/curve_analyzer.h"

#include <gtest/gtest.h>

namespace lossguard::analyzers {
namespace {

TEST(CurveAnalyzerTest, RejectsNonIncreasingSteps) {
  CurveAnalyzer a;
  ASSERT_TRUE(a.Feed({.step = 5, .lr = 0.1, .loss = 1.0}, nullptr).ok());
  EXPECT_EQ(a.Feed({.step = 5, .lr = 0.1, .loss = 1.0}, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a.steps_seen(), 1);
}

}  // namespace
}  // namespace lossguard::analyzers
