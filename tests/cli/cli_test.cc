// End-to-end tests of the `lossguard` binary: exit codes, stdout, stderr.
// They check the shape of the output only, so that they hold for any
// analyzer implementation.

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

extern char** environ;

namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::StartsWith;

namespace fs = std::filesystem;

struct Result {
  int exit_code = -1;
  std::string out;
  std::string err;
  long max_rss_kib = -1;  // RunMeasured only: the process's peak RSS
};

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string Example(const std::string& name) {
  return std::string(LOSSGUARD_EXAMPLES_DIR) + "/" + name;
}

constexpr char kDiverging[] = "digits-mlp-sgdm-lr0.3-b32-s9.csv";
constexpr char kHealthy[] = "digits-mlp-sgdm-lr0.01-b32-s6.csv";
constexpr char kRangeTest[] = "digits-mlp-sgdm-lr1e-07-b32-exp-lrrange-s1.csv";

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("lossguard_cli_test_") +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Runs `lossguard ARGS` (ARGS already quoted for the shell).
  Result Run(const std::string& args) {
    const fs::path out = dir_ / "stdout";
    const fs::path err = dir_ / "stderr";
    // StrFormat rather than operator+ chains: GCC 12 -O3 reports a bogus
    // -Wrestrict on `"literal" + std::string&&` (GCC bug 105651).
    const std::string cmd =
        absl::StrFormat("'%s' %s >'%s' 2>'%s' </dev/null", LOSSGUARD_BIN, args,
                        out.string(), err.string());
    const int status = std::system(cmd.c_str());
    Result r;
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = ReadAll(out);
    r.err = ReadAll(err);
    return r;
  }

  // Runs `lossguard ARGS` as a direct child and measures its peak memory
  // (wait4's rusage is that process's own).
  Result RunMeasured(const std::vector<std::string>& args) {
    const fs::path out = dir_ / "stdout";
    const fs::path err = dir_ / "stderr";
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, out.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, 2, err.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<std::string> argv_strings = {LOSSGUARD_BIN};
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& a : argv_strings) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, LOSSGUARD_BIN, &actions, nullptr,
                               argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    Result r;
    EXPECT_EQ(rc, 0) << "posix_spawn failed";
    if (rc != 0) return r;
    int status = 0;
    struct rusage usage {};
    pid_t waited = -1;
    do {
      waited = wait4(pid, &status, 0, &usage);
    } while (waited < 0 && errno == EINTR);
    EXPECT_EQ(waited, pid);
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.max_rss_kib = usage.ru_maxrss;
    r.out = ReadAll(out);
    r.err = ReadAll(err);
    return r;
  }

  // Writes `text` to a file in the test's folder; returns its path.
  std::string Write(const std::string& name, const std::string& text) {
    const fs::path path = dir_ / name;
    std::ofstream(path, std::ios::binary) << text;
    return path.string();
  }

  // Parses `text` as exactly one JSON object.
  static nlohmann::json ParseObject(const std::string& text) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr,
                                             /*allow_exceptions=*/false);
    EXPECT_FALSE(j.is_discarded()) << "not one JSON value: " << text;
    EXPECT_TRUE(j.is_object()) << text;
    return j;
  }

  fs::path dir_;
};

TEST_F(CliTest, Help) {
  for (const char* args : {"--help", "help", "-h"}) {
    Result r = Run(args);
    EXPECT_EQ(r.exit_code, 0) << args;
    EXPECT_THAT(r.out, StartsWith("usage: lossguard")) << args;
    EXPECT_THAT(r.out, HasSubstr("analyze"));
    EXPECT_THAT(r.out, HasSubstr("lr-find"));
  }
  Result r = Run("help analyze");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, StartsWith("usage: lossguard analyze"));
  r = Run("lr-find --help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, StartsWith("usage: lossguard lr-find"));
}

TEST_F(CliTest, UsageErrorsExitTwo) {
  for (const char* args :
       {"", "frobnicate x.csv", "analyze", "lr-find --json",
        "analyze --bogus x.csv", "analyze a.csv b.csv", "help nosuchcommand"}) {
    Result r = Run(args);
    EXPECT_EQ(r.exit_code, 2) << args;
    EXPECT_THAT(r.out, IsEmpty()) << args;
    EXPECT_THAT(r.err, HasSubstr("usage: lossguard")) << args;
  }
}

TEST_F(CliTest, AnalyzeJsonIsOneObject) {
  for (const char* name : {kDiverging, kHealthy}) {
    Result r = Run("analyze '" + Example(name) + "' --json");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_THAT(r.err, IsEmpty());
    nlohmann::json j = ParseObject(r.out);
    EXPECT_EQ(j["file"], Example(name));
    EXPECT_EQ(j["steps"], 1500);
    EXPECT_TRUE(j["verdict"] == "healthy" || j["verdict"] == "unhealthy");
    ASSERT_TRUE(j["diagnoses"].is_array());
    ASSERT_TRUE(j["events"].is_array());
    ASSERT_TRUE(j["advice"].is_array());
    EXPECT_EQ(j["advice"].size(), j["diagnoses"].size());
    EXPECT_EQ(j["verdict"] == "healthy", j["diagnoses"].empty());
    for (const auto& d : j["diagnoses"]) {
      for (const char* key :
           {"kind", "step", "onset", "severity", "confidence", "evidence"}) {
        EXPECT_TRUE(d.contains(key)) << key << " in " << d;
      }
      EXPECT_NE(d["kind"], "loss_spike");
    }
    for (const auto& e : j["events"]) EXPECT_EQ(e["kind"], "loss_spike");
    for (const auto& a : j["advice"]) {
      for (const char* key : {"at_step", "kind", "action", "explanation"}) {
        EXPECT_TRUE(a.contains(key)) << key << " in " << a;
      }
    }
  }
}

TEST_F(CliTest, AnalyzeText) {
  Result r = Run("analyze '" + Example(kDiverging) + "'");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("summary: 1500 steps, final loss"));
  EXPECT_THAT(r.out, HasSubstr("verdict"));
}

TEST_F(CliTest, NonFiniteLossesAreData) {
  const std::string path =
      Write("nan.csv",
            "step,lr,loss,val_loss,grad_norm\r\n0,0.1,2.3,,\r\n"
            "1,0.1,inf,,inf\r\n2,0.1,nan,nan,\r\n");
  Result r = Run("analyze '" + path + "' --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  nlohmann::json j = ParseObject(r.out);
  EXPECT_EQ(j["steps"], 3);
  EXPECT_TRUE(j["final_loss"].is_null());
}

TEST_F(CliTest, LrFind) {
  Result r = Run("lr-find '" + Example(kRangeTest) + "' --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, IsEmpty());
  nlohmann::json j = ParseObject(r.out);
  for (const char* key :
       {"suggested_lr", "steep_lo_lr", "steep_hi_lr", "steep_mid_lr",
        "min_loss_lr", "basin_lo_lr", "basin_hi_lr", "basin_mid_lr",
        "diverge_lr", "points_used", "evidence"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  // The example's steep descent (lr ~0.008 .. 0.13) and its minimum just
  // before the blow-up at ~0.19: the suggestion lies between the two.
  const double suggested = j["suggested_lr"];
  EXPECT_GT(suggested, j["steep_mid_lr"].get<double>());
  EXPECT_LT(suggested, j["basin_mid_lr"].get<double>());
  EXPECT_GT(suggested, 1e-3);
  EXPECT_LT(suggested, 0.2);
  EXPECT_THAT(j["evidence"].get<std::string>(), HasSubstr("Suggested lr"));
}

TEST_F(CliTest, LrFindOnAFlatCurveIsAClearError) {
  std::string csv = "step,lr,loss\n";
  double lr = 1e-7;
  for (int i = 0; i < 100; ++i, lr *= 1.06) {
    csv += absl::StrFormat("%d,%.17g,%g\n", i, lr, 2.3 + 0.01 * (i % 3));
  }
  const std::string path = Write("flat-range.csv", csv);
  Result r = Run("lr-find '" + path + "' --json");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, IsEmpty());
  EXPECT_THAT(r.err, StartsWith(path + ": "));
  EXPECT_THAT(r.err, HasSubstr("no usable descent"));
}

TEST_F(CliTest, BadFileNamesFileAndLine) {
  const std::string path =
      Write("bad.csv", "step,lr,loss\n0,0.1,2.3\n1,0.1,oops\n");
  for (const char* args :
       {"analyze", "analyze --json", "lr-find", "lr-find --json"}) {
    Result r = Run(std::string(args) + " '" + path + "'");
    EXPECT_EQ(r.exit_code, 1) << args;
    EXPECT_THAT(r.out, IsEmpty()) << args;
    EXPECT_THAT(r.err, StartsWith(path + ":3: loss 'oops'")) << args;
  }
}

TEST_F(CliTest, BadFileCases) {
  struct Case {
    const char* text;
    const char* prefix;
  };
  for (const Case& c : {
           Case{"", ":1: empty file"},
           Case{"step,loss\n0,1\n", ":1: missing required column 'lr'"},
           Case{"step,lr,loss\n0,0.1,1\n1,0.1\n", ":3: expected 3 fields"},
           Case{"step,lr,loss\n5,0.1,1\n5,0.1,1\n",
                ":3: step 5 is not greater"},
           Case{"step,lr,loss\n0,0.1,\n", ":2: missing loss value"},
           // Old Mac line endings: a lone CR ends a line.
           Case{"step,lr,loss\r0,0.1,1\r1,0.1,oops\r", ":3: loss 'oops'"},
           Case{"step,lr,loss\n0,1e400,1\n", ":2: lr '1e400' is out of range"},
           Case{"step,lr,loss\n9223372036854775808,0.1,1\n",
                ":2: step '9223372036854775808' is out of the int64 range"},
       }) {
    const std::string path = Write("case.csv", c.text);
    Result r = Run("analyze --json '" + path + "'");
    EXPECT_EQ(r.exit_code, 1) << c.text;
    EXPECT_THAT(r.out, IsEmpty()) << c.text;
    EXPECT_THAT(r.err, StartsWith(path + c.prefix)) << c.text;
  }
}

TEST_F(CliTest, OverflowingLossIsData) {
  // A loss too large for a double is a blow-up, not a bad file.
  std::string csv = "step,lr,loss,val_loss,grad_norm\n";
  for (int step = 0; step < 60; ++step) {
    absl::StrAppend(&csv, step, ",0.1,", step < 40 ? "2.3" : "1e400", ",",
                    step == 59 ? "1e999" : "", ",", step < 40 ? "1" : "1e400",
                    "\n");
  }
  const std::string path = Write("blowup.csv", csv);
  Result r = Run("analyze '" + path + "' --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, IsEmpty());
  nlohmann::json j = ParseObject(r.out);
  EXPECT_EQ(j["steps"], 60);
  EXPECT_TRUE(j["final_loss"].is_null());  // inf
}

TEST_F(CliTest, BadRowMidFilePrintsNothingOnStdout) {
  // The analyzer has decided diagnoses (and advice) long before the bad
  // row; none of it is printed.
  std::istringstream example(ReadAll(Example(kDiverging)));
  std::string csv;
  std::string line;
  for (int n = 1; std::getline(example, line); ++n) {
    csv += (n == 1200 ? std::string("1198,0.3,oops,,") : line) + "\n";
  }
  const std::string path = Write("late_bad.csv", csv);
  for (const char* args : {"analyze", "analyze --json"}) {
    Result r = Run(std::string(args) + " '" + path + "'");
    EXPECT_EQ(r.exit_code, 1) << args;
    EXPECT_THAT(r.out, IsEmpty()) << args;
    EXPECT_EQ(r.err, path + ":1200: loss 'oops' is not a number\n") << args;
  }
}

TEST_F(CliTest, AnalyzeMemoryDoesNotGrowWithTheFile) {
  // 1M rows (27 MB of CSV): `analyze` streams them through the analyzer,
  // so its peak memory is about that of a short file. Holding the rows
  // (56 bytes each) would add 56 MB or more.
  std::string csv = "step,lr,loss,val_loss,grad_norm\n";
  csv.reserve(28u << 20);
  for (int64_t step = 0; step < 1000000; ++step) {
    const double loss = 0.1 + 2.0 / (1.0 + static_cast<double>(step) / 1e3) +
                        0.05 * static_cast<double>(step * 7919 % 13) / 13.0;
    absl::StrAppendFormat(&csv, "%d,0.1,%.5f,%s,%.4f\n", step, loss,
                          step % 1000 == 0 ? "0.5" : "",
                          1.0 + static_cast<double>(step % 7) / 7.0);
  }
  const std::string big = Write("big.csv", csv);
  csv.clear();
  csv.shrink_to_fit();

  Result small = RunMeasured({"analyze", Example(kHealthy)});
  ASSERT_EQ(small.exit_code, 0) << small.err;
  Result r = RunMeasured({"analyze", big});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("summary: 1000000 steps"));
  EXPECT_LT(r.max_rss_kib, small.max_rss_kib + 16 * 1024)
      << "peak RSS " << r.max_rss_kib << " KiB for 1M rows vs "
      << small.max_rss_kib << " KiB for 1500";
}

TEST_F(CliTest, FileNameTooLongIsNotMissing) {
  const std::string path = (dir_ / std::string(300, 'x')).string();
  Result r = Run("analyze '" + path + "'");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, IsEmpty());
  EXPECT_THAT(r.err, StartsWith(path + ": "));
  EXPECT_THAT(r.err, Not(HasSubstr("no such file")));
}

TEST_F(CliTest, MissingFile) {
  const std::string path = (dir_ / "nope.csv").string();
  Result r = Run("analyze '" + path + "'");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, IsEmpty());
  EXPECT_THAT(r.err, StartsWith(path + ": no such file"));
}

}  // namespace
