#ifndef LOSSGUARD_ANALYZERS_SRC_OVERFITTING_DETECTOR_H_
#define LOSSGUARD_ANALYZERS_SRC_OVERFITTING_DETECTOR_H_

#include <array>
#include <cstdint>
#include <vector>

#include "analyzers/src/common.h"
#include "analyzers/src/loss_track.h"
#include "lossguard/analyzers/options.h"

namespace lossguard::analyzers {

// Overfitting: the validation loss has passed its minimum and risen clearly
// above it while the training loss has not risen and the LR has not climbed.
// "Clearly" is judged against the validation loss's own evaluation noise,
// allowing for how low the minimum of many noisy evaluations falls by
// chance (see the overfitting section of AnalyzerOptions). Three views of
// the rise, each with its own reference minimum: a short and a long running
// median of the latest evaluations against their running minimums (jumps
// and clean curves; noisy curves), and a least-squares line through the
// evaluations after the lowest one (slow climbs through noise). The onset is
// the minimum of the view that reports. Until the noise can be estimated
// (five evaluations) only the rise fraction applies, so that a per-epoch log
// of a handful of points can still be judged.
//
// Constant time and memory per evaluation.
//
// Not thread-safe; owned by one CurveAnalyzer.
class OverfittingDetector {
 public:
  explicit OverfittingDetector(const AnalyzerOptions& options)
      : options_(options) {}

  OverfittingDetector(const OverfittingDetector&) = delete;
  OverfittingDetector& operator=(const OverfittingDetector&) = delete;

  // A finite validation loss at `rec.step`.
  void OnValLoss(const StepRecord& rec, const LossTrack& track, bool diverged,
                 Findings* findings);

 private:
  // Most evaluations a level's median covers, and most second differences
  // the noise estimate keeps.
  static constexpr int kMaxLevelPoints = 16;
  static constexpr int kMaxNoisePoints = 64;

  // The lowest validation value of one view and what held when it was seen.
  struct Minimum {
    double value = kInf;  // log validation loss
    int64_t step = 0;
    double train = kNaN;  // smoothed training log-loss at that step
    double lr = kNaN;
  };

  // One view's test on the current evaluation.
  struct Rise {
    double rise = 0.0;    // above the minimum, log
    double margin = 0.0;  // what it had to exceed, log
  };

  // Least-squares line through (t, y) points, updated in Welford's form so
  // that t in the millions loses no precision.
  class LineFit {
   public:
    void Reset() { *this = LineFit(); }
    void Add(double t, double y);
    int64_t count() const { return n_; }
    double sxx() const { return sxx_; }
    double Slope() const { return sxx_ > 0.0 ? sxy_ / sxx_ : 0.0; }

   private:
    int64_t n_ = 0;
    double mean_t_ = 0.0;
    double mean_y_ = 0.0;
    double sxx_ = 0.0;
    double sxy_ = 0.0;
  };

  struct Level {
    Minimum min;
    int rise_points = 0;  // consecutive evaluations above the margin
  };

  struct Trend {
    Minimum min;
    LineFit fit;  // over the evaluations after `min`, t = step - min.step
    int rise_points = 0;
  };

  // Evaluation noise sigma of the log validation loss; 0 until three second
  // differences are known.
  double NoiseSigma();
  // Median of the latest `points` log validation losses (fewer at first);
  // `*center_step` is the step in the middle of them.
  double LevelValue(int points, int64_t* center_step);
  // The validation rise since `min` may be overfitting: the training loss
  // has not risen and the LR has not climbed since then.
  bool Attributable(const Minimum& min, double train, double lr) const;
  // Counts `rise` into `*rise_points`; true once it held on
  // overfit_confirm_points consecutive evaluations.
  bool Confirmed(const Rise& r, bool attributable, int* rise_points) const;

  const AnalyzerOptions& options_;
  std::array<double, kMaxLevelPoints> recent_{};  // ring: log val loss
  std::array<int64_t, kMaxLevelPoints> recent_steps_{};
  std::array<double, kMaxNoisePoints> second_diffs_{};  // ring: |2nd diff|
  int64_t count_ = 0;
  int64_t second_diff_count_ = 0;
  double prev_log_ = kNaN;
  double prev_log2_ = kNaN;
  std::array<Level, 2> levels_{};  // short, long
  Trend trend_;
  std::vector<double> scratch_;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_SRC_OVERFITTING_DETECTOR_H_
