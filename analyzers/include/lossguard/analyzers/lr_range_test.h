#ifndef LOSSGUARD_ANALYZERS_LR_RANGE_TEST_H_
#define LOSSGUARD_ANALYZERS_LR_RANGE_TEST_H_

#include <span>
#include <string>

#include "absl/status/statusor.h"

namespace lossguard::analyzers {

// Options of the LR range test analysis (Smith 2015/2017, "LR finder").
struct LrRangeTestOptions {
  // Filled in by the implementation (see lr_range_test.cc); every field gets
  // a comment and a default.
};

// The suggestion drawn from one range-test curve.
struct LrSuggestion {
  double suggested_lr = 0.0;  // the initial LR to train with
  double steep_lo_lr = 0.0;   // steepest-descent region, lower LR
  double steep_hi_lr = 0.0;   // steepest-descent region, upper LR
  double min_loss_lr = 0.0;   // LR at the smoothed-loss minimum
  double diverge_lr = 0.0;    // LR where the loss blew up (0 if it did not)
  int points_used = 0;        // finite points analysed
  std::string evidence;       // words with the numbers behind them
};

// Suggests the initial LR from a range test: `lrs` grows exponentially,
// `losses[i]` is the minibatch loss at `lrs[i]`. Non-finite losses end the
// usable part of the curve. InvalidArgument if the inputs differ in length,
// hold too few points or the LR does not grow.
absl::StatusOr<LrSuggestion> SuggestLearningRate(
    std::span<const double> lrs, std::span<const double> losses,
    const LrRangeTestOptions& options = LrRangeTestOptions());

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_LR_RANGE_TEST_H_
