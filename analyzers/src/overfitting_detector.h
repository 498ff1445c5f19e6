#ifndef LOSSGUARD_ANALYZERS_SRC_OVERFITTING_DETECTOR_H_
#define LOSSGUARD_ANALYZERS_SRC_OVERFITTING_DETECTOR_H_

#include <array>
#include <cstdint>
#include <vector>

#include "analyzers/src/common.h"
#include "analyzers/src/loss_track.h"
#include "analyzers/src/robust.h"
#include "lossguard/analyzers/options.h"

namespace lossguard::analyzers {

// Overfitting: the smoothed validation loss has passed its minimum and risen
// clearly above it on consecutive evaluations (or climbed steadily) while
// the training loss has not risen and the LR has not climbed. The onset is
// the minimum.
//
// Not thread-safe; owned by one CurveAnalyzer.
class OverfittingDetector {
 public:
  explicit OverfittingDetector(const AnalyzerOptions& options)
      : options_(options) {}

  // A finite validation loss at `rec.step`.
  void OnValLoss(const StepRecord& rec, const LossTrack& track, bool diverged,
                 Findings* findings);

 private:
  const AnalyzerOptions& options_;
  std::array<double, 8> recent_{};
  int count_ = 0;
  double min_ = kInf;           // min of smoothed log val loss
  int64_t min_step_ = 0;
  double min_train_ = kNaN;     // smoothed train log-loss at the val min
  double min_lr_ = kNaN;        // LR at the val min
  int rise_points_ = 0;
  int rising_ = 0;              // consecutive rises of the smoothed val loss
  double prev_smoothed_ = kNaN;
  RobustScale noise_{10.0};     // per-eval noise of log val loss
  double prev_log_ = kNaN;
  double prev_log2_ = kNaN;
  std::vector<double> scratch_;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_SRC_OVERFITTING_DETECTOR_H_
