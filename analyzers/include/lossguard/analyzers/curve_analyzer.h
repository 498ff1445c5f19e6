#ifndef LOSSGUARD_ANALYZERS_CURVE_ANALYZER_H_
#define LOSSGUARD_ANALYZERS_CURVE_ANALYZER_H_

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "lossguard/analyzers/options.h"
#include "lossguard/analyzers/types.h"

namespace lossguard::analyzers {

// OK if every field of `options` is in its documented range (counts >= 1,
// factors > 1, fractions within [0, 1], ...); InvalidArgument naming the
// first field that is not.
absl::Status ValidateOptions(const AnalyzerOptions& options);

// The streaming analyzer of one training run. Feed it every step in order;
// it returns each diagnosis at the step where it is decided, the way a live
// run would be told. Time per step is constant (amortized) and memory is
// bounded by the windows in AnalyzerOptions, whatever the run's length.
//
// Thread-safety: not thread-safe. One owner per run serializes all calls.
class CurveAnalyzer {
 public:
  // Requires ValidateOptions(options).ok() (asserted in debug builds).
  explicit CurveAnalyzer(const AnalyzerOptions& options = AnalyzerOptions());
  ~CurveAnalyzer();

  CurveAnalyzer(const CurveAnalyzer&) = delete;
  CurveAnalyzer& operator=(const CurveAnalyzer&) = delete;
  // A moved-from analyzer may only be destroyed or assigned to.
  CurveAnalyzer(CurveAnalyzer&&) noexcept;
  CurveAnalyzer& operator=(CurveAnalyzer&&) noexcept;

  // Feeds one step. Diagnoses decided at this step are appended to `*out`
  // (which may be null to discard them). Returns InvalidArgument, and
  // changes nothing, if `rec.step` is not greater than the previous step or
  // if `rec.lr` is negative or infinite (NaN means "not logged"). Non-finite
  // losses are data.
  absl::Status Feed(const StepRecord& rec, std::vector<Diagnosis>* out);

  // Number of steps accepted so far.
  int64_t steps_seen() const;
  // Last accepted step, or -1 before the first.
  int64_t last_step() const;
  // Diagnoses reported so far that still hold (at most one per kind, the
  // latest). A divergence or overfitting stays active; oscillation,
  // stagnation and gradient explosion clear when the curve recovers.
  std::vector<Diagnosis> Active() const;

  const AnalyzerOptions& options() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_CURVE_ANALYZER_H_
