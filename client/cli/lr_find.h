#ifndef LOSSGUARD_CLIENT_CLI_LR_FIND_H_
#define LOSSGUARD_CLIENT_CLI_LR_FIND_H_

#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lossguard/analyzers/lr_range_test.h"
#include "lossguard/analyzers/types.h"

namespace lossguard::cli {

// Runs the LR range-test analysis on every row of a range-test curve.
// Errors carry `file` in their message.
absl::StatusOr<analyzers::LrSuggestion> FindLr(
    const std::string& file, const std::vector<analyzers::StepRecord>& records);

// The suggestion as one JSON object: file, suggested_lr, steep_lo_lr,
// steep_hi_lr, steep_mid_lr, min_loss_lr, basin_lo_lr, basin_hi_lr,
// basin_mid_lr, diverge_lr, points_used, evidence.
nlohmann::ordered_json LrSuggestionToJson(const std::string& file,
                                          const analyzers::LrSuggestion& s);

// The suggestion as a short readable summary.
void PrintLrSuggestion(const std::string& file,
                       const analyzers::LrSuggestion& s, std::ostream& out);

}  // namespace lossguard::cli

#endif  // LOSSGUARD_CLIENT_CLI_LR_FIND_H_
