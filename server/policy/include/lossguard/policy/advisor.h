#ifndef LOSSGUARD_POLICY_ADVISOR_H_
#define LOSSGUARD_POLICY_ADVISOR_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "lossguard/analyzers/curve_analyzer.h"
#include "lossguard/analyzers/types.h"
#include "lossguard/policy/advice_policy.h"

namespace lossguard::policy {

// One run's analyzer and the policy's memory of it, fed together, so the
// daemon, the embedded guard, the CLI and AnalyzeCurve all run the same
// sequence: Feed a step (analyzer, then ObserveStep), TakeDue the deferred
// diagnoses whose cooldown is over, Decide on each diagnosis and Record
// the advice that was given.
//
// Thread-safety: not thread-safe; one owner.
class Advisor {
 public:
  // Requires analyzers::ValidateOptions(analyzer).ok().
  Advisor(const analyzers::AnalyzerOptions& analyzer,
          const PolicyOptions& policy);

  Advisor(const Advisor&) = delete;
  Advisor& operator=(const Advisor&) = delete;

  // Feeds one step: diagnoses decided at it are appended to `*decided`. On
  // an analyzer error (InvalidArgument naming the step) nothing changes.
  absl::Status Feed(const analyzers::StepRecord& rec,
                    std::vector<analyzers::Diagnosis>* decided);
  // Appends the deferred diagnoses now due (see TakeDeferred).
  void TakeDue(std::vector<analyzers::Diagnosis>* due);

  Advice Decide(const analyzers::Diagnosis& d) const {
    return policy::Decide(d, ctx_, options_);
  }
  // The advice given for `d` (ObserveAdvice). An LR ramp starts the
  // collection of its points for the range test that ends it.
  void Record(const analyzers::Diagnosis& d, const Advice& advice);

  const analyzers::CurveAnalyzer& analyzer() const { return analyzer_; }
  const RunContext& context() const { return ctx_; }
  // For rebuilding the policy's memory from stored advice after a restart.
  RunContext* mutable_context() { return &ctx_; }
  const PolicyOptions& options() const { return options_; }

 private:
  // The range test over an LR ramp's points: sets ctx_.ramp_suggested_lr
  // when it finds a steepest descent.
  void SuggestFromRamp();

  const PolicyOptions options_;
  analyzers::CurveAnalyzer analyzer_;
  RunContext ctx_;

  // An LR ramp being watched: the points where the LR grew (at most the
  // ramp's steps), and whether it has been concluded.
  struct Ramp {
    bool on = false;
    int64_t advised_step = 0;
    int64_t steps = 0;
    double last_lr = 0.0;
    int flat = 0;  // steps since the LR last grew
    std::vector<double> lrs;
    std::vector<double> losses;
  };
  Ramp ramp_;
};

}  // namespace lossguard::policy

#endif  // LOSSGUARD_POLICY_ADVISOR_H_
