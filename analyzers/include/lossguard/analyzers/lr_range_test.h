#ifndef LOSSGUARD_ANALYZERS_LR_RANGE_TEST_H_
#define LOSSGUARD_ANALYZERS_LR_RANGE_TEST_H_

#include <span>
#include <string>

#include "absl/status/statusor.h"

namespace lossguard::analyzers {

// Options of the LR range test analysis (Smith 2015/2017, "LR finder").
//
// The curve is read against x = log10(lr). Windows are given in decades of
// LR, so the defaults do not depend on how many steps the test took per
// decade; for a sparse test they widen to hold a minimum number of points.
// Thresholds on the loss are relative (to the best loss, to the steepest
// slope, to the local noise), so they serve a loss of 0.01 and one of 10.
struct LrRangeTestOptions {
  // --- input ---
  // Fewest finite points (before the first non-finite loss) that are
  // analysed; fewer is InvalidArgument. Below this the smoothing windows
  // hold only a handful of points.
  int min_points = 20;
  // Points closer than this in log10(lr) are pooled before the analysis:
  // the points in each bin [m, m + 1) * pool_decades become one, at their
  // mean log10(lr), with their median loss (and a variance to match, for the
  // standard errors). A test that steps more than this per point, as
  // exponential range tests do (x1.06 = 0.025 decade), is analysed point by
  // point; a dense one (a linear ramp, thousands of points per decade) costs
  // no more than ~100 points per decade, while its extra points still narrow
  // the noise of each bin. The noise sigma is still measured on the points.
  double pool_decades = 0.01;

  // --- smoothing ---
  // Full width, in decades of LR, of the running median applied to the raw
  // minibatch losses first. It removes single-batch spikes without the lag
  // of an EMA. 0.1 decade = 2 points either side at the usual x1.06 step.
  double median_window_decades = 0.1;
  // The running median reaches at least (min_median_points - 1) / 2
  // neighbours on either side (for sparse tests), whatever
  // `median_window_decades` says. 5: one spike among them never moves the
  // median, even at the ends of the curve where the window is one-sided.
  int min_median_points = 5;
  // Half-width, in decades, of the tricube-weighted local linear fit of the
  // median-filtered loss against log10(lr) that gives the smoothed loss and
  // its slope. Half a decade in all: narrow enough to resolve a descent one
  // decade wide, wide enough to average ~20 points at the x1.06 step.
  double fit_half_width_decades = 0.25;
  // The local fit gives a non-zero weight to at least
  // (min_fit_points - 1) / 2 neighbours on either side (for sparse tests).
  int min_fit_points = 11;
  // Half-width, in decades, of the window over which the local noise of the
  // raw losses (robust sigma of their residuals around the smoothed loss)
  // is measured for the standard errors; at least the fit's half-width. A
  // decade in all holds ~40 points at the x1.06 step, so sigma is itself
  // steady, while the noise may still change along the curve.
  double noise_half_width_decades = 0.5;

  // --- divergence ---
  // The usable curve ends at the first non-finite loss, or where the
  // running-median loss rises above this factor times its best value so far
  // and stays above it to the end (fastai and Lightning stop their range
  // tests at 4x the best smoothed loss). For a non-positive best loss the
  // factor applies to the drop from the start.
  double divergence_factor = 4.0;

  // --- descent and steepest-descent region ---
  // Descents are found by hysteresis, as edges are in images: a descent is
  // seeded by a point whose slope is at least this many standard errors
  // below zero (standard error from the local robust noise of the raw
  // losses; not within a half-window of either end, where the fit is
  // one-sided), so minibatch noise in a flat stretch rarely seeds one...
  double slope_sigmas = 3.0;
  // ...and grows over neighbours whose slope is at least this many standard
  // errors below zero; a gap narrower than the fit's half-width after which
  // the loss is lower is filled. One noisy point does not split a descent.
  double extend_sigmas = 1.0;
  // A descent's drop in smoothed loss must be at least this many standard
  // errors. The largest of the many noise-only stretches a long flat curve
  // holds is ~3-4 standard errors; 5 leaves them out (1 flat noisy curve in
  // 300 gave a suggestion in a synthetic check), while a real descent is
  // tens of standard errors.
  double drop_sigmas = 5.0;
  // ...and at least this fraction of the loss at its start. Of the descents
  // that pass, the one with the largest drop is kept.
  double min_relative_drop = 0.02;
  // The steepest-descent region is the part of that descent, around its
  // steepest point, whose slope is at least this fraction of the steepest.
  // 0.1 keeps the part of a sigmoidal drop that holds ~95% of the fall and
  // leaves out its gentle tails.
  double steep_fraction = 0.1;

  // --- the loss minimum ---
  // The basin of the smoothed-loss minimum: the LRs around it where the
  // smoothed loss is above its minimum by at most this fraction of the
  // descent's drop...
  double basin_fraction = 0.05;
  // ...plus this many standard errors of the difference: the minimum of a
  // flat noisy bottom is itself a low draw, ~2 standard errors below the
  // bottom's level for the handful of independent fits a decade holds. The
  // basin's geometric middle stands for where the loss stops falling; a
  // flat bottom's argmin alone is wherever the noise puts it.
  double basin_sigmas = 2.0;
};

// The suggestion drawn from one range-test curve.
struct LrSuggestion {
  double suggested_lr = 0.0;  // the initial LR to train with
  double steep_lo_lr = 0.0;   // steepest-descent region, lower LR
  double steep_hi_lr = 0.0;   // steepest-descent region, upper LR
  double steep_mid_lr = 0.0;  // its geometric middle
  double min_loss_lr = 0.0;   // LR at the smoothed-loss minimum
  double basin_lo_lr = 0.0;   // the minimum's basin (basin_fraction), lower LR
  double basin_hi_lr = 0.0;   // ... upper LR
  double basin_mid_lr = 0.0;  // its geometric middle
  double diverge_lr = 0.0;    // LR where the loss blew up (0 if it did not)
  int points_used = 0;        // finite points analysed
  std::string evidence;       // words with the numbers behind them

  double steepest_lr = 0.0;                // LR of the steepest slope
  double steepest_slope_per_decade = 0.0;  // d(smoothed loss)/d log10(lr)
  double region_start_loss = 0.0;          // smoothed loss at steep_lo_lr
  double region_end_loss = 0.0;            // smoothed loss at steep_hi_lr
  // True when the smoothed loss is lowest at the last usable point: the test
  // ended before the loss turned, so the region may reach further.
  bool still_descending = false;
};

// Suggests the initial LR from a range test: `lrs` grows exponentially,
// `losses[i]` is the minibatch loss at `lrs[i]`. Non-finite losses end the
// usable part of the curve.
//
// Method: points closer than `pool_decades` are pooled (median loss), so the
// cost is O(n log n) however densely the LR is sampled. Then a running
// median of the losses, then a tricube local linear fit
// against log10(lr) gives the smoothed loss and its slope per decade, with
// standard errors from the local robust noise. The curve is cut where the
// loss blows up. Before the smoothed-loss minimum, the stretches where the
// slope is significantly negative (hysteresis: seeded at `slope_sigmas`,
// grown at `extend_sigmas`) are the candidate descents; the one with the
// largest significant drop is kept. Its steepest-descent region is the part
// around its steepest point where the slope is at least `steep_fraction` of
// the steepest. The suggestion is the geometric middle between that
// region's geometric middle and the middle of the loss minimum's basin
// (`basin_fraction`).
//
// Why between the two: the steepest descent marks the LRs at which the
// test's few steps per LR (~18 at x1.06 per step) make the most progress;
// a run spends thousands of steps at one LR and trains best at a larger
// one, short of where the loss stops falling (Smith's maximum LR; the LR
// at the minimum / 3 to / 10 is the other classic rule). On 23 range tests
// with swept best LRs (README, "LR suggestions") the steep region's middle
// lies 0.56 decades below the best LR on average and the minimum's basin
// 0.61 above; the middle between them is 0.02 above (mean error 0.40
// decades, fastai's valley 0.63).
//
// Errors: InvalidArgument if the options are out of range, the inputs differ
// in length, an LR is not finite and positive, the LR does not strictly
// grow, or fewer than `options.min_points` finite losses precede the first
// non-finite one. FailedPrecondition if the curve has no usable descent
// (flat, only rising, a descent within noise or under `min_relative_drop`,
// or blown up before `min_points` points): no suggestion is guessed, and the
// message gives the numbers.
//
// Thread-safety: a pure function; safe to call concurrently.
absl::StatusOr<LrSuggestion> SuggestLearningRate(
    std::span<const double> lrs, std::span<const double> losses,
    const LrRangeTestOptions& options = LrRangeTestOptions());

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_LR_RANGE_TEST_H_
