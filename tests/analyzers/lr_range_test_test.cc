#include "lossguard/analyzers/lr_range_test.h"

#include <gtest/gtest.h>

#include <vector>

namespace lossguard::analyzers {
namespace {

TEST(LrRangeTest, RejectsMismatchedLengths) {
  std::vector<double> lrs = {1e-7, 1e-6};
  std::vector<double> losses = {2.3};
  EXPECT_EQ(SuggestLearningRate(lrs, losses).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lossguard::analyzers
