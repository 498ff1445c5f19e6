#include "analyzers/src/divergence_detector.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_format.h"

namespace lossguard::analyzers {
namespace {

// "nan", "inf" or "-inf" (printf gives "-nan" for a NaN with its sign bit
// set, which is what a blown-up loss often is).
std::string NonFiniteName(double v) {
  if (std::isnan(v)) return "nan";
  return v > 0 ? "inf" : "-inf";
}

}  // namespace

void DivergenceDetector::OnNonFinite(const StepRecord& rec, const char* what,
                                     double value, const LossTrack& track,
                                     double grad_norm_level,
                                     Findings* findings) {
  ReportNonFinite(rec, rec.step, /*confidence=*/1.0, value,
                  absl::StrFormat("%s is %s at step %d (non-finite)", what,
                                  NonFiniteName(value), rec.step),
                  track, grad_norm_level, findings);
}

void DivergenceDetector::OnNonFiniteGradNorm(const StepRecord& rec,
                                             int64_t first_step, int64_t count,
                                             const LossTrack& track,
                                             double grad_norm_level,
                                             Findings* findings) {
  ReportNonFinite(
      rec, first_step, count > 1 ? 0.95 : 1.0, rec.loss,
      absl::StrFormat(
          "gradient norm is %s at step %d and has been non-finite on %d "
          "consecutive reports since step %d (mixed-precision loss scaling "
          "skips only a few); loss %.4g",
          NonFiniteName(*rec.grad_norm), rec.step, count, first_step, rec.loss),
      track, grad_norm_level, findings);
}

void DivergenceDetector::ReportNonFinite(const StepRecord& rec, int64_t onset,
                                         double confidence, double value,
                                         std::string evidence,
                                         const LossTrack& track,
                                         double grad_norm_level,
                                         Findings* findings) {
  if (diverged_ && !CutSinceDivergence(track)) return;
  diverged_ = true;
  diverged_lr_ = track.lr();
  Diagnosis d;
  d.kind = DiagnosisKind::kDivergence;
  d.step = rec.step;
  d.onset = onset;
  d.severity = 1.0;
  d.confidence = confidence;
  d.loss_at_onset = value;
  d.best_loss = ExpOrNaN(best_level_);
  d.lr_at_onset = track.lr();
  d.grad_norm_level = grad_norm_level;
  d.nonfinite = true;
  d.evidence = std::move(evidence);
  if (std::isfinite(best_level_)) {
    absl::StrAppendFormat(&d.evidence, "; best smoothed loss was %.4g at %d",
                          std::exp(best_level_), best_step_);
  }
  findings->Report(std::move(d));
}

bool DivergenceDetector::LrClimbing(const LossTrack& track) const {
  return !std::isnan(rise_lr_) && !std::isnan(track.lr()) &&
         track.lr() > rise_lr_ * options_.stagnation_lr_rise;
}

bool DivergenceDetector::CutSinceDivergence(const LossTrack& track) const {
  const double lr = track.lr();
  return std::isfinite(lr) && std::isfinite(diverged_lr_) &&
         lr <= diverged_lr_ * options_.divergence_rearm_lr_fraction;
}

void DivergenceDetector::OnBlock(LossTrack& track, double typical_swing,
                                 double grad_norm_level, Findings* findings) {
  const Block& b = track.last_block();
  const double level = track.smoothed_level();
  if (diverged_) {
    // Reported once; the LR cut that answers it starts a new run from here
    // (the loss before it, blow-up included, is no reference for what the
    // cut LR does), so every detector watches again.
    if (!CutSinceDivergence(track) || !std::isfinite(level)) return;
    diverged_ = false;
    rearmed_at_points_ = track.finite_points();
    awaiting_clean_level_ = true;
    best_level_ = level;
    best_step_ = b.last_step;
    best_level_lr_ = track.lr();
    rise_blocks_ = 0;
    follow_blocks_left_ = 0;
    return;
  }
  if (awaiting_clean_level_) {
    // The smoothed level is a median over the latest blocks; until they
    // all come after the cut, it still holds the blow-up (a median of
    // 1e16 losses and the cut LR's 1.1 can read 1e7 and climb as normal
    // blocks from before the blow-up leave its window), which is no level
    // of what the cut LR does. The reference is the first level of the
    // cut LR's own points.
    if (track.finite_points() - track.smoothed_points() < rearmed_at_points_) {
      return;
    }
    awaiting_clean_level_ = false;
    best_level_ = level;
    best_step_ = b.last_step;
    best_level_lr_ = track.lr();
    return;
  }
  if (std::isnan(first_level_)) {
    first_level_ = b.level;
    first_step_ = b.last_step;
  }
  if (std::isinf(best_level_) && std::isfinite(level) &&
      std::isfinite(first_level_) && first_level_ < level) {
    // The smoothed level needs a few blocks; a loss that jumped within
    // them (an LR so large the first steps blow it up) must still count as
    // a rise from where the run started.
    best_level_ = first_level_;
    best_step_ = first_step_;
    best_level_lr_ = track.lr();
  }
  if (track.restart_pending()) {
    track.TakeRestart();
    follow_blocks_left_ = options_.restart_follow_blocks;
    best_level_ = level;
    best_step_ = b.last_step;
    rise_blocks_ = 0;
  }
  if (follow_blocks_left_ > 0) {
    // Right after a warm restart the loss is expected to rise: the reference
    // follows it up, then tracking resumes.
    --follow_blocks_left_;
    if (level >= best_level_ || follow_blocks_left_ > 0) {
      best_level_ = level;
      best_step_ = b.last_step;
      return;
    }
  }
  // Noise of the smoothed level: per-point scale over the points it spans.
  const double level_sd = 1.2533 * track.point_sigma() /
                          std::sqrt(std::max(1, track.smoothed_points()));
  // Swings correlated over many steps don't average out in the level: the
  // typical swing amplitude of the latest windows widens the margin.
  const double margin = std::max(std::log(options_.divergence_rise_factor),
                                 options_.divergence_rise_sigmas * level_sd) +
                        typical_swing;
  const double rise = level - best_level_;
  const bool material = std::exp(level) - std::exp(best_level_) >=
                        options_.divergence_min_rise_of_initial * track.l0();

  if (rise > margin && material) {
    if (rise_blocks_ == 0) {
      rise_start_step_ = b.first_step;
      rise_points_ = 0;
      rise_points_before_ = track.finite_points() - b.points;
      rise_base_ = best_level_;
      rise_peak_ = level;
      rise_lr_ = best_level_lr_;
    }
    ++rise_blocks_;
    rise_peak_ = std::max(rise_peak_, level);
    rise_points_ += b.points;
    // Confirmation: enough points, fewer the more margins the rise clears.
    const double needed =
        std::max<double>(
            options_.divergence_confirm_points,
            std::min<double>(options_.divergence_confirm_max_points,
                             options_.divergence_confirm_fraction *
                                 static_cast<double>(rise_points_before_))) /
        std::max(1.0, rise / margin) /
        (LrClimbing(track) ? options_.divergence_climbing_lr_speedup : 1.0);
    if (rise_blocks_ < options_.divergence_confirm_blocks ||
        static_cast<double>(rise_points_) < needed) {
      return;
    }
    diverged_ = true;
    diverged_lr_ = track.lr();
    const int64_t lasted = StepSpan(rise_start_step_, b.last_step);
    const double ratio = std::exp(level - rise_base_);
    Diagnosis d;
    d.kind = DiagnosisKind::kDivergence;
    d.step = b.last_step;
    d.onset = rise_start_step_;
    d.severity = Clamp01(std::log(ratio) / std::log(10.0));
    d.confidence = Clamp01(0.5 + 0.5 * (rise - margin) / margin);
    d.loss_at_onset = std::exp(level);
    d.best_loss = std::exp(rise_base_);
    d.lr_at_onset = best_level_lr_;
    d.grad_norm_level = grad_norm_level;
    d.evidence = absl::StrFormat(
        "smoothed loss %.4g is %.3gx its best %.4g (step %d) and has stayed "
        "above %.3gx for %d steps since step %d",
        std::exp(level), ratio, std::exp(rise_base_), best_step_,
        std::exp(margin), lasted, rise_start_step_);
    findings->Report(std::move(d));
    return;
  }
  if (rise_blocks_ > 0) {
    // The rise came back before it was confirmed: a recovered spike.
    const double spike = rise_peak_ - rise_base_;
    if (spike > std::log(options_.spike_factor)) {
      Diagnosis d;
      d.kind = DiagnosisKind::kLossSpike;
      d.step = b.last_step;
      d.onset = rise_start_step_;
      d.severity = Clamp01(spike / std::log(100.0));
      d.confidence = 1.0;
      d.loss_at_onset = std::exp(rise_peak_);
      d.best_loss = std::exp(rise_base_);
      d.lr_at_onset = track.lr();
      d.evidence = absl::StrFormat(
          "smoothed loss spiked to %.4g (%.3gx its best %.4g) at step %d and "
          "recovered to %.4g (%.3gx its best) by step %d; divergence needs "
          "%.3gx its best and %.3g above it",
          std::exp(rise_peak_), std::exp(spike), std::exp(rise_base_),
          rise_start_step_, std::exp(level), std::exp(level - rise_base_),
          b.last_step, std::exp(margin),
          options_.divergence_min_rise_of_initial * track.l0());
      findings->Report(std::move(d));
    }
    rise_blocks_ = 0;
  }
  if (level < best_level_) {
    best_level_ = level;
    best_step_ = b.last_step;
    best_level_lr_ = track.lr();
  }
}

}  // namespace lossguard::analyzers
