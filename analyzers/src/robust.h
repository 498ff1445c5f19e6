#ifndef LOSSGUARD_ANALYZERS_SRC_ROBUST_H_
#define LOSSGUARD_ANALYZERS_SRC_ROBUST_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lossguard::analyzers {

// Median of `v`, reordering it. NaN for an empty vector.
double MedianInPlace(std::vector<double>& v);
// Median of a copy of `v`.
double Median(std::vector<double> v);

// Robust running scale of a stream of deviations (differences of successive
// points, or deviations from a level): an EMA of |x| with outliers
// winsorized at 5 current scales, turned into a standard deviation assuming
// Gaussian noise. Constant time and memory. Not thread-safe.
class RobustScale {
 public:
  // `span`: EMA span in points; `differences`: the stream holds differences
  // of successive points (sigma = 0.886 E|d|) rather than deviations
  // (sigma = 1.2533 E|x|).
  explicit RobustScale(double span = 200.0, bool differences = true)
      : span_(span), factor_(differences ? 0.8862 : 1.2533) {}

  void Add(double x) {
    double a = std::fabs(x);
    if (!std::isfinite(a)) return;
    ++count_;
    if (count_ > 2 && mean_abs_ > 0) a = std::min(a, 5.0 * mean_abs_);
    // Cumulative mean at first, then an EMA of span `span_`.
    const double alpha =
        std::max(1.0 / static_cast<double>(count_), 2.0 / (span_ + 1.0));
    mean_abs_ += alpha * (a - mean_abs_);
  }
  double Sigma() const { return factor_ * mean_abs_; }
  int64_t count() const { return count_; }

 private:
  double span_;
  double factor_;
  double mean_abs_ = 0.0;
  int64_t count_ = 0;
};

// Streaming least-squares line through (t, y) points: mean and residual
// standard deviation about the fitted trend. Constant time and memory. Not
// thread-safe.
class WindowFit {
 public:
  void Add(double t, double y) {
    ++n_;
    st_ += t;
    stt_ += t * t;
    sy_ += y;
    syy_ += y * y;
    sty_ += t * y;
  }
  void Reset() { *this = WindowFit(); }
  double MeanY() const { return n_ > 0 ? sy_ / n_ : 0.0; }
  double ResidualStd() const {
    if (n_ < 3) return 0.0;
    const double n = static_cast<double>(n_);
    const double vtt = stt_ - st_ * st_ / n;
    const double vyy = syy_ - sy_ * sy_ / n;
    const double vty = sty_ - st_ * sy_ / n;
    const double rss = vtt > 0 ? vyy - vty * vty / vtt : vyy;
    return std::sqrt(std::max(0.0, rss) / n);
  }

 private:
  int64_t n_ = 0;
  double st_ = 0, stt_ = 0, sy_ = 0, syy_ = 0, sty_ = 0;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_SRC_ROBUST_H_
