#ifndef LOSSGUARD_CLIENT_CLI_ANALYZE_H_
#define LOSSGUARD_CLIENT_CLI_ANALYZE_H_

#include <cstdint>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lossguard/analyzers/curve_analyzer.h"
#include "lossguard/analyzers/types.h"
#include "lossguard/policy/advice_policy.h"
#include "lossguard/policy/advisor.h"

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

// Analyzes one curve fed step by step, as a live run would: each step goes
// through one CurveAnalyzer, and the policy is asked for advice on each
// diagnosis when it is decided, with the run context kept up to date. Memory
// is that of the analyzer plus the diagnoses, whatever the curve's length.
//
// Thread-safety: not thread-safe; one owner serializes all calls.
class CurveAnalysis {
 public:
  // `file` names the curve in the report.
  explicit CurveAnalysis(
      std::string file,
      const policy::PolicyOptions& options = policy::PolicyOptions());

  CurveAnalysis(const CurveAnalysis&) = delete;
  CurveAnalysis& operator=(const CurveAnalysis&) = delete;

  // Feeds the next step. On an error from the analyzer (InvalidArgument,
  // "step N: reason") nothing changes.
  absl::Status Feed(const analyzers::StepRecord& rec);

  // The report on the steps fed so far.
  const AnalyzeReport& report() const { return report_; }

 private:
  policy::Advisor advisor_;
  std::vector<analyzers::Diagnosis> decided_;  // scratch for Feed
  AnalyzeReport report_;
};

// Feeds `records` through a CurveAnalysis of `file` and returns its report;
// errors carry `file` in their message.
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
