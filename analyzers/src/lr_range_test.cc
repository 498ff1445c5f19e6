#include "lossguard/analyzers/lr_range_test.h"

namespace lossguard::analyzers {

// Placeholder; the range-test analysis replaces it.
absl::StatusOr<LrSuggestion> SuggestLearningRate(
    std::span<const double> lrs, std::span<const double> losses,
    const LrRangeTestOptions& /*options*/) {
  if (lrs.size() != losses.size()) {
    return absl::InvalidArgumentError("lrs and losses differ in length");
  }
  return absl::UnimplementedError("LR range test analysis not written yet");
}

}  // namespace lossguard::analyzers
