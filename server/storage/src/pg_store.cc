// The PostgreSQL RunStore, for several daemons sharing one fleet.
//
// Writes are queued by BatchingStore (batching_store.h) and committed by
// its writer thread on one connection, a batch per transaction, with the
// SQLite store's layout: a run's new steps in a transaction become one row
// of step_chunks (step_chunk.h), so ingest costs a round trip per run and
// transaction, not per step. Reads use a small pool of connections.
//
// Schema (lossguard_schema.version = 1):
//   runs        (id bigserial, run_id text UNIQUE, metadata..., step_count,
//                last_step)
//   step_chunks (run, first_step): last_step, n_steps, data bytea
//   events      (run, type, id): step, payload bytea
//   run_leases  (run_id): owner, address, expires_at (the database's clock)
// Created at open under an advisory lock, so daemons starting together do
// not race. float8 holds NaN and +-inf; doubles travel in binary, bit for
// bit.
//
// Several writers: a run's steps are written only by the daemon holding
// its lease, but a daemon that lost its lease without knowing (paused,
// partitioned) may still try. Each chunk is added only if it starts above
// the run's last stored step *in the database* (not the writer's cache);
// otherwise the transaction fails with ABORTED, the cache is dropped and
// the retry filters the steps again, so a run's chunks never overlap.
//
// Errors: see pg::Retryable. A lost connection is reopened by the retry.

#include <libpq-fe.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "lossguard/storage/run_store.h"
#include "server/storage/src/batching_store.h"
#include "server/storage/src/pg_conn.h"
#include "server/storage/src/step_chunk.h"

namespace lossguard::storage {
namespace {

constexpr int kSchemaVersion = 1;
// Any fixed number: serializes schema creation among daemons.
constexpr int64_t kSchemaLockKey = 0x6c6f737367756172;  // "lossguar"
constexpr size_t kMaxChunkSteps = 4096;  // as the SQLite store
constexpr size_t kMaxCachedRuns = 65536;
constexpr size_t kMaxIdleReaders = 4;

constexpr char kSchemaSql[] = R"sql(
CREATE TABLE IF NOT EXISTS lossguard_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
  id bigserial PRIMARY KEY,
  run_id text NOT NULL UNIQUE,
  name text NOT NULL DEFAULT '',
  project text NOT NULL DEFAULT '',
  tags_json text NOT NULL DEFAULT '',
  config bytea NOT NULL DEFAULT '',
  mode integer NOT NULL DEFAULT 0,
  state integer NOT NULL DEFAULT 0,
  created_time double precision NOT NULL DEFAULT 0,
  updated_time double precision NOT NULL DEFAULT 0,
  step_count bigint NOT NULL DEFAULT 0,
  last_step bigint  -- NULL: no steps
);
CREATE TABLE IF NOT EXISTS step_chunks (
  run bigint NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  first_step bigint NOT NULL,
  last_step bigint NOT NULL,
  n_steps integer NOT NULL,
  data bytea NOT NULL,  -- step_chunk.h
  PRIMARY KEY (run, first_step)
);
CREATE TABLE IF NOT EXISTS events (
  run bigint NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  type integer NOT NULL,
  id bigint NOT NULL,  -- the uint64 id's bits
  step bigint NOT NULL,
  payload bytea NOT NULL,
  PRIMARY KEY (run, type, id)
);
CREATE TABLE IF NOT EXISTS run_leases (
  run_id text PRIMARY KEY,
  owner text NOT NULL,
  address text NOT NULL,
  expires_at timestamptz NOT NULL
);
)sql";

// The writer's statements.
const std::vector<pg::Statement>& WriterStatements() {
  static const auto* statements = new std::vector<pg::Statement>{
      {"put_run",
       "INSERT INTO runs (run_id, name, project, tags_json, config, mode, "
       "state, created_time, updated_time) "
       "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
       "ON CONFLICT (run_id) DO UPDATE SET name = EXCLUDED.name, "
       "project = EXCLUDED.project, tags_json = EXCLUDED.tags_json, "
       "config = EXCLUDED.config, mode = EXCLUDED.mode, "
       "state = EXCLUDED.state, created_time = EXCLUDED.created_time, "
       "updated_time = EXCLUDED.updated_time"},
      // The run's key and last step, adding an empty row for a run with
      // none yet (steps or events before its PutRun).
      {"find_run",
       "INSERT INTO runs (run_id) VALUES ($1) "
       "ON CONFLICT (run_id) DO UPDATE SET run_id = EXCLUDED.run_id "
       "RETURNING id, last_step"},
      // Adds a chunk only if it starts above the run's last stored step.
      {"add_chunk",
       "WITH r AS (UPDATE runs SET step_count = step_count + $4::integer, "
       "last_step = $3::bigint WHERE id = $1::bigint AND (last_step IS NULL "
       "OR last_step < $2::bigint) RETURNING id) "
       "INSERT INTO step_chunks (run, first_step, last_step, n_steps, data) "
       "SELECT id, $2, $3, $4, $5::bytea FROM r"},
      {"put_event",
       "INSERT INTO events (run, type, id, step, payload) "
       "VALUES ($1, $2, $3, $4, $5) "
       "ON CONFLICT (run, type, id) DO UPDATE SET step = EXCLUDED.step, "
       "payload = EXCLUDED.payload"},
  };
  return *statements;
}

const std::vector<pg::Statement>& ReaderStatements() {
  static const auto* statements = new std::vector<pg::Statement>{
      {"load_runs",
       "SELECT run_id, name, project, tags_json, config, mode, state, "
       "created_time, updated_time, step_count, last_step "
       "FROM runs ORDER BY run_id COLLATE \"C\""},
      {"load_run",
       "SELECT run_id, name, project, tags_json, config, mode, state, "
       "created_time, updated_time, step_count, last_step "
       "FROM runs WHERE run_id = $1"},
      // From the chunk that holds $2 (the last one starting at or before
      // it), to the last one starting at or before $3.
      {"read_steps",
       "WITH r AS (SELECT id FROM runs WHERE run_id = $1) "
       "SELECT n_steps, data FROM step_chunks "
       "WHERE run = (SELECT id FROM r) AND first_step <= $3 "
       "AND first_step >= COALESCE((SELECT MAX(first_step) FROM step_chunks "
       "WHERE run = (SELECT id FROM r) AND first_step <= $2), $2) "
       "ORDER BY first_step"},
      // (id < 0) first: ids at or above 2^63 are stored as negative int64s
      // and sort after the others, as uint64s do.
      {"read_events",
       "SELECT type, id, step, payload FROM events "
       "WHERE run = (SELECT id FROM runs WHERE run_id = $1) "
       "ORDER BY type, id < 0, id"},
  };
  return *statements;
}

const std::vector<pg::Statement>& LeaseStatements() {
  static const auto* statements = new std::vector<pg::Statement>{
      // Takes the lease when free, expired or already ours; then reads
      // whoever holds it (the upsert's row, or the other daemon's).
      {"acquire",
       "WITH taken AS (INSERT INTO run_leases (run_id, owner, address, "
       "expires_at) VALUES ($1, $2, $3, now() + make_interval(secs => $4)) "
       "ON CONFLICT (run_id) DO UPDATE SET owner = EXCLUDED.owner, "
       "address = EXCLUDED.address, expires_at = EXCLUDED.expires_at "
       "WHERE run_leases.owner = EXCLUDED.owner "
       "OR run_leases.expires_at <= now() "
       "RETURNING owner, address, expires_at) "
       "SELECT owner, address, "
       "EXTRACT(EPOCH FROM expires_at - now())::float8 FROM taken "
       "UNION ALL SELECT owner, address, "
       "EXTRACT(EPOCH FROM expires_at - now())::float8 FROM run_leases "
       "WHERE run_id = $1 AND NOT EXISTS (SELECT 1 FROM taken)"},
      {"renew",
       "UPDATE run_leases SET expires_at = now() + make_interval(secs => $3) "
       "WHERE run_id = ANY($1::text[]) AND owner = $2 RETURNING run_id"},
      {"release",
       "DELETE FROM run_leases WHERE run_id = $1 AND owner = $2"},
      {"live_runs",
       "SELECT run_id FROM run_leases WHERE expires_at > now()"},
      {"holder",
       "SELECT owner, address, "
       "EXTRACT(EPOCH FROM expires_at - now())::float8 "
       "FROM run_leases WHERE run_id = $1"},
  };
  return *statements;
}

BatchingOptions BatchingOptionsOf(const PostgresOptions& o) {
  BatchingOptions b;
  b.max_ops_per_transaction = o.max_ops_per_transaction;
  b.writer_nice = o.writer_nice;
  b.retry_initial_backoff_s = o.retry_initial_backoff_s;
  b.retry_max_backoff_s = o.retry_max_backoff_s;
  return b;
}

// Creates the schema (or checks its version) in one transaction.
absl::Status EnsureSchema(pg::Conn& c) {
  absl::Status s = c.Exec("BEGIN", "begin schema transaction");
  if (!s.ok()) return s;
  s = c.RunSql("SELECT pg_advisory_xact_lock($1)",
               pg::Params().Int8(kSchemaLockKey), "lock the schema")
          .status();
  if (s.ok()) s = c.Exec(kSchemaSql, "create schema");
  std::optional<int> version;
  if (s.ok()) {
    absl::StatusOr<pg::Result> r =
        c.RunSql("SELECT version FROM lossguard_schema", pg::Params(),
                 "read schema version");
    if (!r.ok()) {
      s = r.status();
    } else if (r->rows() > 0) {
      version = r->Int4(0, 0);
    }
  }
  if (s.ok() && !version.has_value()) {
    s = c.RunSql("INSERT INTO lossguard_schema (version) VALUES ($1)",
                 pg::Params().Int4(kSchemaVersion), "set schema version")
            .status();
  } else if (s.ok() && *version != kSchemaVersion) {
    s = absl::FailedPreconditionError(absl::StrFormat(
        "%s: schema version %d is not supported (this lossguardd knows "
        "version %d)",
        c.display_name(), *version, kSchemaVersion));
  }
  if (s.ok()) s = c.Exec("COMMIT", "commit schema");
  if (!s.ok() && c.InTransaction()) {
    c.Exec("ROLLBACK", "rollback schema").IgnoreError();
  }
  return s;
}

LeaseHolder HolderOf(const pg::Result& r, int row) {
  LeaseHolder h;
  h.owner = r.String(row, 0);
  h.address = r.String(row, 1);
  h.expires_in_s = r.Float8(row, 2);
  return h;
}

// Thread-safe: the lease connection is guarded by mu_.
class PgLeaseTable final : public LeaseTable {
 public:
  explicit PgLeaseTable(std::unique_ptr<pg::Conn> conn)
      : conn_(std::move(conn)) {}

  absl::StatusOr<LeaseHolder> Acquire(const std::string& run_id,
                                      const std::string& owner,
                                      const std::string& address,
                                      double ttl_s) override {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<pg::Result> r = conn_->RunRetryingOnce(
        "acquire",
        pg::Params().Text(run_id).Text(owner).Text(address).Float8(ttl_s),
        absl::StrCat("acquire the lease on run ", run_id));
    if (!r.ok()) return r.status();
    if (r->rows() == 0) {  // released between the two halves: try again
      return absl::AbortedError(
          absl::StrCat("the lease on run ", run_id, " changed hands"));
    }
    return HolderOf(*r, 0);
  }

  absl::StatusOr<std::vector<std::string>> Renew(
      const std::vector<std::string>& run_ids, const std::string& owner,
      double ttl_s) override {
    if (run_ids.empty()) return std::vector<std::string>();
    absl::MutexLock lock(&mu_);
    absl::StatusOr<pg::Result> r =
        conn_->RunRetryingOnce("renew", pg::Params().TextArray(run_ids).Text(owner)
                                .Float8(ttl_s),
                   "renew leases");
    if (!r.ok()) return r.status();
    absl::flat_hash_set<std::string> renewed;
    for (int i = 0; i < r->rows(); ++i) renewed.insert(r->String(i, 0));
    std::vector<std::string> lost;
    for (const std::string& id : run_ids) {
      if (!renewed.contains(id)) lost.push_back(id);
    }
    return lost;
  }

  absl::Status Release(const std::string& run_id,
                       const std::string& owner) override {
    absl::MutexLock lock(&mu_);
    return conn_
        ->Run("release", pg::Params().Text(run_id).Text(owner),
              absl::StrCat("release the lease on run ", run_id))
        .status();
  }

  absl::StatusOr<std::vector<std::string>> LiveRuns() override {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<pg::Result> r =
        conn_->RunRetryingOnce("live_runs", pg::Params(), "list live leases");
    if (!r.ok()) return r.status();
    std::vector<std::string> runs;
    runs.reserve(static_cast<size_t>(r->rows()));
    for (int i = 0; i < r->rows(); ++i) runs.push_back(r->String(i, 0));
    return runs;
  }

  absl::StatusOr<std::optional<LeaseHolder>> Holder(
      const std::string& run_id) override {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<pg::Result> r =
        conn_->RunRetryingOnce("holder", pg::Params().Text(run_id),
                   absl::StrCat("read the lease on run ", run_id));
    if (!r.ok()) return r.status();
    if (r->rows() == 0) return std::optional<LeaseHolder>();
    return std::optional<LeaseHolder>(HolderOf(*r, 0));
  }

 private:
  absl::Mutex mu_;
  std::unique_ptr<pg::Conn> conn_ ABSL_GUARDED_BY(mu_);
};

// Thread-safe (see RunStore). readers_mu_ is never held with the
// BatchingStore's lock.
class PgStore final : public BatchingStore {
 public:
  static absl::StatusOr<std::unique_ptr<RunStore>> Open(
      const std::string& conninfo, const PostgresOptions& options);

  PgStore(const PgStore&) = delete;
  PgStore& operator=(const PgStore&) = delete;
  ~PgStore() override { StopWriter(); }

  absl::StatusOr<std::vector<RunRow>> LoadRuns() override;
  absl::StatusOr<std::optional<RunRow>> LoadRun(
      const std::string& run_id) override;
  absl::Status ReadSteps(
      const std::string& run_id, int64_t from_step, int64_t to_step,
      const std::function<bool(const StepRow&)>& fn) override;
  absl::StatusOr<std::vector<EventRow>> ReadEvents(
      const std::string& run_id) override;
  LeaseTable* leases() override { return &leases_; }

 private:
  struct CachedRun {
    int64_t key = 0;  // runs.id
    std::optional<int64_t> last_step;
  };

  // Returns a reader connection to the pool when the read ends.
  class ReaderLease {
   public:
    ReaderLease(PgStore* store, std::unique_ptr<pg::Conn> conn)
        : store_(store), conn_(std::move(conn)) {}
    ReaderLease(ReaderLease&&) = default;
    ReaderLease& operator=(ReaderLease&&) = delete;
    ~ReaderLease() { store_->ReleaseReader(std::move(conn_)); }
    pg::Conn* operator->() const { return conn_.get(); }

   private:
    PgStore* const store_;
    std::unique_ptr<pg::Conn> conn_;
  };

  PgStore(std::string conninfo, const PostgresOptions& options,
          std::unique_ptr<pg::Conn> writer, std::unique_ptr<pg::Conn> reader,
          std::unique_ptr<pg::Conn> leases)
      : BatchingStore(BatchingOptionsOf(options)),
        conninfo_(std::move(conninfo)),
        writer_(std::move(writer)),
        leases_(std::move(leases)) {
    idle_readers_.push_back(std::move(reader));
    StartWriter();
  }

  absl::Status CommitBatch(std::vector<WriteOp>& batch,
                           int64_t* inserted_steps) override;
  bool Retryable(const absl::Status& status) const override {
    return pg::Retryable(status);
  }
  absl::Status Apply(std::vector<WriteOp>& batch, size_t index);
  absl::Status WritePendingSteps(int64_t* inserted_steps);
  absl::StatusOr<CachedRun*> FindRun(const std::string& run_id);

  absl::StatusOr<ReaderLease> AcquireReader();
  void ReleaseReader(std::unique_ptr<pg::Conn> conn);

  const std::string conninfo_;

  // Only the writer thread touches these while it runs.
  std::unique_ptr<pg::Conn> writer_;
  absl::flat_hash_map<std::string, CachedRun> run_cache_;
  StepCollector pending_;

  PgLeaseTable leases_;

  absl::Mutex readers_mu_;
  std::vector<std::unique_ptr<pg::Conn>> idle_readers_
      ABSL_GUARDED_BY(readers_mu_);
};

absl::StatusOr<std::unique_ptr<RunStore>> PgStore::Open(
    const std::string& conninfo, const PostgresOptions& options) {
  // The schema first, so the others can prepare their statements.
  absl::StatusOr<std::unique_ptr<pg::Conn>> setup =
      pg::Conn::Open(conninfo, {});
  if (!setup.ok()) return setup.status();
  absl::Status s = EnsureSchema(**setup);
  if (!s.ok()) return s;
  setup->reset();
  absl::StatusOr<std::unique_ptr<pg::Conn>> writer =
      pg::Conn::Open(conninfo, WriterStatements());
  if (!writer.ok()) return writer.status();
  absl::StatusOr<std::unique_ptr<pg::Conn>> reader =
      pg::Conn::Open(conninfo, ReaderStatements());
  if (!reader.ok()) return reader.status();
  absl::StatusOr<std::unique_ptr<pg::Conn>> leases =
      pg::Conn::Open(conninfo, LeaseStatements());
  if (!leases.ok()) return leases.status();
  return std::unique_ptr<RunStore>(
      new PgStore(conninfo, options, *std::move(writer), *std::move(reader),
                  *std::move(leases)));
}

absl::Status PgStore::CommitBatch(std::vector<WriteOp>& batch,
                                  int64_t* inserted_steps) {
  *inserted_steps = 0;
  if (run_cache_.size() > kMaxCachedRuns) run_cache_.clear();
  absl::Status s = writer_->Exec("BEGIN", "begin transaction");
  if (!s.ok()) return s;
  for (size_t i = 0; i < batch.size() && s.ok(); ++i) s = Apply(batch, i);
  if (s.ok()) s = WritePendingSteps(inserted_steps);
  if (s.ok()) s = writer_->Exec("COMMIT", "commit");
  if (!s.ok()) {
    pending_.GiveBack(batch);  // for a retry
    if (writer_->InTransaction()) {
      writer_->Exec("ROLLBACK", "rollback").IgnoreError();
    }
    *inserted_steps = 0;
    run_cache_.clear();  // it saw the rolled-back steps and rows
  }
  pending_.Clear();
  return s;
}

absl::StatusOr<PgStore::CachedRun*> PgStore::FindRun(
    const std::string& run_id) {
  if (auto it = run_cache_.find(run_id); it != run_cache_.end()) {
    return &it->second;
  }
  absl::StatusOr<pg::Result> r = writer_->Run(
      "find_run", pg::Params().Text(run_id), absl::StrCat("find run ", run_id));
  if (!r.ok()) return r.status();
  CachedRun run;
  run.key = r->Int8(0, 0);
  if (!r->IsNull(0, 1)) run.last_step = r->Int8(0, 1);
  return &run_cache_.emplace(run_id, run).first->second;
}

absl::Status PgStore::Apply(std::vector<WriteOp>& batch, size_t index) {
  WriteOp& op = batch[index];
  if (const RunRow* run = std::get_if<RunRow>(&op.write)) {
    return writer_
        ->Run("put_run",
              pg::Params()
                  .Text(run->run_id)
                  .Text(run->name)
                  .Text(run->project)
                  .Text(run->tags_json)
                  .Bytes(run->config)
                  .Int4(run->mode)
                  .Int4(run->state)
                  .Float8(run->created_time)
                  .Float8(run->updated_time),
              absl::StrCat("put run ", run->run_id))
        .status();
  }
  if (StepsWrite* steps = std::get_if<StepsWrite>(&op.write)) {
    if (steps->steps.empty()) return absl::OkStatus();  // a marker
    absl::StatusOr<CachedRun*> found = FindRun(steps->run_id);
    if (!found.ok()) return found.status();
    CachedRun& run = **found;
    pending_.Add(batch, index, run.key, &run.last_step);
    return absl::OkStatus();
  }
  const EventRow& event = std::get<EventRow>(op.write);
  absl::StatusOr<CachedRun*> run = FindRun(event.run_id);
  if (!run.ok()) return run.status();
  return writer_
      ->Run("put_event",
            pg::Params()
                .Int8((*run)->key)
                .Int4(static_cast<int32_t>(event.type))
                .Int8(static_cast<int64_t>(event.id))
                .Int8(event.step)
                .Bytes(event.payload),
            absl::StrFormat("put event %d/%d of run %s",
                            static_cast<int>(event.type), event.id,
                            event.run_id))
      .status();
}

absl::Status PgStore::WritePendingSteps(int64_t* inserted_steps) {
  for (const StepCollector::Pending& p : pending_.runs()) {
    const std::span<const StepRow> steps(p.steps);
    for (size_t i = 0; i < steps.size(); i += kMaxChunkSteps) {
      const std::span<const StepRow> chunk =
          steps.subspan(i, std::min(kMaxChunkSteps, steps.size() - i));
      const std::string what =
          absl::StrFormat("add steps %d..%d of run %s", chunk.front().step,
                          chunk.back().step, p.run_id);
      absl::StatusOr<pg::Result> r = writer_->Run(
          "add_chunk",
          pg::Params()
              .Int8(p.key)
              .Int8(chunk.front().step)
              .Int8(chunk.back().step)
              .Int4(static_cast<int32_t>(chunk.size()))
              .Bytes(EncodeStepChunk(chunk)),
          what);
      if (!r.ok()) return r.status();
      if (r->affected() != 1) {
        // Another writer stored steps past what this one knew: retry with
        // the database's last step (CommitBatch drops the cache).
        return absl::AbortedError(absl::StrCat(
            writer_->display_name(), ": ", what,
            ": the run already holds later steps (written by another "
            "daemon); retrying"));
      }
    }
    *inserted_steps += static_cast<int64_t>(p.steps.size());
  }
  return absl::OkStatus();
}

absl::StatusOr<PgStore::ReaderLease> PgStore::AcquireReader() {
  {
    absl::MutexLock lock(&readers_mu_);
    if (!idle_readers_.empty()) {
      std::unique_ptr<pg::Conn> conn = std::move(idle_readers_.back());
      idle_readers_.pop_back();
      return ReaderLease(this, std::move(conn));
    }
  }
  absl::StatusOr<std::unique_ptr<pg::Conn>> conn =
      pg::Conn::Open(conninfo_, ReaderStatements());
  if (!conn.ok()) return conn.status();
  return ReaderLease(this, *std::move(conn));
}

void PgStore::ReleaseReader(std::unique_ptr<pg::Conn> conn) {
  if (conn == nullptr) return;
  absl::MutexLock lock(&readers_mu_);
  if (idle_readers_.size() < kMaxIdleReaders) {
    idle_readers_.push_back(std::move(conn));
  }
}

RunRow RunRowOf(const pg::Result& r, int i) {
  RunRow row;
  row.run_id = r.String(i, 0);
  row.name = r.String(i, 1);
  row.project = r.String(i, 2);
  row.tags_json = r.String(i, 3);
  row.config = r.String(i, 4);
  row.mode = r.Int4(i, 5);
  row.state = r.Int4(i, 6);
  row.created_time = r.Float8(i, 7);
  row.updated_time = r.Float8(i, 8);
  row.steps_stored = r.Int8(i, 9);
  row.has_steps = !r.IsNull(i, 10);
  row.last_step = row.has_steps ? r.Int8(i, 10) : 0;
  return row;
}

absl::StatusOr<std::vector<RunRow>> PgStore::LoadRuns() {
  absl::StatusOr<ReaderLease> reader = AcquireReader();
  if (!reader.ok()) return reader.status();
  absl::StatusOr<pg::Result> r =
      (*reader)->RunRetryingOnce("load_runs", pg::Params(), "load runs");
  if (!r.ok()) return r.status();
  std::vector<RunRow> runs;
  runs.reserve(static_cast<size_t>(r->rows()));
  for (int i = 0; i < r->rows(); ++i) runs.push_back(RunRowOf(*r, i));
  return runs;
}

absl::StatusOr<std::optional<RunRow>> PgStore::LoadRun(
    const std::string& run_id) {
  absl::StatusOr<ReaderLease> reader = AcquireReader();
  if (!reader.ok()) return reader.status();
  absl::StatusOr<pg::Result> r =
      (*reader)->RunRetryingOnce("load_run", pg::Params().Text(run_id),
                                 absl::StrCat("load run ", run_id));
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return std::optional<RunRow>();
  return std::optional<RunRow>(RunRowOf(*r, 0));
}

absl::Status PgStore::ReadSteps(
    const std::string& run_id, int64_t from_step, int64_t to_step,
    const std::function<bool(const StepRow&)>& fn) {
  if (from_step > to_step) return absl::OkStatus();
  absl::StatusOr<ReaderLease> reader = AcquireReader();
  if (!reader.ok()) return reader.status();
  // The result is held whole; chunks are bounded (kMaxChunkSteps), and a
  // caller reading a long run asks for a range at a time.
  absl::StatusOr<pg::Result> r = (*reader)->RunRetryingOnce(
      "read_steps", pg::Params().Text(run_id).Int8(from_step).Int8(to_step),
      absl::StrCat("read steps of run ", run_id));
  if (!r.ok()) return r.status();
  for (int i = 0; i < r->rows(); ++i) {
    bool more = true;
    absl::Status decoded = DecodeStepChunk(
        r->Bytes(i, 1), r->Int4(i, 0), [&](const StepRow& row) {
          if (row.step < from_step) return true;
          if (row.step > to_step || !fn(row)) {
            more = false;
            return false;
          }
          return true;
        });
    if (!decoded.ok()) {
      return absl::DataLossError(
          absl::StrFormat("%s: run %s: %s", (*reader)->display_name(), run_id,
                          decoded.message()));
    }
    if (!more) break;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<EventRow>> PgStore::ReadEvents(
    const std::string& run_id) {
  absl::StatusOr<ReaderLease> reader = AcquireReader();
  if (!reader.ok()) return reader.status();
  absl::StatusOr<pg::Result> r =
      (*reader)->RunRetryingOnce("read_events", pg::Params().Text(run_id),
                     absl::StrCat("read events of run ", run_id));
  if (!r.ok()) return r.status();
  std::vector<EventRow> events;
  events.reserve(static_cast<size_t>(r->rows()));
  for (int i = 0; i < r->rows(); ++i) {
    EventRow row;
    row.run_id = run_id;
    row.type = static_cast<EventRow::Type>(r->Int4(i, 0));
    row.id = static_cast<uint64_t>(r->Int8(i, 1));
    row.step = r->Int8(i, 2);
    row.payload = r->String(i, 3);
    events.push_back(std::move(row));
  }
  return events;
}

}  // namespace

std::string PostgresDisplayName(const std::string& conninfo) {
  return pg::DisplayName(conninfo);
}

absl::StatusOr<std::unique_ptr<RunStore>> OpenPostgresStore(
    const std::string& conninfo, const PostgresOptions& options) {
  return PgStore::Open(conninfo, options);
}

}  // namespace lossguard::storage
