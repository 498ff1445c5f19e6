#ifndef LOSSGUARD_CLIENT_CLI_ANALYZE_H_
#define LOSSGUARD_CLIENT_CLI_ANALYZE_H_

#include <cstdint>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lossguard/analyzers/types.h"
#include "lossguard/policy/advice_policy.h"

namespace lossguard::cli {

// What `lossguard analyze` found in one curve.
struct AnalyzeReport {
  std::string file;
  int64_t steps = 0;
  double final_loss = 0.0;
  std::vector<analyzers::Diagnosis> diagnoses;  // all kinds but loss_spike
  std::vector<analyzers::Diagnosis> events;     // loss_spike
  std::vector<policy::Advice> advice;           // one per diagnosis
  bool healthy() const { return diagnoses.empty(); }
};

// Feeds `records` step by step through one CurveAnalyzer, as a live run
// would, and asks the policy for advice on each diagnosis when it is
// decided, keeping the run context up to date. `file` names the curve.
absl::StatusOr<AnalyzeReport> AnalyzeCurve(
    const std::string& file, const std::vector<analyzers::StepRecord>& records,
    const policy::PolicyOptions& options = policy::PolicyOptions());

// The report as one JSON object: file, steps, final_loss, verdict,
// diagnoses, events, advice.
nlohmann::ordered_json AnalyzeReportToJson(const AnalyzeReport& report);

// The report as a table, advice lines and a one-line summary.
void PrintAnalyzeReport(const AnalyzeReport& report, std::ostream& out);

}  // namespace lossguard::cli

#endif  // LOSSGUARD_CLIENT_CLI_ANALYZE_H_
