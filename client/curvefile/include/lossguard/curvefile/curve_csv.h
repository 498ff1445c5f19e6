#ifndef LOSSGUARD_CURVEFILE_CURVE_CSV_H_
#define LOSSGUARD_CURVEFILE_CURVE_CSV_H_

#include <istream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lossguard/analyzers/types.h"

namespace lossguard::curvefile {

// Readers of a training curve in the corpus CSV format (FORMAT.md, v1).
//
// The first line is a header naming the columns; columns are found by name,
// in any order. `step`, `lr` and `loss` are required; `val_loss` and
// `grad_norm` are optional, and an empty cell there means "not measured".
// Other columns are ignored. Every row has as many fields as the header.
// Steps are integers in the int64 range and strictly increasing; lr is a
// finite number >= 0. `nan`, `inf`, `-inf`, `Infinity` (any case) in loss,
// val_loss and grad_norm are data, not errors, and so is a number too large
// for a double there (`1e400` reads as inf: a divergence signal). A number
// too small for a double (`1e-400`) reads as 0 in every column. Numbers are
// parsed strictly: the whole field (after the CSV layer drops spaces around
// it) must be one number. Lines end in LF, CRLF or a lone CR (old Mac
// files); a leading UTF-8 byte order mark is accepted.
//
// Errors are InvalidArgument with the message "NAME:LINE: what is wrong"
// (LINE is 1-based), so a caller can print the message as it is. Reading a
// file: a file that does not exist is NotFound, "PATH: no such file"; one
// that may not be read is PermissionDenied, "PATH: permission denied"; a
// directory is InvalidArgument, "PATH: is a directory"; any other failure to
// open it carries the system's own message, "PATH: <reason>", and a code
// that fits it (absl::ErrnoToStatus). A read error is DataLoss.
//
// Thread-safety: the functions share no state; concurrent calls are safe.

// Receives each data row, in file order, as soon as it has been parsed and
// checked. A non-OK status stops the parse: the parse returns it with its
// code and its message prefixed by "NAME:LINE: " of that row.
using RowCallback =
    absl::FunctionRef<absl::Status(const analyzers::StepRecord&)>;

// Streaming readers: they hold one line at a time, whatever the file's
// length, and pass each row to `on_row`. Rows before an error have been
// passed already; a caller that must not act on a partly bad file buffers
// what it would act on until OK is returned.

// Reads the curve file at `path`; messages name it by `path`.
absl::Status ReadCurveCsv(const std::string& path, RowCallback on_row);

// Parses curve CSV read from `in`; messages name it `name`.
absl::Status ParseCurveCsv(std::istream& in, std::string_view name,
                           RowCallback on_row);

// Parses curve CSV held in `data` (any bytes); messages name it `name`.
absl::Status ParseCurveCsv(std::string_view data, std::string_view name,
                           RowCallback on_row);

// The same, collecting every row.

absl::StatusOr<std::vector<analyzers::StepRecord>> ReadCurveCsv(
    const std::string& path);

absl::StatusOr<std::vector<analyzers::StepRecord>> ParseCurveCsv(
    std::istream& in, std::string_view name);

absl::StatusOr<std::vector<analyzers::StepRecord>> ParseCurveCsv(
    std::string_view data, std::string_view name);

}  // namespace lossguard::curvefile

#endif  // LOSSGUARD_CURVEFILE_CURVE_CSV_H_
