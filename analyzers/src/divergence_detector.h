#ifndef LOSSGUARD_ANALYZERS_SRC_DIVERGENCE_DETECTOR_H_
#define LOSSGUARD_ANALYZERS_SRC_DIVERGENCE_DETECTOR_H_

#include <cstdint>
#include <string>

#include "analyzers/src/common.h"
#include "analyzers/src/loss_track.h"
#include "lossguard/analyzers/options.h"

namespace lossguard::analyzers {

// Divergence: a non-finite loss or gradient norm at once; otherwise the
// smoothed level rising above its best by a clear, noise-aware margin and
// staying there long enough to be "for good". A rise that comes back first
// is a recovered spike, reported as a kLossSpike event. After a warm restart
// the reference level follows the loss up for a few blocks.
//
// Not thread-safe; owned by one CurveAnalyzer.
class DivergenceDetector {
 public:
  explicit DivergenceDetector(const AnalyzerOptions& options)
      : options_(options) {}

  // A non-finite `value` of `what` ("loss", "gradient norm", ...).
  void OnNonFinite(const StepRecord& rec, const char* what, double value,
                   const LossTrack& track, double grad_norm_level,
                   Findings* findings);
  // The gradient norm has been non-finite on `count` consecutive reports
  // since `first_step` while the loss stayed finite.
  void OnNonFiniteGradNorm(const StepRecord& rec, int64_t first_step,
                           int64_t count, const LossTrack& track,
                           double grad_norm_level, Findings* findings);
  // After `track` closed a block. `typical_swing` is the oscillation
  // detector's typical log-loss swing, which widens the margin.
  void OnBlock(LossTrack& track, double typical_swing, double grad_norm_level,
               Findings* findings);

  bool diverged() const { return diverged_; }
  // A rise is under way but not yet confirmed or dismissed.
  bool rise_pending() const { return rise_blocks_ > 0; }
  // Finite points seen when the detector last re-armed after the LR cut
  // that answered a divergence (0: never).
  int64_t rearmed_at_points() const { return rearmed_at_points_; }
  // Best smoothed log-loss so far (+inf before the first block).
  double best_level() const { return best_level_; }

 private:
  // The LR has climbed since the best level the rise is measured from.
  bool LrClimbing(const LossTrack& track) const;
  // The LR was cut since the divergence was reported (see
  // AnalyzerOptions::divergence_rearm_lr_fraction).
  bool CutSinceDivergence(const LossTrack& track) const;
  // Reports an immediate divergence (once, or again after an LR cut; see
  // AnalyzerOptions::divergence_rearm_lr_fraction).
  void ReportNonFinite(const StepRecord& rec, int64_t onset, double confidence,
                       double value, std::string evidence,
                       const LossTrack& track, double grad_norm_level,
                       Findings* findings);

  const AnalyzerOptions& options_;
  bool diverged_ = false;
  double diverged_lr_ = kNaN;  // LR when the divergence was reported
  double first_level_ = kNaN;  // level of the first block (the first loss)
  int64_t first_step_ = 0;
  double best_level_ = kInf;
  int64_t best_step_ = 0;
  double best_level_lr_ = kNaN;
  int rise_blocks_ = 0;
  int64_t rise_points_ = 0;         // points since the rise began
  int64_t rise_points_before_ = 0;  // points before it began
  int64_t rise_start_step_ = -1;
  double rise_peak_ = -kInf;
  double rise_base_ = kNaN;
  int follow_blocks_left_ = 0;
  double rise_lr_ = kNaN;  // LR at the best level the rise is measured from
  int64_t rearmed_at_points_ = 0;
  // Re-armed, and the smoothed level still spans points from before the
  // cut: no rise is judged until it does not.
  bool awaiting_clean_level_ = false;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_SRC_DIVERGENCE_DETECTOR_H_
