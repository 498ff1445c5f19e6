#include "client/cli/lr_find.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lossguard::cli {

absl::StatusOr<analyzers::LrSuggestion> FindLr(
    const std::string& file,
    const std::vector<analyzers::StepRecord>& records) {
  std::vector<double> lrs;
  std::vector<double> losses;
  lrs.reserve(records.size());
  losses.reserve(records.size());
  for (const analyzers::StepRecord& rec : records) {
    lrs.push_back(rec.lr);
    losses.push_back(rec.loss);
  }
  absl::StatusOr<analyzers::LrSuggestion> s =
      analyzers::SuggestLearningRate(lrs, losses);
  if (!s.ok()) {
    return absl::Status(
        s.status().code(),
        absl::StrCat(file, ": LR range test: ", s.status().message()));
  }
  return s;
}

nlohmann::ordered_json LrSuggestionToJson(const std::string& file,
                                          const analyzers::LrSuggestion& s) {
  return {{"file", file},
          {"suggested_lr", s.suggested_lr},
          {"steep_lo_lr", s.steep_lo_lr},
          {"steep_hi_lr", s.steep_hi_lr},
          {"steep_mid_lr", s.steep_mid_lr},
          {"min_loss_lr", s.min_loss_lr},
          {"basin_lo_lr", s.basin_lo_lr},
          {"basin_hi_lr", s.basin_hi_lr},
          {"basin_mid_lr", s.basin_mid_lr},
          {"diverge_lr", s.diverge_lr},
          {"points_used", s.points_used},
          {"evidence", s.evidence}};
}

void PrintLrSuggestion(const std::string& file,
                       const analyzers::LrSuggestion& s, std::ostream& out) {
  out << file << "\n"
      << absl::StrFormat("suggested lr:     %g\n", s.suggested_lr)
      << absl::StrFormat("steepest descent: %g .. %g (middle %g)\n",
                         s.steep_lo_lr, s.steep_hi_lr, s.steep_mid_lr)
      << absl::StrFormat("min loss at lr:   %g (basin %g .. %g, middle %g)\n",
                         s.min_loss_lr, s.basin_lo_lr, s.basin_hi_lr,
                         s.basin_mid_lr)
      << (s.diverge_lr > 0.0
              ? absl::StrFormat("diverges at lr:   %g\n", s.diverge_lr)
              : std::string("diverges at lr:   (did not diverge)\n"))
      << absl::StrFormat("points used:      %d\n", s.points_used)
      << "evidence: " << s.evidence << "\n";
}

}  // namespace lossguard::cli
