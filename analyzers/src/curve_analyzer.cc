#include "lossguard/analyzers/curve_analyzer.h"

#include <cmath>

#include "absl/strings/str_format.h"

namespace lossguard::analyzers {

// Placeholder implementation: validates input only. The detectors replace it.
class CurveAnalyzer::Impl {
 public:
  explicit Impl(const AnalyzerOptions& options) : options_(options) {}

  absl::Status Feed(const StepRecord& rec, std::vector<Diagnosis>* /*out*/) {
    if (steps_seen_ > 0 && rec.step <= last_step_) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "step %d is not greater than the previous step %d", rec.step,
          last_step_));
    }
    if (!std::isfinite(rec.lr) || rec.lr < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("step %d: learning rate %g is not a finite value >= 0",
                          rec.step, rec.lr));
    }
    last_step_ = rec.step;
    ++steps_seen_;
    return absl::OkStatus();
  }

  AnalyzerOptions options_;
  int64_t steps_seen_ = 0;
  int64_t last_step_ = -1;
  std::vector<Diagnosis> active_;
};

CurveAnalyzer::CurveAnalyzer(const AnalyzerOptions& options)
    : impl_(std::make_unique<Impl>(options)) {}
CurveAnalyzer::~CurveAnalyzer() = default;
CurveAnalyzer::CurveAnalyzer(CurveAnalyzer&&) noexcept = default;
CurveAnalyzer& CurveAnalyzer::operator=(CurveAnalyzer&&) noexcept = default;

absl::Status CurveAnalyzer::Feed(const StepRecord& rec,
                                 std::vector<Diagnosis>* out) {
  return impl_->Feed(rec, out);
}
int64_t CurveAnalyzer::steps_seen() const { return impl_->steps_seen_; }
int64_t CurveAnalyzer::last_step() const { return impl_->last_step_; }
std::vector<Diagnosis> CurveAnalyzer::Active() const { return impl_->active_; }
const AnalyzerOptions& CurveAnalyzer::options() const {
  return impl_->options_;
}

}  // namespace lossguard::analyzers
