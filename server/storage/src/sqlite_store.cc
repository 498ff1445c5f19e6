// The SQLite RunStore.
//
// Writes are queued under `mu_` and applied by one writer thread, which owns
// the write connection: it takes whatever is queued (up to
// max_ops_per_transaction) and commits it in one BEGIN IMMEDIATE ... COMMIT.
// Reads go through a small pool of read-only connections; in WAL mode they
// run concurrently with the writer and see the last committed state.
//
// Schema (PRAGMA user_version = 1):
//   runs   (id INTEGER PRIMARY KEY, run_id TEXT UNIQUE, metadata...)
//   steps  (run, step) WITHOUT ROWID: lr, loss, val_loss, grad_norm,
//          wall_time, nan_mask
//   events (run, type, id) WITHOUT ROWID: step, payload BLOB
//
// Doubles: SQLite stores a bound NaN as NULL, so steps.nan_mask has one bit
// per double column (kNanBit*) that is set when the value is NaN; the column
// then holds NULL. A NULL val_loss or grad_norm with its bit clear is an
// absent optional. The double columns are declared without a type: a REAL
// column stores an integral value as an integer, which turns -0.0 into 0;
// an untyped column keeps the bound double as is (+-inf, denormals, -0.0).
//
// Errors: a failed transaction is rolled back and its writes are dropped;
// the error (naming the path and SQLite's message) is kept for Flush() and
// Stats(), and the writer goes on with the next writes.

#include <sqlite3.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "lossguard/storage/run_store.h"

namespace lossguard::storage {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kSchemaVersion = 1;

// Bits of steps.nan_mask: the column holds NULL and the value is NaN.
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
  updated_time REAL DEFAULT 0   -- NULL: NaN
);
CREATE TABLE IF NOT EXISTS steps (
  run INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  step INTEGER NOT NULL,
  lr, loss, val_loss, grad_norm, wall_time,  -- untyped: doubles kept as is
  nan_mask INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (run, step)
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

// Binds a double column: NaN binds NULL and returns `nan_bit`, any other
// value binds as is and returns 0.
int64_t BindDouble(sqlite3_stmt* stmt, int index, double value, int64_t nan_bit,
                   int* rc) {
  if (std::isnan(value)) {
    if (*rc == SQLITE_OK) *rc = sqlite3_bind_null(stmt, index);
    return nan_bit;
  }
  if (*rc == SQLITE_OK) *rc = sqlite3_bind_double(stmt, index, value);
  return 0;
}

// An absent optional binds NULL with its bit clear.
int64_t BindOptional(sqlite3_stmt* stmt, int index,
                     const std::optional<double>& value, int64_t nan_bit,
                     int* rc) {
  if (!value.has_value()) {
    if (*rc == SQLITE_OK) *rc = sqlite3_bind_null(stmt, index);
    return 0;
  }
  return BindDouble(stmt, index, *value, nan_bit, rc);
}

void BindInt(sqlite3_stmt* stmt, int index, int64_t value, int* rc) {
  if (*rc == SQLITE_OK) *rc = sqlite3_bind_int64(stmt, index, value);
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
       "SELECT r.run_id, r.name, r.project, r.tags_json, r.config, r.mode, "
       "r.state, r.created_time, r.updated_time, "
       "(SELECT COUNT(*) FROM steps s WHERE s.run = r.id), "
       "(SELECT MAX(s.step) FROM steps s WHERE s.run = r.id) "
       "FROM runs r ORDER BY r.run_id"},
      {&reader->read_steps,
       "SELECT step, lr, loss, val_loss, grad_norm, wall_time, nan_mask "
       "FROM steps WHERE run = (SELECT id FROM runs WHERE run_id = ?1) "
       "AND step BETWEEN ?2 AND ?3 ORDER BY step"},
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

struct StepsWrite {
  std::string run_id;
  std::vector<StepRow> steps;
};

// One queued write.
struct WriteOp {
  std::variant<RunRow, StepsWrite, EventRow> write;
  Clock::time_point queued_at;

  // Steps count one op each toward max_ops_per_transaction.
  int64_t Steps() const {
    const StepsWrite* s = std::get_if<StepsWrite>(&write);
    return s != nullptr ? static_cast<int64_t>(s->steps.size()) : 0;
  }
};

// A NotifyWhenBacklogBelow callback waiting for the backlog to shrink.
struct BacklogWaiter {
  int64_t below_steps;
  std::function<void()> resume;
};

// Thread-safe (see RunStore). Lock order: readers_mu_ and mu_ are never
// held together.
class SqliteStore final : public RunStore {
 public:
  static absl::StatusOr<std::unique_ptr<RunStore>> Open(
      const std::string& path, const SqliteOptions& options);

  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;

  // Commits what is queued, then stops the writer and closes the database.
  ~SqliteStore() override {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
      work_cv_.Signal();
    }
    writer_.join();
  }

  void PutRun(const RunRow& run) override { Enqueue(run, 0); }

  void AppendSteps(const std::string& run_id,
                   std::vector<StepRow> steps) override {
    if (steps.empty()) return;
    const int64_t n = static_cast<int64_t>(steps.size());
    Enqueue(StepsWrite{run_id, std::move(steps)}, n);
  }

  void PutEvent(const EventRow& event) override { Enqueue(event, 0); }

  absl::Status Flush() override {
    absl::MutexLock lock(&mu_);
    const int64_t target = ops_queued_;
    while (ops_done_ < target) done_cv_.Wait(&mu_);
    return first_error_;
  }

  void NotifyWhenBacklogBelow(int64_t below_steps,
                              std::function<void()> resume) override {
    // "Fewer than 0 steps" never holds; wait for an empty backlog instead,
    // so that every callback runs once.
    if (below_steps < 1) below_steps = 1;
    {
      absl::MutexLock lock(&mu_);
      if (queued_steps_ >= below_steps) {
        waiters_.push_back({below_steps, std::move(resume)});
        return;
      }
    }
    resume();
  }

  StoreStats Stats() const override {
    const Clock::time_point now = Clock::now();
    absl::MutexLock lock(&mu_);
    StoreStats stats;
    stats.queued_ops = ops_queued_ - ops_done_;
    stats.queued_steps = queued_steps_;
    stats.committed_steps = committed_steps_;
    stats.transactions = transactions_;
    std::optional<Clock::time_point> oldest;
    if (in_flight_ops_ > 0) {
      oldest = in_flight_queued_at_;
    } else if (!queue_.empty()) {
      oldest = queue_.front().queued_at;
    }
    if (oldest.has_value() && now > *oldest) {
      stats.oldest_queued_age_s =
          std::chrono::duration<double>(now - *oldest).count();
    }
    stats.last_error = last_error_;
    return stats;
  }

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
    sqlite3_stmt* add_step = nullptr;
    sqlite3_stmt* put_event = nullptr;
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
      : path_(std::move(path)),
        options_(options),
        writer_state_(std::move(writer)) {
    idle_readers_.push_back(std::move(reader));
    writer_ = std::thread([this] { WriterLoop(); });
  }

  static absl::StatusOr<Writer> OpenWriter(const std::string& path,
                                           const SqliteOptions& options);

  void Enqueue(std::variant<RunRow, StepsWrite, EventRow> write,
               int64_t steps) {
    absl::MutexLock lock(&mu_);
    queue_.push_back({std::move(write), Clock::now()});
    ++ops_queued_;
    queued_steps_ += steps;
    work_cv_.Signal();
  }

  void WriterLoop();
  // Applies `batch` in one transaction; rolls back on error. Sets
  // `*inserted_steps` to the steps it added (duplicates are not counted).
  absl::Status Commit(const std::vector<WriteOp>& batch,
                      int64_t* inserted_steps);
  absl::Status Apply(const WriteOp& op, int64_t* inserted_steps);
  // The runs.id of `run_id`; adds a row with empty metadata when the run
  // has none yet (steps or events before its PutRun).
  absl::StatusOr<int64_t> RunKey(const std::string& run_id);

  absl::StatusOr<ReaderLease> AcquireReader();
  void ReleaseReader(std::unique_ptr<Reader> reader);

  const std::string path_;
  const SqliteOptions options_;

  mutable absl::Mutex mu_;
  absl::CondVar work_cv_;  // signalled when queue_ grows or stop_ is set
  absl::CondVar done_cv_;  // signalled when ops_done_ grows
  std::deque<WriteOp> queue_ ABSL_GUARDED_BY(mu_);
  int64_t ops_queued_ ABSL_GUARDED_BY(mu_) = 0;  // ever queued
  int64_t ops_done_ ABSL_GUARDED_BY(mu_) = 0;    // committed or dropped
  int64_t queued_steps_ ABSL_GUARDED_BY(mu_) = 0;
  // The batch the writer is committing (taken off queue_).
  int64_t in_flight_ops_ ABSL_GUARDED_BY(mu_) = 0;
  Clock::time_point in_flight_queued_at_ ABSL_GUARDED_BY(mu_);
  int64_t committed_steps_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t transactions_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status first_error_ ABSL_GUARDED_BY(mu_);
  std::string last_error_ ABSL_GUARDED_BY(mu_);
  std::vector<BacklogWaiter> waiters_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;

  // Only the writer thread touches this while it runs.
  Writer writer_state_;

  absl::Mutex readers_mu_;
  std::vector<std::unique_ptr<Reader>> idle_readers_
      ABSL_GUARDED_BY(readers_mu_);

  std::thread writer_;  // last: started once everything above exists
};

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
  s = c.Exec("PRAGMA foreign_keys=ON", "enable foreign keys");
  if (!s.ok()) return s;

  s = c.Exec("BEGIN IMMEDIATE", "begin schema transaction");
  if (!s.ok()) return s;
  absl::StatusOr<std::string> version =
      c.QueryString("PRAGMA user_version", "read schema version");
  if (!version.ok()) s = version.status();
  if (s.ok() && *version != "0" && *version != absl::StrCat(kSchemaVersion)) {
    s = absl::FailedPreconditionError(absl::StrFormat(
        "SQLite database %s: schema version %s is not supported (this "
        "lossguardd knows version %d)",
        path, *version, kSchemaVersion));
  }
  if (s.ok()) s = c.Exec(kSchemaSql, "create schema");
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
      {&w.find_run, "SELECT id FROM runs WHERE run_id = ?1"},
      {&w.add_run, "INSERT INTO runs (run_id) VALUES (?1)"},
      {&w.add_step,
       "INSERT OR IGNORE INTO steps (run, step, lr, loss, val_loss, "
       "grad_norm, wall_time, nan_mask) "
       "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"},
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

void SqliteStore::WriterLoop() {
  const int64_t max_ops = std::max(1, options_.max_ops_per_transaction);
  std::vector<WriteOp> batch;
  std::vector<BacklogWaiter> ready;
  for (;;) {
    int64_t batch_steps = 0;
    {
      absl::MutexLock lock(&mu_);
      while (queue_.empty() && !stop_) work_cv_.Wait(&mu_);
      if (queue_.empty()) return;  // stopping, and everything is committed
      int64_t weight = 0;
      while (!queue_.empty()) {
        const int64_t w = std::max<int64_t>(1, queue_.front().Steps());
        if (!batch.empty() && weight + w > max_ops) break;
        weight += w;
        batch_steps += queue_.front().Steps();
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      in_flight_ops_ = static_cast<int64_t>(batch.size());
      in_flight_queued_at_ = batch.front().queued_at;
    }

    int64_t inserted_steps = 0;
    absl::Status status = Commit(batch, &inserted_steps);

    {
      absl::MutexLock lock(&mu_);
      in_flight_ops_ = 0;
      ops_done_ += static_cast<int64_t>(batch.size());
      queued_steps_ -= batch_steps;
      if (status.ok()) {
        ++transactions_;
        committed_steps_ += inserted_steps;
      } else {
        if (first_error_.ok()) first_error_ = status;
        last_error_ = std::string(status.message());
      }
      for (auto it = waiters_.begin(); it != waiters_.end();) {
        if (queued_steps_ < it->below_steps) {
          ready.push_back(std::move(*it));
          it = waiters_.erase(it);
        } else {
          ++it;
        }
      }
      done_cv_.SignalAll();
    }
    batch.clear();
    for (BacklogWaiter& waiter : ready) waiter.resume();
    ready.clear();
  }
}

absl::Status SqliteStore::Commit(const std::vector<WriteOp>& batch,
                                 int64_t* inserted_steps) {
  Writer& w = writer_state_;
  *inserted_steps = 0;
  absl::Status s = w.conn->Run(w.begin, "begin transaction");
  if (!s.ok()) return s;
  for (const WriteOp& op : batch) {
    s = Apply(op, inserted_steps);
    if (!s.ok()) break;
  }
  if (s.ok()) s = w.conn->Run(w.commit, "commit");
  if (!s.ok()) {
    // Some errors (SQLITE_FULL, I/O errors) already rolled back.
    if (sqlite3_get_autocommit(w.conn->db()) == 0) {
      w.conn->Run(w.rollback, "rollback").IgnoreError();
    }
    *inserted_steps = 0;
  }
  return s;
}

absl::StatusOr<int64_t> SqliteStore::RunKey(const std::string& run_id) {
  Writer& w = writer_state_;
  int64_t key = 0;
  {
    ScopedReset reset(w.find_run);
    int rc = SQLITE_OK;
    BindText(w.find_run, 1, run_id, &rc);
    if (rc == SQLITE_OK) rc = sqlite3_step(w.find_run);
    if (rc == SQLITE_ROW) {
      key = sqlite3_column_int64(w.find_run, 0);
    } else if (rc != SQLITE_DONE) {
      return w.conn->Error(absl::StrCat("find run ", run_id), rc);
    }
  }
  if (key == 0) {  // rowids start at 1
    ScopedReset reset(w.add_run);
    int rc = SQLITE_OK;
    BindText(w.add_run, 1, run_id, &rc);
    if (rc == SQLITE_OK) rc = sqlite3_step(w.add_run);
    if (rc != SQLITE_DONE) {
      return w.conn->Error(absl::StrCat("add run ", run_id), rc);
    }
    key = sqlite3_last_insert_rowid(w.conn->db());
  }
  return key;
}

absl::Status SqliteStore::Apply(const WriteOp& op, int64_t* inserted_steps) {
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

  if (const StepsWrite* steps = std::get_if<StepsWrite>(&op.write)) {
    absl::StatusOr<int64_t> key = RunKey(steps->run_id);
    if (!key.ok()) return key.status();
    for (const StepRow& step : steps->steps) {
      ScopedReset reset(w.add_step);
      int rc = SQLITE_OK;
      BindInt(w.add_step, 1, *key, &rc);
      BindInt(w.add_step, 2, step.step, &rc);
      int64_t mask = 0;
      mask |= BindDouble(w.add_step, 3, step.lr, kNanBitLr, &rc);
      mask |= BindDouble(w.add_step, 4, step.loss, kNanBitLoss, &rc);
      mask |= BindOptional(w.add_step, 5, step.val_loss, kNanBitValLoss, &rc);
      mask |= BindOptional(w.add_step, 6, step.grad_norm, kNanBitGradNorm, &rc);
      mask |= BindDouble(w.add_step, 7, step.wall_time, kNanBitWallTime, &rc);
      BindInt(w.add_step, 8, mask, &rc);
      if (rc == SQLITE_OK) rc = sqlite3_step(w.add_step);
      if (rc != SQLITE_DONE) {
        return w.conn->Error(
            absl::StrFormat("add step %d of run %s", step.step, steps->run_id),
            rc);
      }
      *inserted_steps += sqlite3_changes(w.conn->db());
    }
    return absl::OkStatus();
  }

  const EventRow& event = std::get<EventRow>(op.write);
  absl::StatusOr<int64_t> key = RunKey(event.run_id);
  if (!key.ok()) return key.status();
  ScopedReset reset(w.put_event);
  int rc = SQLITE_OK;
  BindInt(w.put_event, 1, *key, &rc);
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
    row.has_steps = row.steps_stored > 0;
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
    const int64_t mask = sqlite3_column_int64(stmt, 6);
    StepRow row;
    row.step = sqlite3_column_int64(stmt, 0);
    row.lr = ColumnDouble(stmt, 1, mask, kNanBitLr);
    row.loss = ColumnDouble(stmt, 2, mask, kNanBitLoss);
    row.val_loss = ColumnOptional(stmt, 3, mask, kNanBitValLoss);
    row.grad_norm = ColumnOptional(stmt, 4, mask, kNanBitGradNorm);
    row.wall_time = ColumnDouble(stmt, 5, mask, kNanBitWallTime);
    if (!fn(row)) return absl::OkStatus();
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
