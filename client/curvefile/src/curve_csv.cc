#include "lossguard/curvefile/curve_csv.h"

#include <csv.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <istream>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

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
// Growth step of libcsv's field buffer.
constexpr size_t kCsvBlockSize = 1 << 20;

// Bytes read from a file or stream at a time.
constexpr size_t kReadChunk = 64 * 1024;

// How std::from_chars read a whole field.
enum class NumberRead {
  kOk,
  kNotANumber,  // not one number, or not all of the field
  kOverflow,    // a number beyond the type's range
  kUnderflow,   // floating point: a nonzero number that rounds to 0
};

// Whether `s`, a decimal number that std::from_chars read whole but found
// outside the range of double, is too large rather than too small: its
// magnitude is >= 1 exactly when the decimal exponent of its first nonzero
// digit is >= 0. (std::from_chars leaves the value unset then, and says
// only "out of range".)
bool MagnitudeAtLeastOne(std::string_view s) {
  if (!s.empty() && s.front() == '-') s.remove_prefix(1);
  const size_t e = std::min(s.find_first_of("eE"), s.size());
  const std::string_view mantissa = s.substr(0, e);
  const size_t point = std::min(mantissa.find('.'), mantissa.size());
  const size_t lead = mantissa.find_first_not_of("0.");
  if (lead == std::string_view::npos) return false;  // zero
  // Both are bounded by the field's length.
  int64_t exponent = lead < point ? static_cast<int64_t>(point - lead - 1)
                                  : -static_cast<int64_t>(lead - point);
  if (e == s.size()) return exponent >= 0;
  std::string_view x = s.substr(e + 1);
  const bool negative = !x.empty() && x.front() == '-';
  if (!x.empty() && (x.front() == '-' || x.front() == '+')) x.remove_prefix(1);
  int64_t written = 0;
  const auto [ptr, ec] =
      std::from_chars(x.data(), x.data() + x.size(), written);
  // An exponent beyond int64 dwarfs the mantissa's.
  if (ec != std::errc()) return !negative;
  if (negative) written = -written;
  int64_t sum = 0;
  if (__builtin_add_overflow(exponent, written, &sum)) return !negative;
  return sum >= 0;
}

// Reads the whole of `s` as a T (integral or floating point; for floating
// point the nan and inf spellings included). On kOverflow `*out` is set to
// the value saturated with the sign of `s`: +-inf for floating point, the
// type's limit for integral T. On kUnderflow `*out` is zero with the sign of
// `s`, the correctly rounded value.
template <typename T>
NumberRead ReadNumber(std::string_view s, T* out) {
  const char* end = s.data() + s.size();
  const auto [ptr, ec] = std::from_chars(s.data(), end, *out);
  if (s.empty() || ptr != end) return NumberRead::kNotANumber;
  if (ec == std::errc()) return NumberRead::kOk;
  if (ec != std::errc::result_out_of_range) return NumberRead::kNotANumber;
  const bool negative = s.front() == '-';
  if constexpr (std::is_floating_point_v<T>) {
    if (!MagnitudeAtLeastOne(s)) {
      *out = negative ? -T{0} : T{0};
      return NumberRead::kUnderflow;
    }
    *out = negative ? -std::numeric_limits<T>::infinity()
                    : std::numeric_limits<T>::infinity();
  } else {
    *out = negative ? std::numeric_limits<T>::min()
                    : std::numeric_limits<T>::max();
  }
  return NumberRead::kOverflow;
}

// `s` quoted for a message: escaped, and shortened when long.
std::string Quote(std::string_view s) {
  const bool cut = s.size() > kMaxQuotedField;
  if (cut) s = s.substr(0, kMaxQuotedField);
  return absl::StrCat("'",
                      absl::CHexEscape(absl::string_view(s.data(), s.size())),
                      cut ? "...'" : "'");
}

// Splits input into physical lines and feeds libcsv one line at a time, so
// that each record knows the 1-based line it starts on; passes each checked
// row to the callback. Holds one line (and one record) at a time.
class CurveCsvParser {
 public:
  CurveCsvParser(std::string_view name, RowCallback on_row)
      : name_(name), on_row_(on_row) {
    if (csv_init(&csv_, CSV_STRICT | CSV_STRICT_FINI) != 0) {
      status_ = absl::ResourceExhaustedError(
          absl::StrCat(name_, ": cannot initialize the CSV parser"));
    }
    // libcsv grows its field buffer by a fixed block (128 bytes by default):
    // a long field would cost a quadratic number of copies wherever realloc
    // cannot grow in place. Large blocks keep that to a handful.
    csv_set_blk_size(&csv_, kCsvBlockSize);
  }
  ~CurveCsvParser() { csv_free(&csv_); }

  CurveCsvParser(const CurveCsvParser&) = delete;
  CurveCsvParser& operator=(const CurveCsvParser&) = delete;

  // Feeds the next bytes of the input, cut anywhere. A line ends at "\n",
  // "\r\n" or a lone "\r". Returns false once an error has been found.
  bool Feed(std::string_view chunk) {
    if (chunk.empty()) return status_.ok();
    if (held_cr_) {
      // The last chunk ended in '\r': a "\r\n" split in two, or a lone CR.
      held_cr_ = false;
      if (chunk.front() == '\n') {
        partial_.push_back('\n');
        chunk.remove_prefix(1);
      }
      if (!FeedPartial()) return false;
    }
    while (!chunk.empty()) {
      const size_t brk = chunk.find_first_of("\r\n");
      if (brk == std::string_view::npos) {
        partial_.append(chunk);
        break;
      }
      size_t len = brk + 1;
      if (chunk[brk] == '\r') {
        if (len == chunk.size()) {  // a '\n' may follow in the next chunk
          partial_.append(chunk);
          held_cr_ = true;
          break;
        }
        if (chunk[len] == '\n') ++len;
      }
      const std::string_view line = chunk.substr(0, len);
      chunk.remove_prefix(len);
      if (partial_.empty()) {
        if (!FeedLine(line)) return false;
      } else {
        partial_.append(line);
        if (!FeedPartial()) return false;
      }
    }
    return status_.ok();
  }

  // Ends the input; returns OK or the first error.
  absl::Status Finish() {
    if (status_.ok() && !partial_.empty()) FeedPartial();  // no final break
    if (status_.ok() && csv_fini(&csv_, &OnField, &OnRecordEnd, this) != 0) {
      SetCsvError();
    }
    if (!status_.ok()) return status_;
    if (!header_done_) {
      return Error(1,
                   "empty file: expected a header line naming the columns "
                   "step,lr,loss");
    }
    if (rows_ == 0) {
      return Error(header_line_ + 1, "no data rows after the header");
    }
    return absl::OkStatus();
  }

 private:
  bool FeedPartial() {
    const bool ok = FeedLine(partial_);
    partial_.clear();
    return ok;
  }

  // Feeds one physical line with its break (the last line may lack it).
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
    switch (ReadNumber(step_text, &rec.step)) {
      case NumberRead::kOk:
        break;
      case NumberRead::kOverflow:
        return Error(record_line_, absl::StrCat("step ", Quote(step_text),
                                                " is out of the int64 range"));
      case NumberRead::kNotANumber:
      case NumberRead::kUnderflow:
        return Error(record_line_, absl::StrCat("step ", Quote(step_text),
                                                " is not an integer"));
    }
    if (rows_ > 0 && rec.step <= prev_step_) {
      return Error(record_line_,
                   absl::StrFormat("step %d is not greater than the previous "
                                   "step %d (line %d)",
                                   rec.step, prev_step_, prev_line_));
    }

    // An empty or nan lr means the log did not record it (many published
    // logs don't); the analyzer then skips its LR-aware rules.
    std::optional<double> lr;
    absl::Status s = Number("lr", col_lr_, /*required=*/false,
                            /*overflow_is_data=*/false, &lr);
    if (!s.ok()) return s;
    if (lr.has_value() && (std::isinf(*lr) || *lr < 0)) {
      return Error(record_line_, absl::StrCat("lr ", Quote(fields_[col_lr_]),
                                              " is not a finite number >= 0"));
    }
    if (lr == 0.0) lr = 0.0;  // -0 (an underflow of "-1e-400") is 0
    rec.lr = lr.value_or(std::numeric_limits<double>::quiet_NaN());

    // A loss or norm too large for a double is data: it blew up.
    std::optional<double> loss;
    s = Number("loss", col_loss_, /*required=*/true,
               /*overflow_is_data=*/true, &loss);
    if (!s.ok()) return s;
    rec.loss = *loss;
    s = Number("val_loss", col_val_loss_, /*required=*/false,
               /*overflow_is_data=*/true, &rec.val_loss);
    if (!s.ok()) return s;
    s = Number("grad_norm", col_grad_norm_, /*required=*/false,
               /*overflow_is_data=*/true, &rec.grad_norm);
    if (!s.ok()) return s;

    ++rows_;
    prev_step_ = rec.step;
    prev_line_ = record_line_;
    s = on_row_(rec);
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrFormat("%s:%d: %s", name_,
                                                    record_line_, s.message()));
    }
    return absl::OkStatus();
  }

  // Parses column `col` (absent when < 0) named `name` into `*out`. An empty
  // cell leaves `*out` empty, which is an error only when `required`. A
  // number too large for a double reads as +-inf when `overflow_is_data`
  // and is an error otherwise; one too small reads as 0.
  absl::Status Number(std::string_view name, int col, bool required,
                      bool overflow_is_data, std::optional<double>* out) const {
    *out = std::nullopt;
    if (col < 0) return absl::OkStatus();
    const std::string& text = fields_[col];
    if (text.empty()) {
      return required ? Error(record_line_,
                              absl::StrFormat("missing %s value", name))
                      : absl::OkStatus();
    }
    double v = 0.0;
    switch (ReadNumber(text, &v)) {
      case NumberRead::kOk:
      case NumberRead::kUnderflow:
        break;
      case NumberRead::kOverflow:
        if (overflow_is_data) break;
        return Error(record_line_, absl::StrFormat("%s %s is out of range",
                                                   name, Quote(text)));
      case NumberRead::kNotANumber:
        return Error(record_line_, absl::StrFormat("%s %s is not a number",
                                                   name, Quote(text)));
    }
    *out = v;
    return absl::OkStatus();
  }

  const std::string name_;
  const RowCallback on_row_;
  csv_parser csv_{};
  absl::Status status_;
  std::string partial_;      // the start of a line not yet ended
  bool held_cr_ = false;     // partial_ ends in a '\r' that may precede '\n'
  int64_t line_ = 0;         // physical line last fed, 1-based
  int64_t record_line_ = 0;  // line where the current record starts
  int64_t header_line_ = 0;
  std::vector<std::string> fields_;  // the current record
  bool header_done_ = false;
  size_t num_fields_ = 0;
  int col_step_ = -1;
  int col_lr_ = -1;
  int col_loss_ = -1;
  int col_val_loss_ = -1;
  int col_grad_norm_ = -1;
  int64_t rows_ = 0;       // rows accepted
  int64_t prev_step_ = 0;  // step of the last accepted row
  int64_t prev_line_ = 0;  // line of the last accepted row
};

// Closes a file descriptor when it goes out of scope.
class ScopedFd {
 public:
  explicit ScopedFd(int fd) : fd_(fd) {}
  ~ScopedFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  int get() const { return fd_; }

 private:
  const int fd_;
};

// The error for a failed open(2) of `path` with `err` (errno).
absl::Status OpenError(const std::string& path, int err) {
  switch (err) {
    case ENOENT:
      return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    case EACCES:
      return absl::PermissionDeniedError(
          absl::StrCat(path, ": permission denied"));
    case EISDIR:
      return absl::InvalidArgumentError(absl::StrCat(path, ": is a directory"));
    default:
      return absl::ErrnoToStatus(err, path);  // "PATH: <strerror>"
  }
}

// Collects rows into `*records`.
auto CollectInto(std::vector<StepRecord>* records) {
  return [records](const StepRecord& rec) {
    records->push_back(rec);
    return absl::OkStatus();
  };
}

}  // namespace

absl::Status ParseCurveCsv(std::string_view data, std::string_view name,
                           RowCallback on_row) {
  CurveCsvParser parser(name, on_row);
  parser.Feed(data);
  return parser.Finish();
}

absl::Status ParseCurveCsv(std::istream& in, std::string_view name,
                           RowCallback on_row) {
  CurveCsvParser parser(name, on_row);
  std::string buffer(kReadChunk, '\0');
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const auto got = static_cast<size_t>(in.gcount());
    if (!parser.Feed(std::string_view(buffer.data(), got))) break;
  }
  if (in.bad()) {
    return absl::DataLossError(absl::StrFormat("%s: read error", name));
  }
  return parser.Finish();
}

absl::Status ReadCurveCsv(const std::string& path, RowCallback on_row) {
  // open(2) rather than std::ifstream: it sets errno, so the error says what
  // went wrong.
  const ScopedFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return OpenError(path, errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return absl::ErrnoToStatus(errno, path);
  if (S_ISDIR(st.st_mode)) return OpenError(path, EISDIR);

  CurveCsvParser parser(path, on_row);
  std::string buffer(kReadChunk, '\0');
  while (true) {
    const ssize_t got = ::read(fd.get(), buffer.data(), buffer.size());
    if (got < 0) {
      if (errno == EINTR) continue;
      return absl::DataLossError(
          absl::ErrnoToStatus(errno, absl::StrCat(path, ": read error"))
              .message());
    }
    if (got == 0) break;
    if (!parser.Feed(
            std::string_view(buffer.data(), static_cast<size_t>(got)))) {
      break;
    }
  }
  return parser.Finish();
}

absl::StatusOr<std::vector<StepRecord>> ParseCurveCsv(std::string_view data,
                                                      std::string_view name) {
  std::vector<StepRecord> records;
  absl::Status s = ParseCurveCsv(data, name, CollectInto(&records));
  if (!s.ok()) return s;
  return records;
}

absl::StatusOr<std::vector<StepRecord>> ParseCurveCsv(std::istream& in,
                                                      std::string_view name) {
  std::vector<StepRecord> records;
  absl::Status s = ParseCurveCsv(in, name, CollectInto(&records));
  if (!s.ok()) return s;
  return records;
}

absl::StatusOr<std::vector<StepRecord>> ReadCurveCsv(const std::string& path) {
  std::vector<StepRecord> records;
  absl::Status s = ReadCurveCsv(path, CollectInto(&records));
  if (!s.ok()) return s;
  return records;
}

}  // namespace lossguard::curvefile
