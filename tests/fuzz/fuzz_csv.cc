// libFuzzer target: the curve CSV reader (client/curvefile/curve_csv.h).
//
// Any bytes are parsed; besides "no crash, no sanitizer report" it checks
// what the header promises:
//   - an error is InvalidArgument "NAME:LINE: ..." with 1 <= LINE <= the
//     input's physical lines + 1;
//   - a parse yields at least one row, strictly increasing steps, an lr that
//     is NaN or a finite number >= 0 (never -0), and val_loss / grad_norm
//     only where the header has that column (step, lr, loss exactly once);
//   - the rows, written back as CSV, read back the same;
//   - the string, std::istream and file readers agree, and so does the file
//     reader when its 64 KiB read chunks cut the input at another place
//     (the input padded with spaces the CSV layer drops);
//   - a callback error after k rows stops the parse with "NAME:LINE: " and
//     its own code, after exactly the first k rows.

#include <csv.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "fuzz_common.h"
#include "lossguard/curvefile/curve_csv.h"

namespace lossguard::fuzz {
namespace {

using analyzers::StepRecord;
using curvefile::ParseCurveCsv;
using curvefile::ReadCurveCsv;

constexpr std::string_view kBom = "\xEF\xBB\xBF";
// curve_csv.cc reads files 64 KiB at a time.
constexpr size_t kReadChunk = 64 * 1024;

struct Result {
  absl::Status status;
  std::vector<StepRecord> rows;  // every row passed to the callback
};

bool SameRecord(const StepRecord& a, const StepRecord& b) {
  return a.step == b.step && SameDouble(a.lr, b.lr) &&
         SameDouble(a.loss, b.loss) && SameOptional(a.val_loss, b.val_loss) &&
         SameOptional(a.grad_norm, b.grad_norm);
}

std::string Describe(const Result& r) {
  return absl::StrFormat("status=%s rows=%d", r.status.ToString(),
                         r.rows.size());
}

void CheckSame(const Result& a, const Result& b, const char* what) {
  FUZZ_CHECK(a.status == b.status, "%s: %s vs %s", what, Describe(a).c_str(),
             Describe(b).c_str());
  FUZZ_CHECK(a.rows.size() == b.rows.size(), "%s: %s vs %s", what,
             Describe(a).c_str(), Describe(b).c_str());
  for (size_t i = 0; i < a.rows.size(); ++i) {
    FUZZ_CHECK(SameRecord(a.rows[i], b.rows[i]), "%s: row %d differs", what, i);
  }
}

auto Collect(std::vector<StepRecord>* rows) {
  return [rows](const StepRecord& r) {
    rows->push_back(r);
    return absl::OkStatus();
  };
}

Result ParseString(std::string_view data, std::string_view name) {
  Result r;
  r.status = ParseCurveCsv(data, name, Collect(&r.rows));
  return r;
}

Result ParseStream(std::string_view data, std::string_view name) {
  std::istringstream in{std::string(data)};
  Result r;
  r.status = ParseCurveCsv(in, name, Collect(&r.rows));
  return r;
}

Result ReadFile(MemFile& file, std::string_view data) {
  file.Write(data);
  Result r;
  r.status = ReadCurveCsv(file.path(), Collect(&r.rows));
  return r;
}

// Physical lines: LF, CRLF and a lone CR each end one.
int64_t CountLines(std::string_view data) {
  int64_t lines = 1;
  for (size_t i = 0; i < data.size(); ++i) {
    if (data[i] == '\n') {
      ++lines;
    } else if (data[i] == '\r') {
      ++lines;
      if (i + 1 < data.size() && data[i + 1] == '\n') ++i;
    }
  }
  return lines;
}

// "NAME:LINE: what" -> LINE; -1 when the message has not that form.
int64_t LineOf(std::string_view message, std::string_view name) {
  if (!StartsWith(message, name)) return -1;
  message.remove_prefix(name.size());
  if (message.empty() || message.front() != ':') return -1;
  message.remove_prefix(1);
  const size_t colon = message.find(": ");
  if (colon == std::string_view::npos || colon == 0) return -1;
  int64_t line = 0;
  if (!ParseInt(message.substr(0, colon), &line)) return -1;
  return line;
}

// The header's fields as libcsv reads them (the first record); empty when
// it cannot tell.
std::vector<std::string> HeaderFields(std::string_view data) {
  if (StartsWith(data, kBom)) data.remove_prefix(kBom.size());
  struct State {
    std::vector<std::string> fields;
    bool done = false;
  } st;
  csv_parser p{};
  if (csv_init(&p, CSV_STRICT | CSV_STRICT_FINI) != 0) return {};
  auto on_field = [](void* text, size_t len, void* self) {
    auto* s = static_cast<State*>(self);
    if (s->done) return;
    s->fields.emplace_back(text ? static_cast<const char*>(text) : "", len);
  };
  auto on_record = [](int, void* self) {
    static_cast<State*>(self)->done = true;
  };
  // Feed a byte at a time until the first record ends.
  for (size_t i = 0; i < data.size() && !st.done; ++i) {
    if (csv_parse(&p, data.data() + i, 1, on_field, on_record, &st) != 1) break;
  }
  if (!st.done) csv_fini(&p, on_field, on_record, &st);
  csv_free(&p);
  if (!st.done) return {};
  return st.fields;
}

// A double as the CSV reader reads it back exactly.
std::string Num(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return absl::StrFormat("%.17g", v);
}

std::string Write(const std::vector<StepRecord>& rows) {
  std::string out = "step,lr,loss,val_loss,grad_norm\n";
  for (const StepRecord& r : rows) {
    absl::StrAppend(&out, r.step, ",", Num(r.lr), ",", Num(r.loss), ",",
                    r.val_loss ? Num(*r.val_loss) : "", ",",
                    r.grad_norm ? Num(*r.grad_norm) : "", "\n");
  }
  return out;
}

void CheckParsed(std::string_view data, std::string_view name,
                 const Result& r) {
  FUZZ_CHECK(!r.rows.empty(), "OK with no rows");
  for (size_t i = 0; i < r.rows.size(); ++i) {
    const StepRecord& rec = r.rows[i];
    if (i > 0) {
      FUZZ_CHECK(rec.step > r.rows[i - 1].step, "row %d: step %d after %d", i,
                 rec.step, r.rows[i - 1].step);
    }
    FUZZ_CHECK(std::isnan(rec.lr) || (std::isfinite(rec.lr) && rec.lr >= 0 &&
                                      !std::signbit(rec.lr)),
               "row %d: lr %g", i, rec.lr);
  }
  const std::vector<std::string> header = HeaderFields(data);
  if (!header.empty()) {
    auto count = [&](std::string_view col) {
      int n = 0;
      for (const std::string& f : header) n += f == col;
      return n;
    };
    FUZZ_CHECK(count("step") == 1 && count("lr") == 1 && count("loss") == 1,
               "parsed without step, lr and loss once each in the header");
    for (const StepRecord& rec : r.rows) {
      FUZZ_CHECK(!rec.val_loss || count("val_loss") == 1,
                 "val_loss without its column");
      FUZZ_CHECK(!rec.grad_norm || count("grad_norm") == 1,
                 "grad_norm without its column");
    }
  }
  // Written back and read again: the same rows.
  const Result again = ParseString(Write(r.rows), name);
  FUZZ_CHECK(again.status.ok(), "round trip: %s",
             again.status.ToString().c_str());
  CheckSame(r, again, "round trip");
}

void CheckError(std::string_view data, std::string_view name, const Result& r) {
  FUZZ_CHECK(r.status.code() == absl::StatusCode::kInvalidArgument, "%s",
             r.status.ToString().c_str());
  const int64_t line = LineOf(Message(r.status), name);
  FUZZ_CHECK(line >= 1 && line <= CountLines(data) + 1,
             "message does not name the file and a line of it: %s",
             Message(r.status));
}

// A callback that fails after `k` rows stops the parse there.
void CheckStop(std::string_view data, std::string_view name,
               const Result& full) {
  const size_t k = full.rows.size() / 2;
  std::vector<StepRecord> seen;
  const absl::Status s = ParseCurveCsv(data, name, [&](const StepRecord& r) {
    if (seen.size() == k) return absl::CancelledError("stop here");
    seen.push_back(r);
    return absl::OkStatus();
  });
  FUZZ_CHECK(s.code() == absl::StatusCode::kCancelled, "stop: %s",
             s.ToString().c_str());
  FUZZ_CHECK(
      EndsWith(Message(s), ": stop here") && LineOf(Message(s), name) >= 1,
      "stop: %s", Message(s));
  FUZZ_CHECK(seen.size() == k, "stop: %d rows, not %d", seen.size(), k);
  for (size_t i = 0; i < k; ++i) {
    FUZZ_CHECK(SameRecord(seen[i], full.rows[i]), "stop: row %d differs", i);
  }
}

// `data` with spaces after its header's last field, so that the file
// reader's first 64 KiB chunk ends just before byte `cut` of `data`. Only
// for a header the padding cannot change: no BOM, no quotes, something
// other than blanks. Empty when it does not apply.
std::string PaddedForCut(std::string_view data) {
  if (data.size() >= kReadChunk || StartsWith(data, kBom)) return "";
  const size_t brk = data.find_first_of("\r\n");
  if (brk == std::string_view::npos || brk + 2 > data.size()) return "";
  const std::string_view header = data.substr(0, brk);
  if (header.find('"') != std::string_view::npos ||
      header.find_first_not_of(" \t") == std::string_view::npos) {
    return "";
  }
  // The cut: right after the first CR after the header when there is one
  // (a CRLF split between two reads), else a place the bytes choose.
  size_t cut = data.find('\r', brk + 1);
  if (cut != std::string_view::npos && cut + 1 < data.size()) {
    ++cut;
  } else {
    uint32_t h = 2166136261u;
    for (unsigned char c : data) h = (h ^ c) * 16777619u;
    cut = brk + 1 + h % (data.size() - brk - 1);
  }
  std::string padded(data.substr(0, brk));
  padded.append(kReadChunk - cut, ' ');
  padded.append(data.substr(brk));
  return padded;
}

MemFile* file = new MemFile();

}  // namespace
}  // namespace lossguard::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  using namespace lossguard::fuzz;
  const std::string_view data(reinterpret_cast<const char*>(bytes), size);
  const std::string& name = file->path();

  const Result r = ParseString(data, name);
  if (r.status.ok()) {
    CheckParsed(data, name, r);
  } else {
    CheckError(data, name, r);
  }
  CheckSame(r, ParseStream(data, name), "istream reader");
  CheckSame(r, ReadFile(*file, data), "file reader");
  const std::string padded = PaddedForCut(data);
  if (!padded.empty()) {
    CheckSame(r, ReadFile(*file, padded), "file reader, other chunk cut");
  }
  if (!r.rows.empty()) CheckStop(data, name, r);
  return 0;
}
