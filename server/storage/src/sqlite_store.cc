// The SQLite RunStore.
//
// Writes are queued by BatchingStore (batching_store.h) and applied by its
// writer thread, which owns the write connection: it takes whatever is
// queued (up to max_ops_per_transaction) and commits it in one BEGIN
// IMMEDIATE ... COMMIT.
// Reads go through a small pool of read-only connections; in WAL mode they
// run concurrently with the writer and see the last committed state.
//
// Schema (PRAGMA user_version = 2):
//   runs        (id INTEGER PRIMARY KEY, run_id TEXT UNIQUE, metadata...,
//                step_count, last_step: kept by the writer with the chunks)
//   step_chunks (run, first_step) WITHOUT ROWID: last_step, n_steps, data
//   events      (run, type, id) WITHOUT ROWID: step, payload BLOB
//
// Steps: a transaction writes each run's new steps as one row of
// step_chunks (split past kMaxChunkSteps), packed as step_chunk.h says, so
// ingest costs a B-tree insert per run and transaction, not per step
// (version 1 had a row per step: 4x slower). A run's chunks hold
// increasing, non-overlapping step ranges, because the writer keeps only
// steps above the run's last stored one; ReadSteps starts at the chunk
// that holds `from_step`.
//
// Version 1 databases (steps (run, step) with one row per step and a
// nan_mask column for the NaNs SQLite turns into NULL) are converted to
// version 2 when opened, in one transaction.
//
// Metadata doubles: SQLite stores a bound NaN as NULL, which reads back as
// NaN.
//
// Errors: a failed transaction is rolled back. If the error may pass
// (SQLITE_BUSY/LOCKED, FULL, IOERR, NOMEM, CANTOPEN, READONLY: Retryable)
// the writer keeps the batch and retries it with backoff until it commits,
// or once more when the store closes; otherwise (CORRUPT, NOTADB,
// CONSTRAINT, TOOBIG) the batch is dropped. Either way the error (naming
// the path and SQLite's message) is kept for Flush() and Stats(), and the
// batch's commit callbacks learn how it ended.

#include <sqlite3.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lossguard/storage/run_store.h"
#include "server/storage/src/batching_store.h"
#include "server/storage/src/step_chunk.h"

namespace lossguard::storage {
namespace {

constexpr int64_t kSchemaVersion = 2;

// Most steps packed into one row of step_chunks (about 150 KiB): a long
// append (an import) is split, so a read of a few steps never decodes a
// huge blob.
constexpr size_t kMaxChunkSteps = 4096;

// The writer remembers this many runs' keys and last steps between
// transactions; past it, it forgets them all and reads them again.
constexpr size_t kMaxCachedRuns = 65536;

// Version 1 only (read when converting): bits of steps.nan_mask, set when
// the column holds NULL because the value is NaN.
constexpr int64_t kNanBitLr = 1 << 0;
constexpr int64_t kNanBitLoss = 1 << 1;
constexpr int64_t kNanBitValLoss = 1 << 2;
constexpr int64_t kNanBitGradNorm = 1 << 3;
constexpr int64_t kNanBitWallTime = 1 << 4;

// Idle read connections kept open; more are opened while reads overlap.
constexpr size_t kMaxIdleReaders = 4;

constexpr char kSchemaSql[] = R"sql(
CREATE TABLE IF NOT EXISTS runs (
  id INTEGER PRIMARY KEY,
  run_id TEXT NOT NULL UNIQUE,
  name TEXT NOT NULL DEFAULT '',
  project TEXT NOT NULL DEFAULT '',
  tags_json TEXT NOT NULL DEFAULT '',
  config BLOB NOT NULL DEFAULT x'',
  mode INTEGER NOT NULL DEFAULT 0,
  state INTEGER NOT NULL DEFAULT 0,
  created_time REAL DEFAULT 0,  -- NULL: NaN
  updated_time REAL DEFAULT 0,  -- NULL: NaN
  step_count INTEGER NOT NULL DEFAULT 0,
  last_step INTEGER  -- NULL: no steps
);
CREATE TABLE IF NOT EXISTS step_chunks (
  run INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  first_step INTEGER NOT NULL,
  last_step INTEGER NOT NULL,
  n_steps INTEGER NOT NULL,
  data BLOB NOT NULL,  -- step_chunk.h
  PRIMARY KEY (run, first_step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
  run INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  type INTEGER NOT NULL,
  id INTEGER NOT NULL,  -- the uint64 id's bits
  step INTEGER NOT NULL,
  payload BLOB NOT NULL,
  PRIMARY KEY (run, type, id)
) WITHOUT ROWID;
)sql";

// Version 1 to 2: the runs' new columns and the chunk table; the steps
// are then moved by ConvertStepsV1, which drops the old table.
constexpr char kUpgradeV1Sql[] = R"sql(
ALTER TABLE runs ADD COLUMN step_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN last_step INTEGER;
)sql";

absl::StatusCode CodeOf(int rc) {
  switch (rc & 0xff) {
    case SQLITE_FULL:
    case SQLITE_NOMEM:
      return absl::StatusCode::kResourceExhausted;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return absl::StatusCode::kUnavailable;
    case SQLITE_NOTADB:
    case SQLITE_CORRUPT:
      return absl::StatusCode::kDataLoss;
    case SQLITE_CANTOPEN:
    case SQLITE_PERM:
    case SQLITE_READONLY:
    case SQLITE_AUTH:
      return absl::StatusCode::kFailedPrecondition;
    case SQLITE_TOOBIG:
    case SQLITE_CONSTRAINT:
    case SQLITE_MISMATCH:
      return absl::StatusCode::kInvalidArgument;
    default:
      return absl::StatusCode::kInternal;
  }
}

void BindInt(sqlite3_stmt* stmt, int index, int64_t value, int* rc) {
  if (*rc == SQLITE_OK) *rc = sqlite3_bind_int64(stmt, index, value);
}

// Whether a failed transaction may succeed later (the writer retries it).
bool RetryableCode(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kUnavailable:         // BUSY, LOCKED
    case absl::StatusCode::kResourceExhausted:   // FULL, NOMEM
    case absl::StatusCode::kInternal:            // IOERR and the rest
    case absl::StatusCode::kFailedPrecondition:  // CANTOPEN, READONLY, PERM
      return true;
    default:  // DataLoss (CORRUPT, NOTADB), InvalidArgument (CONSTRAINT...)
      return false;
  }
}

// Binds `value` without copying: it must outlive the statement's reset.
void BindText(sqlite3_stmt* stmt, int index, const std::string& value,
              int* rc) {
  if (*rc == SQLITE_OK) {
    *rc = sqlite3_bind_text64(stmt, index, value.data(), value.size(),
                              SQLITE_STATIC, SQLITE_UTF8);
  }
}

void BindBlob(sqlite3_stmt* stmt, int index, const std::string& value,
              int* rc) {
  if (*rc == SQLITE_OK) {
    *rc = sqlite3_bind_blob64(stmt, index, value.data(), value.size(),
                              SQLITE_STATIC);
  }
}

double ColumnDouble(sqlite3_stmt* stmt, int col, int64_t nan_mask,
                    int64_t nan_bit) {
  if ((nan_mask & nan_bit) != 0) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  return sqlite3_column_double(stmt, col);
}

std::optional<double> ColumnOptional(sqlite3_stmt* stmt, int col,
                                     int64_t nan_mask, int64_t nan_bit) {
  if ((nan_mask & nan_bit) != 0) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  if (sqlite3_column_type(stmt, col) == SQLITE_NULL) return std::nullopt;
  return sqlite3_column_double(stmt, col);
}

// A REAL metadata column: NULL is how SQLite stored a NaN.
double ColumnNullableDouble(sqlite3_stmt* stmt, int col) {
  if (sqlite3_column_type(stmt, col) == SQLITE_NULL) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  return sqlite3_column_double(stmt, col);
}

std::string ColumnBytes(sqlite3_stmt* stmt, int col) {
  // sqlite3_column_bytes() after sqlite3_column_blob(), as SQLite requires.
  const void* data = sqlite3_column_blob(stmt, col);
  const int size = sqlite3_column_bytes(stmt, col);
  if (data == nullptr) return std::string();
  return std::string(static_cast<const char*>(data), static_cast<size_t>(size));
}

// Resets a statement and clears its bindings when it goes out of scope, so
// every exit path leaves it ready for the next use.
class ScopedReset {
 public:
  explicit ScopedReset(sqlite3_stmt* stmt) : stmt_(stmt) {}
  ScopedReset(const ScopedReset&) = delete;
  ScopedReset& operator=(const ScopedReset&) = delete;
  ~ScopedReset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

 private:
  sqlite3_stmt* const stmt_;
};

// One SQLite connection and the statements prepared on it (finalized when
// it closes). Not thread-safe: one thread uses it at a time.
class Connection {
 public:
  static absl::StatusOr<std::unique_ptr<Connection>> Open(
      const std::string& path, int flags, int busy_timeout_ms) {
    sqlite3* db = nullptr;
    const int rc = sqlite3_open_v2(path.c_str(), &db,
                                   flags | SQLITE_OPEN_NOMUTEX, nullptr);
    std::unique_ptr<Connection> conn(new Connection(db, path));
    if (rc != SQLITE_OK) return conn->Error("open", rc);
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_timeout(db, busy_timeout_ms);
    return conn;
  }

  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  ~Connection() {
    for (sqlite3_stmt* stmt : statements_) sqlite3_finalize(stmt);
    sqlite3_close_v2(db_);  // a null handle is a no-op
  }

  // An error of `what` on this connection: names the database and gives
  // SQLite's message. Call right after the failing call, before any other
  // call on the connection overwrites the message.
  absl::Status Error(std::string_view what, int rc) const {
    const char* message =
        db_ != nullptr ? sqlite3_errmsg(db_) : sqlite3_errstr(rc);
    return absl::Status(CodeOf(rc),
                        absl::StrFormat("SQLite database %s: %s: %s (code %d)",
                                        path_, what, message, rc));
  }

  // Runs `sql` (one or more statements), ignoring any rows.
  absl::Status Exec(const char* sql, std::string_view what) {
    const int rc = sqlite3_exec(db_, sql, nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) return Error(what, rc);
    return absl::OkStatus();
  }

  // The first column of the first row of `sql` as a string ("" if none).
  absl::StatusOr<std::string> QueryString(const char* sql,
                                          std::string_view what) {
    sqlite3_stmt* stmt = nullptr;
    int rc = sqlite3_prepare_v2(db_, sql, -1, &stmt, nullptr);
    if (rc != SQLITE_OK) return Error(what, rc);
    std::string value;
    rc = sqlite3_step(stmt);
    if (rc == SQLITE_ROW) {
      value = ColumnBytes(stmt, 0);
      rc = sqlite3_step(stmt);
    }
    absl::Status status =
        rc == SQLITE_DONE ? absl::OkStatus() : Error(what, rc);
    sqlite3_finalize(stmt);
    if (!status.ok()) return status;
    return value;
  }

  // Prepares a statement that lives as long as the connection.
  absl::StatusOr<sqlite3_stmt*> Prepare(const char* sql) {
    sqlite3_stmt* stmt = nullptr;
    const int rc = sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT,
                                      &stmt, nullptr);
    if (rc != SQLITE_OK) {
      return Error(absl::StrCat("prepare \"", sql, "\""), rc);
    }
    statements_.push_back(stmt);
    return stmt;
  }

  // Runs a statement that returns no rows, then resets it.
  absl::Status Run(sqlite3_stmt* stmt, std::string_view what) {
    ScopedReset reset(stmt);
    const int rc = sqlite3_step(stmt);
    if (rc != SQLITE_DONE) return Error(what, rc);
    return absl::OkStatus();
  }

  sqlite3* db() const { return db_; }

 private:
  Connection(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}

  sqlite3* const db_;
  const std::string path_;
  std::vector<sqlite3_stmt*> statements_;
};

// A read connection with its statements.
struct Reader {
  std::unique_ptr<Connection> conn;
  sqlite3_stmt* load_runs = nullptr;
  sqlite3_stmt* read_steps = nullptr;
  sqlite3_stmt* read_events = nullptr;
};

absl::StatusOr<std::unique_ptr<Reader>> OpenReader(
    const std::string& path, const SqliteOptions& options) {
  auto reader = std::make_unique<Reader>();
  absl::StatusOr<std::unique_ptr<Connection>> conn =
      Connection::Open(path, SQLITE_OPEN_READONLY, options.busy_timeout_ms);
  if (!conn.ok()) return conn.status();
  reader->conn = *std::move(conn);
  struct {
    sqlite3_stmt** stmt;
    const char* sql;
  } const statements[] = {
      {&reader->load_runs,
       "SELECT run_id, name, project, tags_json, config, mode, state, "
       "created_time, updated_time, step_count, last_step "
       "FROM runs ORDER BY run_id"},
      // From the chunk that holds ?2 (the last one starting at or before
      // it), to the last one starting at or before ?3.
      {&reader->read_steps,
       "WITH r AS (SELECT id FROM runs WHERE run_id = ?1) "
       "SELECT n_steps, data FROM step_chunks "
       "WHERE run = (SELECT id FROM r) AND first_step <= ?3 "
       "AND first_step >= COALESCE((SELECT MAX(first_step) FROM step_chunks "
       "WHERE run = (SELECT id FROM r) AND first_step <= ?2), ?2) "
       "ORDER BY first_step"},
      // (id < 0) first: ids at or above 2^63 are stored as negative int64s
      // and sort after the others, as uint64s do.
      {&reader->read_events,
       "SELECT type, id, step, payload FROM events "
       "WHERE run = (SELECT id FROM runs WHERE run_id = ?1) "
       "ORDER BY type, id < 0, id"},
  };
  for (const auto& s : statements) {
    absl::StatusOr<sqlite3_stmt*> stmt = reader->conn->Prepare(s.sql);
    if (!stmt.ok()) return stmt.status();
    *s.stmt = *stmt;
  }
  return reader;
}

BatchingOptions BatchingOptionsOf(const SqliteOptions& o) {
  BatchingOptions b;
  b.max_ops_per_transaction = o.max_ops_per_transaction;
  b.writer_nice = o.writer_nice;
  b.retry_initial_backoff_s = o.retry_initial_backoff_s;
  b.retry_max_backoff_s = o.retry_max_backoff_s;
  return b;
}

// Thread-safe (see RunStore). readers_mu_ is never held with the
// BatchingStore's lock.
class SqliteStore final : public BatchingStore {
 public:
  static absl::StatusOr<std::unique_ptr<RunStore>> Open(
      const std::string& path, const SqliteOptions& options);

  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;

  // Commits what is queued, then stops the writer and closes the database.
  ~SqliteStore() override { StopWriter(); }

  absl::StatusOr<std::vector<RunRow>> LoadRuns() override;
  absl::Status ReadSteps(
      const std::string& run_id, int64_t from_step, int64_t to_step,
      const std::function<bool(const StepRow&)>& fn) override;
  absl::StatusOr<std::vector<EventRow>> ReadEvents(
      const std::string& run_id) override;

 private:
  // The writer's connection and statements.
  struct Writer {
    std::unique_ptr<Connection> conn;
    sqlite3_stmt* begin = nullptr;
    sqlite3_stmt* commit = nullptr;
    sqlite3_stmt* rollback = nullptr;
    sqlite3_stmt* put_run = nullptr;
    sqlite3_stmt* find_run = nullptr;
    sqlite3_stmt* add_run = nullptr;
    sqlite3_stmt* add_chunk = nullptr;
    sqlite3_stmt* count_steps = nullptr;
    sqlite3_stmt* put_event = nullptr;
  };

  // What the writer knows of a run between transactions.
  struct CachedRun {
    int64_t key = 0;  // runs.id
    std::optional<int64_t> last_step;
  };


  // Returns a reader to the pool when the read ends.
  class ReaderLease {
   public:
    ReaderLease(SqliteStore* store, std::unique_ptr<Reader> reader)
        : store_(store), reader_(std::move(reader)) {}
    ReaderLease(ReaderLease&&) = default;  // leaves `reader_` null
    ReaderLease& operator=(ReaderLease&&) = delete;
    ~ReaderLease() { store_->ReleaseReader(std::move(reader_)); }
    Reader* operator->() const { return reader_.get(); }

   private:
    SqliteStore* const store_;
    std::unique_ptr<Reader> reader_;
  };

  SqliteStore(std::string path, const SqliteOptions& options, Writer writer,
              std::unique_ptr<Reader> reader)
      : BatchingStore(BatchingOptionsOf(options)),
        path_(std::move(path)),
        options_(options),
        writer_state_(std::move(writer)) {
    idle_readers_.push_back(std::move(reader));
    StartWriter();
  }

  static absl::StatusOr<Writer> OpenWriter(const std::string& path,
                                           const SqliteOptions& options);

  absl::Status CommitBatch(std::vector<WriteOp>& batch,
                           int64_t* inserted_steps) override;
  bool Retryable(const absl::Status& status) const override {
    return RetryableCode(status);
  }
  // Writes a run or an event; collects steps into pending_ (moving the
  // steps of batch[index] out when it is its run's first in the batch).
  absl::Status Apply(std::vector<WriteOp>& batch, size_t index);
  // Writes pending_ as chunks and updates the runs' step counts.
  absl::Status WritePendingSteps(int64_t* inserted_steps);
  // What the writer knows of `run_id`, read on first use; adds a row with
  // empty metadata when the run has none yet (steps or events before its
  // PutRun). The pointer is valid until the next FindRun.
  absl::StatusOr<CachedRun*> FindRun(const std::string& run_id);

  absl::StatusOr<ReaderLease> AcquireReader();
  void ReleaseReader(std::unique_ptr<Reader> reader);

  const std::string path_;
  const SqliteOptions options_;

  // Only the writer thread touches these while it runs. run_cache_ is
  // cleared when a transaction fails, so it only holds committed state.
  Writer writer_state_;
  absl::flat_hash_map<std::string, CachedRun> run_cache_;
  StepCollector pending_;

  absl::Mutex readers_mu_;
  std::vector<std::unique_ptr<Reader>> idle_readers_
      ABSL_GUARDED_BY(readers_mu_);
};

// Moves the steps of a version 1 database (a row per step) into
// step_chunks, sets the runs' step counts, and drops the old table. Runs
// inside the schema transaction.
// Adds a chunk of a run's steps, and counts steps into the run's row.
constexpr char kAddChunkSql[] =
    "INSERT INTO step_chunks (run, first_step, last_step, n_steps, data) "
    "VALUES (?1, ?2, ?3, ?4, ?5)";
constexpr char kCountStepsSql[] =
    "UPDATE runs SET step_count = step_count + ?2, last_step = ?3 "
    "WHERE id = ?1";

// Writes `steps` (increasing, above the run's last stored step) of the run
// with key `key` as chunks of at most kMaxChunkSteps, then adds them to the
// run's step_count and last_step. `run_name` names the run in errors.
absl::Status WriteRunSteps(Connection& c, sqlite3_stmt* add_chunk,
                           sqlite3_stmt* count_steps, int64_t key,
                           std::string_view run_name,
                           std::span<const StepRow> steps) {
  if (steps.empty()) return absl::OkStatus();
  for (size_t i = 0; i < steps.size(); i += kMaxChunkSteps) {
    const std::span<const StepRow> chunk =
        steps.subspan(i, std::min(kMaxChunkSteps, steps.size() - i));
    const std::string data = EncodeStepChunk(chunk);
    ScopedReset reset(add_chunk);
    int rc = SQLITE_OK;
    BindInt(add_chunk, 1, key, &rc);
    BindInt(add_chunk, 2, chunk.front().step, &rc);
    BindInt(add_chunk, 3, chunk.back().step, &rc);
    BindInt(add_chunk, 4, static_cast<int64_t>(chunk.size()), &rc);
    BindBlob(add_chunk, 5, data, &rc);
    if (rc == SQLITE_OK) rc = sqlite3_step(add_chunk);
    if (rc != SQLITE_DONE) {
      return c.Error(absl::StrFormat("add steps %d..%d of run %s",
                                     chunk.front().step, chunk.back().step,
                                     run_name),
                     rc);
    }
  }
  ScopedReset reset(count_steps);
  int rc = SQLITE_OK;
  BindInt(count_steps, 1, key, &rc);
  BindInt(count_steps, 2, static_cast<int64_t>(steps.size()), &rc);
  BindInt(count_steps, 3, steps.back().step, &rc);
  if (rc == SQLITE_OK) rc = sqlite3_step(count_steps);
  if (rc != SQLITE_DONE) {
    return c.Error(absl::StrCat("count steps of run ", std::string(run_name)),
                   rc);
  }
  return absl::OkStatus();
}

absl::Status ConvertStepsV1(Connection& c) {
  absl::StatusOr<sqlite3_stmt*> read = c.Prepare(
      "SELECT run, step, lr, loss, val_loss, grad_norm, wall_time, nan_mask "
      "FROM steps ORDER BY run, step");
  if (!read.ok()) return read.status();
  absl::StatusOr<sqlite3_stmt*> add_chunk = c.Prepare(kAddChunkSql);
  if (!add_chunk.ok()) return add_chunk.status();
  absl::StatusOr<sqlite3_stmt*> count_steps = c.Prepare(kCountStepsSql);
  if (!count_steps.ok()) return count_steps.status();

  int64_t run = 0;
  std::vector<StepRow> steps;
  auto flush = [&]() -> absl::Status {
    absl::Status s = WriteRunSteps(c, *add_chunk, *count_steps, run,
                                   absl::StrCat("#", run), steps);
    steps.clear();
    return s;
  };

  {
    ScopedReset reset_read(*read);  // before the DROP, which it would lock
    int rc;
    while ((rc = sqlite3_step(*read)) == SQLITE_ROW) {
      const int64_t row_run = sqlite3_column_int64(*read, 0);
      if (row_run != run || steps.size() == kMaxChunkSteps) {
        if (absl::Status s = flush(); !s.ok()) return s;
        run = row_run;
      }
      const int64_t mask = sqlite3_column_int64(*read, 7);
      StepRow row;
      row.step = sqlite3_column_int64(*read, 1);
      row.lr = ColumnDouble(*read, 2, mask, kNanBitLr);
      row.loss = ColumnDouble(*read, 3, mask, kNanBitLoss);
      row.val_loss = ColumnOptional(*read, 4, mask, kNanBitValLoss);
      row.grad_norm = ColumnOptional(*read, 5, mask, kNanBitGradNorm);
      row.wall_time = ColumnDouble(*read, 6, mask, kNanBitWallTime);
      steps.push_back(row);
    }
    if (rc != SQLITE_DONE) return c.Error("read version 1 steps", rc);
    if (absl::Status s = flush(); !s.ok()) return s;
  }
  return c.Exec("DROP TABLE steps", "drop version 1 steps");
}

absl::StatusOr<SqliteStore::Writer> SqliteStore::OpenWriter(
    const std::string& path, const SqliteOptions& options) {
  Writer w;
  absl::StatusOr<std::unique_ptr<Connection>> conn =
      Connection::Open(path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                       options.busy_timeout_ms);
  if (!conn.ok()) return conn.status();
  w.conn = *std::move(conn);
  Connection& c = *w.conn;

  // The first statement reads the file: this is where a file that is not
  // a database fails.
  absl::StatusOr<std::string> mode =
      c.QueryString("PRAGMA journal_mode=WAL", "set WAL mode");
  if (!mode.ok()) return mode.status();
  if (*mode != "wal") {
    return absl::FailedPreconditionError(absl::StrFormat(
        "SQLite database %s: cannot use WAL mode (journal_mode is %s)", path,
        *mode));
  }
  absl::Status s =
      c.Exec(options.synchronous_full ? "PRAGMA synchronous=FULL"
                                      : "PRAGMA synchronous=NORMAL",
             "set synchronous");
  if (!s.ok()) return s;
  // Each transaction touches the last leaf page of every run it writes;
  // with a thousand runs attached SQLite's default 2 MiB cache misses on
  // most of them and reads them back from the file.
  s = c.Exec(absl::StrCat("PRAGMA cache_size=-",
                          std::max(0, options.writer_cache_kib))
                 .c_str(),
             "set cache size");
  if (!s.ok()) return s;
  if (options.max_page_count > 0) {
    s = c.Exec(absl::StrCat("PRAGMA max_page_count=", options.max_page_count)
                   .c_str(),
               "cap the database size");
    if (!s.ok()) return s;
  }
  s = c.Exec("PRAGMA foreign_keys=ON", "enable foreign keys");
  if (!s.ok()) return s;

  s = c.Exec("BEGIN IMMEDIATE", "begin schema transaction");
  if (!s.ok()) return s;
  absl::StatusOr<std::string> version =
      c.QueryString("PRAGMA user_version", "read schema version");
  if (!version.ok()) s = version.status();
  const bool upgrade_v1 = s.ok() && *version == "1";
  if (s.ok() && *version != "0" && !upgrade_v1 &&
      *version != absl::StrCat(kSchemaVersion)) {
    s = absl::FailedPreconditionError(absl::StrFormat(
        "SQLite database %s: schema version %s is not supported (this "
        "lossguardd knows versions 1 to %d)",
        path, *version, kSchemaVersion));
  }
  if (s.ok() && upgrade_v1) s = c.Exec(kUpgradeV1Sql, "upgrade schema 1 to 2");
  if (s.ok()) s = c.Exec(kSchemaSql, "create schema");
  if (s.ok() && upgrade_v1) s = ConvertStepsV1(c);
  if (s.ok()) {
    s = c.Exec(absl::StrCat("PRAGMA user_version=", kSchemaVersion).c_str(),
               "set schema version");
  }
  if (s.ok()) s = c.Exec("COMMIT", "commit schema");
  if (!s.ok()) {
    if (sqlite3_get_autocommit(c.db()) == 0) {
      c.Exec("ROLLBACK", "rollback schema").IgnoreError();
    }
    return s;
  }

  struct {
    sqlite3_stmt** stmt;
    const char* sql;
  } const statements[] = {
      {&w.begin, "BEGIN IMMEDIATE"},
      {&w.commit, "COMMIT"},
      {&w.rollback, "ROLLBACK"},
      {&w.put_run,
       "INSERT INTO runs (run_id, name, project, tags_json, config, mode, "
       "state, created_time, updated_time) "
       "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) "
       "ON CONFLICT (run_id) DO UPDATE SET name = excluded.name, "
       "project = excluded.project, tags_json = excluded.tags_json, "
       "config = excluded.config, mode = excluded.mode, "
       "state = excluded.state, created_time = excluded.created_time, "
       "updated_time = excluded.updated_time"},
      {&w.find_run, "SELECT id, last_step FROM runs WHERE run_id = ?1"},
      {&w.add_run, "INSERT INTO runs (run_id) VALUES (?1)"},
      {&w.add_chunk, kAddChunkSql},
      {&w.count_steps, kCountStepsSql},
      {&w.put_event,
       "INSERT INTO events (run, type, id, step, payload) "
       "VALUES (?1, ?2, ?3, ?4, ?5) "
       "ON CONFLICT (run, type, id) DO UPDATE SET step = excluded.step, "
       "payload = excluded.payload"},
  };
  for (const auto& st : statements) {
    absl::StatusOr<sqlite3_stmt*> stmt = c.Prepare(st.sql);
    if (!stmt.ok()) return stmt.status();
    *st.stmt = *stmt;
  }
  return w;
}

absl::StatusOr<std::unique_ptr<RunStore>> SqliteStore::Open(
    const std::string& path, const SqliteOptions& options) {
  absl::StatusOr<Writer> writer = OpenWriter(path, options);
  if (!writer.ok()) return writer.status();
  // The writer created the schema, so a reader can prepare its statements.
  absl::StatusOr<std::unique_ptr<Reader>> reader = OpenReader(path, options);
  if (!reader.ok()) return reader.status();
  return std::unique_ptr<RunStore>(
      new SqliteStore(path, options, *std::move(writer), *std::move(reader)));
}

absl::Status SqliteStore::CommitBatch(std::vector<WriteOp>& batch,
                                      int64_t* inserted_steps) {
  Writer& w = writer_state_;
  *inserted_steps = 0;
  if (run_cache_.size() > kMaxCachedRuns) run_cache_.clear();
  absl::Status s = w.conn->Run(w.begin, "begin transaction");
  if (!s.ok()) return s;
  for (size_t i = 0; i < batch.size(); ++i) {
    s = Apply(batch, i);
    if (!s.ok()) break;
  }
  if (s.ok()) s = WritePendingSteps(inserted_steps);
  if (s.ok()) s = w.conn->Run(w.commit, "commit");
  if (!s.ok()) {
    pending_.GiveBack(batch);  // for a retry
    // Some errors (SQLITE_FULL, I/O errors) already rolled back.
    if (sqlite3_get_autocommit(w.conn->db()) == 0) {
      w.conn->Run(w.rollback, "rollback").IgnoreError();
    }
    *inserted_steps = 0;
    run_cache_.clear();  // it saw the rolled-back steps and rows
  }
  pending_.Clear();
  return s;
}

absl::StatusOr<SqliteStore::CachedRun*> SqliteStore::FindRun(
    const std::string& run_id) {
  if (auto it = run_cache_.find(run_id); it != run_cache_.end()) {
    return &it->second;
  }
  Writer& w = writer_state_;
  CachedRun run;
  {
    ScopedReset reset(w.find_run);
    int rc = SQLITE_OK;
    BindText(w.find_run, 1, run_id, &rc);
    if (rc == SQLITE_OK) rc = sqlite3_step(w.find_run);
    if (rc == SQLITE_ROW) {
      run.key = sqlite3_column_int64(w.find_run, 0);
      if (sqlite3_column_type(w.find_run, 1) != SQLITE_NULL) {
        run.last_step = sqlite3_column_int64(w.find_run, 1);
      }
    } else if (rc != SQLITE_DONE) {
      return w.conn->Error(absl::StrCat("find run ", run_id), rc);
    }
  }
  if (run.key == 0) {  // rowids start at 1
    ScopedReset reset(w.add_run);
    int rc = SQLITE_OK;
    BindText(w.add_run, 1, run_id, &rc);
    if (rc == SQLITE_OK) rc = sqlite3_step(w.add_run);
    if (rc != SQLITE_DONE) {
      return w.conn->Error(absl::StrCat("add run ", run_id), rc);
    }
    run.key = sqlite3_last_insert_rowid(w.conn->db());
  }
  return &run_cache_.emplace(run_id, run).first->second;
}

absl::Status SqliteStore::Apply(std::vector<WriteOp>& batch, size_t index) {
  WriteOp& op = batch[index];
  Writer& w = writer_state_;
  if (const RunRow* run = std::get_if<RunRow>(&op.write)) {
    ScopedReset reset(w.put_run);
    int rc = SQLITE_OK;
    BindText(w.put_run, 1, run->run_id, &rc);
    BindText(w.put_run, 2, run->name, &rc);
    BindText(w.put_run, 3, run->project, &rc);
    BindText(w.put_run, 4, run->tags_json, &rc);
    BindBlob(w.put_run, 5, run->config, &rc);
    BindInt(w.put_run, 6, run->mode, &rc);
    BindInt(w.put_run, 7, run->state, &rc);
    // NaN binds as NULL, which reads back as NaN.
    if (rc == SQLITE_OK) {
      rc = sqlite3_bind_double(w.put_run, 8, run->created_time);
    }
    if (rc == SQLITE_OK) {
      rc = sqlite3_bind_double(w.put_run, 9, run->updated_time);
    }
    if (rc == SQLITE_OK) rc = sqlite3_step(w.put_run);
    if (rc != SQLITE_DONE) {
      return w.conn->Error(absl::StrCat("put run ", run->run_id), rc);
    }
    return absl::OkStatus();
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
  ScopedReset reset(w.put_event);
  int rc = SQLITE_OK;
  BindInt(w.put_event, 1, (*run)->key, &rc);
  BindInt(w.put_event, 2, static_cast<int64_t>(event.type), &rc);
  BindInt(w.put_event, 3, static_cast<int64_t>(event.id), &rc);
  BindInt(w.put_event, 4, event.step, &rc);
  BindBlob(w.put_event, 5, event.payload, &rc);
  if (rc == SQLITE_OK) rc = sqlite3_step(w.put_event);
  if (rc != SQLITE_DONE) {
    return w.conn->Error(
        absl::StrFormat("put event %d/%d of run %s",
                        static_cast<int>(event.type), event.id, event.run_id),
        rc);
  }
  return absl::OkStatus();
}

absl::Status SqliteStore::WritePendingSteps(int64_t* inserted_steps) {
  Writer& w = writer_state_;
  for (const StepCollector::Pending& p : pending_.runs()) {
    absl::Status s = WriteRunSteps(*w.conn, w.add_chunk, w.count_steps, p.key,
                                   p.run_id, p.steps);
    if (!s.ok()) return s;
    *inserted_steps += static_cast<int64_t>(p.steps.size());
  }
  return absl::OkStatus();
}

absl::StatusOr<SqliteStore::ReaderLease> SqliteStore::AcquireReader() {
  {
    absl::MutexLock lock(&readers_mu_);
    if (!idle_readers_.empty()) {
      std::unique_ptr<Reader> reader = std::move(idle_readers_.back());
      idle_readers_.pop_back();
      return ReaderLease(this, std::move(reader));
    }
  }
  // Every reader is busy (concurrent reads, or a ReadSteps callback that
  // reads again): open another one.
  absl::StatusOr<std::unique_ptr<Reader>> reader = OpenReader(path_, options_);
  if (!reader.ok()) return reader.status();
  return ReaderLease(this, *std::move(reader));
}

void SqliteStore::ReleaseReader(std::unique_ptr<Reader> reader) {
  if (reader == nullptr) return;
  {
    absl::MutexLock lock(&readers_mu_);
    if (idle_readers_.size() < kMaxIdleReaders) {
      idle_readers_.push_back(std::move(reader));
      return;
    }
  }
  // Closed here, outside the lock.
}

absl::StatusOr<std::vector<RunRow>> SqliteStore::LoadRuns() {
  absl::StatusOr<ReaderLease> reader = AcquireReader();
  if (!reader.ok()) return reader.status();
  sqlite3_stmt* stmt = (*reader)->load_runs;
  ScopedReset reset(stmt);
  std::vector<RunRow> runs;
  int rc;
  while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
    RunRow row;
    row.run_id = ColumnBytes(stmt, 0);
    row.name = ColumnBytes(stmt, 1);
    row.project = ColumnBytes(stmt, 2);
    row.tags_json = ColumnBytes(stmt, 3);
    row.config = ColumnBytes(stmt, 4);
    row.mode = sqlite3_column_int(stmt, 5);
    row.state = sqlite3_column_int(stmt, 6);
    row.created_time = ColumnNullableDouble(stmt, 7);
    row.updated_time = ColumnNullableDouble(stmt, 8);
    row.steps_stored = sqlite3_column_int64(stmt, 9);
    row.has_steps = sqlite3_column_type(stmt, 10) != SQLITE_NULL;
    row.last_step = row.has_steps ? sqlite3_column_int64(stmt, 10) : 0;
    runs.push_back(std::move(row));
  }
  if (rc != SQLITE_DONE) return (*reader)->conn->Error("load runs", rc);
  return runs;
}

absl::Status SqliteStore::ReadSteps(
    const std::string& run_id, int64_t from_step, int64_t to_step,
    const std::function<bool(const StepRow&)>& fn) {
  if (from_step > to_step) return absl::OkStatus();
  absl::StatusOr<ReaderLease> reader = AcquireReader();
  if (!reader.ok()) return reader.status();
  sqlite3_stmt* stmt = (*reader)->read_steps;
  ScopedReset reset(stmt);
  int rc = SQLITE_OK;
  BindText(stmt, 1, run_id, &rc);
  BindInt(stmt, 2, from_step, &rc);
  BindInt(stmt, 3, to_step, &rc);
  if (rc != SQLITE_OK) {
    return (*reader)->conn->Error(absl::StrCat("read steps of run ", run_id),
                                  rc);
  }
  while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
    const int64_t n_steps = sqlite3_column_int64(stmt, 0);
    // sqlite3_column_bytes() after sqlite3_column_blob(), as SQLite
    // requires; the blob stays valid until the next step.
    const char* data = static_cast<const char*>(sqlite3_column_blob(stmt, 1));
    const std::string_view chunk(
        data == nullptr ? "" : data,
        static_cast<size_t>(sqlite3_column_bytes(stmt, 1)));
    bool more = true;
    absl::Status decoded =
        DecodeStepChunk(chunk, n_steps, [&](const StepRow& row) {
          if (row.step < from_step) return true;
          if (row.step > to_step || !fn(row)) {
            more = false;
            return false;
          }
          return true;
        });
    if (!decoded.ok()) {
      return absl::DataLossError(absl::StrFormat(
          "SQLite database %s: run %s: %s", path_, run_id, decoded.message()));
    }
    if (!more) return absl::OkStatus();
  }
  if (rc != SQLITE_DONE) {
    return (*reader)->conn->Error(absl::StrCat("read steps of run ", run_id),
                                  rc);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<EventRow>> SqliteStore::ReadEvents(
    const std::string& run_id) {
  absl::StatusOr<ReaderLease> reader = AcquireReader();
  if (!reader.ok()) return reader.status();
  sqlite3_stmt* stmt = (*reader)->read_events;
  ScopedReset reset(stmt);
  int rc = SQLITE_OK;
  BindText(stmt, 1, run_id, &rc);
  std::vector<EventRow> events;
  while (rc == SQLITE_OK || rc == SQLITE_ROW) {
    rc = sqlite3_step(stmt);
    if (rc != SQLITE_ROW) break;
    EventRow row;
    row.run_id = run_id;
    row.type = static_cast<EventRow::Type>(sqlite3_column_int(stmt, 0));
    row.id = static_cast<uint64_t>(sqlite3_column_int64(stmt, 1));
    row.step = sqlite3_column_int64(stmt, 2);
    row.payload = ColumnBytes(stmt, 3);
    events.push_back(std::move(row));
  }
  if (rc != SQLITE_DONE) {
    return (*reader)->conn->Error(absl::StrCat("read events of run ", run_id),
                                  rc);
  }
  return events;
}

}  // namespace

absl::StatusOr<std::unique_ptr<RunStore>> OpenSqliteStore(
    const std::string& path, const SqliteOptions& options) {
  return SqliteStore::Open(path, options);
}

}  // namespace lossguard::storage
