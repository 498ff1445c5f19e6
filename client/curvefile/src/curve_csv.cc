#include "lossguard/curvefile/curve_csv.h"

#include <csv.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lossguard::curvefile {
namespace {

using analyzers::StepRecord;

constexpr std::string_view kUtf8Bom = "\xEF\xBB\xBF";
// Longest field text quoted back in a message.
constexpr size_t kMaxQuotedField = 40;

// The whole of `s` as an integer, or nullopt.
std::optional<int64_t> ParseInt(std::string_view s) {
  int64_t v = 0;
  const char* end = s.data() + s.size();
  auto [ptr, ec] = std::from_chars(s.data(), end, v);
  if (s.empty() || ec != std::errc() || ptr != end) return std::nullopt;
  return v;
}

// The whole of `s` as a double (nan and inf spellings included), or nullopt.
std::optional<double> ParseDouble(std::string_view s) {
  double v = 0.0;
  const char* end = s.data() + s.size();
  auto [ptr, ec] = std::from_chars(s.data(), end, v);
  if (s.empty() || ec != std::errc() || ptr != end) return std::nullopt;
  return v;
}

// `s` quoted for a message: escaped, and shortened when long.
std::string Quote(std::string_view s) {
  const bool cut = s.size() > kMaxQuotedField;
  if (cut) s = s.substr(0, kMaxQuotedField);
  return absl::StrCat("'",
                      absl::CHexEscape(absl::string_view(s.data(), s.size())),
                      cut ? "...'" : "'");
}

// Feeds libcsv one physical line at a time, so that each record knows the
// 1-based line it starts on, and turns the records into StepRecords.
class CurveCsvParser {
 public:
  explicit CurveCsvParser(std::string_view name) : name_(name) {
    if (csv_init(&csv_, CSV_STRICT | CSV_STRICT_FINI) != 0) {
      status_ = absl::ResourceExhaustedError(
          absl::StrCat(name_, ": cannot initialize the CSV parser"));
    }
  }
  ~CurveCsvParser() { csv_free(&csv_); }

  CurveCsvParser(const CurveCsvParser&) = delete;
  CurveCsvParser& operator=(const CurveCsvParser&) = delete;

  // Feeds one physical line with its '\n' (the last line may lack it).
  // Returns false once an error has been found.
  bool FeedLine(std::string_view line) {
    if (!status_.ok()) return false;
    ++line_;
    if (line_ == 1 && line.substr(0, kUtf8Bom.size()) == kUtf8Bom) {
      line.remove_prefix(kUtf8Bom.size());
    }
    const size_t used = csv_parse(&csv_, line.data(), line.size(), &OnField,
                                  &OnRecordEnd, this);
    if (status_.ok() && used != line.size()) SetCsvError();
    return status_.ok();
  }

  // Ends the input and returns the records or the first error.
  absl::StatusOr<std::vector<StepRecord>> Finish() {
    if (status_.ok() && csv_fini(&csv_, &OnField, &OnRecordEnd, this) != 0) {
      SetCsvError();
    }
    if (!status_.ok()) return status_;
    if (!header_done_) {
      return Error(1,
                   "empty file: expected a header line naming the columns "
                   "step,lr,loss");
    }
    if (records_.empty()) {
      return Error(header_line_ + 1, "no data rows after the header");
    }
    return std::move(records_);
  }

 private:
  static void OnField(void* text, size_t len, void* self) {
    auto* p = static_cast<CurveCsvParser*>(self);
    if (!p->status_.ok()) return;
    if (p->fields_.empty()) p->record_line_ = p->line_;
    p->fields_.emplace_back(text == nullptr ? "" : static_cast<char*>(text),
                            len);
  }

  static void OnRecordEnd(int /*terminator*/, void* self) {
    auto* p = static_cast<CurveCsvParser*>(self);
    if (p->status_.ok()) {
      p->status_ = p->header_done_ ? p->TakeRow() : p->TakeHeader();
    }
    p->fields_.clear();
  }

  absl::Status Error(int64_t line, std::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s:%d: %s", name_, line, what));
  }

  void SetCsvError() {
    const int err = csv_error(&csv_);
    status_ =
        Error(line_, err == CSV_EPARSE
                         ? "malformed CSV: a quote inside an unquoted "
                           "field, or a quoted field not closed"
                         : absl::StrCat("CSV error: ", csv_strerror(err)));
  }

  absl::Status TakeHeader() {
    header_line_ = record_line_;
    num_fields_ = fields_.size();
    const std::pair<std::string_view, int*> known[] = {
        {"step", &col_step_},
        {"lr", &col_lr_},
        {"loss", &col_loss_},
        {"val_loss", &col_val_loss_},
        {"grad_norm", &col_grad_norm_}};
    for (size_t i = 0; i < fields_.size(); ++i) {
      for (const auto& [name, col] : known) {
        if (fields_[i] != name) continue;
        if (*col >= 0) {
          return Error(
              record_line_,
              absl::StrFormat("column '%s' appears twice in the header", name));
        }
        *col = static_cast<int>(i);
      }
    }
    for (const auto& [name, col] : known) {
      if (*col < 0 && (name == "step" || name == "lr" || name == "loss")) {
        return Error(
            record_line_,
            absl::StrFormat("missing required column '%s' in the header "
                            "(need step,lr,loss)",
                            name));
      }
    }
    header_done_ = true;
    return absl::OkStatus();
  }

  absl::Status TakeRow() {
    if (fields_.size() != num_fields_) {
      return Error(
          record_line_,
          absl::StrFormat("expected %d fields as in the header, found %d",
                          num_fields_, fields_.size()));
    }
    StepRecord rec;
    const std::string& step_text = fields_[col_step_];
    if (step_text.empty()) return Error(record_line_, "missing step value");
    std::optional<int64_t> step = ParseInt(step_text);
    if (!step) {
      return Error(record_line_, absl::StrCat("step ", Quote(step_text),
                                              " is not an integer"));
    }
    if (!records_.empty() && *step <= records_.back().step) {
      return Error(record_line_,
                   absl::StrFormat("step %d is not greater than the previous "
                                   "step %d (line %d)",
                                   *step, records_.back().step, prev_line_));
    }
    rec.step = *step;

    // An empty or nan lr means the log did not record it (many published
    // logs don't); the analyzer then skips its LR-aware rules.
    std::optional<double> lr;
    absl::Status s = Number("lr", col_lr_, /*required=*/false, &lr);
    if (!s.ok()) return s;
    if (lr.has_value() && (std::isinf(*lr) || *lr < 0)) {
      return Error(record_line_, absl::StrCat("lr ", Quote(fields_[col_lr_]),
                                              " is not a finite number >= 0"));
    }
    rec.lr = lr.value_or(std::numeric_limits<double>::quiet_NaN());

    std::optional<double> loss;
    s = Number("loss", col_loss_, /*required=*/true, &loss);
    if (!s.ok()) return s;
    rec.loss = *loss;
    s = Number("val_loss", col_val_loss_, /*required=*/false, &rec.val_loss);
    if (!s.ok()) return s;
    s = Number("grad_norm", col_grad_norm_, /*required=*/false, &rec.grad_norm);
    if (!s.ok()) return s;

    records_.push_back(rec);
    prev_line_ = record_line_;
    return absl::OkStatus();
  }

  // Parses column `col` (absent when < 0) named `name` into `*out`. An empty
  // cell leaves `*out` empty, which is an error only when `required`.
  absl::Status Number(std::string_view name, int col, bool required,
                      std::optional<double>* out) const {
    *out = std::nullopt;
    if (col < 0) return absl::OkStatus();
    const std::string& text = fields_[col];
    if (text.empty()) {
      return required ? Error(record_line_,
                              absl::StrFormat("missing %s value", name))
                      : absl::OkStatus();
    }
    *out = ParseDouble(text);
    if (!*out) {
      return Error(record_line_,
                   absl::StrFormat("%s %s is not a number", name, Quote(text)));
    }
    return absl::OkStatus();
  }

  const std::string name_;
  csv_parser csv_{};
  absl::Status status_;
  int64_t line_ = 0;         // physical line last fed, 1-based
  int64_t record_line_ = 0;  // line where the current record starts
  int64_t header_line_ = 0;
  int64_t prev_line_ = 0;            // line of the last accepted row
  std::vector<std::string> fields_;  // the current record
  bool header_done_ = false;
  size_t num_fields_ = 0;
  int col_step_ = -1;
  int col_lr_ = -1;
  int col_loss_ = -1;
  int col_val_loss_ = -1;
  int col_grad_norm_ = -1;
  std::vector<StepRecord> records_;
};

}  // namespace

absl::StatusOr<std::vector<StepRecord>> ParseCurveCsv(std::string_view data,
                                                      std::string_view name) {
  CurveCsvParser parser(name);
  while (!data.empty()) {
    const size_t nl = data.find('\n');
    const size_t len = nl == std::string_view::npos ? data.size() : nl + 1;
    if (!parser.FeedLine(data.substr(0, len))) break;
    data.remove_prefix(len);
  }
  return parser.Finish();
}

absl::StatusOr<std::vector<StepRecord>> ParseCurveCsv(std::istream& in,
                                                      std::string_view name) {
  CurveCsvParser parser(name);
  std::string line;
  while (std::getline(in, line)) {
    if (!in.eof()) line.push_back('\n');
    if (!parser.FeedLine(line)) break;
  }
  if (in.bad()) {
    return absl::DataLossError(absl::StrFormat("%s: read error", name));
  }
  return parser.Finish();
}

absl::StatusOr<std::vector<StepRecord>> ReadCurveCsv(const std::string& path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  }
  if (std::filesystem::is_directory(status)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": is a directory"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  return ParseCurveCsv(in, path);
}

}  // namespace lossguard::curvefile
