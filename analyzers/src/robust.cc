#include "analyzers/src/robust.h"

#include <limits>

namespace lossguard::analyzers {

double MedianInPlace(std::vector<double>& v) {
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  const size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + mid, v.end());
  const double upper = v[mid];
  if (v.size() % 2 == 1) return upper;
  const double lower = *std::max_element(v.begin(), v.begin() + mid);
  return 0.5 * (lower + upper);
}

double Median(std::vector<double> v) { return MedianInPlace(v); }

}  // namespace lossguard::analyzers
