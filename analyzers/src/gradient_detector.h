#ifndef LOSSGUARD_ANALYZERS_SRC_GRADIENT_DETECTOR_H_
#define LOSSGUARD_ANALYZERS_SRC_GRADIENT_DETECTOR_H_

#include <cstdint>

#include "analyzers/src/common.h"
#include "analyzers/src/robust.h"
#include "lossguard/analyzers/options.h"

namespace lossguard::analyzers {

// Gradient explosion: the gradient norm jumps far above its robust recent
// level (an EMA of the log norm, with outliers winsorized so that they don't
// drag it up). Clears when the norm is back near its level.
//
// Not thread-safe; owned by one CurveAnalyzer.
class GradientDetector {
 public:
  explicit GradientDetector(const AnalyzerOptions& options)
      : options_(options) {}

  // A finite, positive gradient norm. `lr` and `best_level` only feed the
  // diagnosis's fields.
  void OnGradNorm(const StepRecord& rec, double lr, double best_level,
                  Findings* findings);

  // The robust typical gradient norm (0 before the first).
  double level() const { return std::isnan(level_) ? 0.0 : std::exp(level_); }

 private:
  const AnalyzerOptions& options_;
  int64_t points_ = 0;
  double level_ = kNaN;  // EMA of log grad norm
  RobustScale noise_{50.0, /*differences=*/false};
  bool exploding_ = false;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_SRC_GRADIENT_DETECTOR_H_
