#ifndef LOSSGUARD_ANALYZERS_SRC_STAGNATION_DETECTOR_H_
#define LOSSGUARD_ANALYZERS_SRC_STAGNATION_DETECTOR_H_

#include <cstdint>
#include <vector>

#include "analyzers/src/common.h"
#include "analyzers/src/loss_track.h"
#include "lossguard/analyzers/options.h"

namespace lossguard::analyzers {

// Stagnation: over the recent window the loss makes no meaningful progress
// (at its rate it would take many times the run so far to halve) while it
// is far from converged: still near its initial level, or stuck after the LR
// was cut before the loss had even halved. Not while the LR is rising. A
// loss repeating exactly, well above zero, is a dead model.
//
// Not thread-safe; owned by one CurveAnalyzer.
class StagnationDetector {
 public:
  explicit StagnationDetector(const AnalyzerOptions& options)
      : options_(options) {}

  // After each finite loss: the dead-model (constant loss) rule.
  void OnPoint(const StepRecord& rec, const LossTrack& track, bool diverged,
               double best_level, Findings* findings);
  // After `track` closed a block. `since_points`: the finite points seen
  // since the divergence detector last re-armed (after the LR cut that
  // answered a divergence), or all of them: the window never reaches back
  // past that cut, and the minimum points count from it.
  void OnBlock(const LossTrack& track, bool diverged, double best_level,
               int64_t since_points, Findings* findings);

 private:
  const AnalyzerOptions& options_;
  double const_value_ = kNaN;
  int const_run_ = 0;
  int64_t const_start_ = 0;
  double const_lr_ = kNaN;        // LR when the constant run began
  static constexpr int kChecksPerWindow = 32;
  int blocks_since_check_ = 0;
  int last_window_blocks_ = 0;    // blocks in the window at the last check
  bool blown_up_ = false;         // a loss >= stagnation_blowup_factor x L0 seen
  int64_t candidate_since_ = -1;  // points seen when the condition first held
  double reported_level_ = kNaN;  // tail level when stagnation was reported
  double reported_lr_ = kNaN;     // LR when stagnation was reported
  // Points seen when a report was cleared because the LR moved (the
  // remedy applied): the judgement afresh looks only at points after it.
  int64_t afresh_from_points_ = 0;
  std::vector<double> scratch_;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_SRC_STAGNATION_DETECTOR_H_
