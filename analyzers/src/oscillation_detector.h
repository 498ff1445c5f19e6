#ifndef LOSSGUARD_ANALYZERS_SRC_OSCILLATION_DETECTOR_H_
#define LOSSGUARD_ANALYZERS_SRC_OSCILLATION_DETECTOR_H_

#include <cstdint>

#include "analyzers/src/common.h"
#include "analyzers/src/loss_track.h"
#include "analyzers/src/ring_buffer.h"
#include "analyzers/src/robust.h"
#include "lossguard/analyzers/options.h"

namespace lossguard::analyzers {

// Oscillation: in recent windows, the EMA-smoothed loss swings about its
// trend far more than minibatch noise explains, both in log terms and
// relative to the task's initial loss, while the loss makes no net progress
// and no lasting rise.
//
// Not thread-safe; owned by one CurveAnalyzer.
class OscillationDetector {
 public:
  explicit OscillationDetector(const AnalyzerOptions& options);

  // After each finite loss (before the block it may close is judged).
  // `diverged` / `rise_pending` come from the divergence detector.
  void OnPoint(const StepRecord& rec, const LossTrack& track, bool diverged,
               bool rise_pending, double best_level, Findings* findings);

  // Median log-loss swing of the latest 3 windows (0 before the first).
  double TypicalSwing() const;

 private:
  const AnalyzerOptions& options_;
  double ema_ = kNaN;
  WindowFit log_fit_;
  WindowFit rel_fit_;
  int points_ = 0;
  double window_lr_ = kNaN;  // LR at the current window's last point
  int64_t window_start_ = 0;
  uint32_t history_ = 0;         // bit i: window i back swung
  bool streak_ = false;
  int64_t streak_start_ = 0;
  RingBuffer<double> means_{32};    // mean smoothed log-loss per window
  RingBuffer<double> log_stds_{3};  // log-loss swing of the latest windows
  static constexpr double kMaxSwing = 1e6;  // input cap, in units of L0
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_SRC_OSCILLATION_DETECTOR_H_
