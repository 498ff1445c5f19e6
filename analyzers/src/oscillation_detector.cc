#include "analyzers/src/oscillation_detector.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "absl/strings/str_format.h"

namespace lossguard::analyzers {

OscillationDetector::OscillationDetector(const AnalyzerOptions& options)
    : options_(options) {}

double OscillationDetector::TypicalSwing() const {
  const size_t n = log_stds_.size();
  if (n == 0) return 0.0;
  const double a = log_stds_.FromBack(0);
  if (n == 1) return a;
  const double b = log_stds_.FromBack(1);
  if (n == 2) return 0.5 * (a + b);
  const double c = log_stds_.FromBack(2);
  return std::max(std::min(a, b), std::min(std::max(a, b), c));
}

void OscillationDetector::OnPoint(const StepRecord& rec,
                                  const LossTrack& track, bool diverged,
                                  bool rise_pending, double best_level,
                                  Findings* findings) {
  const double alpha = 2.0 / (options_.oscillation_ema_span + 1.0);
  // One absurd minibatch (1e200) must not saturate the EMA and the window
  // sums for a thousand steps: swings far beyond the task's scale count as
  // kMaxSwing x L0 (or 1 before L0 is known).
  const double cap = kMaxSwing * (track.has_l0() ? track.l0() : 1.0);
  const double loss = std::min(rec.loss, cap);
  // An abrupt LR cut (the remedy applied, a step decay) starts the
  // judgement afresh: swings at the larger LR say nothing about the smaller
  // one. (A raise keeps them: it can only make swings likelier.)
  const double lr = track.lr();
  if (points_ > 0 && std::isfinite(lr) && std::isfinite(window_lr_) &&
      window_lr_ > 0 && lr > 0 && window_lr_ / lr >= options_.restart_lr_jump) {
    log_fit_.Reset();
    rel_fit_.Reset();
    points_ = 0;
    history_ = 0;
    streak_ = false;
    ema_ = loss;
    if (findings->IsActive(DiagnosisKind::kOscillation)) {
      findings->Clear(DiagnosisKind::kOscillation);
    }
  }
  window_lr_ = lr;
  ema_ = std::isnan(ema_) ? loss : ema_ + alpha * (loss - ema_);
  if (!track.has_l0()) return;
  if (points_ == 0) window_start_ = rec.step;
  const double t = static_cast<double>(points_);
  log_fit_.Add(t, track.LogLoss(ema_));
  rel_fit_.Add(t, ema_ / track.l0());
  if (++points_ < options_.oscillation_window) return;

  const double log_std = log_fit_.ResidualStd();
  const double rel_std = rel_fit_.ResidualStd();
  const double swing = std::sqrt(log_std * rel_std);
  const double mean = log_fit_.MeanY();
  log_stds_.Push(log_std);
  means_.Push(mean);
  log_fit_.Reset();
  rel_fit_.Reset();
  points_ = 0;
  const bool swinging = swing > options_.oscillation_swing &&
                        log_std > options_.oscillation_min_log_std &&
                        rel_std > options_.oscillation_min_rel_std;
  history_ = (history_ << 1) | (swinging ? 1u : 0u);
  const int recent = std::clamp(options_.oscillation_recent_windows, 1, 31);
  const uint32_t mask = (1u << recent) - 1;
  const int flagged = std::popcount(history_ & mask);
  if (flagged == 0) {
    findings->Clear(DiagnosisKind::kOscillation);
    streak_ = false;
    return;
  }
  if (swinging && !streak_) {
    streak_ = true;
    streak_start_ = window_start_;
  }
  // A marginal swing is as likely minibatch noise as an LR too large: it
  // must hold in every recent window, not just `confirm_windows` of them.
  const double marginal =
      options_.oscillation_marginal_swing * options_.oscillation_swing;
  const int needed =
      swing < marginal ? recent : options_.oscillation_confirm_windows;
  // A pending divergence rise is a lasting rise in the making, not a swing.
  if (!swinging || flagged < needed ||
      findings->IsActive(DiagnosisKind::kOscillation) || diverged ||
      rise_pending) {
    return;
  }
  // Net progress across the recent windows. A rise beyond the factor is a
  // lasting rise (divergence's to judge). A fall is judged against the
  // swing itself: the window means of a loss swinging by log_std move by
  // about that much without any trend, so only a fall beyond the factor
  // plus `oscillation_progress_swing_sds` swing stds is net progress.
  const size_t back = std::min<size_t>(recent - 1, means_.size() - 1);
  const double progress = means_.FromBack(back) - mean;
  const double allowed = std::log(options_.oscillation_progress_factor);
  if (-progress > allowed ||
      progress > allowed + options_.oscillation_progress_swing_sds * log_std) {
    return;
  }

  Diagnosis d;
  d.kind = DiagnosisKind::kOscillation;
  d.step = rec.step;
  d.onset = streak_start_;
  d.severity = Clamp01(swing / (4.0 * options_.oscillation_swing));
  d.confidence = Clamp01(0.5 + 0.25 * (swing / options_.oscillation_swing - 1));
  d.loss_at_onset = std::exp(mean);
  d.best_loss = ExpOrNaN(best_level);
  d.lr_at_onset = track.lr();
  d.evidence = absl::StrFormat(
      "%d of the last %d windows of %d steps swing since step %d: the EMA(%g) "
      "loss varies about its trend with std %.2f in log-loss and %.3f of the "
      "initial loss %.4g (swing %.3f, threshold %.3f); net change %+.0f%%",
      flagged, recent, options_.oscillation_window, streak_start_,
      options_.oscillation_ema_span, log_std, rel_std, track.l0(), swing,
      options_.oscillation_swing, 100.0 * (std::exp(-progress) - 1.0));
  findings->Report(std::move(d));
}

}  // namespace lossguard::analyzers
