#include "lossguard/analyzers/lr_range_test.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace lossguard::analyzers {
namespace {

// 1 / Phi^-1(3/4): turns a median absolute deviation into a normal sigma.
constexpr double kMadToSigma = 1.4826;

// Median of `v`, which it reorders. `v` must not be empty.
double MedianInPlace(std::vector<double>& v) {
  const std::size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + mid, v.end());
  const double upper = v[mid];
  if (v.size() % 2 == 1) return upper;
  const double lower = *std::max_element(v.begin(), v.begin() + mid);
  return 0.5 * (lower + upper);
}

// Half-width of the window around x[i]: `base`, widened where needed to
// reach the `k`-th neighbour on either side (where there is one). `x` is
// increasing.
double WindowHalfWidth(std::span<const double> x, std::size_t i, double base,
                       std::size_t k) {
  const std::size_t left = i >= k ? i - k : 0;
  const std::size_t right = std::min(i + k, x.size() - 1);
  return std::max({base, x[i] - x[left], x[right] - x[i]});
}

// y[i] = median of `values[j]` over the j with |x[j] - x[i]| <= the window
// half-width (`half_width`, or wider to hold `k` neighbours on each side).
std::vector<double> RunningMedian(std::span<const double> x,
                                  std::span<const double> values,
                                  double half_width, std::size_t k) {
  const std::size_t n = x.size();
  std::vector<double> out(n);
  std::vector<double> window;
  for (std::size_t i = 0; i < n; ++i) {
    const double h = WindowHalfWidth(x, i, half_width, k);
    const auto lo = std::lower_bound(x.begin(), x.end(), x[i] - h);
    const auto hi = std::upper_bound(x.begin(), x.end(), x[i] + h);
    window.assign(values.begin() + (lo - x.begin()),
                  values.begin() + (hi - x.begin()));
    out[i] = MedianInPlace(window);
  }
  return out;
}

// The local linear fit at every point: smoothed level and slope per unit of
// x, with their standard errors.
struct LocalFit {
  std::vector<double> level;
  std::vector<double> level_se;
  std::vector<double> slope;
  std::vector<double> slope_se;
};

// Tricube-weighted linear least squares of `y` against `x` in the window
// |x[j] - x[i]| < h around each point, h = `half_width` or wider so that
// `k` - 1 neighbours on each side get a non-zero weight.
//
// Standard errors: the sandwich form of the weighted fit's covariance times
// the local noise sigma of the raw values `raw`, a robust one (MAD of
// raw[j] - level[j]) over the wider window |x[j] - x[i]| <= `noise_half_width`
// so that sigma itself is not noisy. (The fit runs on the median-filtered
// `y`, whose slope has about the variance that the raw-noise formula gives.)
LocalFit FitLocalLinear(std::span<const double> x, std::span<const double> y,
                        std::span<const double> raw, double half_width,
                        std::size_t k, double noise_half_width) {
  const std::size_t n = x.size();
  LocalFit fit;
  fit.level.resize(n);
  fit.slope.resize(n);
  fit.slope_se.resize(n);
  fit.level_se.resize(n);
  std::vector<double> var_level(n);  // the covariance factors
  std::vector<double> var_slope(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double h = WindowHalfWidth(x, i, half_width, k);
    // The window is [lo, hi): |x[j] - x[i]| < h.
    const std::size_t lo = static_cast<std::size_t>(
        std::upper_bound(x.begin(), x.end(), x[i] - h) - x.begin());
    const std::size_t hi = static_cast<std::size_t>(
        std::lower_bound(x.begin(), x.end(), x[i] + h) - x.begin());
    Eigen::Matrix2d normal = Eigen::Matrix2d::Zero();     // sum w a a^T
    Eigen::Matrix2d normal_w2 = Eigen::Matrix2d::Zero();  // sum w^2 a a^T
    Eigen::Vector2d rhs = Eigen::Vector2d::Zero();        // sum w a y
    for (std::size_t j = lo; j < hi; ++j) {
      const double d = x[j] - x[i];
      const double u = std::abs(d) / h;
      const double t = 1.0 - u * u * u;
      const double w = t * t * t;
      const Eigen::Vector2d a(1.0, d);
      normal.noalias() += w * a * a.transpose();
      normal_w2.noalias() += (w * w) * a * a.transpose();
      rhs.noalias() += (w * y[j]) * a;
    }
    // The window holds x[i] and at least one neighbour with a non-zero
    // weight, so `normal` is positive definite; guard anyway.
    if (!(normal.determinant() > 0)) {
      fit.level[i] = y[i];
      fit.slope[i] = 0.0;
      var_level[i] = INFINITY;
      var_slope[i] = INFINITY;
      continue;
    }
    const Eigen::Matrix2d inverse = normal.inverse();
    const Eigen::Vector2d coef = inverse * rhs;
    const Eigen::Matrix2d cov = inverse * normal_w2 * inverse;
    fit.level[i] = coef(0);
    fit.slope[i] = coef(1);
    var_level[i] = std::max(cov(0, 0), 0.0);
    var_slope[i] = std::max(cov(1, 1), 0.0);
  }
  std::vector<double> abs_residuals;
  for (std::size_t i = 0; i < n; ++i) {
    const auto lo =
        std::lower_bound(x.begin(), x.end(), x[i] - noise_half_width);
    const auto hi =
        std::upper_bound(x.begin(), x.end(), x[i] + noise_half_width);
    abs_residuals.clear();
    for (auto it = lo; it != hi; ++it) {
      const std::size_t j = static_cast<std::size_t>(it - x.begin());
      abs_residuals.push_back(std::abs(raw[j] - fit.level[j]));
    }
    const double sigma = kMadToSigma * MedianInPlace(abs_residuals);
    fit.level_se[i] = sigma * std::sqrt(var_level[i]);
    fit.slope_se[i] = sigma * std::sqrt(var_slope[i]);
  }
  return fit;
}

// Fills each gap in `mask` (false points between true ones) that is
// narrower than `width` in x and after which `level` is lower than before
// it: a noisy dip in the slope, not the end of a descent.
void FillNarrowGaps(std::span<const double> x, std::span<const double> level,
                    double width, std::vector<bool>& mask) {
  const std::size_t n = mask.size();
  for (std::size_t i = 1; i < n;) {
    if (mask[i] || !mask[i - 1]) {
      ++i;
      continue;
    }
    std::size_t j = i;  // the gap is [i, j)
    while (j < n && !mask[j]) ++j;
    if (j < n && x[j] - x[i - 1] <= width && level[j] < level[i - 1]) {
      std::fill(mask.begin() + i, mask.begin() + j, true);
    }
    i = j;
  }
}

// The maximal runs [first, last] of true values in `mask`.
std::vector<std::pair<std::size_t, std::size_t>> Runs(
    const std::vector<bool>& mask) {
  std::vector<std::pair<std::size_t, std::size_t>> runs;
  for (std::size_t i = 0; i < mask.size();) {
    if (!mask[i]) {
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j + 1 < mask.size() && mask[j + 1]) ++j;
    runs.emplace_back(i, j);
    i = j + 1;
  }
  return runs;
}

absl::Status ValidateOptions(const LrRangeTestOptions& o) {
  if (o.min_points < 3 || o.min_median_points < 1 || o.min_fit_points < 3 ||
      !(o.median_window_decades >= 0) || !(o.fit_half_width_decades > 0) ||
      !(o.noise_half_width_decades >= 0) || !(o.drop_sigmas >= 0) ||
      !(o.divergence_factor > 1) || !(o.slope_sigmas >= 0) ||
      !(o.extend_sigmas >= 0 && o.extend_sigmas <= o.slope_sigmas) ||
      !(o.steep_fraction >= 0 && o.steep_fraction <= 1) ||
      !(o.min_relative_drop >= 0)) {
    return absl::InvalidArgumentError(
        "LrRangeTestOptions out of range (need min_points >= 3, "
        "min_median_points >= 1, min_fit_points >= 3, windows >= 0 with a "
        "positive fit half-width, divergence_factor > 1, "
        "0 <= extend_sigmas <= slope_sigmas, drop_sigmas >= 0, "
        "steep_fraction in [0, 1], min_relative_drop >= 0)");
  }
  return absl::OkStatus();
}

// Index of the first point from which the running-median loss `y` stays
// blown up to the end: above `factor` times its best value so far (for a
// non-positive best, risen above it by more than (factor - 1) times the drop
// from the start) at every later point, so a noisy low-loss basin that comes
// back is not a blow-up. y.size() if there is none.
std::size_t FindDivergence(std::span<const double> y, double factor) {
  const std::size_t n = y.size();
  std::vector<double> suffix_min(n);
  suffix_min[n - 1] = y[n - 1];
  for (std::size_t i = n - 1; i-- > 0;) {
    suffix_min[i] = std::min(y[i], suffix_min[i + 1]);
  }
  double best = y[0];
  for (std::size_t i = 1; i < n; ++i) {
    best = std::min(best, y[i]);
    const double scale = best > 0 ? best : y[0] - best;
    if (scale > 0 && suffix_min[i] - best > (factor - 1.0) * scale) return i;
  }
  return n;
}

}  // namespace

absl::StatusOr<LrSuggestion> SuggestLearningRate(
    std::span<const double> lrs, std::span<const double> losses,
    const LrRangeTestOptions& options) {
  if (absl::Status s = ValidateOptions(options); !s.ok()) return s;
  if (lrs.size() != losses.size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("lrs and losses differ in length (%d vs %d)",
                        lrs.size(), losses.size()));
  }
  for (std::size_t i = 0; i < lrs.size(); ++i) {
    if (!std::isfinite(lrs[i]) || lrs[i] <= 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "lr[%d] = %g is not a finite positive learning rate", i, lrs[i]));
    }
    if (i > 0 && !(lrs[i] > lrs[i - 1])) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "the learning rate must grow at every step of a range test, but "
          "lr[%d] = %g follows lr[%d] = %g",
          i, lrs[i], i - 1, lrs[i - 1]));
    }
  }

  // The usable curve: up to the first non-finite loss...
  std::size_t n = 0;
  while (n < losses.size() && std::isfinite(losses[n])) ++n;
  if (n < static_cast<std::size_t>(options.min_points)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "only %d finite losses before %s; the range test analysis needs at "
        "least %d",
        n, n < losses.size() ? "the first non-finite one" : "the end",
        options.min_points));
  }
  std::vector<double> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = std::log10(lrs[i]);
  const double median_half = 0.5 * options.median_window_decades;
  const std::size_t median_k =
      static_cast<std::size_t>(options.min_median_points - 1) / 2;
  const double fit_half = options.fit_half_width_decades;
  const std::size_t fit_k =
      static_cast<std::size_t>(options.min_fit_points - 1) / 2 + 1;

  // ...and up to where the running-median loss blows up.
  const std::vector<double> median_all =
      RunningMedian(x, losses.first(n), median_half, median_k);
  const std::size_t cut = FindDivergence(median_all, options.divergence_factor);
  double diverge_lr = 0.0;
  std::string diverge_words = "the loss did not blow up within the test";
  if (cut < n) {
    diverge_lr = lrs[cut];
    diverge_words = absl::StrFormat(
        "the loss blew up at lr %.3g (running-median loss %.4g and above %g x "
        "its best %.4g from there on)",
        lrs[cut], median_all[cut], options.divergence_factor,
        *std::min_element(median_all.begin(), median_all.begin() + cut));
  } else if (n < losses.size()) {
    diverge_lr = lrs[n];
    diverge_words =
        absl::StrFormat("the loss became non-finite at lr %.3g", lrs[n]);
  }
  if (cut < static_cast<std::size_t>(options.min_points)) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "no usable descent: %s after only %d points", diverge_words, cut));
  }

  const std::span<const double> used_x(x.data(), cut);
  const std::span<const double> used_loss = losses.first(cut);
  const std::vector<double> median =
      RunningMedian(used_x, used_loss, median_half, median_k);
  const LocalFit fit =
      FitLocalLinear(used_x, median, used_loss, fit_half, fit_k,
                     std::max(fit_half, options.noise_half_width_decades));

  const std::size_t imin = static_cast<std::size_t>(
      std::min_element(fit.level.begin(), fit.level.end()) - fit.level.begin());
  if (imin == 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "no usable descent: the smoothed loss never falls below its start "
        "(%.4g at lr %.3g); %s",
        fit.level[0], lrs[0], diverge_words));
  }
  auto t_value = [&](std::size_t i) {
    return fit.slope_se[i] > 0 ? fit.slope[i] / fit.slope_se[i]
                               : (fit.slope[i] < 0 ? -INFINITY : 0.0);
  };

  // 1. Descents, found by hysteresis as edges are in images: stretches
  // before the minimum where the slope is `extend_sigmas` standard errors
  // below zero, seeded by a point `slope_sigmas` below. Within a half-window
  // of either end the fit is one-sided and the running median short, so the
  // slope there is noisier than its standard error says: such points may
  // extend a descent but not seed one.
  std::vector<bool> descending(imin + 1);
  for (std::size_t i = 0; i <= imin; ++i) {
    descending[i] = t_value(i) < -options.extend_sigmas;
  }
  FillNarrowGaps(used_x, fit.level, fit_half, descending);
  auto seeds = [&](std::size_t i) {
    const double h = WindowHalfWidth(used_x, i, fit_half, fit_k);
    return t_value(i) < -options.slope_sigmas && x[i] - x[0] >= h &&
           x[cut - 1] - x[i] >= h;
  };
  // Keep the descent with the largest drop among those whose drop is
  // significant (`drop_sigmas`; the two levels' errors are taken as
  // independent, which overstates the error of a short drop) and large
  // enough (`min_relative_drop`).
  std::size_t desc_lo = 0;
  std::size_t desc_hi = 0;
  double desc_drop = 0.0;
  bool any_seed = false;
  double largest_drop = 0.0;  // of the seeded descents, for the error message
  double largest_drop_se = 0.0;
  for (const auto& [lo, hi] : Runs(descending)) {
    bool seeded = false;
    for (std::size_t i = lo; i <= hi && !seeded; ++i) seeded = seeds(i);
    if (!seeded) continue;
    any_seed = true;
    const double drop = fit.level[lo] - fit.level[hi];
    const double drop_se = std::hypot(fit.level_se[lo], fit.level_se[hi]);
    if (drop > largest_drop) {
      largest_drop = drop;
      largest_drop_se = drop_se;
    }
    if (drop > desc_drop && drop >= options.drop_sigmas * drop_se &&
        drop >= options.min_relative_drop * std::abs(fit.level[lo])) {
      desc_drop = drop;
      desc_lo = lo;
      desc_hi = hi;
    }
  }
  if (!any_seed) {
    std::size_t most = 0;
    for (std::size_t i = 1; i <= imin; ++i) {
      if (t_value(i) < t_value(most)) most = i;
    }
    return absl::FailedPreconditionError(absl::StrFormat(
        "no usable descent: no slope before the loss minimum is %g standard "
        "errors below zero away from the ends of the curve (the most "
        "significant, %.3g per decade at lr %.3g, is %.1f); the smoothed "
        "loss goes from %.4g to a minimum of %.4g at lr %.3g; %s",
        options.slope_sigmas, fit.slope[most], lrs[most], -t_value(most),
        fit.level[0], fit.level[imin], lrs[imin], diverge_words));
  }
  if (!(desc_drop > 0)) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "no usable descent: the largest significant descent lowers the "
        "smoothed loss by %.3g, %.1f standard errors (need %g) and %.1f%% of "
        "the loss (need %g%%); the smoothed loss goes from %.4g to a minimum "
        "of %.4g at lr %.3g; %s",
        largest_drop,
        largest_drop_se > 0 ? largest_drop / largest_drop_se : INFINITY,
        options.drop_sigmas, 100.0 * largest_drop / std::abs(fit.level[0]),
        100.0 * options.min_relative_drop, fit.level[0], fit.level[imin],
        lrs[imin], diverge_words));
  }

  // 2. The steepest-descent region: the part of that descent, around its
  // steepest point, where the slope is at least `steep_fraction` of the
  // steepest (narrow gaps filled as above).
  std::size_t isteep = desc_lo;
  for (std::size_t i = desc_lo; i <= desc_hi; ++i) {
    if (fit.slope[i] < fit.slope[isteep]) isteep = i;
  }
  const double steepest = fit.slope[isteep];
  std::vector<bool> steep(imin + 1, false);
  for (std::size_t i = desc_lo; i <= desc_hi; ++i) {
    steep[i] = fit.slope[i] <= options.steep_fraction * steepest;
  }
  FillNarrowGaps(used_x, fit.level, fit_half, steep);
  std::size_t lo = isteep;
  std::size_t hi = isteep;
  while (lo > desc_lo && steep[lo - 1]) --lo;
  while (hi < desc_hi && steep[hi + 1]) ++hi;

  LrSuggestion out;
  out.steep_lo_lr = lrs[lo];
  out.steep_hi_lr = lrs[hi];
  out.suggested_lr = std::pow(10.0, 0.5 * (x[lo] + x[hi]));
  out.min_loss_lr = lrs[imin];
  out.diverge_lr = diverge_lr;
  out.points_used = static_cast<int>(cut);
  out.steepest_lr = lrs[isteep];
  out.steepest_slope_per_decade = steepest;
  out.region_start_loss = fit.level[lo];
  out.region_end_loss = fit.level[hi];
  out.still_descending = imin + 1 == cut;
  out.evidence = absl::StrFormat(
      "Suggested lr %.3g: the geometric middle of the steepest-descent region "
      "lr %.3g .. %.3g (%.2f decades), where the smoothed loss falls from "
      "%.4g to %.4g and its slope against log10(lr) is at least %g of the "
      "steepest, %.3g per decade at lr %.3g (%.1f standard errors). That "
      "region lies in the most significant descent, lr %.3g .. %.3g (loss "
      "%.4g to %.4g). The smoothed loss starts at %.4g and is lowest, %.4g, "
      "at lr %.3g%s. %d of %d points used (lr %.3g .. %.3g); %s.",
      out.suggested_lr, out.steep_lo_lr, out.steep_hi_lr, x[hi] - x[lo],
      out.region_start_loss, out.region_end_loss, options.steep_fraction,
      steepest, out.steepest_lr, -t_value(isteep), lrs[desc_lo], lrs[desc_hi],
      fit.level[desc_lo], fit.level[desc_hi], fit.level[0], fit.level[imin],
      out.min_loss_lr,
      out.still_descending
          ? " (the last usable point: the loss was still falling, so the "
            "test may have stopped too early)"
          : "",
      cut, lrs.size(), lrs[0], lrs[cut - 1], diverge_words);
  return out;
}

}  // namespace lossguard::analyzers
