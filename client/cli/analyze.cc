#include "client/cli/analyze.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lossguard::cli {
namespace {

using analyzers::Diagnosis;
using analyzers::DiagnosisKind;
using policy::ActionKind;
using policy::Advice;

nlohmann::ordered_json DiagnosisToJson(const Diagnosis& d) {
  return {{"kind", analyzers::KindName(d.kind)},
          {"step", d.step},
          {"onset", d.onset},
          {"severity", d.severity},
          {"confidence", d.confidence},
          {"evidence", d.evidence}};
}

nlohmann::ordered_json AdviceToJson(const Advice& a) {
  nlohmann::ordered_json j = {{"at_step", a.at_step},
                              {"kind", analyzers::KindName(a.diagnosis)},
                              {"action", policy::ActionName(a.action)}};
  switch (a.action) {
    case ActionKind::kScaleLr:
      j["factor"] = a.lr_factor;
      [[fallthrough]];
    case ActionKind::kSetLr:
      j["lr_from"] = a.lr_from;
      j["lr_to"] = a.lr_to;
      break;
    case ActionKind::kRestartCosine:
      j["t_0"] = a.t_0;
      j["eta_max"] = a.eta_max;
      j["eta_min"] = a.eta_min;
      break;
    case ActionKind::kRampLr:
      j["factor_per_step"] = a.ramp_factor;
      j["steps"] = a.ramp_steps;
      j["lr_from"] = a.lr_from;
      j["lr_to"] = a.lr_to;
      break;
    case ActionKind::kNone:
      j["reason"] = a.reason;
      if (a.blocked_by != policy::GuardRail::kNone) {
        j["blocked_by"] = policy::GuardRailName(a.blocked_by);
      }
      break;
    case ActionKind::kEnableGradClip:
    case ActionKind::kEarlyStop:
      break;
  }
  if (a.clip_max_norm > 0.0) j["max_norm"] = a.clip_max_norm;
  j["explanation"] = a.explanation;
  return j;
}

}  // namespace

CurveAnalysis::CurveAnalysis(std::string file,
                             const policy::PolicyOptions& options)
    : advisor_(analyzers::AnalyzerOptions(), options) {
  report_.file = std::move(file);
}

absl::Status CurveAnalysis::Feed(const analyzers::StepRecord& rec) {
  decided_.clear();
  // The analyzer's errors already name the step.
  absl::Status s = advisor_.Feed(rec, &decided_);
  if (!s.ok()) return s;
  advisor_.TakeDue(&decided_);
  for (Diagnosis& d : decided_) {
    if (d.kind == DiagnosisKind::kLossSpike) {
      report_.events.push_back(std::move(d));
      continue;
    }
    Advice advice = advisor_.Decide(d);
    advisor_.Record(d, advice);
    report_.advice.push_back(std::move(advice));
    report_.diagnoses.push_back(std::move(d));
  }
  ++report_.steps;
  report_.final_loss = rec.loss;
  return absl::OkStatus();
}

absl::StatusOr<AnalyzeReport> AnalyzeCurve(
    const std::string& file, const std::vector<analyzers::StepRecord>& records,
    const policy::PolicyOptions& options) {
  CurveAnalysis analysis(file, options);
  for (const analyzers::StepRecord& rec : records) {
    absl::Status s = analysis.Feed(rec);
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat(file, ": ", s.message()));
    }
  }
  return analysis.report();
}

nlohmann::ordered_json AnalyzeReportToJson(const AnalyzeReport& report) {
  nlohmann::ordered_json diagnoses = nlohmann::ordered_json::array();
  for (const Diagnosis& d : report.diagnoses) {
    diagnoses.push_back(DiagnosisToJson(d));
  }
  nlohmann::ordered_json events = nlohmann::ordered_json::array();
  for (const Diagnosis& d : report.events) events.push_back(DiagnosisToJson(d));
  nlohmann::ordered_json advice = nlohmann::ordered_json::array();
  for (const Advice& a : report.advice) advice.push_back(AdviceToJson(a));
  // A non-finite final loss is written as null.
  return {{"file", report.file},
          {"steps", report.steps},
          {"final_loss", report.final_loss},
          {"verdict", report.healthy() ? "healthy" : "unhealthy"},
          {"diagnoses", std::move(diagnoses)},
          {"events", std::move(events)},
          {"advice", std::move(advice)}};
}

void PrintAnalyzeReport(const AnalyzeReport& report, std::ostream& out) {
  out << report.file << "\n";
  if (report.diagnoses.empty() && report.events.empty()) {
    out << "no diagnoses\n";
  } else {
    out << absl::StrFormat("%8s  %-18s  %8s  %8s  %10s  %s\n", "step", "kind",
                           "onset", "severity", "confidence", "evidence");
    // Diagnoses and events in the order they were decided.
    std::vector<const Diagnosis*> rows;
    for (const Diagnosis& d : report.diagnoses) rows.push_back(&d);
    for (const Diagnosis& d : report.events) rows.push_back(&d);
    std::stable_sort(rows.begin(), rows.end(),
                     [](const Diagnosis* a, const Diagnosis* b) {
                       return a->step < b->step;
                     });
    for (const Diagnosis* d : rows) {
      out << absl::StrFormat("%8d  %-18s  %8d  %8.2f  %10.2f  %s\n", d->step,
                             analyzers::KindName(d->kind), d->onset,
                             d->severity, d->confidence, d->evidence);
    }
  }
  if (!report.advice.empty()) {
    out << "advice:\n";
    for (const Advice& a : report.advice) {
      out << absl::StrFormat("  step %d %s: %s\n", a.at_step,
                             policy::ActionName(a.action), a.explanation);
    }
  }
  std::string kinds;
  for (const Diagnosis& d : report.diagnoses) {
    absl::StrAppend(&kinds, kinds.empty() ? "" : ", ",
                    std::string(analyzers::KindName(d.kind)));
  }
  out << absl::StrFormat("summary: %d steps, final loss %g, verdict %s%s\n",
                         report.steps, report.final_loss,
                         report.healthy() ? "healthy" : "unhealthy",
                         kinds.empty() ? "" : absl::StrCat(" (", kinds, ")"));
}

}  // namespace lossguard::cli
