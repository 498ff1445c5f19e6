// lossguard: the command line tool. Flags are read here and nowhere else.
//
//   lossguard analyze FILE.csv [--json]
//   lossguard lr-find FILE.csv [--json]
//   lossguard runs|health RUN|watch RUN|plot RUN|import FILE.csv|probe
//             [--server ADDR] ...
//   lossguard help [COMMAND]
//
// Exit codes: 0 done, 1 bad file, failed analysis or a daemon error
// (message on stderr, nothing on stdout), 2 usage error (usage on stderr).
// `analyze` streams the file through the analyzer and prints once the whole
// file has parsed.

#include <algorithm>
#include <cctype>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <cstdlib>
#include <fstream>

#include "absl/functional/function_ref.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/cli/analyze.h"
#include "client/cli/fleet.h"
#include "client/cli/lr_find.h"
#include "lossguard/auth/auth.h"
#include "lossguard/client/credentials.h"
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

against a running lossguardd (--server ADDR, default $LOSSGUARD_SERVER or
127.0.0.1:7077):
  runs                       the fleet: run, project, state, step, loss, LR,
                             active diagnoses
  health RUN                 one run: state, diagnoses with evidence, advice
                             history with outcomes
  watch RUN                  the run's events, live, until it finishes
  plot RUN [-o FILE.svg]     loss, validation loss and LR against step, with
                             diagnosis onsets and applied actions marked
  import FILE                send a curve file (CSV or TensorBoard event
                             file) to the daemon as a run, to be diagnosed
                             and plotted (never steered)
  probe [--service NAME]     exit 0 when the daemon's gRPC health service
                             says SERVING (a liveness/readiness probe)

  a daemon with tokens or TLS: --token T (default $LOSSGUARD_TOKEN),
  --tls-ca CA.pem (default $LOSSGUARD_TLS_CA), and for mTLS --tls-cert
  CERT.pem --tls-key KEY.pem

  token new --project P      make a bearer token for lossguardd's
                             --auth_config: prints the token and the
                             config entry with its SHA-256

  help [COMMAND]             show this help, or a command's usage

every command takes --json (one JSON object; `watch`: one per line)

exit codes: 0 done, 1 bad file, failed analysis or daemon error, 2 usage error
)";

constexpr std::string_view kRunsUsage =
    R"(usage: lossguard runs [--server ADDR] [--project P] [--state S,...] [--json]

The runs lossguardd knows, newest first: run id, project, state, last step,
loss, validation loss, LR and active diagnoses, then a count by state.

  --project P  only runs of project P
  --state S    only runs in these states (comma separated): healthy,
               at_risk, unhealthy, finished, detached
  --json       {"server": ..., "runs": [RunSummary, ...]} (proto field names)
)";

constexpr std::string_view kHealthUsage =
    R"(usage: lossguard health RUN [--server ADDR] [--json]

One run: state and mode, last step, loss, validation loss and LR, its
configuration, the active diagnoses with their evidence, and every advice
with its status (sent, applied, rejected) and outcome (improved, no_change,
worsened).

  --json  the RunHealth message as JSON (proto field names)
)";

constexpr std::string_view kProbeUsage =
    R"(usage: lossguard probe [--server ADDR] [--service NAME] [--json]

Asks the daemon's standard gRPC health service (grpc.health.v1) whether it
serves: prints SERVING and exits 0, or says what it is and exits 1. For
liveness and readiness probes (deploy/k8s).

  --service NAME  the service to ask about (default lossguard.v1.LossGuard;
                  "" for the server as a whole)
)";

constexpr std::string_view kWatchUsage =
    R"(usage: lossguard watch RUN [--server ADDR] [--json]

Prints the run's past diagnoses, advice, acks, outcomes and state changes,
then the new ones as they happen, until the run finishes (exit 0) or the
daemon goes away (exit 1). Interrupt to stop earlier.

  --json  one RunEvent JSON object per line
)";

constexpr std::string_view kPlotUsage =
    R"(usage: lossguard plot RUN [-o FILE.svg] [--server ADDR] [--max-points N] [--linear]

Writes an SVG of the run's loss and validation loss (left axis, log scale)
and LR (right axis, log scale) against step. Each diagnosis is marked by a
dashed line at its onset and a triangle where it was decided; each applied
action by a solid line with what it did. Hover a marker for its evidence.

  -o FILE.svg       where to write it (default RUN.svg; - for stdout)
  --max-points N    curve points fetched (min/max buckets keep spikes;
                    default 2000)
  --linear          loss axis in linear scale
  --json            print {"file": ..., "run_id": ..., "points": N} when done
)";

constexpr std::string_view kImportUsage =
    R"(usage: lossguard import FILE [--server ADDR] [--run-id ID] [--project P] [--json]
                        [--loss-tag T] [--val-tag T] [--lr-tag T] [--grad-norm-tag T]

Sends a curve file to lossguardd as a run in OBSERVE mode: it is diagnosed,
stored and plotted like a live run, and marked finished. FILE is a curve
CSV (step,lr,loss[,val_loss,grad_norm]) or a TensorBoard event file
(events.out.tfevents.*, as SummaryWriter writes it): its scalars become the
columns, the tags chosen by name unless given. The whole file is checked
first; a bad row or record sends nothing. Importing the same run again adds
only the steps it lacks.

  --run-id ID        the run's id (default: the CSV's name without
                     extension; an event file's directory)
  --project P        its project (default: imported)
  --loss-tag T       event files: the training loss's tag (default: a tag
                     with "loss" not naming val/eval/test)
  --val-tag T        the validation loss's (default: a loss tag naming
                     val/valid/eval/test)
  --lr-tag T         the learning rate's (default: "lr", "learning_rate"...)
  --grad-norm-tag T  the gradient norm's (default: grad + norm)
  --json             {"file", "run_id", "rows", "last_step", "advice",
                     "format", "tags"}
)";

constexpr std::string_view kTokenUsage =
    R"(usage: lossguard token new --project P [--access write|read] [--name N] [--json]

Makes a bearer token (256 random bits) and prints it with the entry to add
to lossguardd's --auth_config file, which holds only the token's SHA-256.
Keep the token secret; it is not stored anywhere.

  --project P   the project it may access ("*": every project)
  --access A    write (attach, stream and steer runs, and read them; the
                default) or read
  --name N      who holds it, for logs and limits (default: the project)
  --json        {"token": ..., "entry": {...}}
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
suggests the initial learning rate: the geometric middle between the
steepest descent and the loss minimum.

  --json  print one JSON object: file, suggested_lr, steep_lo_lr,
          steep_hi_lr, steep_mid_lr, min_loss_lr, basin_lo_lr, basin_hi_lr,
          basin_mid_lr, diverge_lr, points_used, evidence
)";

// The usage of `command`, or nullopt for an unknown command.
std::optional<std::string_view> CommandUsage(std::string_view command) {
  if (command == "analyze") return kAnalyzeUsage;
  if (command == "lr-find") return kLrFindUsage;
  if (command == "runs") return kRunsUsage;
  if (command == "health") return kHealthUsage;
  if (command == "probe") return kProbeUsage;
  if (command == "watch") return kWatchUsage;
  if (command == "plot") return kPlotUsage;
  if (command == "import") return kImportUsage;
  if (command == "token") return kTokenUsage;
  return std::nullopt;
}

int UsageError(std::string_view message, std::string_view usage) {
  std::cerr << "lossguard: " << message << "\n\n" << usage;
  return kExitUsage;
}

// lossguard token new: a token and its --auth_config entry.
int RunTokenNew(const std::string& what, std::map<std::string, std::string>& opts, bool json,
                std::string_view usage) {
  if (what != "new") return UsageError("token takes 'new'", usage);
  const std::string project = opts["--project"];
  if (project.empty()) return UsageError("token new needs --project (\"*\": every project)", usage);
  std::string access = opts["--access"].empty() ? "write" : opts["--access"];
  if (access != "write" && access != "read") {
    return UsageError("--access must be write or read", usage);
  }
  const std::string name = opts["--name"].empty() ? project : opts["--name"];
  const std::string token = lossguard::auth::NewToken();
  if (token.empty()) {
    std::cerr << "lossguard: no random bytes from OpenSSL\n";
    return kExitFailed;
  }
  nlohmann::ordered_json entry = {{"name", name},
                                  {"sha256", lossguard::auth::Sha256Hex(token)},
                                  {"project", project},
                                  {"access", access}};
  if (json) {
    std::cout << nlohmann::ordered_json{{"token", token}, {"entry", entry}}.dump() << "\n";
  } else {
    std::cout << "token (give it to the trainers or people; it is not stored):\n  " << token
              << "\nentry for lossguardd's --auth_config \"tokens\" list:\n  "
              << entry.dump() << "\n";
  }
  return kExitOk;
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

  // Options: "--name value" or "--name=value"; which ones a command takes
  // is checked below.
  static constexpr std::string_view kTok = "--token", kCa = "--tls-ca",
                                    kCert = "--tls-cert", kKey = "--tls-key";
  bool json = false;
  bool linear = false;
  std::map<std::string, std::string> opts;
  std::vector<std::string> positional;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string_view arg = args[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << *usage;
      return kExitOk;
    }
    if (arg == "--json") {
      json = true;
    } else if (arg == "--linear") {
      linear = true;
    } else if (arg == "-") {
      positional.emplace_back(arg);
    } else if (arg.size() > 1 && arg[0] == '-') {
      std::string name(arg);
      std::string value;
      const size_t eq = name.find('=');
      if (eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
      } else if (i + 1 < args.size()) {
        value = std::string(args[++i]);
      } else {
        return UsageError("option '" + name + "' needs a value", *usage);
      }
      static const std::map<std::string_view, std::vector<std::string_view>>
          kAllowed = {
              {"analyze", {}},
              {"lr-find", {}},
              {"runs", {"--server", "--project", "--state", kTok, kCa, kCert, kKey}},
              {"health", {"--server", kTok, kCa, kCert, kKey}},
              {"probe", {"--server", "--service", kTok, kCa, kCert, kKey}},
              {"watch", {"--server", kTok, kCa, kCert, kKey}},
              {"plot", {"--server", "-o", "--max-points", kTok, kCa, kCert, kKey}},
              {"import", {"--server", "--run-id", "--project", "--loss-tag",
                          "--val-tag", "--lr-tag", "--grad-norm-tag", kTok, kCa, kCert,
                          kKey}},
              {"token", {"--project", "--access", "--name"}},
          };
      const auto& allowed = kAllowed.at(command);
      if (std::find(allowed.begin(), allowed.end(), name) == allowed.end()) {
        return UsageError("unknown option '" + name + "'", *usage);
      }
      opts[name] = value;
    } else {
      positional.emplace_back(arg);
    }
  }
  if (linear && command != "plot") {
    return UsageError("unknown option '--linear'", *usage);
  }
  const bool remote = command != "analyze" && command != "lr-find" && command != "token";
  const size_t wanted = command == "runs" || command == "probe" ? 0 : 1;
  if (positional.size() != wanted) {
    const std::string what = command == "analyze" || command == "lr-find" ||
                                     command == "import"
                                 ? "FILE.csv"
                                 : command == "token" ? "'new'" : "RUN";
    return UsageError(positional.size() < wanted ? "missing " + what
                                                 : "too many arguments",
                      *usage);
  }
  if (command == "token") return RunTokenNew(positional[0], opts, json, *usage);
  if (!remote) {
    return command == "analyze" ? RunAnalyze(positional[0], json)
                                : RunLrFind(positional[0], json);
  }
  lossguard::Credentials creds;
  creds.token = opts["--token"];
  creds.tls_ca_file = opts["--tls-ca"];
  creds.tls_cert_file = opts["--tls-cert"];
  creds.tls_key_file = opts["--tls-key"];
  lossguard::CredentialsFromEnvironment(&creds);

  std::string server = "127.0.0.1:7077";
  if (const char* env = std::getenv("LOSSGUARD_SERVER"); env && *env) server = env;
  if (opts.count("--server")) server = opts["--server"];
  auto print = [](const absl::StatusOr<std::string>& out) {
    if (!out.ok()) {
      std::cerr << "lossguard: " << out.status().message() << "\n";
      return kExitFailed;
    }
    std::cout << *out;
    return kExitOk;
  };
  if (command == "probe") {
    const std::string service = opts.count("--service")
                                    ? opts["--service"]
                                    : std::string("lossguard.v1.LossGuard");
    return print(lossguard::cli::Probe(server, creds, service, json));
  }
  if (command == "import") {
    lossguard::cli::ImportOptions io;
    io.server = server;
    io.credentials = creds;
    io.run_id = opts["--run-id"];
    io.project = opts["--project"];
    io.tags.loss = opts["--loss-tag"];
    io.tags.val_loss = opts["--val-tag"];
    io.tags.lr = opts["--lr-tag"];
    io.tags.grad_norm = opts["--grad-norm-tag"];
    absl::StatusOr<lossguard::cli::ImportReport> r =
        lossguard::cli::ImportCurve(positional[0], io);
    if (!r.ok()) return print(r.status());
    return print(lossguard::cli::ImportReportText(*r, json));
  }
  absl::StatusOr<std::unique_ptr<lossguard::v1::LossGuard::StubInterface>> connected =
      lossguard::cli::ConnectTo(server, creds);
  if (!connected.ok()) return print(connected.status());
  std::unique_ptr<lossguard::v1::LossGuard::StubInterface> stub = std::move(*connected);
  if (command == "runs") {
    lossguard::cli::RunsQuery q;
    q.project = opts["--project"];
    if (!opts["--state"].empty()) {
      for (absl::string_view name : absl::StrSplit(opts["--state"], ',')) {
        lossguard::v1::RunState state;
        if (!lossguard::v1::RunState_Parse(
                absl::AsciiStrToUpper(std::string(absl::StripAsciiWhitespace(name))),
                &state) ||
            state == lossguard::v1::RUN_STATE_UNSPECIFIED) {
          return UsageError("unknown state '" + std::string(name.data(), name.size()) + "'",
                            *usage);
        }
        q.states.push_back(state);
      }
    }
    return print(lossguard::cli::Runs(*stub, server, q, json));
  }
  const std::string& run = positional[0];
  if (command == "health") {
    return print(lossguard::cli::Health(*stub, server, run, json));
  }
  if (command == "watch") {
    const absl::Status s = lossguard::cli::Watch(*stub, server, run, json, std::cout);
    if (!s.ok()) return print(s);
    return kExitOk;
  }
  // plot
  lossguard::cli::PlotOptions po;
  po.log_loss = !linear;
  if (opts.count("--max-points") &&
      (!absl::SimpleAtoi(opts["--max-points"], &po.max_points) ||
       po.max_points < 4 || po.max_points > 100000)) {
    return UsageError("--max-points takes a number from 4 to 100000", *usage);
  }
  std::string out_path = opts["-o"];
  if (out_path.empty()) {
    out_path = run + ".svg";
    for (char& c : out_path) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' &&
          c != '_') {
        c = '_';
      }
    }
  }
  absl::StatusOr<std::string> svg = lossguard::cli::PlotSvg(*stub, server, run, po);
  if (!svg.ok()) return print(svg.status());
  if (out_path == "-") {
    std::cout << *svg;
    return kExitOk;
  }
  {
    std::ofstream f(out_path, std::ios::binary);
    f << *svg;
    if (!f.flush()) {
      return print(absl::UnavailableError("cannot write " + out_path));
    }
  }
  if (json) {
    nlohmann::ordered_json j;
    j["file"] = out_path;
    j["run_id"] = run;
    std::cout << JsonText(j);
  } else {
    std::cout << "wrote " << out_path << "\n";
  }
  return kExitOk;
}
