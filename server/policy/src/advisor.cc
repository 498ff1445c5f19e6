#include "lossguard/policy/advisor.h"

#include <utility>

namespace lossguard::policy {

Advisor::Advisor(const analyzers::AnalyzerOptions& analyzer,
                 const PolicyOptions& policy)
    : options_(policy), analyzer_(analyzer) {}

absl::Status Advisor::Feed(const analyzers::StepRecord& rec,
                           std::vector<analyzers::Diagnosis>* decided) {
  absl::Status s = analyzer_.Feed(rec, decided);
  if (!s.ok()) return s;
  ObserveStep(rec, options_, &ctx_);
  return absl::OkStatus();
}

void Advisor::TakeDue(std::vector<analyzers::Diagnosis>* due) {
  if (!DeferredDue(ctx_, options_)) return;
  for (analyzers::Diagnosis& d : TakeDeferred(analyzer_.Active(), options_, &ctx_)) {
    due->push_back(std::move(d));
  }
}

}  // namespace lossguard::policy
