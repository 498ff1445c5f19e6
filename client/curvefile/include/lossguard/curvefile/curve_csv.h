#ifndef LOSSGUARD_CURVEFILE_CURVE_CSV_H_
#define LOSSGUARD_CURVEFILE_CURVE_CSV_H_

#include <istream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "lossguard/analyzers/types.h"

namespace lossguard::curvefile {

// Readers of a training curve in the corpus CSV format (FORMAT.md, v1).
//
// The first line is a header naming the columns; columns are found by name,
// in any order. `step`, `lr` and `loss` are required; `val_loss` and
// `grad_norm` are optional, and an empty cell there means "not measured".
// Other columns are ignored. Every row has as many fields as the header.
// Steps are integers and strictly increasing; lr is a finite number >= 0.
// `nan`, `inf`, `-inf`, `Infinity` (any case) in loss, val_loss and
// grad_norm are data, not errors. Numbers are parsed strictly: the whole
// field (after the CSV layer drops spaces around it) must be one number.
// CRLF line endings and a leading UTF-8 byte order mark are accepted.
//
// Errors are InvalidArgument with the message "NAME:LINE: what is wrong"
// (LINE is 1-based), so a caller can print the message as it is. A file
// that does not exist is NotFound, "PATH: no such file".
//
// Thread-safety: the functions share no state; concurrent calls are safe.

// Reads the curve file at `path`; messages name it by `path`.
absl::StatusOr<std::vector<analyzers::StepRecord>> ReadCurveCsv(
    const std::string& path);

// Parses curve CSV read from `in`; messages name it `name`.
absl::StatusOr<std::vector<analyzers::StepRecord>> ParseCurveCsv(
    std::istream& in, std::string_view name);

// Parses curve CSV held in `data` (any bytes); messages name it `name`.
absl::StatusOr<std::vector<analyzers::StepRecord>> ParseCurveCsv(
    std::string_view data, std::string_view name);

}  // namespace lossguard::curvefile

#endif  // LOSSGUARD_CURVEFILE_CURVE_CSV_H_
