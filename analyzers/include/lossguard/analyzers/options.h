#ifndef LOSSGUARD_ANALYZERS_OPTIONS_H_
#define LOSSGUARD_ANALYZERS_OPTIONS_H_

namespace lossguard::analyzers {

// Every threshold of the curve analyzer, with its default. The statistics
// are scale-free (ratios to the run's own initial loss, log-loss, robust
// z-scores) and windows are counted in points, so one set of defaults serves
// loss 0.01 and loss 10, per-step and per-epoch logs.
//
// The training loss is summarised in blocks: a block's level is the median
// log-loss of its points. Blocks start one point long and double in length
// (up to `max_block_points`) whenever the run has seen `blocks_per_run`
// blocks' worth of points, so a 20-point epoch log and a 300,000-step log are
// both seen as a few dozen to a few hundred levels.
struct AnalyzerOptions {
  // --- block summary of the training loss ---------------------------------
  // Target number of blocks covering the run so far.
  int blocks_per_run = 64;
  // Longest block, in points (bounds per-run memory and detection delay).
  int max_block_points = 64;
  // Blocks kept for windowed statistics (memory bound: this many levels).
  int history_blocks = 512;
  // Smoothed level = median of the latest block levels covering at least
  // this many blocks and this many points.
  int level_median_blocks = 3;
  int level_median_points = 16;
  // Initial loss L0 = median of this many first finite, positive losses...
  int initial_points = 5;
  // ...unless that median is more than this factor above the very first
  // loss: then the first updates already blew the loss up (an LR far too
  // large), and L0 is the first loss (the untrained model's, before any
  // update). A healthy run does not raise its loss by 10% in its first
  // steps (an untrained model's loss hardly varies between minibatches);
  // a spike at one of them leaves the median alone. (1.5 let an Adam run
  // at 100x its LR, whose first updates raised the loss 17%, set L0 17%
  // high: stuck at 83% of its true initial loss, it read as 72%, below
  // the 75% stagnation asks, and was never diagnosed.)
  double initial_blowup_factor = 1.1;

  // --- divergence ---------------------------------------------------------
  // A rise counts when the smoothed loss exceeds its best level by this
  // factor...
  double divergence_rise_factor = 1.4;
  // ...and by this many robust standard deviations of the smoothed level...
  double divergence_rise_sigmas = 4.0;
  // ...and by this fraction of the initial loss (a rise from 1e-5 to 1e-4
  // is noise at the scale of the task, not divergence).
  double divergence_min_rise_of_initial = 0.1;
  // The rise must last this many blocks, and this many points or this
  // fraction of the points seen before it began (capped at
  // `divergence_confirm_max_points`), whichever is more, to be "for good"
  // rather than a spike. The points are divided by how many margins the
  // rise clears: a loss that jumps 1000x needs less confirmation than one
  // 1.6x up.
  int divergence_confirm_blocks = 3;
  int divergence_confirm_points = 20;
  double divergence_confirm_fraction = 0.25;
  int divergence_confirm_max_points = 500;
  // While the LR is still climbing past its value at the best level
  // (warmup, a ramp, a range test), nothing will bring the loss back down:
  // the confirmation then needs this many times fewer points.
  double divergence_climbing_lr_speedup = 2.0;
  // A divergence is reported once; a non-finite loss is reported again once
  // the LR has been cut to at most this fraction of the LR at the last
  // divergence: the correction was applied and the run blew up again
  // (still too large an LR), which is news. 0.5 ignores schedule wobble.
  double divergence_rearm_lr_fraction = 0.5;
  // A non-finite gradient norm with a finite loss is a divergence once it
  // has been non-finite on this many consecutive reports. Mixed-precision
  // loss scaling (torch.cuda.amp.GradScaler) overflows and skips a step now
  // and then, and a few in a row at the start while the scale settles; a
  // model whose gradients stay non-finite is not training at all. 1 makes
  // every non-finite norm an immediate divergence. A non-finite loss is
  // always an immediate divergence.
  int nonfinite_grad_norm_points = 8;
  // An LR that jumps up by this factor in one step is a warm restart: the
  // loss may rise for a while without that being divergence.
  double restart_lr_jump = 1.5;
  // After a warm restart the reference level follows the loss up for at most
  // this many blocks.
  int restart_follow_blocks = 6;

  // --- recovered loss spikes (events) --------------------------------------
  // A rise that falls back inside the margin before it is confirmed as
  // divergence is reported as a loss spike when its peak was this factor
  // above the best level.
  double spike_factor = 2.0;

  // --- oscillation ----------------------------------------------------------
  // Points per oscillation window.
  int oscillation_window = 50;
  // EMA span (points) that smooths single-minibatch noise before measuring
  // swings.
  double oscillation_ema_span = 5.0;
  // A window's swing is measured two ways, about its linear trend: the std
  // of the smoothed log-loss (relative swings) and the std of the smoothed
  // loss divided by the initial loss (swings at the scale of the task). The
  // window swings when the geometric mean of the two exceeds this (e.g. 0.5
  // in log-loss with 0.02 of the initial loss, or 0.2 with 0.05)...
  double oscillation_swing = 0.1;
  // ...and each exceeds its floor.
  double oscillation_min_log_std = 0.1;
  double oscillation_min_rel_std = 0.01;
  // Oscillation is reported when this many of the last
  // `oscillation_recent_windows` windows swing...
  int oscillation_confirm_windows = 2;
  int oscillation_recent_windows = 3;
  // ...when, over them, the smoothed loss neither fell nor rose by more
  // than this factor (no net progress, no lasting rise).
  double oscillation_progress_factor = 2.0;
  // A fall counts as net progress only beyond that factor plus this many
  // log-loss swing stds of the latest window: a loss swinging by 2x that
  // drifts down by 2x over the same windows is chiefly swinging, and its
  // swings (not the drift) are what an LR cut would fix. The allowance
  // scales with the effect: a marginal swing gets almost none, a large one
  // is reported while the loss still drifts down. Rises get no allowance
  // (a lasting rise is divergence's to judge). 0 restores the symmetric
  // rule.
  double oscillation_progress_swing_sds = 1.0;
  // A swing under this multiple of `oscillation_swing` is marginal: its
  // report's confidence (0.5 + 0.25 (swing / threshold - 1)) is under 0.6,
  // and on the dev corpus and bench/detect-torch such first reports were
  // right about as often as not. A marginal swing must hold in all
  // `oscillation_recent_windows` windows, not just `confirm_windows` of
  // them. 0 treats every swing alike.
  double oscillation_marginal_swing = 1.4;

  // --- stagnation -----------------------------------------------------------
  // Fewest points before stagnation may be decided...
  int stagnation_min_points = 64;
  // ...or, once the loss has blown up to this many times the initial loss
  // (a blow-up that often leaves a model dead at chance level), this many:
  // a run that jumped 10x and is back at its initial loss is likely
  // damaged, so less evidence of no progress is needed to say so.
  double stagnation_blowup_factor = 10.0;
  int stagnation_min_points_after_blowup = 24;
  // The window examined is this fraction of the points seen so far.
  double stagnation_window_fraction = 0.5;
  // No meaningful progress: at the recent rate the loss would take more than
  // this many times the steps seen so far to halve.
  double stagnation_halving_ratio = 10.0;
  // The condition must hold again after the run has grown by this factor
  // since it first held ("for a long stretch", not one unlucky window)...
  double stagnation_persist_factor = 1.25;
  // Evidence-scaled confirmation (a sequential test: the stronger the
  // evidence, the sooner the decision). Strength s >= 1 is how many times
  // the window's |change| plus this many standard errors of it (a
  // one-sided 97.7% bound at 2) falls short of the stagnation threshold;
  // s = 1 for a marginal case (or a noisy one). The factor's
  // excess over 1 is divided by s, and so is `stagnation_min_points`, down
  // to `stagnation_min_points_strong`: a loss flat well within its noise
  // band is decided at once, a marginal one waits as long as before.
  double stagnation_evidence_sigmas = 2.0;
  // The fewest points for any evidence: a window of 24 points (half the
  // run), thirds of 8 points whose medians shrug off 3 outliers each. A
  // floor, because a start that is slow but real (a few % down in the
  // first 50 steps) is the one case no noise bound tells from a plateau;
  // 32 and 40 gave the same dev-corpus figures, 48 is the cautious choice.
  int stagnation_min_points_strong = 48;
  // ...without clear progress in between: a halving time below this
  // fraction of the threshold.
  double stagnation_progress_fraction = 0.5;
  // An active stagnation clears once the smoothed loss has fallen this
  // fraction below its level when reported...
  double stagnation_clear_fall = 0.1;
  // ...or once the LR has moved this factor above or below the LR when
  // reported (the remedy was applied: a raise for a starved run, a cut for
  // one damaged by too large an LR): the run is then judged afresh at its
  // new LR and reported again if it still stagnates, so it can get a
  // second remedy. 2 ignores schedule wobble.
  double stagnation_rearm_lr_rise = 2.0;
  // Far from converged, case 1: the loss is still above this fraction of
  // its initial level.
  double stagnation_initial_fraction = 0.75;
  // Far from converged, case 2: the LR was cut by at least this factor in
  // one step...
  double stagnation_lr_drop = 4.0;
  // ...while the loss was still above this fraction of its initial level
  // (the LR decayed before the loss had even halved).
  double stagnation_drop_fraction = 0.5;
  // The LR rising by this factor over the window (warmup, range test)
  // suppresses stagnation; since the validation minimum, overfitting.
  double stagnation_lr_rise = 1.2;
  // This many identical finite losses in a row, at a loss of at least
  // `stagnation_constant_min_fraction` of the initial loss, mean a dead
  // model...
  int stagnation_constant_points = 10;
  double stagnation_constant_min_fraction = 0.1;
  // ...unless the value is printed so coarsely (its last decimal digit is
  // worth more than this fraction of it) that a live loss could repeat too.
  double stagnation_constant_max_resolution = 1e-3;

  // --- overfitting ----------------------------------------------------------
  // The validation loss is judged in log space against its own evaluation
  // noise sigma: the median absolute second difference of the last this many
  // evaluations (a second difference cancels a linear trend, the median
  // ignores the few large ones at the bends of the curve). A low estimate is
  // what lets noise pass for a rise, so the window is long: over 64
  // evaluations the estimate is within ~20% (one sd). At most 64.
  int overfit_noise_points = 64;
  // Validation levels: running medians of the last this many evaluations.
  // The short one follows a clean curve without lag; the long one averages
  // a small validation set's noise down (sd ~0.44 sigma, against ~0.72 sigma
  // for 3) so that a sustained rise can stand out of it. At most 16; 0
  // turns the long level off.
  int overfit_smooth_points = 3;
  int overfit_long_points = 8;
  // A level has risen when it is above its running minimum by
  //   sd z + max(log(1 + overfit_rise_fraction), sd z),
  //   z = overfit_extreme_scale * sqrt(2 ln n),
  // with sd the level's noise and n the evaluations so far. sqrt(2 ln n) is
  // the extreme of n Gaussian draws in sds: the running minimum of a flat
  // noisy level sits about sd z below its true value (the first term), and
  // over n evaluations the level itself strays about sd z above it (the
  // second), so a flat curve stays inside the margin however long the run.
  // The fraction is what "clearly" means once the noise is accounted for: a
  // validation loss 10% worse than its best is worth stopping for, while a
  // converged one may drift a few percent either way in a healthy run.
  double overfit_rise_fraction = 0.10;
  double overfit_extreme_scale = 1.0;
  // A steady climb counts too: the least-squares line through the
  // evaluations after the lowest one has risen since it by the same
  // fraction and by z standard errors of that rise. The line averages all
  // of those evaluations and is not anchored on the lowest (extreme) value,
  // so it sees a slow climb through noise that no single level clears.
  // Every rule must hold on this many consecutive evaluations.
  int overfit_confirm_points = 2;
  // Training loss must not have risen by more than this factor since the
  // validation minimum ("keeps falling").
  double overfit_train_rise_factor = 1.0;

  // --- gradient explosion ---------------------------------------------------
  // EMA span (points) of the robust gradient-norm level.
  double grad_ema_span = 50.0;
  // Explosion: gradient norm this factor above its robust level...
  double grad_explosion_factor = 10.0;
  // ...and this many robust standard deviations (log scale) above it.
  double grad_explosion_sigmas = 6.0;
  // Points of gradient norm needed before explosions are judged.
  int grad_min_points = 20;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_OPTIONS_H_
