#ifndef LOSSGUARD_SERVICE_SERVICE_H_
#define LOSSGUARD_SERVICE_SERVICE_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lossguard/auth/auth.h"
#include "lossguard/runs/fleet.h"
#include "lossguard/runs/run.h"
#include "lossguard/runs/run_registry.h"
#include "lossguard/storage/run_store.h"

namespace grpc {
class Server;
}  // namespace grpc

namespace lossguard::service {

// Everything lossguardd is configured with.
struct ServerOptions {
  // host:port to listen on; loopback unless told otherwise. Port 0 picks a
  // free port (see Daemon::port()).
  std::string listen = "127.0.0.1:7077";
  // host:port of the HTTP port (dashboard, /api, /metrics, /healthz);
  // empty: none. Port 0 picks a free port (see Daemon::http_port()).
  std::string http_listen;
  // Webhook for alerts (JSON POST when a run turns UNHEALTHY or a trainer
  // applies an action): http(s)://host[:port][/path]; empty: none.
  std::string alert_webhook;
  // Attempts per alert and the first retry's delay (doubling after).
  int alert_max_attempts = 5;
  double alert_initial_backoff_s = 0.5;
  runs::RunOptions run;
  runs::RunLimits limits;
  // Most steps in one StepBatch (RESOURCE_EXHAUSTED above).
  int max_batch_steps = 10000;
  // Largest message the server accepts, in bytes (gRPC's limit; RESOURCE_
  // EXHAUSTED above). 64 MiB holds an AnalyzeCurve of ~1.5M steps.
  int max_message_bytes = 64 << 20;
  // Responses queued for one Attach stream before the server gives up on a
  // client that does not read them (RESOURCE_EXHAUSTED).
  int max_queued_responses = 1024;
  // Events queued for one WatchRun stream before a watcher that does not
  // keep up is dropped (RESOURCE_EXHAUSTED; it can watch again).
  int max_queued_events = 10000;
  // Attach streams stop reading while the store has more than this many
  // steps queued, and resume once it is below half of it: the store's
  // backlog, and so the daemon's memory, stays bounded under any load.
  int64_t max_store_backlog_steps = 1000000;
  // Threads for requests that read the store or compute (GetCurve,
  // AnalyzeCurve): never on gRPC's callback threads.
  int worker_threads = 2;
  // On shutdown, how long streams get to finish before they are cancelled.
  double shutdown_grace_s = 5.0;
  // Bearer tokens per project (lossguard/auth/auth.h); none: every client
  // may do everything (fine on loopback, which is the default listen).
  // With it, Attach needs a write token of the run's project, reads need a
  // token that may read the run's project, ListRuns shows only those, and
  // the gRPC health check and /healthz need none.
  std::optional<auth::AuthConfig> auth;
  // Attach streams one client may have open at once (per token with auth,
  // per peer host without); 0: no limit. RESOURCE_EXHAUSTED above.
  int max_streams_per_client = 10000;
  // TLS for the gRPC port (PEM files): the server's certificate chain and
  // key. With tls_client_ca_file too, clients must present a certificate
  // signed by that CA (mTLS). Empty: plaintext.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  // Fleet of daemons sharing one store (a store with leases: PostgreSQL;
  // ignored otherwise). A run is served by the daemon holding its lease;
  // see lossguard/runs/fleet.h. Empty replica_id: host:port of `advertise`;
  // empty advertise: the listen address with the port listened on (set it
  // when listening on 0.0.0.0 or behind NAT: it is what trainers are told
  // to reach).
  std::string replica_id;
  std::string advertise;
  double lease_s = 10.0;
  double fleet_sync_s = 1.0;
};

class LossGuardServiceImpl;
class HttpFrontend;
class Alerter;

// lossguardd in a box: the gRPC server with the LossGuard service, the
// standard health service and reflection, over a run registry and a store.
//
// Thread-safety: Start and Shutdown from one thread; the rest is internal.
class Daemon {
 public:
  // `store` and `clock` must outlive the daemon.
  Daemon(const ServerOptions& options, storage::RunStore* store,
         runs::Clock* clock = runs::SystemClock());
  ~Daemon();  // Shutdown() if still running

  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Recovers the stored runs, then listens. FailedPrecondition or the
  // store's error when recovery fails; Unavailable when it cannot listen.
  absl::Status Start();
  // The port actually listened on (after Start).
  int port() const { return port_; }
  // The HTTP port actually listened on (0: none).
  int http_port() const;
  // Stops taking new calls, ends every Attach stream with UNAVAILABLE
  // ("shutting down; reconnect"), waits up to the grace period for calls to
  // end, then flushes the store. Returns the store's flush status.
  absl::Status Shutdown();

  runs::RunRegistry* registry() { return registry_.get(); }

 private:
  Alerter* alerter_raw_ = nullptr;  // alerter_.get(), for the runs' hook
  const ServerOptions options_;
  storage::RunStore* const store_;
  runs::Clock* const clock_;
  std::unique_ptr<runs::RunRegistry> registry_;
  std::unique_ptr<LossGuardServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<HttpFrontend> http_;
  std::unique_ptr<Alerter> alerter_;
  std::unique_ptr<runs::Fleet> fleet_;  // with a shared store only
  int port_ = 0;
  bool running_ = false;
};

}  // namespace lossguard::service

#endif  // LOSSGUARD_SERVICE_SERVICE_H_
