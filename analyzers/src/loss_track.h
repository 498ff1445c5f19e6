#ifndef LOSSGUARD_ANALYZERS_SRC_LOSS_TRACK_H_
#define LOSSGUARD_ANALYZERS_SRC_LOSS_TRACK_H_

#include <cstdint>
#include <vector>

#include "analyzers/src/common.h"
#include "analyzers/src/ring_buffer.h"
#include "analyzers/src/robust.h"
#include "lossguard/analyzers/options.h"
#include "lossguard/analyzers/types.h"

namespace lossguard::analyzers {

// One block of consecutive finite training-loss points.
struct Block {
  int64_t first_step = 0;
  int64_t last_step = 0;
  int points = 0;
  double level = 0.0;  // median log-loss of the block
  double lr = kNaN;    // LR at the block's last point
};

// The signals every detector reads: the learning rate and its events, the
// initial loss L0, the block summary of the training loss and its smoothed
// level, and the per-point noise of the log-loss. Bounded memory.
//
// Not thread-safe; owned by one CurveAnalyzer.
class LossTrack {
 public:
  explicit LossTrack(const AnalyzerOptions& options);

  LossTrack(const LossTrack&) = delete;
  LossTrack& operator=(const LossTrack&) = delete;

  // Call for every accepted step, before AddLoss.
  void ObserveLr(const StepRecord& rec);
  // Adds a finite loss. Returns true when it closed a block. Losses <= 0
  // before L0 is known count towards finite_points() but not the levels.
  bool AddLoss(const StepRecord& rec);

  // log(loss) with losses clamped at 1e-12 L0, so a loss of 0 stays finite.
  double LogLoss(double loss) const;

  bool has_l0() const { return !std::isnan(l0_); }
  double l0() const { return l0_; }
  double log_l0() const { return log_l0_; }
  int64_t finite_points() const { return finite_points_; }
  double last_log_loss() const { return prev_log_loss_; }
  double point_sigma() const { return point_noise_.Sigma(); }

  const RingBuffer<Block>& blocks() const { return blocks_; }
  const Block& last_block() const { return blocks_.FromBack(0); }
  // Median of the latest block levels covering `level_median_blocks` blocks
  // and `level_median_points` points; NaN before the first block.
  double smoothed_level() const { return smoothed_level_; }
  int smoothed_points() const { return smoothed_points_; }

  double lr() const { return lr_; }  // NaN when no LR was logged
  // True once after an LR jump up (a warm restart); TakeRestart() clears it.
  bool restart_pending() const { return restart_pending_; }
  void TakeRestart() { restart_pending_ = false; }
  // The latest abrupt LR cut (-1 if none), the smoothed level when it came,
  // and its factor.
  int64_t lr_drop_step() const { return lr_drop_step_; }
  double lr_drop_level() const { return lr_drop_level_; }
  double lr_drop_factor() const { return lr_drop_factor_; }

 private:
  const AnalyzerOptions& options_;

  double lr_ = kNaN;
  double max_lr_ = 0.0;
  bool restart_pending_ = false;
  int64_t lr_drop_step_ = -1;
  double lr_drop_level_ = kNaN;
  double lr_drop_factor_ = 1.0;

  std::vector<double> init_losses_;
  double l0_ = kNaN;
  double log_l0_ = kNaN;
  int64_t finite_points_ = 0;
  RobustScale point_noise_;
  double prev_log_loss_ = kNaN;

  std::vector<double> block_values_;
  int64_t block_first_step_ = 0;
  int block_size_ = 1;
  RingBuffer<Block> blocks_;
  double smoothed_level_ = kNaN;
  int smoothed_points_ = 0;
  std::vector<double> scratch_;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_SRC_LOSS_TRACK_H_
