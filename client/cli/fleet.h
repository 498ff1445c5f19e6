#ifndef LOSSGUARD_CLIENT_CLI_FLEET_H_
#define LOSSGUARD_CLIENT_CLI_FLEET_H_

// The commands that talk to a running lossguardd: the fleet table, one
// run's health, its live events, its curve as an SVG plot, and the import
// of a curve file as a run. Each takes the stub to call, so tests run them
// against an in-process daemon; none prints anything itself except Watch,
// which streams.

#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lossguard/client/credentials.h"
#include "lossguard/curvefile/tfevents.h"
#include "lossguard/v1/lossguard.grpc.pb.h"

namespace lossguard::cli {

// A stub for `server` (host:port) with `credentials` (token, TLS);
// InvalidArgument for a certificate file that cannot be used.
absl::StatusOr<std::unique_ptr<v1::LossGuard::StubInterface>> ConnectTo(
    const std::string& server, const Credentials& credentials);

// How long one call may take (a daemon that is down answers UNAVAILABLE
// within this, and the message says which address was tried).
inline constexpr absl::Duration kCallTimeout = absl::Seconds(10);

struct RunsQuery {
  std::string project;               // empty: every project
  std::vector<v1::RunState> states;  // empty: every state
};

// `lossguard runs`: every run (all pages), newest first, as a table (run,
// project, state, step, loss, LR, active diagnoses) or, with `json`, one
// object {"runs": [RunSummary...]} (proto field names).
absl::StatusOr<std::string> Runs(v1::LossGuard::StubInterface& stub,
                                 const std::string& server,
                                 const RunsQuery& query, bool json);

// `lossguard health RUN`: the run's summary, config, active diagnoses with
// their evidence, and its advice history with status and outcome; with
// `json`, the RunHealth message as JSON.
// Asks the daemon's standard gRPC health service whether `service` (empty:
// the server as a whole) is SERVING: OK with "SERVING" (or JSON), else
// Unavailable naming the status. A liveness or readiness probe.
absl::StatusOr<std::string> Probe(const std::string& server,
                                  const Credentials& credentials,
                                  const std::string& service, bool json);

absl::StatusOr<std::string> Health(v1::LossGuard::StubInterface& stub,
                                   const std::string& server,
                                   const std::string& run_id, bool json);

// `lossguard watch RUN`: the run's past events, then its live ones, one per
// line (with `json`, one JSON object per line), until the run finishes
// (OK) or the stream fails. Each line is flushed as it comes.
absl::Status Watch(v1::LossGuard::StubInterface& stub,
                   const std::string& server, const std::string& run_id,
                   bool json, std::ostream& out);

struct PlotOptions {
  int max_points = 2000;  // curve points fetched (min/max buckets)
  bool log_loss = true;   // loss axis in log scale
  int width = 1000;       // SVG size in pixels
  int height = 560;
};

// `lossguard plot RUN`: an SVG of the loss, the validation loss and the LR
// (right axis, log scale) against step, with each diagnosis's onset and
// each applied action marked where it happened.
absl::StatusOr<std::string> PlotSvg(v1::LossGuard::StubInterface& stub,
                                    const std::string& server,
                                    const std::string& run_id,
                                    const PlotOptions& options);

// The SVG for a curve and the run's advice records (PlotSvg after its
// calls; exposed for tests).
std::string RenderSvg(const v1::Curve& curve,
                      const std::vector<v1::AdviceRecord>& advice,
                      const std::string& title, const PlotOptions& options);

struct ImportOptions {
  std::string server;
  Credentials credentials;
  std::string run_id;   // empty: the file name without its extension
  std::string project;  // empty: "imported"
  // TensorBoard event files: the scalar tags of the columns (empty: chosen
  // from the tags present, see curvefile::ChooseTags).
  curvefile::TagMap tags;
  // How long to wait for the daemon to take every step.
  absl::Duration timeout = absl::Seconds(120);
};

struct ImportReport {
  std::string file;
  std::string run_id;
  int64_t rows = 0;       // rows read from the file
  int64_t last_step = 0;  // the last step the daemon holds for the run
  int64_t advice = 0;     // advice the daemon sent back (informational)
  std::string format;     // "csv" or "tfevents"
  curvefile::TagMap tags;  // tfevents: the tags read
};

// The report as text ("imported N rows of FILE as run R ...") or JSON.
std::string ImportReportText(const ImportReport& report, bool json);

// `lossguard import FILE`: streams a curve file (CSV, or a TensorBoard
// event file: see curvefile::LooksLikeTfEvents) into the daemon as a run in
// OBSERVE mode (diagnosed and plotted, never steered) and marks it
// finished. Re-importing the same run adds only the steps the daemon lacks.
// Errors name the file and line or record (a bad file: nothing of it is
// sent) or the server.
absl::StatusOr<ImportReport> ImportCurve(const std::string& file,
                                         const ImportOptions& options);

}  // namespace lossguard::cli

#endif  // LOSSGUARD_CLIENT_CLI_FLEET_H_
