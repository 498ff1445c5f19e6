#include "analyzers/src/loss_track.h"

#include <algorithm>
#include <cmath>

namespace lossguard::analyzers {
namespace {

// Losses below this fraction of the initial loss are clamped before taking
// logs, so a loss of exactly 0 stays finite in log space.
constexpr double kLogFloorFraction = 1e-12;

}  // namespace

LossTrack::LossTrack(const AnalyzerOptions& options)
    : options_(options),
      blocks_(static_cast<size_t>(std::max(8, options.history_blocks))) {
  init_losses_.reserve(options_.initial_points);
  block_values_.reserve(options_.max_block_points);
}

double LossTrack::LogLoss(double loss) const {
  const double floor = (std::isfinite(l0_) ? l0_ : 1.0) * kLogFloorFraction;
  return std::log(std::max(loss, floor));
}

void LossTrack::ObserveLr(const StepRecord& rec) {
  if (std::isnan(rec.lr)) return;
  const double prev = lr_;
  lr_ = rec.lr;
  max_lr_ = std::max(max_lr_, lr_);
  if (std::isnan(prev)) return;
  if (prev > 0 && lr_ > prev * options_.restart_lr_jump &&
      lr_ >= 0.5 * max_lr_) {
    restart_pending_ = true;
  }
  if (lr_ > 0 && prev > lr_ * options_.stagnation_lr_drop) {
    lr_drop_step_ = rec.step;
    lr_drop_level_ = smoothed_level_;
    lr_drop_factor_ = prev / lr_;
  }
}

bool LossTrack::AddLoss(const StepRecord& rec) {
  ++finite_points_;
  // L0 comes from positive losses only: a log of zero (or a loss that can
  // go negative, like some NLLs) says nothing about the task's scale.
  if (std::isnan(l0_) && rec.loss > 0) {
    init_losses_.push_back(rec.loss);
    if (static_cast<int>(init_losses_.size()) >= options_.initial_points) {
      // The median resists a spike among the first points; but when most of
      // them blew up (an LR so large the first updates explode), only the
      // first loss, computed before any update, is the untrained model's.
      const double first = init_losses_.front();
      double l0 = Median(init_losses_);
      if (l0 > options_.initial_blowup_factor * first) l0 = first;
      l0_ = std::max(l0, 1e-300);
      log_l0_ = std::log(l0_);
    }
  }
  // Levels live in log space with losses clamped at 1e-12 L0, so a loss of
  // zero (or below) is "as low as it gets". Before L0 is known there is no
  // such scale, and zeros at the very start are a logging artefact: they
  // count as seen but do not move the levels.
  if (rec.loss <= 0 && std::isnan(l0_)) return false;
  const double y = LogLoss(rec.loss);
  if (std::isfinite(prev_log_loss_)) point_noise_.Add(y - prev_log_loss_);
  prev_log_loss_ = y;

  if (block_values_.empty()) block_first_step_ = rec.step;
  block_values_.push_back(y);
  if (static_cast<int>(block_values_.size()) < block_size_) return false;

  Block b;
  b.first_step = block_first_step_;
  b.last_step = rec.step;
  b.points = static_cast<int>(block_values_.size());
  b.level = MedianInPlace(block_values_);
  b.lr = lr_;
  block_values_.clear();
  blocks_.Push(b);
  // Next block's length: the run so far in `blocks_per_run` blocks.
  const int64_t target = finite_points_ / std::max(1, options_.blocks_per_run);
  int size = 1;
  while (size * 2 <= target && size * 2 <= options_.max_block_points) {
    size *= 2;
  }
  block_size_ = std::max(block_size_, size);

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
  return true;
}

}  // namespace lossguard::analyzers
