#include "lossguard/analyzers/curve_analyzer.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <optional>

#include "absl/strings/str_format.h"
#include "analyzers/src/ring_buffer.h"
#include "analyzers/src/robust.h"

namespace lossguard::analyzers {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Losses below this fraction of the initial loss are clamped before taking
// logs, so a loss of exactly 0 stays finite in log space.
constexpr double kLogFloorFraction = 1e-12;

double Clamp01(double x) { return std::clamp(x, 0.0, 1.0); }

// One block of consecutive finite training-loss points.
struct Block {
  int64_t first_step = 0;
  int64_t last_step = 0;
  int points = 0;
  double level = 0.0;  // median log-loss of the block
  double lr = kNaN;    // LR at the block's last point
};

}  // namespace

class CurveAnalyzer::Impl {
 public:
  explicit Impl(const AnalyzerOptions& options)
      : options_(options),
        blocks_(static_cast<size_t>(std::max(8, options.history_blocks))) {
    init_losses_.reserve(options_.initial_points);
    block_values_.reserve(options_.max_block_points);
  }

  absl::Status Feed(const StepRecord& rec, std::vector<Diagnosis>* out);

  const AnalyzerOptions options_;
  int64_t steps_seen_ = 0;
  int64_t last_step_ = -1;
  int64_t first_step_ = 0;
  std::array<std::optional<Diagnosis>, 6> active_;

 private:
  void Emit(Diagnosis d, std::vector<Diagnosis>* out) {
    if (d.kind != DiagnosisKind::kLossSpike) {
      active_[static_cast<size_t>(d.kind)] = d;
    }
    if (out != nullptr) out->push_back(std::move(d));
  }
  bool IsActive(DiagnosisKind k) const {
    return active_[static_cast<size_t>(k)].has_value();
  }
  void Clear(DiagnosisKind k) { active_[static_cast<size_t>(k)].reset(); }

  void TrackLr(const StepRecord& rec);
  void OnNonFinite(const StepRecord& rec, const char* what, double value,
                   std::vector<Diagnosis>* out);
  void OnLoss(const StepRecord& rec, std::vector<Diagnosis>* out);
  void CloseBlock(std::vector<Diagnosis>* out);
  void CheckDivergence(const Block& b, std::vector<Diagnosis>* out);
  void CheckStagnation(const Block& b, std::vector<Diagnosis>* out);
  void CheckConstantLoss(const StepRecord& rec, std::vector<Diagnosis>* out);
  void OnOscillationPoint(const StepRecord& rec, std::vector<Diagnosis>* out);
  void OnValLoss(const StepRecord& rec, std::vector<Diagnosis>* out);
  void OnGradNorm(const StepRecord& rec, std::vector<Diagnosis>* out);

  // Median log-loss swing of the latest oscillation windows (0 before any).
  double TypicalSwing() {
    scratch_swing_.clear();
    for (size_t i = 0; i < osc_log_stds_.size(); ++i) {
      scratch_swing_.push_back(osc_log_stds_.FromBack(i));
    }
    return scratch_swing_.empty() ? 0.0 : MedianInPlace(scratch_swing_);
  }

  double LogLoss(double loss) const {
    const double floor = (std::isfinite(l0_) ? l0_ : 1.0) * kLogFloorFraction;
    return std::log(std::max(loss, floor));
  }

  // --- learning rate ---
  double lr_ = kNaN;       // latest known LR
  double max_lr_ = 0.0;    // largest LR seen
  int64_t restart_step_ = -1;
  bool restart_pending_ = false;
  int64_t lr_drop_step_ = -1;        // latest abrupt LR cut
  double lr_drop_level_ = kNaN;      // smoothed log-loss at that cut
  double lr_drop_factor_ = 1.0;

  // --- initial loss ---
  std::vector<double> init_losses_;
  double l0_ = kNaN;        // initial loss level (linear)
  double log_l0_ = kNaN;
  int64_t finite_points_ = 0;

  // --- blocks ---
  std::vector<double> block_values_;
  int64_t block_first_step_ = 0;
  int block_size_ = 1;
  RingBuffer<Block> blocks_;
  int64_t blocks_closed_ = 0;
  double smoothed_level_ = kNaN;  // median of the latest block levels
  int smoothed_points_ = 0;       // points behind smoothed_level_
  RobustScale point_noise_;       // per-point log-loss noise
  double prev_log_loss_ = kNaN;

  // --- divergence ---
  bool diverged_ = false;
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

  // --- constant loss ---
  double const_value_ = kNaN;
  int const_run_ = 0;
  int64_t const_start_ = 0;

  // --- stagnation ---
  std::vector<double> scratch_;
  std::vector<double> scratch_swing_;

  // --- oscillation ---
  double osc_ema_ = kNaN;
  WindowFit osc_log_;
  WindowFit osc_rel_;
  int osc_points_ = 0;
  int64_t osc_window_start_ = 0;
  uint32_t osc_history_ = 0;
  RingBuffer<double> osc_log_stds_{3};  // swings of the latest windows
  bool osc_streak_ = false;
  int64_t osc_run_start_ = 0;
  RingBuffer<double> osc_means_{32};  // mean smoothed log-loss per window

  // --- overfitting ---
  std::array<double, 8> val_recent_{};
  int val_count_ = 0;
  double val_min_ = kInf;       // min of smoothed log val loss
  int64_t val_min_step_ = 0;
  double val_min_train_ = kNaN;  // smoothed train log-loss at the val min
  double val_min_lr_ = kNaN;     // LR at the val min
  int val_rise_points_ = 0;
  int val_rising_ = 0;  // consecutive rises of the smoothed val loss
  double prev_val_smoothed_ = kNaN;
  RobustScale val_noise_{10.0};  // per-eval noise of log val loss
  double prev_val_log_ = kNaN;
  double prev_val_log2_ = kNaN;

  // --- gradient norm ---
  int64_t grad_points_ = 0;
  double grad_level_ = kNaN;  // EMA of log grad norm
  RobustScale grad_noise_{50.0, /*differences=*/false};
  bool grad_exploding_ = false;
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
  if (steps_seen_ == 0) first_step_ = rec.step;
  last_step_ = rec.step;
  ++steps_seen_;

  TrackLr(rec);
  if (!std::isfinite(rec.loss)) {
    OnNonFinite(rec, "loss", rec.loss, out);
  } else {
    OnLoss(rec, out);
  }
  if (rec.grad_norm.has_value()) OnGradNorm(rec, out);
  if (rec.val_loss.has_value() && std::isfinite(*rec.val_loss)) {
    OnValLoss(rec, out);
  } else if (rec.val_loss.has_value()) {
    OnNonFinite(rec, "validation loss", *rec.val_loss, out);
  }
  return absl::OkStatus();
}

void CurveAnalyzer::Impl::TrackLr(const StepRecord& rec) {
  if (std::isnan(rec.lr)) return;
  const double prev = lr_;
  lr_ = rec.lr;
  max_lr_ = std::max(max_lr_, lr_);
  if (std::isnan(prev)) return;
  if (prev > 0 && lr_ > prev * options_.restart_lr_jump &&
      lr_ >= 0.5 * max_lr_) {
    restart_step_ = rec.step;
    restart_pending_ = true;
  }
  if (lr_ > 0 && prev > lr_ * options_.stagnation_lr_drop) {
    lr_drop_step_ = rec.step;
    lr_drop_level_ = smoothed_level_;
    lr_drop_factor_ = prev / lr_;
  }
}

void CurveAnalyzer::Impl::OnNonFinite(const StepRecord& rec, const char* what,
                                      double value,
                                      std::vector<Diagnosis>* out) {
  if (diverged_) return;
  diverged_ = true;
  Diagnosis d;
  d.kind = DiagnosisKind::kDivergence;
  d.step = rec.step;
  d.onset = rec.step;
  d.severity = 1.0;
  d.confidence = 1.0;
  d.loss_at_onset = value;
  d.best_loss = std::isfinite(best_level_) ? std::exp(best_level_) : kNaN;
  d.lr_at_onset = lr_;
  d.grad_norm_level = std::isfinite(grad_level_) ? std::exp(grad_level_) : 0;
  d.evidence = absl::StrFormat("%s is %g at step %d (non-finite)", what, value,
                               rec.step);
  if (std::isfinite(best_level_)) {
    absl::StrAppendFormat(&d.evidence, "; best smoothed loss was %.4g at %d",
                          std::exp(best_level_), best_step_);
  }
  Emit(std::move(d), out);
}

void CurveAnalyzer::Impl::OnLoss(const StepRecord& rec,
                                 std::vector<Diagnosis>* out) {
  ++finite_points_;
  if (std::isnan(l0_)) {
    init_losses_.push_back(rec.loss);
    if (static_cast<int>(init_losses_.size()) >= options_.initial_points) {
      l0_ = std::max(Median(init_losses_), 1e-300);
      log_l0_ = std::log(l0_);
    }
  }
  const double y = LogLoss(rec.loss);
  if (std::isfinite(prev_log_loss_)) point_noise_.Add(y - prev_log_loss_);
  prev_log_loss_ = y;

  CheckConstantLoss(rec, out);
  OnOscillationPoint(rec, out);

  if (block_values_.empty()) block_first_step_ = rec.step;
  block_values_.push_back(y);
  if (static_cast<int>(block_values_.size()) >= block_size_) {
    Block b;
    b.first_step = block_first_step_;
    b.last_step = rec.step;
    b.points = static_cast<int>(block_values_.size());
    b.level = MedianInPlace(block_values_);
    b.lr = lr_;
    block_values_.clear();
    blocks_.Push(b);
    ++blocks_closed_;
    // Next block's length: the run so far in `blocks_per_run` blocks.
    int64_t target = finite_points_ / std::max(1, options_.blocks_per_run);
    int size = 1;
    while (size * 2 <= target && size * 2 <= options_.max_block_points) {
      size *= 2;
    }
    block_size_ = std::max(block_size_, size);
    CloseBlock(out);
  }
}

void CurveAnalyzer::Impl::CloseBlock(std::vector<Diagnosis>* out) {
  // Smoothed level: median of the latest blocks, enough of them to cover
  // `level_median_blocks` blocks and `level_median_points` points.
  scratch_.clear();
  int points = 0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (static_cast<int>(i) >= options_.level_median_blocks &&
        points >= options_.level_median_points) {
      break;
    }
    scratch_.push_back(blocks_.FromBack(i).level);
    points += blocks_.FromBack(i).points;
  }
  smoothed_points_ = points;
  smoothed_level_ = MedianInPlace(scratch_);
  const Block& b = blocks_.FromBack(0);
  if (std::isnan(l0_)) return;  // nothing is judged before L0 is known
  CheckDivergence(b, out);
  CheckStagnation(b, out);
}

// Divergence: the smoothed level rises above its best by a clear, noise-aware
// margin and stays there for long enough to be "for good". A rise that comes
// back first is a recovered spike, reported as an event.
void CurveAnalyzer::Impl::CheckDivergence(const Block& b,
                                          std::vector<Diagnosis>* out) {
  if (diverged_) return;
  const double level = smoothed_level_;
  if (restart_pending_) {
    restart_pending_ = false;
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
  const double level_sd = 1.2533 * point_noise_.Sigma() /
                          std::sqrt(std::max(1, smoothed_points_));
  // Swings correlated over many steps don't average out in the level: the
  // typical swing amplitude of the latest windows (their median, so that a
  // window holding the rise itself does not count) widens the margin.
  const double margin = std::max(std::log(options_.divergence_rise_factor),
                                 options_.divergence_rise_sigmas * level_sd) +
                        TypicalSwing();
  const double rise = level - best_level_;
  const bool material = std::exp(level) - std::exp(best_level_) >=
                        options_.divergence_min_rise_of_initial * l0_;

  if (rise > margin && material) {
    if (rise_blocks_ == 0) {
      rise_start_step_ = b.first_step;
      rise_points_ = 0;
      rise_points_before_ = finite_points_ - b.points;
      rise_base_ = best_level_;
      rise_peak_ = level;
    }
    ++rise_blocks_;
    rise_peak_ = std::max(rise_peak_, level);
    rise_points_ += b.points;
    const double needed =
        std::max<double>(
            options_.divergence_confirm_points,
            std::min<double>(options_.divergence_confirm_max_points,
                             options_.divergence_confirm_fraction *
                                 static_cast<double>(rise_points_before_))) /
        std::max(1.0, rise / margin);
    const int64_t lasted = b.last_step - rise_start_step_ + 1;
    if (rise_blocks_ >= options_.divergence_confirm_blocks &&
        rise_points_ >= needed) {
      diverged_ = true;
      Diagnosis d;
      d.kind = DiagnosisKind::kDivergence;
      d.step = b.last_step;
      d.onset = rise_start_step_;
      const double ratio = std::exp(level - rise_base_);
      d.severity = Clamp01(std::log(ratio) / std::log(10.0));
      d.confidence = Clamp01(0.5 + 0.5 * (rise - margin) / margin);
      d.loss_at_onset = std::exp(level);
      d.best_loss = std::exp(rise_base_);
      d.lr_at_onset = best_level_lr_;
      d.grad_norm_level =
          std::isfinite(grad_level_) ? std::exp(grad_level_) : 0.0;
      d.evidence = absl::StrFormat(
          "smoothed loss %.4g is %.2fx its best %.4g (step %d) and has stayed "
          "above %.2fx for %d steps since step %d",
          std::exp(level), ratio, std::exp(rise_base_), best_step_,
          std::exp(margin), lasted, rise_start_step_);
      Emit(std::move(d), out);
    }
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
      d.lr_at_onset = lr_;
      d.evidence = absl::StrFormat(
          "smoothed loss spiked to %.4g (%.2fx its best %.4g) at step %d and "
          "recovered to %.4g by step %d",
          std::exp(rise_peak_), std::exp(spike), std::exp(rise_base_),
          rise_start_step_, std::exp(level), b.last_step);
      Emit(std::move(d), out);
    }
    rise_blocks_ = 0;
  }
  if (level < best_level_) {
    best_level_ = level;
    best_step_ = b.last_step;
    best_level_lr_ = lr_;
  }
}

// Stagnation: over the recent window the loss makes no meaningful progress
// (at its rate it would take many times the run so far to halve) while it
// is far from converged: still near its initial level, or stuck after the LR
// was cut before the loss had even halved. Not while the LR is rising.
void CurveAnalyzer::Impl::CheckStagnation(const Block& b,
                                          std::vector<Diagnosis>* out) {
  if (diverged_ || finite_points_ < options_.stagnation_min_points) return;
  const int64_t window_points = static_cast<int64_t>(
      options_.stagnation_window_fraction * static_cast<double>(finite_points_));
  // Walk back over whole blocks covering the window.
  int nblocks = 0;
  int64_t covered = 0;
  while (nblocks < static_cast<int>(blocks_.size()) && covered < window_points) {
    covered += blocks_.FromBack(nblocks).points;
    ++nblocks;
  }
  if (nblocks < 3) return;
  const Block& first = blocks_.FromBack(nblocks - 1);
  const int third = std::max(1, nblocks / 3);
  scratch_.clear();
  for (int i = nblocks - 1; i > nblocks - 1 - third; --i) {
    scratch_.push_back(blocks_.FromBack(i).level);
  }
  const double head = MedianInPlace(scratch_);
  scratch_.clear();
  for (int i = 0; i < third; ++i) scratch_.push_back(blocks_.FromBack(i).level);
  const double tail = MedianInPlace(scratch_);
  const double progress = head - tail;  // log-loss fallen across the window
  // Distance between the centres of the head and tail thirds, in points.
  const double span = static_cast<double>(covered) * (1.0 - 1.0 / 3.0);
  const double halving_points =
      progress > 0 ? std::log(2.0) * span / progress : kInf;
  const double halving_ratio =
      halving_points / static_cast<double>(finite_points_);
  const bool no_progress = halving_ratio > options_.stagnation_halving_ratio;

  if (IsActive(DiagnosisKind::kStagnation)) {
    if (halving_ratio < options_.stagnation_halving_ratio *
                            options_.stagnation_clear_fraction) {
      Clear(DiagnosisKind::kStagnation);
    }
    return;
  }
  if (!no_progress) return;
  if (!std::isnan(first.lr) && !std::isnan(lr_) &&
      lr_ > first.lr * options_.stagnation_lr_rise) {
    return;  // warmup or a range test: a flat start is expected
  }
  const double frac_now = std::exp(tail - log_l0_);
  const double frac_best = std::exp(best_level_ - log_l0_);
  const bool near_start = frac_now >= options_.stagnation_initial_fraction &&
                          frac_best >= options_.stagnation_drop_fraction;
  const bool cut_early =
      lr_drop_step_ >= 0 && lr_drop_step_ <= first.first_step &&
      std::isfinite(lr_drop_level_) &&
      std::exp(lr_drop_level_ - log_l0_) >= options_.stagnation_drop_fraction;
  if (!near_start && !cut_early) return;

  Diagnosis d;
  d.kind = DiagnosisKind::kStagnation;
  d.step = b.last_step;
  d.onset = cut_early ? lr_drop_step_ : first.first_step;
  d.severity = Clamp01(frac_now);
  d.confidence = Clamp01(0.5 + 0.1 * std::log(halving_ratio /
                                              options_.stagnation_halving_ratio));
  if (!std::isfinite(halving_ratio)) d.confidence = 0.95;
  d.loss_at_onset = std::exp(tail);
  d.best_loss = std::exp(best_level_);
  d.lr_at_onset = lr_;
  std::string rate =
      std::isfinite(halving_points)
          ? absl::StrFormat("at its rate it would take %.0f steps (%.1fx the "
                            "run so far) to halve",
                            halving_points, halving_ratio)
          : std::string("it did not fall at all");
  d.evidence = absl::StrFormat(
      "smoothed loss went from %.4g to %.4g over the last %d steps (%+.1f%%); "
      "%s; it is %.0f%% of the initial loss %.4g",
      std::exp(head), std::exp(tail), b.last_step - first.first_step + 1,
      100.0 * (std::exp(-progress) - 1.0), rate, 100.0 * frac_now, l0_);
  if (cut_early) {
    absl::StrAppendFormat(
        &d.evidence,
        "; the LR was cut %.3gx at step %d while the loss was still %.0f%% of "
        "its initial level",
        lr_drop_factor_, lr_drop_step_,
        100.0 * std::exp(lr_drop_level_ - log_l0_));
  }
  Emit(std::move(d), out);
}

void CurveAnalyzer::Impl::CheckConstantLoss(const StepRecord& rec,
                                            std::vector<Diagnosis>* out) {
  if (rec.loss == const_value_) {
    ++const_run_;
  } else {
    const_value_ = rec.loss;
    const_run_ = 1;
    const_start_ = rec.step;
  }
  if (const_run_ != options_.stagnation_constant_points || diverged_ ||
      IsActive(DiagnosisKind::kStagnation) || std::isnan(l0_) ||
      rec.loss < options_.stagnation_constant_min_fraction * l0_) {
    return;
  }
  Diagnosis d;
  d.kind = DiagnosisKind::kStagnation;
  d.step = rec.step;
  d.onset = const_start_;
  d.severity = 1.0;
  d.confidence = 0.95;
  d.loss_at_onset = rec.loss;
  d.best_loss = std::isfinite(best_level_) ? std::exp(best_level_) : rec.loss;
  d.lr_at_onset = lr_;
  d.evidence = absl::StrFormat(
      "loss has been exactly %.6g for %d points since step %d: the model's "
      "output no longer changes",
      rec.loss, const_run_, const_start_);
  Emit(std::move(d), out);
}

// Oscillation: in consecutive windows, the EMA-smoothed loss swings about its
// trend far more than minibatch noise explains, both in log terms and
// relative to the task's initial loss, while the loss makes no net progress.
void CurveAnalyzer::Impl::OnOscillationPoint(const StepRecord& rec,
                                             std::vector<Diagnosis>* out) {
  const double alpha = 2.0 / (options_.oscillation_ema_span + 1.0);
  osc_ema_ = std::isnan(osc_ema_) ? rec.loss
                                  : osc_ema_ + alpha * (rec.loss - osc_ema_);
  if (std::isnan(l0_)) return;
  if (osc_points_ == 0) osc_window_start_ = rec.step;
  const double t = static_cast<double>(osc_points_);
  osc_log_.Add(t, LogLoss(osc_ema_));
  osc_rel_.Add(t, osc_ema_ / l0_);
  if (++osc_points_ < options_.oscillation_window) return;

  const double log_std = osc_log_.ResidualStd();
  const double rel_std = osc_rel_.ResidualStd();
  osc_log_stds_.Push(log_std);
  const double swing = std::sqrt(log_std * rel_std);
  const double mean = osc_log_.MeanY();
  osc_log_.Reset();
  osc_rel_.Reset();
  osc_points_ = 0;
  const bool swinging = swing > options_.oscillation_swing &&
                        log_std > options_.oscillation_min_log_std &&
                        rel_std > options_.oscillation_min_rel_std;
  // Bit history of the latest windows: bit 0 is this window.
  osc_history_ = (osc_history_ << 1) | (swinging ? 1u : 0u);
  const int recent = std::clamp(options_.oscillation_recent_windows, 1, 31);
  const uint32_t mask = (1u << recent) - 1;
  const int flagged = std::popcount(osc_history_ & mask);
  if (flagged == 0) {
    osc_means_.Push(mean);
    Clear(DiagnosisKind::kOscillation);
    osc_streak_ = false;
    return;
  }
  osc_means_.Push(mean);
  if (swinging && !osc_streak_) {
    osc_streak_ = true;
    osc_run_start_ = osc_window_start_;
  }
  // A pending divergence rise is a lasting rise in the making, not a swing.
  if (!swinging || flagged < options_.oscillation_confirm_windows ||
      IsActive(DiagnosisKind::kOscillation) || diverged_ || rise_blocks_ > 0) {
    return;
  }
  // Net progress across the recent windows.
  const size_t back = std::min<size_t>(recent - 1, osc_means_.size() - 1);
  const double progress = osc_means_.FromBack(back) - mean;
  if (std::fabs(progress) > std::log(options_.oscillation_progress_factor)) {
    return;
  }

  Diagnosis d;
  d.kind = DiagnosisKind::kOscillation;
  d.step = rec.step;
  d.onset = osc_run_start_;
  d.severity = Clamp01(swing / (4.0 * options_.oscillation_swing));
  d.confidence = Clamp01(0.5 + 0.25 * (swing / options_.oscillation_swing - 1));
  d.loss_at_onset = std::exp(mean);
  d.best_loss = std::isfinite(best_level_) ? std::exp(best_level_) : kNaN;
  d.lr_at_onset = lr_;
  d.evidence = absl::StrFormat(
      "%d of the last %d windows of %d steps swing since step %d: the EMA(%g) "
      "loss varies about its trend with std %.2f in log-loss and %.3f of the "
      "initial loss %.4g (swing %.3f, threshold %.3f); net change %+.0f%%",
      flagged, recent, options_.oscillation_window, osc_run_start_,
      options_.oscillation_ema_span, log_std, rel_std, l0_, swing,
      options_.oscillation_swing, 100.0 * (std::exp(-progress) - 1.0));
  Emit(std::move(d), out);
}

// Overfitting: the smoothed validation loss has passed its minimum and risen
// clearly above it on consecutive evaluations while the training loss keeps
// falling.
void CurveAnalyzer::Impl::OnValLoss(const StepRecord& rec,
                                    std::vector<Diagnosis>* out) {
  const double v = std::log(std::max(*rec.val_loss, 1e-300));
  // Second differences cancel a linear trend, leaving the evaluation noise:
  // sd(v[k] - 2 v[k-1] + v[k-2]) = sqrt(6) sigma.
  if (std::isfinite(prev_val_log2_)) {
    val_noise_.Add((v - 2.0 * prev_val_log_ + prev_val_log2_) / std::sqrt(3.0));
  }
  prev_val_log2_ = prev_val_log_;
  prev_val_log_ = v;
  const int keep = std::clamp(options_.overfit_smooth_points, 1,
                              static_cast<int>(val_recent_.size()));
  val_recent_[val_count_ % keep] = v;
  ++val_count_;
  const int n = std::min(val_count_, keep);
  scratch_.assign(val_recent_.begin(), val_recent_.begin() + n);
  const double smoothed = MedianInPlace(scratch_);
  const double train = std::isfinite(smoothed_level_) ? smoothed_level_
                                                      : prev_log_loss_;
  val_rising_ = (val_count_ > 1 && smoothed > prev_val_smoothed_)
                    ? val_rising_ + 1
                    : 0;
  prev_val_smoothed_ = smoothed;
  if (smoothed < val_min_) {
    val_min_ = smoothed;
    val_min_step_ = rec.step;
    val_min_train_ = train;
    val_min_lr_ = lr_;
    val_rise_points_ = 0;
    return;
  }
  if (IsActive(DiagnosisKind::kOverfitting) || diverged_) return;
  const double noise = val_noise_.count() >= 3 ? val_noise_.Sigma() : 0.0;
  const double margin =
      std::max(std::log1p(options_.overfit_rise_fraction),
               options_.overfit_rise_sigmas * noise / std::sqrt(2.0));
  const double rise = smoothed - val_min_;
  const bool train_ok =
      !std::isfinite(val_min_train_) || !std::isfinite(train) ||
      train - val_min_train_ <= std::log(options_.overfit_train_rise_factor);
  const bool steady_climb =
      val_rising_ >= options_.overfit_trend_points &&
      rise > std::log1p(options_.overfit_trend_rise_fraction);
  // A validation rise while the LR climbs is the LR's doing, not overfitting.
  const bool lr_rose = !std::isnan(val_min_lr_) && !std::isnan(lr_) &&
                       lr_ > val_min_lr_ * options_.stagnation_lr_rise;
  if ((rise > margin || steady_climb) && train_ok && !lr_rose) {
    ++val_rise_points_;
  } else {
    val_rise_points_ = 0;
  }
  if (val_rise_points_ < options_.overfit_confirm_points) return;

  Diagnosis d;
  d.kind = DiagnosisKind::kOverfitting;
  d.step = rec.step;
  d.onset = val_min_step_;
  d.severity = Clamp01((std::exp(rise) - 1.0) / 0.5);
  d.confidence = Clamp01(0.5 + 0.5 * (rise - margin) / margin);
  d.loss_at_onset = std::exp(val_min_);
  d.best_loss = std::exp(val_min_);
  d.lr_at_onset = lr_;
  d.evidence = absl::StrFormat(
      "validation loss (median of %d evals) rose %+.1f%% above its minimum "
      "%.4g at step %d (margin %.1f%%) while training loss went from %.4g to "
      "%.4g",
      keep, 100.0 * (std::exp(rise) - 1.0), std::exp(val_min_), val_min_step_,
      100.0 * (std::exp(margin) - 1.0),
      std::isfinite(val_min_train_) ? std::exp(val_min_train_) : kNaN,
      std::isfinite(train) ? std::exp(train) : kNaN);
  Emit(std::move(d), out);
}

// Gradient explosion: the gradient norm jumps far above its robust recent
// level (EMA of log norm, outliers winsorized so they don't drag it up).
void CurveAnalyzer::Impl::OnGradNorm(const StepRecord& rec,
                                     std::vector<Diagnosis>* out) {
  const double g = *rec.grad_norm;
  if (!std::isfinite(g)) {
    if (options_.nonfinite_grad_norm_is_divergence) {
      OnNonFinite(rec, "gradient norm", g, out);
    }
    return;
  }
  if (g <= 0) return;
  const double x = std::log(g);
  const double alpha = 2.0 / (options_.grad_ema_span + 1.0);
  ++grad_points_;
  if (std::isnan(grad_level_)) {
    grad_level_ = x;
    return;
  }
  const double dev = x - grad_level_;
  const double sigma = grad_noise_.Sigma();
  const double threshold =
      std::max(std::log(options_.grad_explosion_factor),
               options_.grad_explosion_sigmas * sigma);
  const bool judged = grad_points_ > options_.grad_min_points;
  if (judged && dev > threshold) {
    if (!grad_exploding_) {
      grad_exploding_ = true;
      Diagnosis d;
      d.kind = DiagnosisKind::kGradientExplosion;
      d.step = rec.step;
      d.onset = rec.step;
      d.severity = Clamp01(dev / std::log(1e4));
      d.confidence = Clamp01(0.5 + 0.5 * (dev - threshold) / threshold);
      d.loss_at_onset = rec.loss;
      d.best_loss = std::isfinite(best_level_) ? std::exp(best_level_) : kNaN;
      d.lr_at_onset = lr_;
      d.grad_norm_level = std::exp(grad_level_);
      d.evidence = absl::StrFormat(
          "gradient norm %.4g is %.1fx its robust level %.4g (threshold "
          "%.1fx, %.1f robust sd)",
          g, std::exp(dev), std::exp(grad_level_), std::exp(threshold),
          sigma > 0 ? dev / sigma : kInf);
      Emit(std::move(d), out);
    }
  } else if (dev < 0.5 * threshold) {
    if (grad_exploding_) Clear(DiagnosisKind::kGradientExplosion);
    grad_exploding_ = false;
  }
  // Winsorized update keeps one explosion from becoming the new normal.
  const double clip = 3.0 * std::max(sigma, 1e-3);
  const double step = std::clamp(dev, -clip, clip);
  grad_noise_.Add(dev);
  grad_level_ += alpha * step;
}

CurveAnalyzer::CurveAnalyzer(const AnalyzerOptions& options)
    : impl_(std::make_unique<Impl>(options)) {}
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
