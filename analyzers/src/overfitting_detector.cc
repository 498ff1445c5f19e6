#include "analyzers/src/overfitting_detector.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>

#include "absl/strings/str_format.h"
#include "analyzers/src/robust.h"

namespace lossguard::analyzers {
namespace {

// Standard deviation of the median of n Gaussian draws, in units of one
// draw's: sqrt(pi / 2n) for large n, and slightly above the exact value for
// small n (0.72 for 3 against 0.67), so the margins err on the safe side.
double MedianSd(int64_t n) {
  return std::min(1.0, std::sqrt(std::numbers::pi / (2.0 * n)));
}

// Extreme of n Gaussian draws, in sds: the expected maximum (or minus the
// minimum) is a little below sqrt(2 ln n).
double ExtremeSds(int64_t n) {
  return n > 1 ? std::sqrt(2.0 * std::log(static_cast<double>(n))) : 0.0;
}

}  // namespace

void OverfittingDetector::LineFit::Add(double t, double y) {
  ++n_;
  const double dt = t - mean_t_;
  mean_t_ += dt / static_cast<double>(n_);
  mean_y_ += (y - mean_y_) / static_cast<double>(n_);
  sxx_ += dt * (t - mean_t_);
  sxy_ += dt * (y - mean_y_);
}

double OverfittingDetector::NoiseSigma() {
  const int keep = std::clamp(options_.overfit_noise_points, 3,
                              static_cast<int>(second_diffs_.size()));
  const int64_t n = std::min<int64_t>(second_diff_count_, keep);
  if (n < 3) return 0.0;
  scratch_.assign(second_diffs_.begin(), second_diffs_.begin() + n);
  // A second difference of independent noise has sd sqrt(6) sigma, and the
  // median of |N(0, s)| is 0.6745 s.
  return MedianInPlace(scratch_) / (0.6745 * std::sqrt(6.0));
}

double OverfittingDetector::LevelValue(int points, int64_t* center_step) {
  const int cap = static_cast<int>(recent_.size());
  const int64_t n = std::min<int64_t>(count_, points);
  scratch_.clear();
  for (int64_t i = 0; i < n; ++i) {
    scratch_.push_back(recent_[(count_ - 1 - i) % cap]);
  }
  *center_step = recent_steps_[(count_ - 1 - n / 2) % cap];
  return MedianInPlace(scratch_);
}

bool OverfittingDetector::Attributable(const Minimum& min, double train,
                                       double lr) const {
  const bool train_ok =
      !std::isfinite(min.train) || !std::isfinite(train) ||
      train - min.train <= std::log(options_.overfit_train_rise_factor);
  // A validation rise while the LR climbs is the LR's doing, not
  // overfitting.
  const bool lr_rose = !std::isnan(min.lr) && !std::isnan(lr) &&
                       lr > min.lr * options_.stagnation_lr_rise;
  return train_ok && !lr_rose;
}

bool OverfittingDetector::Confirmed(const Rise& r, bool attributable,
                                    int* rise_points) const {
  *rise_points = (r.rise > r.margin && attributable) ? *rise_points + 1 : 0;
  return *rise_points >= options_.overfit_confirm_points;
}

void OverfittingDetector::OnValLoss(const StepRecord& rec,
                                    const LossTrack& track, bool diverged,
                                    Findings* findings) {
  const double v = std::log(std::max(*rec.val_loss, 1e-300));
  if (std::isfinite(prev_log2_)) {
    const int keep = std::clamp(options_.overfit_noise_points, 3,
                                static_cast<int>(second_diffs_.size()));
    second_diffs_[second_diff_count_ % keep] =
        std::fabs(v - 2.0 * prev_log_ + prev_log2_);
    ++second_diff_count_;
  }
  prev_log2_ = prev_log_;
  prev_log_ = v;
  const int cap = static_cast<int>(recent_.size());
  recent_[count_ % cap] = v;
  recent_steps_[count_ % cap] = rec.step;
  ++count_;

  const double train = std::isfinite(track.smoothed_level())
                           ? track.smoothed_level()
                           : track.last_log_loss();
  const double lr = track.lr();
  const double sigma = NoiseSigma();
  const double z = options_.overfit_extreme_scale * ExtremeSds(count_);
  const double floor = std::log1p(options_.overfit_rise_fraction);

  // Every view is updated on every evaluation; the first one confirmed
  // reports.
  const Minimum* report_min = nullptr;
  Rise report_rise;
  int report_points = 0;

  const int level_points[] = {options_.overfit_smooth_points,
                              options_.overfit_long_points};
  for (size_t i = 0; i < levels_.size(); ++i) {
    if (level_points[i] <= 0) continue;
    const int points = std::min(level_points[i], cap);
    Level& level = levels_[i];
    int64_t center_step = 0;
    const double value = LevelValue(points, &center_step);
    if (value < level.min.value) {
      level.min = {value, center_step, train, lr};
      level.rise_points = 0;
      continue;
    }
    const double sd = MedianSd(std::min<int64_t>(count_, points)) * sigma;
    const Rise r{value - level.min.value, sd * z + std::max(floor, sd * z)};
    if (Confirmed(r, Attributable(level.min, train, lr), &level.rise_points) &&
        report_min == nullptr) {
      report_min = &level.min;
      report_rise = r;
      report_points = static_cast<int>(std::min<int64_t>(count_, points));
    }
  }

  if (v < trend_.min.value) {
    trend_.min = {v, rec.step, train, lr};
    trend_.fit.Reset();
    trend_.rise_points = 0;
  } else {
    const double t =
        static_cast<double>(StepsBetween(trend_.min.step, rec.step));
    trend_.fit.Add(t, v);
    if (trend_.fit.sxx() > 0.0) {
      // The line's rise since the minimum, and its standard error.
      const double se = sigma * t / std::sqrt(trend_.fit.sxx());
      const Rise r{trend_.fit.Slope() * t, std::max(floor, z * se)};
      if (Confirmed(r, Attributable(trend_.min, train, lr),
                    &trend_.rise_points) &&
          report_min == nullptr) {
        report_min = &trend_.min;
        report_rise = r;
        report_points = 0;
      }
    }
  }

  if (report_min == nullptr || diverged ||
      findings->IsActive(DiagnosisKind::kOverfitting)) {
    return;
  }
  const Minimum& min = *report_min;
  const double rise = report_rise.rise;
  const double margin = report_rise.margin;
  Diagnosis d;
  d.kind = DiagnosisKind::kOverfitting;
  d.step = rec.step;
  d.onset = min.step;
  d.severity = Clamp01((std::exp(rise) - 1.0) / 0.5);
  d.confidence = Clamp01(0.5 + 0.5 * (rise - margin) / margin);
  d.loss_at_onset = std::exp(min.value);
  d.best_loss = std::exp(min.value);
  d.lr_at_onset = min.lr;
  const std::string view =
      report_points > 0
          ? absl::StrFormat("median of %d evals", report_points)
          : absl::StrFormat("least-squares line through the %d evals since",
                            trend_.fit.count());
  const std::string noise =
      second_diff_count_ >= 3
          ? absl::StrFormat("an evaluation noise of %.1f%%", 100.0 * sigma)
          : std::string("an evaluation noise not yet known");
  d.evidence = absl::StrFormat(
      "validation loss (%s) rose %+.1f%% above its minimum %.4g at step %d "
      "(margin %.1f%% for %s over %d evals) while training loss went from "
      "%.4g to %.4g",
      view, 100.0 * std::expm1(rise), std::exp(min.value), min.step,
      100.0 * std::expm1(margin), noise, count_, ExpOrNaN(min.train),
      ExpOrNaN(train));
  findings->Report(std::move(d));
}

}  // namespace lossguard::analyzers
