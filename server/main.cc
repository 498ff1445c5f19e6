// lossguardd: the lossguard daemon.
//
//   lossguardd --listen 127.0.0.1:7077 --db ./lossguard.db
//
// Serves lossguard.v1.LossGuard, grpc.health.v1.Health and server
// reflection. SIGTERM or SIGINT shuts down gracefully: Attach streams end
// with UNAVAILABLE (clients reconnect and resume), the store is flushed.

#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/synchronization/mutex.h"
#include "lossguard/service/log.h"
#include "lossguard/service/service.h"
#include "lossguard/storage/run_store.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:7077",
          "host:port to serve gRPC on (loopback by default; port 0 picks one)");
ABSL_FLAG(std::string, http, "127.0.0.1:7078",
          "host:port of the web dashboard, /api (JSON), /metrics "
          "(Prometheus) and /healthz; empty: no HTTP port");
ABSL_FLAG(std::string, alert_webhook, "",
          "POST a JSON alert here when a run turns UNHEALTHY or a trainer "
          "applies an action (http(s)://host[:port][/path]; retried with "
          "backoff); empty: no alerts");
ABSL_FLAG(std::string, db, "./lossguard.db",
          "SQLite database file (created if missing); \":memory:\" keeps "
          "nothing across restarts; postgresql://user@host:port/dbname "
          "(password from ~/.pgpass or $PGPASSWORD): a PostgreSQL database "
          "that several daemons may share");
ABSL_FLAG(int64_t, db_max_mib, 0,
          "cap the SQLite file at this many MiB (0: none); past it writes "
          "fail as on a full disk: reported and retried, nothing lost");
ABSL_FLAG(std::string, log_level, "info", "debug, info, warning or error");
ABSL_FLAG(int, max_actions, 5, "most actions advised per run");
ABSL_FLAG(int64_t, cooldown_steps, 100,
          "steps after an action before the next one");
ABSL_FLAG(double, min_lr, 1e-7, "no action sets the LR below this");
ABSL_FLAG(double, max_lr, 10.0, "no action sets the LR above this");
ABSL_FLAG(double, shutdown_grace_s, 5.0,
          "on SIGTERM, seconds calls get to end before they are cancelled");
ABSL_FLAG(std::string, auth_config, "",
          "JSON file of bearer tokens per project, stored as SHA-256 (see "
          "`lossguard token new`); empty: no auth");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain: TLS on the gRPC port");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA: clients must present a certificate it signed (mTLS)");
ABSL_FLAG(int, max_streams_per_client, 10000,
          "Attach streams one client (token, or peer host without auth) may "
          "have open; 0: no limit");
ABSL_FLAG(int64_t, max_runs_per_project, 0, "runs one project may hold; 0: no limit");
ABSL_FLAG(int, max_message_mib, 64, "largest gRPC message accepted, in MiB");
ABSL_FLAG(std::string, advertise, "",
          "with a PostgreSQL --db shared by several daemons: host:port where "
          "trainers reach this daemon (told to trainers of runs it serves); "
          "empty: the --listen host (this machine's name for 0.0.0.0) and "
          "the port listened on");
ABSL_FLAG(std::string, replica_id, "",
          "with a shared --db: this daemon's unique id in the fleet (a pod "
          "name); empty: the advertised address");
ABSL_FLAG(double, lease_s, 10.0,
          "with a shared --db: a run's lease lasts this long unless renewed "
          "(every lease_s/3); the runs of a daemon that died move to another "
          "after at most this long");
ABSL_FLAG(double, fleet_sync_s, 1.0,
          "with a shared --db: how often the runs other daemons serve are "
          "refreshed from the database (what reads here see)");

namespace {

using lossguard::service::Log;
using lossguard::service::LogLevel;

int Fail(const std::string& what) {
  Log(LogLevel::kError, "fatal", {{"error", what}});
  std::fprintf(stderr, "lossguardd: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "lossguardd --listen 127.0.0.1:7077 --db ./lossguard.db");
  absl::ParseCommandLine(argc, argv);
  // Debian builds abseil without NDEBUG, which leaves Mutex deadlock
  // detection on: a global graph updated under a global lock on every
  // Lock(). The tests keep it; the binaries turn it off.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);

  const std::string level = absl::GetFlag(FLAGS_log_level);
  if (level == "debug") {
    lossguard::service::SetLogLevel(LogLevel::kDebug);
  } else if (level == "warning") {
    lossguard::service::SetLogLevel(LogLevel::kWarning);
  } else if (level == "error") {
    lossguard::service::SetLogLevel(LogLevel::kError);
  } else if (level != "info") {
    return Fail("--log_level must be debug, info, warning or error");
  }

  // Signals are taken by sigwait below: block them in every thread, which
  // all inherit this mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  lossguard::service::ServerOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  options.http_listen = absl::GetFlag(FLAGS_http);
  options.alert_webhook = absl::GetFlag(FLAGS_alert_webhook);
  options.run.policy.max_actions = absl::GetFlag(FLAGS_max_actions);
  options.run.policy.cooldown_steps = absl::GetFlag(FLAGS_cooldown_steps);
  options.run.policy.min_lr = absl::GetFlag(FLAGS_min_lr);
  options.run.policy.max_lr = absl::GetFlag(FLAGS_max_lr);
  options.shutdown_grace_s = absl::GetFlag(FLAGS_shutdown_grace_s);
  if (const std::string path = absl::GetFlag(FLAGS_auth_config); !path.empty()) {
    absl::StatusOr<lossguard::auth::AuthConfig> auth =
        lossguard::auth::LoadAuthConfig(path);
    if (!auth.ok()) return Fail(std::string(auth.status().message()));
    options.auth = std::move(*auth);
  }
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.max_streams_per_client = absl::GetFlag(FLAGS_max_streams_per_client);
  if (options.max_streams_per_client < 0) return Fail("--max_streams_per_client must be >= 0");
  if (absl::GetFlag(FLAGS_max_runs_per_project) < 0) {
    return Fail("--max_runs_per_project must be >= 0");
  }
  options.limits.max_runs_per_project =
      static_cast<size_t>(absl::GetFlag(FLAGS_max_runs_per_project));
  const int max_message_mib = absl::GetFlag(FLAGS_max_message_mib);
  if (max_message_mib < 1 || max_message_mib > 1024) {
    return Fail("--max_message_mib must be from 1 to 1024");
  }
  options.max_message_bytes = max_message_mib << 20;
  options.advertise = absl::GetFlag(FLAGS_advertise);
  options.replica_id = absl::GetFlag(FLAGS_replica_id);
  options.lease_s = absl::GetFlag(FLAGS_lease_s);
  options.fleet_sync_s = absl::GetFlag(FLAGS_fleet_sync_s);
  if (!(options.fleet_sync_s >= 0.05 && options.fleet_sync_s <= 3600)) {
    return Fail("--fleet_sync_s must be from 0.05 to 3600");
  }
  if (!(options.lease_s >= 0.5 && options.lease_s <= 3600)) {
    return Fail("--lease_s must be from 0.5 to 3600");
  }
  if (!(options.shutdown_grace_s >= 0.0)) {
    return Fail("--shutdown_grace_s must be >= 0");
  }
  if (!(options.run.policy.min_lr > 0.0 &&
        options.run.policy.min_lr < options.run.policy.max_lr)) {
    return Fail("need 0 < --min_lr < --max_lr");
  }

  const std::string db = absl::GetFlag(FLAGS_db);
  std::unique_ptr<lossguard::storage::RunStore> store;
  std::string db_name = db;
  if (db == ":memory:") {
    store = lossguard::storage::NewMemoryStore();
  } else if (lossguard::storage::IsPostgresUri(db)) {
    db_name = lossguard::storage::PostgresDisplayName(db);
    auto opened = lossguard::storage::OpenPostgresStore(db);
    if (!opened.ok()) return Fail(std::string(opened.status().message()));
    store = std::move(*opened);
  } else {
    lossguard::storage::SqliteOptions store_options;
    const int64_t max_mib = absl::GetFlag(FLAGS_db_max_mib);
    if (max_mib < 0) return Fail("--db_max_mib must be >= 0");
    // SQLite's default page size, 4 KiB.
    store_options.max_page_count = max_mib * 256;
    auto opened = lossguard::storage::OpenSqliteStore(db, store_options);
    if (!opened.ok()) return Fail(std::string(opened.status().message()));
    store = std::move(*opened);
  }
  Log(LogLevel::kInfo, "store_open", {{"db", db_name}});

  lossguard::service::Daemon daemon(options, store.get());
  absl::Status s = daemon.Start();
  if (!s.ok()) return Fail(std::string(s.message()));
  // Scripts read the port from this line when they listen on port 0.
  std::printf("lossguardd listening on port %d\n", daemon.port());
  if (daemon.http_port() != 0) {
    std::printf("lossguardd dashboard on http port %d\n", daemon.http_port());
  }
  std::fflush(stdout);

  int sig = 0;
  sigwait(&signals, &sig);
  Log(LogLevel::kInfo, "signal", {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
  s = daemon.Shutdown();
  store.reset();
  return s.ok() ? 0 : Fail(std::string(s.message()));
}
