#include "lossguard/analyzers/curve_analyzer.h"

#include <array>
#include <cassert>
#include <cmath>
#include <optional>

#include "absl/strings/str_format.h"
#include "analyzers/src/common.h"
#include "analyzers/src/divergence_detector.h"
#include "analyzers/src/gradient_detector.h"
#include "analyzers/src/loss_track.h"
#include "analyzers/src/oscillation_detector.h"
#include "analyzers/src/overfitting_detector.h"
#include "analyzers/src/stagnation_detector.h"

namespace lossguard::analyzers {

// Feeds each step to the shared LossTrack and the detectors, in an order
// that lets each see the others' state as of the previous block, and keeps
// the active diagnoses.
class CurveAnalyzer::Impl final : public Findings {
 public:
  explicit Impl(const AnalyzerOptions& options)
      : options_(options),
        track_(options_),
        divergence_(options_),
        oscillation_(options_),
        stagnation_(options_),
        overfitting_(options_),
        gradient_(options_) {}

  absl::Status Feed(const StepRecord& rec, std::vector<Diagnosis>* out);

  void Report(Diagnosis d) override {
    // Every diagnosis carries the gradient norm's typical level, when one
    // is known, for the policy (e.g. dead units: a collapsed norm).
    if (d.grad_norm_level <= 0.0) d.grad_norm_level = gradient_.level();
    if (d.kind != DiagnosisKind::kLossSpike) {
      active_[static_cast<size_t>(d.kind)] = d;
    }
    if (out_ != nullptr) out_->push_back(std::move(d));
  }
  void Clear(DiagnosisKind k) override {
    active_[static_cast<size_t>(k)].reset();
  }
  bool IsActive(DiagnosisKind k) const override {
    return active_[static_cast<size_t>(k)].has_value();
  }

  const AnalyzerOptions options_;
  int64_t steps_seen_ = 0;
  int64_t last_step_ = -1;
  std::array<std::optional<Diagnosis>, 6> active_;

 private:
  void OnLoss(const StepRecord& rec);

  LossTrack track_;
  DivergenceDetector divergence_;
  OscillationDetector oscillation_;
  StagnationDetector stagnation_;
  OverfittingDetector overfitting_;
  GradientDetector gradient_;
  std::vector<Diagnosis>* out_ = nullptr;  // set during Feed
  int64_t nonfinite_grads_ = 0;  // consecutive non-finite gradient norms
  int64_t first_nonfinite_grad_step_ = 0;
};

absl::Status CurveAnalyzer::Impl::Feed(const StepRecord& rec,
                                       std::vector<Diagnosis>* out) {
  if (steps_seen_ > 0 && rec.step <= last_step_) {
    return absl::InvalidArgumentError(
        absl::StrFormat("step %d is not greater than the previous step %d",
                        rec.step, last_step_));
  }
  if (std::isinf(rec.lr) || rec.lr < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "step %d: learning rate %g is not a finite value >= 0", rec.step,
        rec.lr));
  }
  last_step_ = rec.step;
  ++steps_seen_;
  out_ = out;

  track_.ObserveLr(rec);
  if (std::isfinite(rec.loss)) {
    OnLoss(rec);
  } else {
    divergence_.OnNonFinite(rec, "loss", rec.loss, track_, gradient_.level(),
                            this);
  }
  if (rec.grad_norm.has_value()) {
    const double g = *rec.grad_norm;
    if (!std::isfinite(g)) {
      if (nonfinite_grads_++ == 0) first_nonfinite_grad_step_ = rec.step;
      if (nonfinite_grads_ >= options_.nonfinite_grad_norm_points) {
        divergence_.OnNonFiniteGradNorm(rec, first_nonfinite_grad_step_,
                                        nonfinite_grads_, track_,
                                        gradient_.level(), this);
      }
    } else {
      nonfinite_grads_ = 0;
      if (g > 0) {
        gradient_.OnGradNorm(rec, track_.lr(), divergence_.best_level(), this);
      }
    }
  }
  if (rec.val_loss.has_value()) {
    if (std::isfinite(*rec.val_loss)) {
      overfitting_.OnValLoss(rec, track_, divergence_.diverged(), this);
    } else {
      divergence_.OnNonFinite(rec, "validation loss", *rec.val_loss, track_,
                              gradient_.level(), this);
    }
  }
  out_ = nullptr;
  return absl::OkStatus();
}

void CurveAnalyzer::Impl::OnLoss(const StepRecord& rec) {
  const bool block_closed = track_.AddLoss(rec);
  stagnation_.OnPoint(rec, track_, divergence_.diverged(),
                      divergence_.best_level(), this);
  oscillation_.OnPoint(rec, track_, divergence_.diverged(),
                       divergence_.rise_pending(), divergence_.best_level(),
                       this);
  if (!block_closed || !track_.has_l0()) return;
  divergence_.OnBlock(track_, oscillation_.TypicalSwing(), gradient_.level(),
                      this);
  stagnation_.OnBlock(track_, divergence_.diverged(), divergence_.best_level(),
                      track_.finite_points() - divergence_.rearmed_at_points(),
                      this);
}

absl::Status ValidateOptions(const AnalyzerOptions& o) {
  struct Check {
    bool ok;
    const char* field;
    const char* rule;
  };
  const Check checks[] = {
      {o.blocks_per_run >= 1, "blocks_per_run", ">= 1"},
      {o.max_block_points >= 1, "max_block_points", ">= 1"},
      {o.history_blocks >= 8, "history_blocks", ">= 8"},
      {o.level_median_blocks >= 1, "level_median_blocks", ">= 1"},
      {o.level_median_points >= 1, "level_median_points", ">= 1"},
      {o.initial_points >= 1, "initial_points", ">= 1"},
      {o.divergence_rise_factor > 1, "divergence_rise_factor", "> 1"},
      {o.divergence_rise_sigmas >= 0, "divergence_rise_sigmas", ">= 0"},
      {o.divergence_min_rise_of_initial >= 0,
       "divergence_min_rise_of_initial", ">= 0"},
      {o.divergence_confirm_blocks >= 1, "divergence_confirm_blocks", ">= 1"},
      {o.divergence_confirm_points >= 1, "divergence_confirm_points", ">= 1"},
      {o.divergence_confirm_fraction >= 0, "divergence_confirm_fraction",
       ">= 0"},
      {o.divergence_confirm_max_points >= 1, "divergence_confirm_max_points",
       ">= 1"},
      {o.divergence_climbing_lr_speedup >= 1,
       "divergence_climbing_lr_speedup", ">= 1"},
      {o.divergence_rearm_lr_fraction > 0 && o.divergence_rearm_lr_fraction < 1,
       "divergence_rearm_lr_fraction", "in (0, 1)"},
      {o.initial_blowup_factor > 1, "initial_blowup_factor", "> 1"},
      {o.stagnation_rearm_lr_rise > 1, "stagnation_rearm_lr_rise", "> 1"},
      {o.nonfinite_grad_norm_points >= 1, "nonfinite_grad_norm_points",
       ">= 1"},
      {o.restart_lr_jump > 1, "restart_lr_jump", "> 1"},
      {o.restart_follow_blocks >= 0, "restart_follow_blocks", ">= 0"},
      {o.spike_factor > 1, "spike_factor", "> 1"},
      {o.oscillation_window >= 3, "oscillation_window", ">= 3"},
      {o.oscillation_ema_span >= 1, "oscillation_ema_span", ">= 1"},
      {o.oscillation_swing > 0, "oscillation_swing", "> 0"},
      {o.oscillation_min_log_std >= 0, "oscillation_min_log_std", ">= 0"},
      {o.oscillation_min_rel_std >= 0, "oscillation_min_rel_std", ">= 0"},
      {o.oscillation_recent_windows >= 1 && o.oscillation_recent_windows <= 31,
       "oscillation_recent_windows", "in [1, 31]"},
      {o.oscillation_marginal_swing >= 0, "oscillation_marginal_swing", ">= 0"},
      {o.oscillation_confirm_windows >= 1 &&
           o.oscillation_confirm_windows <= o.oscillation_recent_windows,
       "oscillation_confirm_windows", "in [1, oscillation_recent_windows]"},
      {o.oscillation_progress_factor > 1, "oscillation_progress_factor", "> 1"},
      {o.oscillation_progress_swing_sds >= 0,
       "oscillation_progress_swing_sds", ">= 0"},
      {o.stagnation_min_points >= 3, "stagnation_min_points", ">= 3"},
      {o.stagnation_min_points_after_blowup >= 3, "stagnation_min_points_after_blowup", ">= 3"},
      {o.stagnation_blowup_factor > 1.0, "stagnation_blowup_factor", "> 1"},
      {o.stagnation_window_fraction > 0 && o.stagnation_window_fraction <= 1,
       "stagnation_window_fraction", "in (0, 1]"},
      {o.stagnation_halving_ratio > 0, "stagnation_halving_ratio", "> 0"},
      {o.stagnation_persist_factor >= 1, "stagnation_persist_factor", ">= 1"},
      {o.stagnation_evidence_sigmas >= 0, "stagnation_evidence_sigmas",
       ">= 0"},
      {o.stagnation_min_points_strong >= 3, "stagnation_min_points_strong",
       ">= 3"},
      {o.stagnation_progress_fraction >= 0 &&
           o.stagnation_progress_fraction <= 1,
       "stagnation_progress_fraction", "in [0, 1]"},
      {o.stagnation_clear_fall > 0 && o.stagnation_clear_fall < 1,
       "stagnation_clear_fall", "in (0, 1)"},
      {o.stagnation_initial_fraction > 0, "stagnation_initial_fraction", "> 0"},
      {o.stagnation_lr_drop > 1, "stagnation_lr_drop", "> 1"},
      {o.stagnation_drop_fraction > 0, "stagnation_drop_fraction", "> 0"},
      {o.stagnation_lr_rise > 1, "stagnation_lr_rise", "> 1"},
      {o.stagnation_constant_points >= 2, "stagnation_constant_points", ">= 2"},
      {o.stagnation_constant_min_fraction >= 0,
       "stagnation_constant_min_fraction", ">= 0"},
      {o.stagnation_constant_max_resolution >= 0,
       "stagnation_constant_max_resolution", ">= 0"},
      {o.overfit_noise_points >= 3 && o.overfit_noise_points <= 64,
       "overfit_noise_points", "in [3, 64]"},
      {o.overfit_smooth_points >= 1 && o.overfit_smooth_points <= 16,
       "overfit_smooth_points", "in [1, 16]"},
      {o.overfit_long_points >= 0 && o.overfit_long_points <= 16,
       "overfit_long_points", "in [0, 16]"},
      {o.overfit_rise_fraction >= 0, "overfit_rise_fraction", ">= 0"},
      {o.overfit_extreme_scale >= 0, "overfit_extreme_scale", ">= 0"},
      {o.overfit_confirm_points >= 1, "overfit_confirm_points", ">= 1"},
      {o.overfit_train_rise_factor >= 1, "overfit_train_rise_factor", ">= 1"},
      {o.grad_ema_span >= 1, "grad_ema_span", ">= 1"},
      {o.grad_explosion_factor > 1, "grad_explosion_factor", "> 1"},
      {o.grad_explosion_sigmas >= 0, "grad_explosion_sigmas", ">= 0"},
      {o.grad_min_points >= 0, "grad_min_points", ">= 0"},
  };
  for (const Check& c : checks) {
    if (!c.ok) {
      return absl::InvalidArgumentError(
          absl::StrFormat("AnalyzerOptions.%s must be %s", c.field, c.rule));
    }
  }
  return absl::OkStatus();
}

CurveAnalyzer::CurveAnalyzer(const AnalyzerOptions& options)
    : impl_(std::make_unique<Impl>(options)) {
  assert(ValidateOptions(options).ok());
}
CurveAnalyzer::~CurveAnalyzer() = default;
CurveAnalyzer::CurveAnalyzer(CurveAnalyzer&&) noexcept = default;
CurveAnalyzer& CurveAnalyzer::operator=(CurveAnalyzer&&) noexcept = default;

absl::Status CurveAnalyzer::Feed(const StepRecord& rec,
                                 std::vector<Diagnosis>* out) {
  return impl_->Feed(rec, out);
}
int64_t CurveAnalyzer::steps_seen() const { return impl_->steps_seen_; }
int64_t CurveAnalyzer::last_step() const { return impl_->last_step_; }
std::vector<Diagnosis> CurveAnalyzer::Active() const {
  std::vector<Diagnosis> active;
  for (const auto& d : impl_->active_) {
    if (d.has_value()) active.push_back(*d);
  }
  return active;
}
const AnalyzerOptions& CurveAnalyzer::options() const {
  return impl_->options_;
}

}  // namespace lossguard::analyzers
