#include "analyzers/src/overfitting_detector.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"

namespace lossguard::analyzers {

void OverfittingDetector::OnValLoss(const StepRecord& rec,
                                    const LossTrack& track, bool diverged,
                                    Findings* findings) {
  const double v = std::log(std::max(*rec.val_loss, 1e-300));
  // Second differences cancel a linear trend, leaving the evaluation noise:
  // sd(v[k] - 2 v[k-1] + v[k-2]) = sqrt(6) sigma.
  if (std::isfinite(prev_log2_)) {
    noise_.Add((v - 2.0 * prev_log_ + prev_log2_) / std::sqrt(3.0));
  }
  prev_log2_ = prev_log_;
  prev_log_ = v;
  const int keep = std::clamp(options_.overfit_smooth_points, 1,
                              static_cast<int>(recent_.size()));
  recent_[count_ % keep] = v;
  ++count_;
  const int n = std::min(count_, keep);
  scratch_.assign(recent_.begin(), recent_.begin() + n);
  const double smoothed = MedianInPlace(scratch_);
  const double train = std::isfinite(track.smoothed_level())
                           ? track.smoothed_level()
                           : track.last_log_loss();
  rising_ = (count_ > 1 && smoothed > prev_smoothed_) ? rising_ + 1 : 0;
  prev_smoothed_ = smoothed;
  if (smoothed < min_) {
    min_ = smoothed;
    min_step_ = rec.step;
    min_train_ = train;
    min_lr_ = track.lr();
    rise_points_ = 0;
    return;
  }
  if (findings->IsActive(DiagnosisKind::kOverfitting) || diverged) return;
  const double noise = noise_.count() >= 3 ? noise_.Sigma() : 0.0;
  const double margin =
      std::max(std::log1p(options_.overfit_rise_fraction),
               options_.overfit_rise_sigmas * noise / std::sqrt(2.0));
  const double rise = smoothed - min_;
  const bool train_ok =
      !std::isfinite(min_train_) || !std::isfinite(train) ||
      train - min_train_ <= std::log(options_.overfit_train_rise_factor);
  const bool steady_climb =
      rising_ >= options_.overfit_trend_points &&
      rise > std::log1p(options_.overfit_trend_rise_fraction);
  // A validation rise while the LR climbs is the LR's doing, not overfitting.
  const double lr = track.lr();
  const bool lr_rose = !std::isnan(min_lr_) && !std::isnan(lr) &&
                       lr > min_lr_ * options_.stagnation_lr_rise;
  if ((rise > margin || steady_climb) && train_ok && !lr_rose) {
    ++rise_points_;
  } else {
    rise_points_ = 0;
  }
  if (rise_points_ < options_.overfit_confirm_points) return;

  Diagnosis d;
  d.kind = DiagnosisKind::kOverfitting;
  d.step = rec.step;
  d.onset = min_step_;
  d.severity = Clamp01((std::exp(rise) - 1.0) / 0.5);
  d.confidence = Clamp01(0.5 + 0.5 * (rise - margin) / margin);
  d.loss_at_onset = std::exp(min_);
  d.best_loss = std::exp(min_);
  d.lr_at_onset = lr;
  d.evidence = absl::StrFormat(
      "validation loss (median of %d evals) rose %+.1f%% above its minimum "
      "%.4g at step %d (margin %.1f%%) while training loss went from %.4g to "
      "%.4g",
      keep, 100.0 * (std::exp(rise) - 1.0), std::exp(min_), min_step_,
      100.0 * (std::exp(margin) - 1.0), ExpOrNaN(min_train_),
      ExpOrNaN(train));
  findings->Report(std::move(d));
}

}  // namespace lossguard::analyzers
