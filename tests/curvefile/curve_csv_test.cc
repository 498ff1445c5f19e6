#include "lossguard/curvefile/curve_csv.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
namespace lossguard::curvefile {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

constexpr char kName[] = "mem.csv";

absl::StatusOr<std::vector<analyzers::StepRecord>> Parse(std::string_view csv) {
  return ParseCurveCsv(csv, kName);
}

// The error message of parsing `csv`; fails the test if it parses.
std::string ErrorOf(std::string_view csv) {
  auto r = Parse(csv);
  EXPECT_FALSE(r.ok()) << "parsed: " << csv;
  if (r.ok()) return "";
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(r.status().message());
}

TEST(CurveCsvTest, ReadsRequiredColumns) {
  auto r = Parse("step,lr,loss\n0,0.1,2.5\n1,0.1,2.25\n");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[1].step, 1);
  EXPECT_DOUBLE_EQ((*r)[1].lr, 0.1);
  EXPECT_DOUBLE_EQ((*r)[1].loss, 2.25);
  EXPECT_FALSE((*r)[1].val_loss.has_value());
  EXPECT_FALSE((*r)[1].grad_norm.has_value());
}

TEST(CurveCsvTest, EmptyOptionalCellsAreAbsent) {
  auto r = Parse(
      "step,lr,loss,val_loss,grad_norm\n"
      "0,0.1,2.5,2.4,0.5\n"
      "1,0.1,2.25,,\n");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[0].val_loss, 2.4);
  EXPECT_EQ((*r)[0].grad_norm, 0.5);
  EXPECT_FALSE((*r)[1].val_loss.has_value());
  EXPECT_FALSE((*r)[1].grad_norm.has_value());
}

TEST(CurveCsvTest, FindsColumnsByNameAndIgnoresOthers) {
  auto r = Parse(
      "epoch,grad_norm,loss,note,lr,step\n"
      "0,0.5,2.5,\"a, quoted\",0.01,10\n"
      "0,0.6,2.0,x,0.02,20\n");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[1].step, 20);
  EXPECT_DOUBLE_EQ((*r)[1].lr, 0.02);
  EXPECT_DOUBLE_EQ((*r)[1].loss, 2.0);
  EXPECT_EQ((*r)[1].grad_norm, 0.6);
}

TEST(CurveCsvTest, NonFiniteValuesAreData) {
  auto r = Parse(
      "step,lr,loss,val_loss,grad_norm\n"
      "0,0.1,nan,NaN,inf\n"
      "1,0.1,inf,-inf,Infinity\n"
      "2,0.1,-inf,nan,NaN\n"
      "3,0.1,Infinity,1,-inf\n");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 4u);
  EXPECT_TRUE(std::isnan((*r)[0].loss));
  EXPECT_TRUE(std::isnan(*(*r)[0].val_loss));
  EXPECT_EQ(*(*r)[0].grad_norm, INFINITY);
  EXPECT_EQ((*r)[1].loss, INFINITY);
  EXPECT_EQ(*(*r)[1].val_loss, -INFINITY);
  EXPECT_EQ(*(*r)[1].grad_norm, INFINITY);
  EXPECT_EQ((*r)[2].loss, -INFINITY);
  EXPECT_EQ((*r)[3].loss, INFINITY);
}

TEST(CurveCsvTest, AcceptsCrlfAndBom) {
  auto r = Parse("\xEF\xBB\xBFstep,lr,loss\r\n0,0.1,2.5\r\n1,0.1,2.0\r\n");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_DOUBLE_EQ((*r)[1].loss, 2.0);
}

TEST(CurveCsvTest, AcceptsMissingFinalNewline) {
  auto r = Parse("step,lr,loss\n0,0.1,2.5\n1,0.1,2.0");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->size(), 2u);
}

TEST(CurveCsvTest, StreamAndStringAgree) {
  const std::string csv =
      "step,lr,loss,val_loss\r\n0,0.1,2.5,\r\n5,0.1,nan,3\r\n";
  std::istringstream in(csv);
  auto a = ParseCurveCsv(in, kName);
  auto b = Parse(csv);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->size(), b->size());
  EXPECT_EQ((*a)[1].step, 5);
  EXPECT_EQ((*a)[1].val_loss, 3.0);
}

TEST(CurveCsvTest, StreamReportsLineNumbers) {
  std::istringstream in("step,lr,loss\n0,0.1,1\n1,0.1,oops\n");
  auto r = ParseCurveCsv(in, "s.csv");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()),
              StartsWith("s.csv:3: loss 'oops'"));
}

TEST(CurveCsvTest, EmptyFile) {
  EXPECT_THAT(ErrorOf(""), StartsWith("mem.csv:1: empty file"));
  EXPECT_THAT(ErrorOf("\n\r\n"), StartsWith("mem.csv:1: empty file"));
}

TEST(CurveCsvTest, HeaderWithoutRows) {
  EXPECT_THAT(ErrorOf("step,lr,loss\n"),
              StartsWith("mem.csv:2: no data rows after the header"));
}

TEST(CurveCsvTest, MissingColumn) {
  EXPECT_THAT(ErrorOf("step,loss\n0,1\n"),
              StartsWith("mem.csv:1: missing required column 'lr'"));
  EXPECT_THAT(ErrorOf("lr,loss,val_loss\n0.1,1,1\n"),
              StartsWith("mem.csv:1: missing required column 'step'"));
  // A header that is really a data row.
  EXPECT_THAT(ErrorOf("0,0.1,2.5\n1,0.1,2.4\n"),
              StartsWith("mem.csv:1: missing required column 'step'"));
}

TEST(CurveCsvTest, DuplicateColumn) {
  EXPECT_THAT(ErrorOf("step,lr,loss,lr\n0,0.1,1,0.2\n"),
              StartsWith("mem.csv:1: column 'lr' appears twice"));
}

TEST(CurveCsvTest, TextWhereANumberBelongs) {
  const std::string head = "step,lr,loss,val_loss,grad_norm\n0,0.1,1,,\n";
  EXPECT_THAT(ErrorOf(head + "1,0.1,abc,,\n"),
              StartsWith("mem.csv:3: loss 'abc' is not a number"));
  EXPECT_THAT(ErrorOf(head + "1,fast,1,,\n"),
              StartsWith("mem.csv:3: lr 'fast' is not a number"));
  EXPECT_THAT(ErrorOf(head + "1,0.1,1,x,\n"),
              StartsWith("mem.csv:3: val_loss 'x' is not a number"));
  EXPECT_THAT(ErrorOf(head + "1,0.1,1,,1.5.2\n"),
              StartsWith("mem.csv:3: grad_norm '1.5.2' is not a number"));
  EXPECT_THAT(ErrorOf(head + "one,0.1,1,,\n"),
              StartsWith("mem.csv:3: step 'one' is not an integer"));
  EXPECT_THAT(ErrorOf(head + "1.5,0.1,1,,\n"),
              StartsWith("mem.csv:3: step '1.5' is not an integer"));
}

TEST(CurveCsvTest, NumbersAreParsedStrictly) {
  const std::string head = "step,lr,loss\n";
  EXPECT_THAT(ErrorOf(head + "0,0.1,1.5x\n"), StartsWith("mem.csv:2: loss"));
  EXPECT_THAT(ErrorOf(head + "0,0.1,0x10\n"), StartsWith("mem.csv:2: loss"));
  EXPECT_THAT(ErrorOf(head + "0x1,0.1,1\n"), StartsWith("mem.csv:2: step"));
  EXPECT_THAT(ErrorOf(head + "0,0.1,nanx\n"), StartsWith("mem.csv:2: loss"));
}

TEST(CurveCsvTest, NumbersBeyondDoubleRangeInLossColumnsAreData) {
  auto r = Parse(
      "step,lr,loss,val_loss,grad_norm\n"
      "0,0.1,1e400,1e999,1e400\n"
      "1,0.1,-1e400,-1e400,0.0000000000000000001e330\n"
      "2,0.1,1e-400,-1e-400,4.9e-324\n"
      "3,0.1,2e-324,0.00001e-320,1E+400\n");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 4u);
  constexpr double kInf = std::numeric_limits<double>::infinity();
  EXPECT_EQ((*r)[0].loss, kInf);
  EXPECT_EQ(*(*r)[0].val_loss, kInf);
  EXPECT_EQ(*(*r)[0].grad_norm, kInf);
  EXPECT_EQ((*r)[1].loss, -kInf);
  EXPECT_EQ(*(*r)[1].val_loss, -kInf);
  EXPECT_EQ(*(*r)[1].grad_norm, kInf);  // 1e311
  // Too small for a double: the correctly rounded value, 0 (or a denormal).
  EXPECT_EQ((*r)[2].loss, 0.0);
  EXPECT_FALSE(std::signbit((*r)[2].loss));
  EXPECT_EQ(*(*r)[2].val_loss, 0.0);
  EXPECT_TRUE(std::signbit(*(*r)[2].val_loss));
  EXPECT_EQ(*(*r)[2].grad_norm, std::numeric_limits<double>::denorm_min());
  EXPECT_EQ((*r)[3].loss, 0.0);
  EXPECT_EQ(*(*r)[3].val_loss, 0.0);
  EXPECT_EQ(*(*r)[3].grad_norm, kInf);
}

TEST(CurveCsvTest, OutOfRangeLrAndStepAreErrors) {
  const std::string head = "step,lr,loss\n";
  EXPECT_THAT(ErrorOf(head + "0,1e400,1\n"),
              StartsWith("mem.csv:2: lr '1e400' is out of range"));
  EXPECT_THAT(ErrorOf(head + "0,-1e400,1\n"),
              StartsWith("mem.csv:2: lr '-1e400' is out of range"));
  EXPECT_THAT(ErrorOf(head + "9223372036854775808,0.1,1\n"),
              StartsWith("mem.csv:2: step '9223372036854775808' is out of "
                         "the int64 range"));
  EXPECT_THAT(ErrorOf(head + "-9223372036854775809,0.1,1\n"),
              StartsWith("mem.csv:2: step '-9223372036854775809' is out of "
                         "the int64 range"));
  // Out of range and trailing junk is just not a number.
  EXPECT_THAT(ErrorOf(head + "0,0.1,1e400x\n"),
              StartsWith("mem.csv:2: loss '1e400x' is not a number"));
  EXPECT_THAT(ErrorOf(head + "0,1e400x,1\n"),
              StartsWith("mem.csv:2: lr '1e400x' is not a number"));

  // An LR too small for a double is 0; the int64 limits are steps.
  auto r = Parse(head +
                 "-9223372036854775808,1e-400,1\n"
                 "9223372036854775807,-1e-400,1\n");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[0].step, std::numeric_limits<int64_t>::min());
  EXPECT_EQ((*r)[1].step, std::numeric_limits<int64_t>::max());
  EXPECT_EQ((*r)[0].lr, 0.0);
  EXPECT_EQ((*r)[1].lr, 0.0);
  EXPECT_FALSE(std::signbit((*r)[1].lr));
}

TEST(CurveCsvTest, LoneCrEndsALine) {
  // Old Mac line endings: each CR is a line break, for records and for the
  // line numbers in messages alike.
  EXPECT_THAT(ErrorOf("step,lr,loss\r0,0.1,1\r1,0.1,x\r"),
              StartsWith("mem.csv:3: loss 'x'"));
  EXPECT_THAT(ErrorOf("step,lr,loss\r\n0,0.1,1\r1,0.1,1\n\r2,0.1,x"),
              StartsWith("mem.csv:5: loss 'x'"));
  EXPECT_THAT(ErrorOf("step,lr,loss\r\r0,0.1,1\r0,0.1,1\r"),
              StartsWith("mem.csv:4: step 0 is not greater than the previous "
                         "step 0 (line 3)"));
  auto r = Parse("step,lr,loss\r0,0.1,1\r1,0.1,0.5");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_DOUBLE_EQ((*r)[1].loss, 0.5);
}

TEST(CurveCsvTest, StreamLineBreaksAcrossReadChunks) {
  // The stream is read 64 KiB at a time: put a CRLF, then a lone CR, across
  // that boundary, and check the line numbers agree with the string parse.
  for (const char* brk : {"\r\n", "\r", "\n"}) {
    for (int shift = 0; shift < 3; ++shift) {
      std::string csv = std::string("step,lr,loss,note") + brk;
      int64_t step = 0;
      while (csv.size() < 64 * 1024 - 64) {
        csv += std::to_string(step++) + ",0.1,1," + brk;
      }
      // This row's break starts at byte 65534 + shift: the "\r\n" lies
      // before, across, or after the boundary at 65536.
      const std::string row = std::to_string(step++) + ",0.1,1,";
      csv += row +
             std::string(64 * 1024 - 2 + shift - csv.size() - row.size(), 'n');
      ASSERT_EQ(csv.size(), 64u * 1024 - 2 + shift);
      csv += brk;
      csv += std::to_string(step) + ",0.1,x," + brk;
      std::istringstream in(csv);
      auto a = ParseCurveCsv(in, kName);
      auto b = Parse(csv);
      ASSERT_FALSE(a.ok());
      ASSERT_FALSE(b.ok());
      EXPECT_EQ(a.status().message(), b.status().message());
      EXPECT_THAT(
          std::string(a.status().message()),
          StartsWith(absl::StrFormat("mem.csv:%d: loss 'x'", step + 2)));
    }
  }
}

TEST(CurveCsvTest, StreamsRowsToTheCallback) {
  const std::string csv = "step,lr,loss\n0,0.1,3\n\n1,0.1,2\n2,0.1,1\n";
  std::vector<int64_t> steps;
  auto on_row = [&steps](const analyzers::StepRecord& rec) {
    steps.push_back(rec.step);
    return absl::OkStatus();
  };
  EXPECT_TRUE(ParseCurveCsv(csv, kName, on_row).ok());
  EXPECT_THAT(steps, ElementsAre(0, 1, 2));

  steps.clear();
  std::istringstream in(csv);
  EXPECT_TRUE(ParseCurveCsv(in, kName, on_row).ok());
  EXPECT_THAT(steps, ElementsAre(0, 1, 2));

  // Rows before a bad row have been passed; none after.
  steps.clear();
  absl::Status s = ParseCurveCsv("step,lr,loss\n0,0.1,3\n1,0.1,oops\n2,0.1,1\n",
                                 kName, on_row);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), StartsWith("mem.csv:3: loss 'oops'"));
  EXPECT_THAT(steps, ElementsAre(0));
}

TEST(CurveCsvTest, CallbackErrorStopsTheParseWithFileAndLine) {
  int calls = 0;
  absl::Status s = ParseCurveCsv(
      "step,lr,loss\n0,0.1,3\n\n1,0.1,2\n2,0.1,1\n", kName,
      [&calls](const analyzers::StepRecord& rec) {
        ++calls;
        return rec.step == 1 ? absl::FailedPreconditionError("no step 1")
                             : absl::OkStatus();
      });
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(), "mem.csv:4: no step 1");
  EXPECT_EQ(calls, 2);
}

TEST(CurveCsvTest, WrongFieldCount) {
  EXPECT_THAT(ErrorOf("step,lr,loss\n0,0.1,1\n1,0.1\n"),
              StartsWith("mem.csv:3: expected 3 fields as in the header, "
                         "found 2"));
  EXPECT_THAT(ErrorOf("step,lr,loss\n0,0.1,1,7\n"),
              StartsWith("mem.csv:2: expected 3 fields as in the header, "
                         "found 4"));
}

TEST(CurveCsvTest, StepsMustIncrease) {
  EXPECT_THAT(ErrorOf("step,lr,loss\n0,0.1,1\n1,0.1,1\n1,0.1,1\n"),
              StartsWith("mem.csv:4: step 1 is not greater than the previous "
                         "step 1 (line 3)"));
  EXPECT_THAT(ErrorOf("step,lr,loss\n5,0.1,1\n3,0.1,1\n"),
              StartsWith("mem.csv:3: step 3 is not greater than the previous "
                         "step 5 (line 2)"));
}

TEST(CurveCsvTest, MissingValues) {
  EXPECT_THAT(ErrorOf("step,lr,loss\n0,0.1,1\n,0.1,1\n"),
              StartsWith("mem.csv:3: missing step value"));
  EXPECT_THAT(ErrorOf("step,lr,loss\n0,0.1,\n"),
              StartsWith("mem.csv:2: missing loss value"));
}

TEST(CurveCsvTest, LrMustBeFiniteAndNonNegative) {
  EXPECT_THAT(ErrorOf("step,lr,loss\n0,-0.1,1\n"),
              StartsWith("mem.csv:2: lr '-0.1' is not a finite number >= 0"));
  EXPECT_THAT(ErrorOf("step,lr,loss\n0,inf,1\n"), StartsWith("mem.csv:2: lr"));
}

TEST(CurveCsvTest, EmptyOrNanLrMeansNotLogged) {
  auto r = Parse("step,lr,loss\n0,,1\n1,nan,0.9\n2,0.1,0.8\n");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 3u);
  EXPECT_TRUE(std::isnan((*r)[0].lr));
  EXPECT_TRUE(std::isnan((*r)[1].lr));
  EXPECT_DOUBLE_EQ((*r)[2].lr, 0.1);
}

TEST(CurveCsvTest, LineNumbersCountBlankLinesCrlfAndBom) {
  EXPECT_THAT(ErrorOf("step,lr,loss\n0,0.1,1\n\n1,0.1,x\n"),
              StartsWith("mem.csv:4: loss 'x'"));
  EXPECT_THAT(ErrorOf("\xEF\xBB\xBFstep,lr,loss\r\n0,0.1,1\r\n1,0.1,x\r\n"),
              StartsWith("mem.csv:3: loss 'x'"));
}

TEST(CurveCsvTest, MalformedQuoting) {
  EXPECT_THAT(ErrorOf("step,lr,loss\n0,0.1,1\n1,0.1,1\"x\n"),
              StartsWith("mem.csv:3: malformed CSV"));
  EXPECT_THAT(ErrorOf("step,lr,loss\n0,0.1,\"1\n"),
              StartsWith("mem.csv:2: malformed CSV"));
}

TEST(CurveCsvTest, LongFieldsAreShortenedInMessages) {
  const std::string junk(500, 'z');
  const std::string message = ErrorOf("step,lr,loss\n0,0.1," + junk + "\n");
  EXPECT_THAT(message, StartsWith("mem.csv:2: loss 'zzz"));
  EXPECT_LT(message.size(), 100u);
}

TEST(CurveCsvTest, ReadsExampleFile) {
  auto r = ReadCurveCsv(std::string(LOSSGUARD_EXAMPLES_DIR) +
                        "/digits-mlp-sgdm-lr0.3-b32-s9.csv");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 1500u);
  EXPECT_EQ(r->front().step, 0);
  EXPECT_DOUBLE_EQ(r->front().lr, 0.3);
  EXPECT_TRUE(r->front().val_loss.has_value());
  EXPECT_FALSE((*r)[1].val_loss.has_value());
  EXPECT_EQ(r->back().step, 1499);
}

TEST(CurveCsvTest, FileErrorsNameTheFile) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / "curve_csv_test";
  std::filesystem::create_directories(dir);
  const std::string missing = (dir / "missing.csv").string();
  auto r = ReadCurveCsv(missing);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), StartsWith(missing + ": "));

  r = ReadCurveCsv(dir.string());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);

  const std::string bad = (dir / "bad.csv").string();
  std::ofstream(bad) << "step,lr,loss\r\n0,0.1,1\r\n0,0.1,1\r\n";
  r = ReadCurveCsv(bad);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()),
              StartsWith(bad + ":3: step 0"));
  std::filesystem::remove_all(dir);
}

TEST(CurveCsvTest, FileErrorsKeepTheirCause) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / "curve_csv_test_errors";
  std::filesystem::create_directories(dir);

  // A name too long for the file system is not a missing file.
  const std::string too_long = (dir / std::string(300, 'x')).string();
  absl::Status s = ReadCurveCsv(
      too_long, [](const analyzers::StepRecord&) { return absl::OkStatus(); });
  EXPECT_NE(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.code(), absl::StatusCode::kOk);
  EXPECT_THAT(std::string(s.message()), StartsWith(too_long + ": "));
  EXPECT_THAT(std::string(s.message()), Not(HasSubstr("no such file")));
  EXPECT_THAT(std::string(s.message()), HasSubstr("too long"));

  // A missing file in a missing folder is still NotFound.
  auto r = ReadCurveCsv((dir / "no" / "such.csv").string());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(": no such file"));

  // A file that may not be read (root reads any file: nothing to see then).
  const std::string locked = (dir / "locked.csv").string();
  std::ofstream(locked) << "step,lr,loss\n0,0.1,1\n";
  std::filesystem::permissions(locked, std::filesystem::perms::none);
  if (::geteuid() != 0) {
    r = ReadCurveCsv(locked);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied);
    EXPECT_EQ(r.status().message(), locked + ": permission denied");
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lossguard::curvefile
