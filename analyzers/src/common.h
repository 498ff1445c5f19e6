#ifndef LOSSGUARD_ANALYZERS_SRC_COMMON_H_
#define LOSSGUARD_ANALYZERS_SRC_COMMON_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "lossguard/analyzers/types.h"

namespace lossguard::analyzers {

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
inline constexpr double kInf = std::numeric_limits<double>::infinity();

inline double Clamp01(double x) { return std::clamp(x, 0.0, 1.0); }
// exp(x) for a finite log-level, NaN otherwise.
inline double ExpOrNaN(double x) {
  return std::isfinite(x) ? std::exp(x) : kNaN;
}

// Steps from `first` to `last` (>= first) inclusive, saturating.
inline int64_t StepSpan(int64_t first, int64_t last) {
  const int64_t diff = StepsBetween(first, last);
  return diff == std::numeric_limits<int64_t>::max() ? diff : diff + 1;
}

// Where detectors put what they decide at one step. The analyzer keeps the
// active diagnoses (at most one per kind) and the list returned by Feed().
// Not thread-safe: called only from the owning CurveAnalyzer's Feed().
class Findings {
 public:
  virtual ~Findings() = default;
  // Reports a diagnosis decided now; every kind but kLossSpike becomes
  // active.
  virtual void Report(Diagnosis d) = 0;
  // The condition of kind `k` no longer holds.
  virtual void Clear(DiagnosisKind k) = 0;
  virtual bool IsActive(DiagnosisKind k) const = 0;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_SRC_COMMON_H_
