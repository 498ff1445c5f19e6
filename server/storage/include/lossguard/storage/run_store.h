#ifndef LOSSGUARD_STORAGE_RUN_STORE_H_
#define LOSSGUARD_STORAGE_RUN_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lossguard::storage {

// One run's metadata and latest state. The store does not interpret
// `config`, `tags_json`, `mode` or `state`: the service owns their meaning
// (serialized wire messages and enum values), so the store stays free of
// gRPC and protobuf and another backend only has to keep bytes.
struct RunRow {
  std::string run_id;     // primary key
  std::string name;
  std::string project;
  std::string tags_json;  // {"key": "value", ...}
  std::string config;     // opaque bytes (serialized lossguard.v1.RunConfig)
  int mode = 0;           // lossguard.v1.Mode value
  int state = 0;          // lossguard.v1.RunState value
  double created_time = 0.0;  // seconds since the Unix epoch
  double updated_time = 0.0;
  // Filled by reads only (LoadRuns); ignored by PutRun.
  bool has_steps = false;
  int64_t last_step = 0;     // largest stored step (when has_steps)
  int64_t steps_stored = 0;  // number of stored steps
};

// One optimizer step exactly as the trainer sent it. Every double may be
// NaN or infinite and reads back bit-for-bit the same class (NaN stays NaN,
// +-inf stays +-inf); an absent optional stays absent.
struct StepRow {
  int64_t step = 0;
  double lr = 0.0;
  double loss = 0.0;
  std::optional<double> val_loss;
  std::optional<double> grad_norm;
  double wall_time = 0.0;
};

// A diagnosis or an advice of a run, with its updates (ack, outcome).
// (run_id, type, id) is the key: putting the same key again replaces the
// payload, so an advice's later status overwrites its earlier one.
struct EventRow {
  enum class Type { kDiagnosis = 1, kAdvice = 2 };
  std::string run_id;
  Type type = Type::kDiagnosis;
  uint64_t id = 0;       // unique per run and type
  int64_t step = 0;      // the step it belongs to (for range queries)
  std::string payload;   // opaque bytes (a serialized wire message)
};

// Writer health, for metrics and tests.
struct StoreStats {
  int64_t queued_ops = 0;     // writes accepted but not yet committed
  int64_t queued_steps = 0;   // steps among them
  int64_t committed_steps = 0;   // steps committed since the store opened
  int64_t transactions = 0;      // transactions committed since open
  double oldest_queued_age_s = 0.0;  // write lag: age of the oldest queued op
  std::string last_error;            // empty when every write succeeded
  bool failing = false;  // a write is failing now (being retried)
};

class LeaseTable;

// Durable home of every run's history.
//
// Writes (PutRun, AppendSteps, PutEvent) never block on I/O: they are queued
// and applied in order by one writer thread in batched transactions, so they
// may be called from gRPC callback threads. Writes of one run are applied in
// the order they were made. AppendSteps keeps only the steps above the
// run's last stored step (a run's steps are appended in increasing order),
// so resending after a reconnect duplicates nothing.
//
// Durability: a write that fails for a reason that may pass (database
// locked, disk full, I/O error) is retried with backoff until it commits,
// so nothing accepted is dropped while the store is open; Flush() and
// Stats() report the error meanwhile, and the backlog grows (see
// NotifyWhenBacklogBelow). A write that cannot succeed (a corrupt database)
// is dropped and reported. What was committed before stays intact.
// AppendSteps' callback says when its steps are durable, so a caller can
// confirm them to whoever must otherwise keep them.
//
// Reads are synchronous and may block on I/O: call them at startup, from a
// thread of your own, or in tests; not on a gRPC callback thread.
//
// Thread-safety: all methods may be called concurrently from any thread.
class RunStore {
 public:
  virtual ~RunStore() = default;

  // Called once a write is durable (OK), or with the error when the store
  // gave up on it (a write that cannot succeed, or one still failing when
  // the store closes). The SQLite store calls it on its writer thread, the
  // memory store at once on the caller's: it must be short and must not
  // call Flush (queuing more writes is fine).
  using CommitCallback = std::function<void(const absl::Status&)>;

  virtual void PutRun(const RunRow& run) = 0;
  // Steps of one run, in increasing step order; those at or below the
  // run's last stored step are ignored. `on_commit` (may be empty) runs
  // once these steps and every write queued before them are durable; with
  // no steps, it marks that point alone.
  virtual void AppendSteps(const std::string& run_id,
                           std::vector<StepRow> steps,
                           CommitCallback on_commit) = 0;
  void AppendSteps(const std::string& run_id, std::vector<StepRow> steps) {
    AppendSteps(run_id, std::move(steps), nullptr);
  }
  virtual void PutEvent(const EventRow& event) = 0;

  // Blocks until every write queued before the call is committed (and its
  // commit callback has run), or until
  // a write is failing (being retried): then returns at once with that
  // error. Otherwise returns the first error any write hit since the store
  // opened (OK if none).
  virtual absl::Status Flush() = 0;

  // Calls `resume` once (on the writer thread) as soon as fewer than
  // `below_steps` steps are queued; at once, on the calling thread, when
  // that already holds. Lets a producer stop reading while the writer
  // catches up without blocking a thread.
  virtual void NotifyWhenBacklogBelow(int64_t below_steps,
                                      std::function<void()> resume) = 0;

  virtual StoreStats Stats() const = 0;

  // Every run, with has_steps/last_step/steps_stored filled in.
  virtual absl::StatusOr<std::vector<RunRow>> LoadRuns() = 0;
  // Steps of `run_id` with from_step <= step <= to_step, in step order.
  // An unknown run reads as no steps. `fn` returning false stops the scan.
  virtual absl::Status ReadSteps(
      const std::string& run_id, int64_t from_step, int64_t to_step,
      const std::function<bool(const StepRow&)>& fn) = 0;
  // One run's row, as LoadRuns fills it; nullopt for an unknown run. (The
  // default scans LoadRuns; a store shared by daemons reads one row.)
  virtual absl::StatusOr<std::optional<RunRow>> LoadRun(
      const std::string& run_id);
  // Every event of `run_id`, ordered by (type, id).
  virtual absl::StatusOr<std::vector<EventRow>> ReadEvents(
      const std::string& run_id) = 0;

  // The ownership leases of a store that several daemons share (the
  // PostgreSQL store); nullptr for a store that one daemon owns alone.
  virtual LeaseTable* leases() { return nullptr; }
};

// Who owns a run, in a fleet of daemons sharing one store.
struct LeaseHolder {
  std::string owner;    // the daemon's id
  std::string address;  // where trainers reach it (host:port)
  double expires_in_s = 0.0;  // by the database's clock; <= 0: expired
};

// Run ownership across daemons: a daemon holds a run's lease while it
// serves the run's trainer and renews it; when the daemon dies the lease
// expires and another daemon may take the run over. Expiry is judged by
// the database's clock, so the daemons' clocks need not agree.
//
// Calls are synchronous round trips to the database: not for a gRPC
// callback thread. Thread-safe.
class LeaseTable {
 public:
  virtual ~LeaseTable() = default;
  // Takes the lease on `run_id` for `owner` (reachable at `address`) for
  // `ttl_s` seconds when it is free, expired or already `owner`'s (then it
  // is renewed). Returns who holds it afterwards: `owner` on success,
  // another daemon otherwise.
  virtual absl::StatusOr<LeaseHolder> Acquire(const std::string& run_id,
                                              const std::string& owner,
                                              const std::string& address,
                                              double ttl_s) = 0;
  // Renews `owner`'s leases on `run_ids` for `ttl_s`; returns the ids
  // among them that `owner` no longer holds (taken over after expiring).
  virtual absl::StatusOr<std::vector<std::string>> Renew(
      const std::vector<std::string>& run_ids, const std::string& owner,
      double ttl_s) = 0;
  // Gives the lease up if `owner` holds it.
  virtual absl::Status Release(const std::string& run_id,
                               const std::string& owner) = 0;
  // The runs whose lease someone holds and has not let expire.
  virtual absl::StatusOr<std::vector<std::string>> LiveRuns() = 0;
  // Who holds the lease on `run_id`, expired or not; nullopt when no one
  // ever did.
  virtual absl::StatusOr<std::optional<LeaseHolder>> Holder(
      const std::string& run_id) = 0;
};

// Options of the SQLite store.
struct SqliteOptions {
  // Most writes committed in one transaction. Bigger batches cost fewer
  // fsyncs per step; the writer commits whatever is queued as soon as the
  // previous transaction ends, so a light load still commits at once.
  int max_ops_per_transaction = 4096;
  // synchronous=NORMAL in WAL mode: a commit survives a crash of the
  // daemon; the last transactions may be lost in a power cut, never the
  // database's integrity. FULL syncs every commit.
  bool synchronous_full = false;
  // Page cache of the writer's connection (KiB). It holds the pages that
  // every transaction touches: a leaf page per run written, and the
  // B-trees' inner pages.
  int writer_cache_kib = 65536;
  // Nice value of the writer thread (0: the process's). Persisting is
  // background work: when the CPU is saturated, the threads that ingest
  // steps and send advice go first; the writer catches up when there is
  // room, and ingest stops reading when its backlog grows too long.
  int writer_nice = 10;
  // Caps the database file at this many pages (PRAGMA max_page_count; 0:
  // SQLite's default, effectively none). Past it, writes fail as on a full
  // disk (retried, reported, nothing committed is harmed).
  int64_t max_page_count = 0;
  // A failing transaction is retried after this long, doubling up to the
  // maximum.
  double retry_initial_backoff_s = 0.05;
  double retry_max_backoff_s = 5.0;
  // How long a reader waits for a lock before SQLITE_BUSY.
  int busy_timeout_ms = 5000;
};

// Opens (creating if needed) the SQLite database at `path` in WAL mode and
// starts its writer thread. The destructor flushes and stops the writer.
absl::StatusOr<std::unique_ptr<RunStore>> OpenSqliteStore(
    const std::string& path, const SqliteOptions& options = SqliteOptions());

// Options of the PostgreSQL store.
struct PostgresOptions {
  // Most writes committed in one transaction (steps count one each).
  int max_ops_per_transaction = 4096;
  // Nice value of the writer thread (see SqliteOptions::writer_nice).
  int writer_nice = 10;
  // A failing transaction (the server unreachable, restarting, failing
  // over, out of disk) is retried after this long, doubling up to the
  // maximum; nothing accepted is dropped meanwhile.
  double retry_initial_backoff_s = 0.05;
  double retry_max_backoff_s = 5.0;
};

// Connects to the PostgreSQL database `conninfo` (a postgresql:// URI or
// libpq key=value pairs; a password may come from ~/.pgpass or
// $PGPASSWORD), creates the schema if needed and starts the writer thread.
// Several daemons may share one database; see leases(). The destructor
// flushes and stops the writer.
absl::StatusOr<std::unique_ptr<RunStore>> OpenPostgresStore(
    const std::string& conninfo,
    const PostgresOptions& options = PostgresOptions());

// Whether a --db value names a PostgreSQL database (a postgresql:// or
// postgres:// URI) rather than a SQLite file.
bool IsPostgresUri(const std::string& db);

// "postgresql host:port/dbname" of a conninfo, without user or password,
// for logs and errors.
std::string PostgresDisplayName(const std::string& conninfo);

// What CopyStore copied.
struct CopyStats {
  int64_t runs = 0;
  int64_t steps = 0;
  int64_t events = 0;
};

// Copies every run of `from` (metadata, steps, events) into `to`, then
// flushes `to`: how a SQLite database moves to PostgreSQL (lossguard-
// migrate). Steps `to` already holds for a run are kept (AppendSteps skips
// them), so an interrupted copy can simply be run again. `progress` (may be
// empty) hears of each run copied. Reads `from` run by run; memory stays
// bounded by one run's events and one batch of steps.
absl::StatusOr<CopyStats> CopyStore(
    RunStore& from, RunStore& to,
    const std::function<void(const RunRow&, const CopyStats&)>& progress =
        nullptr);

// A store that keeps everything in memory, with the same semantics (for
// tests and for embedded use without persistence). Writes apply at once.
std::unique_ptr<RunStore> NewMemoryStore();

}  // namespace lossguard::storage

#endif  // LOSSGUARD_STORAGE_RUN_STORE_H_
