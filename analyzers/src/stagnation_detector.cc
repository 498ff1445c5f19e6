#include "analyzers/src/stagnation_detector.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_format.h"

namespace lossguard::analyzers {
namespace {

// The value of the last decimal digit of `x` as written with the fewest
// decimals that reproduce it (0.33 -> 0.01, 0.6931 -> 0.0001); a value that
// needs more than 12 decimals counts as exact (0).
double PrintResolution(double x) {
  double scale = 1.0;
  for (int d = 0; d <= 12; ++d, scale *= 10.0) {
    const double y = x * scale;
    if (std::fabs(y - std::round(y)) <= 1e-9 * std::max(1.0, std::fabs(y))) {
      return 1.0 / scale;
    }
  }
  return 0.0;
}

}  // namespace

void StagnationDetector::OnPoint(const StepRecord& rec, const LossTrack& track,
                                 bool diverged, double best_level,
                                 Findings* findings) {
  if (track.has_l0() && rec.loss >= options_.stagnation_blowup_factor * track.l0()) {
    blown_up_ = true;
  }
  if (rec.loss == const_value_) {
    ++const_run_;
  } else {
    const_value_ = rec.loss;
    const_run_ = 1;
    const_start_ = rec.step;
    const_lr_ = track.lr();
  }
  if (const_run_ != options_.stagnation_constant_points || diverged ||
      findings->IsActive(DiagnosisKind::kStagnation) || !track.has_l0() ||
      rec.loss < options_.stagnation_constant_min_fraction * track.l0() ||
      PrintResolution(rec.loss) >
          options_.stagnation_constant_max_resolution * rec.loss) {
    return;
  }
  Diagnosis d;
  d.kind = DiagnosisKind::kStagnation;
  d.step = rec.step;
  d.onset = const_start_;
  d.severity = 1.0;
  d.confidence = 0.95;
  d.loss_at_onset = rec.loss;
  d.best_loss = std::isfinite(best_level) ? std::exp(best_level) : rec.loss;
  d.lr_at_onset = const_lr_;
  reported_level_ = track.LogLoss(rec.loss);
  d.evidence = absl::StrFormat(
      "loss has been exactly %.6g for %d points since step %d: the model's "
      "output no longer changes",
      rec.loss, const_run_, const_start_);
  findings->Report(std::move(d));
}

void StagnationDetector::OnBlock(const LossTrack& track, bool diverged,
                                 double best_level, int64_t since_points,
                                 Findings* findings) {
  const int64_t seen = track.finite_points();
  const int64_t since =
      std::min({seen, since_points, seen - afresh_from_points_});
  const int min_points = blown_up_ ? std::min(options_.stagnation_min_points,
                                              options_.stagnation_min_points_after_blowup)
                                   : options_.stagnation_min_points;
  // Strong evidence may be judged from `stagnation_min_points_strong`
  // points on (see the minimum below).
  if (diverged ||
      since < std::min(min_points, options_.stagnation_min_points_strong)) {
    return;
  }
  // The window spans up to `history_blocks` blocks; judging it every
  // 1/kChecksPerWindow of its length keeps the amortized cost per step
  // constant however long the run.
  if (++blocks_since_check_ < last_window_blocks_ / kChecksPerWindow) return;
  blocks_since_check_ = 0;
  const int64_t window_points = std::min(
      since, static_cast<int64_t>(options_.stagnation_window_fraction *
                                  static_cast<double>(seen)));
  // Walk back over whole blocks covering the window.
  const RingBuffer<Block>& blocks = track.blocks();
  int nblocks = 0;
  int64_t covered = 0;
  while (nblocks < static_cast<int>(blocks.size()) &&
         covered < window_points) {
    covered += blocks.FromBack(nblocks).points;
    ++nblocks;
  }
  last_window_blocks_ = nblocks;
  if (nblocks < 3) return;
  const Block& first = blocks.FromBack(nblocks - 1);
  const int third = std::max(1, nblocks / 3);
  scratch_.clear();
  for (int i = nblocks - 1; i > nblocks - 1 - third; --i) {
    scratch_.push_back(blocks.FromBack(i).level);
  }
  const double head = MedianInPlace(scratch_);
  scratch_.clear();
  for (int i = 0; i < third; ++i) scratch_.push_back(blocks.FromBack(i).level);
  const double tail = MedianInPlace(scratch_);
  // Log-loss fallen across the window. Falling back towards the initial
  // loss after a blow-up is not progress: the head counts from L0 at most.
  const double progress = std::min(head, track.log_l0()) - tail;
  if (findings->IsActive(DiagnosisKind::kStagnation)) {
    const double lr_now = track.lr();
    // The LR moved by the rearm factor either way since the report: the
    // remedy was applied (a raise for a starved run, a cut for a damaged
    // one).
    const bool moved =
        std::isfinite(reported_lr_) && std::isfinite(lr_now) && lr_now > 0 &&
        (lr_now >= reported_lr_ * options_.stagnation_rearm_lr_rise ||
         lr_now * options_.stagnation_rearm_lr_rise <= reported_lr_);
    if (tail < reported_level_ + std::log1p(-options_.stagnation_clear_fall) ||
        moved) {
      // Progress, or the remedy was applied: judged afresh, so a run still
      // stagnant at the new LR is reported again once the evidence holds
      // at that LR.
      findings->Clear(DiagnosisKind::kStagnation);
      candidate_since_ = -1;
      // After the remedy the points before it say nothing about the new
      // LR (or, after a rollback, about the restored weights).
      if (moved) afresh_from_points_ = seen;
    }
    return;
  }
  // Distance between the centres of the head and tail thirds, in points.
  const double span = static_cast<double>(covered) * (1.0 - 1.0 / 3.0);
  const double halving_points =
      progress > 0 ? std::log(2.0) * span / progress : kInf;
  const double halving_ratio = halving_points / static_cast<double>(seen);
  const double lr = track.lr();
  const bool lr_rising = !std::isnan(first.lr) && !std::isnan(lr) &&
                         lr > first.lr * options_.stagnation_lr_rise;
  // Not while the LR rises (warmup, a range test): a flat start is expected.
  // Clear progress ends a candidate stretch; a noisy pass does not.
  // Not while the loss climbs across the window by the divergence margin
  // (from the window's own head, uncapped) to above its initial level by
  // that margin too: a loss going that far the wrong way has not stalled,
  // it has diverged, and the divergence detector, still confirming, is the
  // one to judge it. A run already stuck high after a blow-up is flat over
  // its window and still judged here, and so is one that climbed back to
  // its initial loss (a model the LR killed: no progress from the start).
  const double rise_margin = std::log(options_.divergence_rise_factor);
  const bool rising =
      tail - head > rise_margin && tail - track.log_l0() > rise_margin;
  if (lr_rising || rising ||
      halving_ratio < options_.stagnation_halving_ratio *
                          options_.stagnation_progress_fraction) {
    candidate_since_ = -1;
    return;
  }
  if (halving_ratio <= options_.stagnation_halving_ratio) return;
  const double frac_now = std::exp(tail - track.log_l0());
  const double frac_best = std::exp(best_level - track.log_l0());
  const bool near_start = frac_now >= options_.stagnation_initial_fraction &&
                          frac_best >= options_.stagnation_drop_fraction;
  const int64_t drop_step = track.lr_drop_step();
  const bool cut_early =
      drop_step >= 0 && drop_step <= first.first_step &&
      std::isfinite(track.lr_drop_level()) &&
      std::exp(track.lr_drop_level() - track.log_l0()) >=
          options_.stagnation_drop_fraction;
  if (!near_start && !cut_early) {
    candidate_since_ = -1;
    return;
  }
  // Evidence strength: how many times over the window's change stays
  // short of the stagnation threshold even at the top of its noise band.
  // The threshold is the fall that would halve the loss in
  // `stagnation_halving_ratio` x the run so far. The progress is the
  // difference of two medians of a third of the window each; its standard
  // error follows from the per-point noise: a median of m points has sd
  // 1.2533 sigma / sqrt(m), the difference of two sqrt(2) times that, and
  // point_sigma() (the sd of successive differences) is sqrt(2) sigma.
  const double threshold_progress =
      std::log(2.0) * span /
      (options_.stagnation_halving_ratio * static_cast<double>(seen));
  const double third_points =
      std::max(1.0, static_cast<double>(covered) / 3.0);
  const double progress_se =
      1.2533 * track.point_sigma() / std::sqrt(third_points);
  // |progress|: a window that rose says as little for a flat plateau as
  // one that fell (noise, or a loss still settling after a blow-up).
  const double upper = std::fabs(progress) +
                       options_.stagnation_evidence_sigmas * progress_se;
  const double strength =
      std::max(1.0, upper > 0 ? threshold_progress / upper : kInf);
  // A sequential test: the points needed before judging, and the growth
  // the condition must survive, shrink with the strength of the evidence.
  if (static_cast<double>(since) * strength < min_points) return;
  // The growth is counted over the points judged: since the start of the
  // run, or since the remedy or re-arm that started the judgement afresh
  // (a run cut at step 30 and stuck again is not asked to grow 25% over
  // the 30 points before the cut, which say nothing about the new LR).
  const int64_t judged_from = seen - since;
  if (candidate_since_ < judged_from) candidate_since_ = -1;
  if (candidate_since_ < 0) candidate_since_ = seen;
  const double persist =
      1.0 + (options_.stagnation_persist_factor - 1.0) / strength;
  if (static_cast<double>(seen - judged_from) <
      persist * static_cast<double>(candidate_since_ - judged_from)) {
    return;
  }
  reported_level_ = tail;
  reported_lr_ = track.lr();

  const Block& b = track.last_block();
  Diagnosis d;
  d.kind = DiagnosisKind::kStagnation;
  d.step = b.last_step;
  d.onset = cut_early ? drop_step : first.first_step;
  d.severity = Clamp01(frac_now);
  d.confidence = std::isfinite(halving_ratio)
                     ? Clamp01(0.5 + 0.1 * std::log(
                                             halving_ratio /
                                             options_.stagnation_halving_ratio))
                     : 0.95;
  d.loss_at_onset = std::exp(tail);
  d.best_loss = std::exp(best_level);
  // The LR when the stagnant stretch began: a policy compares it with the
  // LR now to tell a schedule still decaying from a constant LR.
  d.lr_at_onset = first.lr;
  const std::string rate =
      std::isfinite(halving_points)
          ? absl::StrFormat("at its rate it would take %.0f more points "
                            "(%.1fx the run so far) to halve",
                            halving_points, halving_ratio)
          : head - track.log_l0() >= std::log(options_.divergence_rise_factor)
              ? std::string(
                    "it only fell back towards the initial loss after "
                    "blowing up, which is no progress")
              : std::string("it did not fall at all");
  d.evidence = absl::StrFormat(
      "smoothed loss went from %.4g to %.4g over the last %d steps (%+.1f%%); "
      "%s; it is %.0f%% of the initial loss %.4g",
      std::exp(head), std::exp(tail), StepSpan(first.first_step, b.last_step),
      100.0 * (std::exp(tail - head) - 1.0), rate, 100.0 * frac_now,
      track.l0());
  if (cut_early) {
    absl::StrAppendFormat(
        &d.evidence,
        "; the LR was cut %.3gx at step %d while the loss was still %.0f%% of "
        "its initial level",
        track.lr_drop_factor(), drop_step,
        100.0 * std::exp(track.lr_drop_level() - track.log_l0()));
  }
  findings->Report(std::move(d));
}

}  // namespace lossguard::analyzers
