#include "lossguard/analyzers/lr_range_test.h"

#include <Eigen/Dense>
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "analyzers/src/robust.h"

namespace lossguard::analyzers {
namespace {

// 1 / Phi^-1(3/4): turns a median absolute deviation into a normal sigma.
constexpr double kMadToSigma = 1.4826;
constexpr double kPi = 3.141592653589793;

// The points of the curve pooled into bins of a fixed width in x =
// log10(lr), so that the analysis costs the same however densely the test
// sampled the LR. A bin holding one point is that point, exactly.
struct Bins {
  // Bin b holds the points [first[b], first[b + 1]); first.back() is the
  // number of points.
  std::vector<std::size_t> first;
  std::vector<double> x;     // mean log10(lr) of its points
  std::vector<double> lr;    // the lr of its point, or 10^x for several
  std::vector<double> loss;  // median loss of its points
  // Variance of `loss` over the variance of one point's loss: 1 for one
  // point, pi / (2 count) (the large-sample variance of a median) for more.
  // For two, whose median is their mean, that overstates it (0.79, not 0.5),
  // which errs toward less significance.
  std::vector<double> var_factor;

  std::size_t size() const { return x.size(); }
};

// Pools the points (x increasing) into the bins [m * width, (m + 1) * width)
// of x that hold any.
Bins PoolPoints(std::span<const double> lrs, std::span<const double> x,
                std::span<const double> losses, double width) {
  const std::size_t n = x.size();
  Bins bins;
  std::vector<double> values;
  for (std::size_t i = 0; i < n;) {
    const double key = std::floor(x[i] / width);
    std::size_t j = i + 1;
    while (j < n && std::floor(x[j] / width) == key) ++j;
    bins.first.push_back(i);
    if (j == i + 1) {
      bins.x.push_back(x[i]);
      bins.lr.push_back(lrs[i]);
      bins.loss.push_back(losses[i]);
      bins.var_factor.push_back(1.0);
    } else {
      const double count = static_cast<double>(j - i);
      const double mean_x =
          std::accumulate(x.begin() + i, x.begin() + j, 0.0) / count;
      bins.x.push_back(mean_x);
      bins.lr.push_back(std::pow(10.0, mean_x));
      values.assign(losses.begin() + i, losses.begin() + j);
      bins.loss.push_back(MedianInPlace(values));
      bins.var_factor.push_back(kPi / (2.0 * count));
    }
    i = j;
  }
  bins.first.push_back(n);
  return bins;
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

// The median of `values[j]` over the j with |x[j] - x[i]| <= the window
// half-width (`half_width`, or wider to hold `k` neighbours on each side).
// `scratch` is working space.
double WindowMedian(std::span<const double> x, std::span<const double> values,
                    std::size_t i, double half_width, std::size_t k,
                    std::vector<double>& scratch) {
  const double h = WindowHalfWidth(x, i, half_width, k);
  const auto lo = std::lower_bound(x.begin(), x.end(), x[i] - h);
  const auto hi = std::upper_bound(x.begin(), x.end(), x[i] + h);
  scratch.assign(values.begin() + (lo - x.begin()),
                 values.begin() + (hi - x.begin()));
  return MedianInPlace(scratch);
}

// y[i] = WindowMedian at every point.
std::vector<double> RunningMedian(std::span<const double> x,
                                  std::span<const double> values,
                                  double half_width, std::size_t k) {
  std::vector<double> out(x.size());
  std::vector<double> scratch;
  for (std::size_t i = 0; i < x.size(); ++i) {
    out[i] = WindowMedian(x, values, i, half_width, k, scratch);
  }
  return out;
}

// RunningMedian(x.first(cut), values.first(cut), ...) given `full`, the
// running median over all of `x`: only the points whose window reached past
// the cut, or whose k-th right neighbour did, are computed again.
std::vector<double> TruncateRunningMedian(std::span<const double> x,
                                          std::span<const double> values,
                                          const std::vector<double>& full,
                                          std::size_t cut, double half_width,
                                          std::size_t k) {
  std::vector<double> out(full.begin(), full.begin() + cut);
  if (cut == x.size()) return out;
  const std::span<const double> used_x = x.first(cut);
  const std::span<const double> used_values = values.first(cut);
  std::vector<double> scratch;
  for (std::size_t i = 0; i < cut; ++i) {
    const double h = WindowHalfWidth(x, i, half_width, k);
    if (i + k >= cut || x[cut] <= x[i] + h) {
      out[i] = WindowMedian(used_x, used_values, i, half_width, k, scratch);
    }
  }
  return out;
}

// The local linear fit at every point: smoothed level and slope per unit of
// x, their variances in units of the noise variance sigma^2, and their
// standard errors once sigma is known.
struct LocalFit {
  std::vector<double> level;
  std::vector<double> slope;
  std::vector<double> level_var;
  std::vector<double> slope_var;
  std::vector<double> level_se;
  std::vector<double> slope_se;
};

// Tricube-weighted linear least squares of `y` against `x` in the window
// |x[j] - x[i]| < h around each point, h = `half_width` or wider so that
// `k` - 1 neighbours on each side get a non-zero weight. The variances are
// the sandwich form of the weighted fit's covariance, y[j] having the
// variance `var_factor[j]` sigma^2. (The fit runs on the median-filtered
// `y`, whose slope has about the variance that the unfiltered values' noise
// gives.)
LocalFit FitLocalLinear(std::span<const double> x, std::span<const double> y,
                        std::span<const double> var_factor, double half_width,
                        std::size_t k) {
  const std::size_t n = x.size();
  LocalFit fit;
  fit.level.resize(n);
  fit.slope.resize(n);
  fit.level_var.resize(n);
  fit.slope_var.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double h = WindowHalfWidth(x, i, half_width, k);
    // The window is [lo, hi): |x[j] - x[i]| < h.
    const std::size_t lo = static_cast<std::size_t>(
        std::upper_bound(x.begin(), x.end(), x[i] - h) - x.begin());
    const std::size_t hi = static_cast<std::size_t>(
        std::lower_bound(x.begin(), x.end(), x[i] + h) - x.begin());
    Eigen::Matrix2d normal = Eigen::Matrix2d::Zero();     // sum w a a^T
    Eigen::Matrix2d normal_w2 = Eigen::Matrix2d::Zero();  // sum w^2 v a a^T
    Eigen::Vector2d rhs = Eigen::Vector2d::Zero();        // sum w a y
    for (std::size_t j = lo; j < hi; ++j) {
      const double d = x[j] - x[i];
      const double u = std::abs(d) / h;
      const double t = 1.0 - u * u * u;
      const double w = t * t * t;
      const Eigen::Vector2d a(1.0, d);
      normal.noalias() += w * a * a.transpose();
      normal_w2.noalias() += (w * w * var_factor[j]) * a * a.transpose();
      rhs.noalias() += (w * y[j]) * a;
    }
    // The window holds x[i] and at least one neighbour with a non-zero
    // weight, so `normal` is positive definite; guard anyway.
    if (!(normal.determinant() > 0)) {
      fit.level[i] = y[i];
      fit.slope[i] = 0.0;
      fit.level_var[i] = INFINITY;
      fit.slope_var[i] = INFINITY;
      continue;
    }
    const Eigen::Matrix2d inverse = normal.inverse();
    const Eigen::Vector2d coef = inverse * rhs;
    const Eigen::Matrix2d cov = inverse * normal_w2 * inverse;
    fit.level[i] = coef(0);
    fit.slope[i] = coef(1);
    fit.level_var[i] = std::max(cov(0, 0), 0.0);
    fit.slope_var[i] = std::max(cov(1, 1), 0.0);
  }
  return fit;
}

// The local noise sigma of the raw losses at each of the first `nb` bins: a
// robust one, kMadToSigma times the median of |losses[j] - level[b(j)]|
// (b(j): j's bin) over the points j of the bins b' with |x[b'] - x[b]| <=
// `half_width`. Both ends of that window only move right, so the window's
// points are kept as ranks in a Fenwick tree of counts: O(n log n) in the
// points, however many each window holds.
std::vector<double> LocalNoiseSigma(const Bins& bins, std::size_t nb,
                                    std::span<const double> losses,
                                    std::span<const double> level,
                                    double half_width) {
  const std::size_t n = bins.first[nb];
  std::vector<double> residual(n);
  for (std::size_t b = 0; b < nb; ++b) {
    for (std::size_t j = bins.first[b]; j < bins.first[b + 1]; ++j) {
      residual[j] = std::abs(losses[j] - level[b]);
    }
  }
  std::vector<std::size_t> order(n);  // the points by residual
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return residual[a] < residual[b] || (residual[a] == residual[b] && a < b);
  });
  std::vector<std::size_t> rank(n);
  for (std::size_t r = 0; r < n; ++r) rank[order[r]] = r;

  std::vector<std::size_t> tree(n + 1, 0);  // Fenwick tree over the ranks
  auto add_bin = [&](std::size_t b, bool insert) {
    for (std::size_t j = bins.first[b]; j < bins.first[b + 1]; ++j) {
      // p & (~p + 1): the lowest set bit of p.
      for (std::size_t p = rank[j] + 1; p <= n; p += p & (~p + 1)) {
        if (insert) {
          ++tree[p];
        } else {
          --tree[p];
        }
      }
    }
  };
  const std::size_t top = std::bit_floor(n);
  auto kth = [&](std::size_t k) {  // the k-th smallest residual, from 0
    std::size_t pos = 0;
    std::size_t remaining = k + 1;
    for (std::size_t step = top; step > 0; step >>= 1) {
      if (pos + step <= n && tree[pos + step] < remaining) {
        pos += step;
        remaining -= tree[pos];
      }
    }
    return residual[order[pos]];
  };

  const std::span<const double> x(bins.x.data(), nb);
  std::vector<double> sigma(nb);
  std::size_t lo = 0;  // the window is bins [lo, hi)
  std::size_t hi = 0;
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t new_lo = static_cast<std::size_t>(
        std::lower_bound(x.begin(), x.end(), x[b] - half_width) - x.begin());
    const std::size_t new_hi = static_cast<std::size_t>(
        std::upper_bound(x.begin(), x.end(), x[b] + half_width) - x.begin());
    for (; hi < new_hi; ++hi) add_bin(hi, true);
    for (; lo < new_lo; ++lo) add_bin(lo, false);
    // Same value as MedianInPlace over the window's residuals.
    const std::size_t count = bins.first[hi] - bins.first[lo];
    const std::size_t mid = count / 2;
    const double upper = kth(mid);
    const double median = count % 2 == 1 ? upper : 0.5 * (kth(mid - 1) + upper);
    sigma[b] = kMadToSigma * median;
  }
  return sigma;
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
      !(o.basin_fraction >= 0 && o.basin_fraction <= 1) ||
      !(o.basin_sigmas >= 0) ||
      !(o.min_relative_drop >= 0) ||
      !(o.pool_decades > 0 && std::isfinite(o.pool_decades))) {
    return absl::InvalidArgumentError(
        "LrRangeTestOptions out of range (need min_points >= 3, "
        "min_median_points >= 1, min_fit_points >= 3, windows >= 0 with a "
        "positive fit half-width, a finite positive pool_decades, "
        "divergence_factor > 1, "
        "0 <= extend_sigmas <= slope_sigmas, drop_sigmas >= 0, "
        "steep_fraction and basin_fraction in [0, 1], basin_sigmas >= 0, "
        "min_relative_drop >= 0)");
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
  std::vector<double> raw_x(n);
  for (std::size_t i = 0; i < n; ++i) raw_x[i] = std::log10(lrs[i]);
  // The analysis runs on the bins; a sparse test (steps wider than a bin)
  // has one point in each, and is analysed point by point.
  const Bins bins =
      PoolPoints(lrs.first(n), raw_x, losses.first(n), options.pool_decades);
  const std::size_t nb = bins.size();
  const std::span<const double> x = bins.x;
  const std::span<const double> lr = bins.lr;
  const double median_half = 0.5 * options.median_window_decades;
  const std::size_t median_k =
      static_cast<std::size_t>(options.min_median_points - 1) / 2;
  const double fit_half = options.fit_half_width_decades;
  const std::size_t fit_k =
      static_cast<std::size_t>(options.min_fit_points - 1) / 2 + 1;

  // ...and up to where the running-median loss blows up.
  const std::vector<double> median_all =
      RunningMedian(x, bins.loss, median_half, median_k);
  const std::size_t cut = FindDivergence(median_all, options.divergence_factor);
  const std::size_t cut_point = bins.first[cut];  // points before the cut
  double diverge_lr = 0.0;
  std::string diverge_words = "the loss did not blow up within the test";
  if (cut < nb) {
    diverge_lr = lrs[cut_point];
    diverge_words = absl::StrFormat(
        "the loss blew up at lr %.3g (running-median loss %.4g and above %g x "
        "its best %.4g from there on)",
        diverge_lr, median_all[cut], options.divergence_factor,
        *std::min_element(median_all.begin(), median_all.begin() + cut));
  } else if (n < losses.size()) {
    diverge_lr = lrs[n];
    diverge_words =
        absl::StrFormat("the loss became non-finite at lr %.3g", lrs[n]);
  }
  if (cut_point < static_cast<std::size_t>(options.min_points)) {
    return absl::FailedPreconditionError(
        absl::StrFormat("no usable descent: %s after only %d points",
                        diverge_words, cut_point));
  }

  const std::span<const double> used_x = x.first(cut);
  const std::vector<double> median = TruncateRunningMedian(
      x, bins.loss, median_all, cut, median_half, median_k);
  LocalFit fit = FitLocalLinear(
      used_x, median, std::span<const double>(bins.var_factor).first(cut),
      fit_half, fit_k);
  const std::vector<double> sigma =
      LocalNoiseSigma(bins, cut, losses, fit.level,
                      std::max(fit_half, options.noise_half_width_decades));
  fit.level_se.resize(cut);
  fit.slope_se.resize(cut);
  for (std::size_t i = 0; i < cut; ++i) {
    fit.level_se[i] = sigma[i] * std::sqrt(fit.level_var[i]);
    fit.slope_se[i] = sigma[i] * std::sqrt(fit.slope_var[i]);
  }

  const std::size_t imin = static_cast<std::size_t>(
      std::min_element(fit.level.begin(), fit.level.end()) - fit.level.begin());
  if (imin == 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "no usable descent: the smoothed loss never falls below its start "
        "(%.4g at lr %.3g); %s",
        fit.level[0], lr[0], diverge_words));
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
        options.slope_sigmas, fit.slope[most], lr[most], -t_value(most),
        fit.level[0], fit.level[imin], lr[imin], diverge_words));
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
        lr[imin], diverge_words));
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

  // 3. The minimum's basin: around the minimum, the points whose smoothed
  // loss is above it by at most `basin_fraction` of the descent's drop
  // plus `basin_sigmas` standard errors of the difference (the minimum of
  // a flat noisy bottom is itself a low draw).
  const double basin_rise =
      options.basin_fraction * (fit.level[desc_lo] - fit.level[imin]);
  auto in_basin = [&](std::size_t i) {
    return fit.level[i] - fit.level[imin] <=
           basin_rise + options.basin_sigmas *
                            std::hypot(fit.level_se[i], fit.level_se[imin]);
  };
  std::size_t basin_lo = imin;
  std::size_t basin_hi = imin;
  while (basin_lo > 0 && in_basin(basin_lo - 1)) --basin_lo;
  while (basin_hi + 1 < cut && in_basin(basin_hi + 1)) ++basin_hi;

  // Said only where points were pooled, so a sparse test's words stay.
  const std::string pooled_words =
      cut < cut_point
          ? absl::StrFormat(
                "; pooled into %d bins of %g decades, median loss in each", cut,
                options.pool_decades)
          : std::string();
  LrSuggestion out;
  out.steep_lo_lr = lr[lo];
  out.steep_hi_lr = lr[hi];
  const double steep_mid_x = 0.5 * (x[lo] + x[hi]);
  const double basin_mid_x = 0.5 * (x[basin_lo] + x[basin_hi]);
  out.steep_mid_lr = std::pow(10.0, steep_mid_x);
  out.suggested_lr = std::pow(10.0, 0.5 * (steep_mid_x + basin_mid_x));
  out.min_loss_lr = lr[imin];
  out.basin_lo_lr = lr[basin_lo];
  out.basin_hi_lr = lr[basin_hi];
  out.basin_mid_lr = std::pow(10.0, basin_mid_x);
  out.diverge_lr = diverge_lr;
  out.points_used = static_cast<int>(cut_point);
  out.steepest_lr = lr[isteep];
  out.steepest_slope_per_decade = steepest;
  out.region_start_loss = fit.level[lo];
  out.region_end_loss = fit.level[hi];
  out.still_descending = imin + 1 == cut;
  out.evidence = absl::StrFormat(
      "Suggested lr %.3g: the geometric middle between the steepest descent "
      "(lr %.3g, the middle of lr %.3g .. %.3g) and the loss minimum (lr "
      "%.3g, the middle of its basin lr %.3g .. %.3g): a run trains best "
      "above where the test's few steps per LR fall fastest and short of "
      "where the loss stops falling. Over the steepest-descent region "
      "(%.2f decades) the smoothed loss falls from "
      "%.4g to %.4g and its slope against log10(lr) is at least %g of the "
      "steepest, %.3g per decade at lr %.3g (%.1f standard errors). That "
      "region lies in the most significant descent, lr %.3g .. %.3g (loss "
      "%.4g to %.4g). The smoothed loss starts at %.4g and is lowest, %.4g, "
      "at lr %.3g%s; the basin holds the LRs within %g of the descent's "
      "drop of it plus %g standard errors. %d of %d points used (lr %.3g .. "
      "%.3g%s); %s.",
      out.suggested_lr, out.steep_mid_lr, out.steep_lo_lr, out.steep_hi_lr,
      out.basin_mid_lr, out.basin_lo_lr, out.basin_hi_lr, x[hi] - x[lo],
      out.region_start_loss, out.region_end_loss, options.steep_fraction,
      steepest, out.steepest_lr, -t_value(isteep), lr[desc_lo], lr[desc_hi],
      fit.level[desc_lo], fit.level[desc_hi], fit.level[0], fit.level[imin],
      out.min_loss_lr,
      out.still_descending
          ? " (the last usable point: the loss was still falling, so the "
            "test may have stopped too early)"
          : "",
      options.basin_fraction, options.basin_sigmas, cut_point, lrs.size(),
      lrs[0], lrs[cut_point - 1], pooled_words, diverge_words);
  return out;
}

}  // namespace lossguard::analyzers
