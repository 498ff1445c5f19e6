// lossguard: the command line tool. Flags are read here and nowhere else.
//
//   lossguard analyze FILE.csv [--json]
//   lossguard lr-find FILE.csv [--json]
//   lossguard help [COMMAND]
//
// Exit codes: 0 done, 1 bad file or failed analysis (message on stderr,
// nothing on stdout), 2 usage error (usage on stderr). `analyze` streams the
// file through the analyzer and prints once the whole file has parsed.

#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/cli/analyze.h"
#include "client/cli/lr_find.h"
#include "lossguard/curvefile/curve_csv.h"

namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;

constexpr std::string_view kUsage =
    R"(usage: lossguard COMMAND [ARGS]

Diagnoses training curves (CSV: step,lr,loss[,val_loss,grad_norm,...]).

commands:
  analyze FILE.csv [--json]  diagnose a training curve, step by step, and
                             show the advice a live run would get
  lr-find FILE.csv [--json]  suggest an initial learning rate from an LR
                             range test curve
  help [COMMAND]             show this help, or a command's usage

exit codes: 0 done, 1 bad file or failed analysis, 2 usage error
)";

constexpr std::string_view kAnalyzeUsage =
    R"(usage: lossguard analyze FILE.csv [--json]

Feeds every row of FILE.csv through the curve analyzer in order and prints
each diagnosis when it is decided (step, kind, onset, severity, confidence,
evidence), the advice the policy would send then, and a summary.

  --json  print one JSON object: file, steps, final_loss, verdict,
          diagnoses, events (loss spikes), advice
)";

constexpr std::string_view kLrFindUsage =
    R"(usage: lossguard lr-find FILE.csv [--json]

Reads an LR range test (LR growing exponentially, one row per step) and
suggests the initial learning rate.

  --json  print one JSON object: file, suggested_lr, steep_lo_lr,
          steep_hi_lr, min_loss_lr, diverge_lr, points_used, evidence
)";

// The usage of `command`, or nullopt for an unknown command.
std::optional<std::string_view> CommandUsage(std::string_view command) {
  if (command == "analyze") return kAnalyzeUsage;
  if (command == "lr-find") return kLrFindUsage;
  return std::nullopt;
}

int UsageError(std::string_view message, std::string_view usage) {
  std::cerr << "lossguard: " << message << "\n\n" << usage;
  return kExitUsage;
}

// `j` as printed with --json.
std::string JsonText(const nlohmann::ordered_json& j) {
  // Replace invalid UTF-8 (a file name, say) rather than throw.
  return j.dump(2, ' ', false,
                nlohmann::ordered_json::error_handler_t::replace) +
         "\n";
}

// What `print` writes, as a string.
std::string TextOf(absl::FunctionRef<void(std::ostream&)> print) {
  std::ostringstream out;
  print(out);
  return out.str();
}

// The part every command shares: reads `file` row by row into `on_row`,
// then asks `finish` for the command's output. The output is printed only
// once the whole file parsed and the command succeeded; any error is printed
// alone, on stderr ("FILE:LINE: reason" for a bad row), and exits 1.
int RunOnCurve(const std::string& file,
               lossguard::curvefile::RowCallback on_row,
               absl::FunctionRef<absl::StatusOr<std::string>()> finish) {
  const absl::Status read = lossguard::curvefile::ReadCurveCsv(file, on_row);
  const absl::StatusOr<std::string> out =
      read.ok() ? finish() : absl::StatusOr<std::string>(read);
  if (!out.ok()) {
    std::cerr << out.status().message() << "\n";
    return kExitFailed;
  }
  std::cout << *out;
  return kExitOk;
}

// Feeds the analyzer as the rows are parsed: only the analyzer's state and
// the (few) diagnoses stay in memory, however long the curve.
int RunAnalyze(const std::string& file, bool json) {
  lossguard::cli::CurveAnalysis analysis(file);
  return RunOnCurve(
      file,
      [&analysis](const lossguard::analyzers::StepRecord& rec) {
        return analysis.Feed(rec);
      },
      [&analysis, json]() -> absl::StatusOr<std::string> {
        const lossguard::cli::AnalyzeReport& report = analysis.report();
        if (json) return JsonText(lossguard::cli::AnalyzeReportToJson(report));
        return TextOf([&report](std::ostream& out) {
          lossguard::cli::PrintAnalyzeReport(report, out);
        });
      });
}

// A range test is short: its rows are collected, then analysed as a whole.
int RunLrFind(const std::string& file, bool json) {
  std::vector<lossguard::analyzers::StepRecord> records;
  return RunOnCurve(
      file,
      [&records](const lossguard::analyzers::StepRecord& rec) {
        records.push_back(rec);
        return absl::OkStatus();
      },
      [&file, &records, json]() -> absl::StatusOr<std::string> {
        const auto suggestion = lossguard::cli::FindLr(file, records);
        if (!suggestion.ok()) return suggestion.status();
        if (json) {
          return JsonText(
              lossguard::cli::LrSuggestionToJson(file, *suggestion));
        }
        return TextOf([&file, &suggestion](std::ostream& out) {
          lossguard::cli::PrintLrSuggestion(file, *suggestion, out);
        });
      });
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string_view> args(argv + 1, argv + argc);
  if (args.empty()) return UsageError("no command given", kUsage);

  const std::string_view command = args[0];
  if (command == "help" || command == "--help" || command == "-h") {
    if (args.size() == 1) {
      std::cout << kUsage;
      return kExitOk;
    }
    std::optional<std::string_view> usage = CommandUsage(args[1]);
    if (args.size() > 2 || !usage) {
      return UsageError("help takes one known command", kUsage);
    }
    std::cout << *usage;
    return kExitOk;
  }
  std::optional<std::string_view> usage = CommandUsage(command);
  if (!usage) {
    return UsageError(
        std::string("unknown command '") + std::string(command) + "'", kUsage);
  }

  bool json = false;
  std::vector<std::string> files;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string_view arg = args[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << *usage;
      return kExitOk;
    }
    if (arg == "--json") {
      json = true;
    } else if (arg.size() > 1 && arg[0] == '-') {
      return UsageError("unknown option '" + std::string(arg) + "'", *usage);
    } else {
      files.emplace_back(arg);
    }
  }
  if (files.size() != 1) {
    return UsageError(files.empty() ? "missing FILE.csv" : "too many files",
                      *usage);
  }
  return command == "analyze" ? RunAnalyze(files[0], json)
                              : RunLrFind(files[0], json);
}
