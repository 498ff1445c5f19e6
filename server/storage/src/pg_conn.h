// A thin RAII layer over libpq: one connection, its prepared statements,
// binary parameters and results, and errors mapped to absl::Status by
// SQLSTATE. Used by the PostgreSQL store and its lease table.

#ifndef LOSSGUARD_STORAGE_SRC_PG_CONN_H_
#define LOSSGUARD_STORAGE_SRC_PG_CONN_H_

#include <libpq-fe.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lossguard::storage::pg {

// Parameters of one statement, all sent in binary format. The values are
// copied in, so temporaries are fine.
class Params {
 public:
  Params& Int8(int64_t v);
  Params& Int4(int32_t v);
  Params& Float8(double v);
  Params& Text(std::string_view v);   // text columns: valid UTF-8, no NUL
  Params& Bytes(std::string_view v);  // bytea
  Params& Null();
  // A one-dimensional array (text[] or int8[]) for `= ANY($n)`.
  Params& TextArray(const std::vector<std::string>& v);

  int size() const { return static_cast<int>(ptrs_.size()); }
  const char* const* values() const { return ptrs_.data(); }
  const int* lengths() const { return lengths_.data(); }
  const int* formats() const { return formats_.data(); }

 private:
  void Add(std::string bytes, bool null = false);

  // A deque: its elements never move as it grows, so ptrs_ stays valid.
  std::deque<std::string> values_;
  std::vector<const char*> ptrs_;
  std::vector<int> lengths_;
  std::vector<int> formats_;
};

// A statement's result (binary format). Column accessors read the given
// row; the caller knows the column types from the statement.
class Result {
 public:
  explicit Result(PGresult* res) : res_(res, &PQclear) {}
  int rows() const { return PQntuples(res_.get()); }
  int64_t affected() const;  // rows an INSERT/UPDATE touched
  bool IsNull(int row, int col) const {
    return PQgetisnull(res_.get(), row, col) != 0;
  }
  int64_t Int8(int row, int col) const;
  int32_t Int4(int row, int col) const;
  double Float8(int row, int col) const;
  std::string_view Bytes(int row, int col) const;  // text or bytea
  std::string String(int row, int col) const {
    return std::string(Bytes(row, col));
  }

 private:
  std::unique_ptr<PGresult, decltype(&PQclear)> res_;
};

// One named prepared statement.
struct Statement {
  const char* name;
  const char* sql;
};

// Whether a failed statement may succeed later: a lost connection, a
// serialization failure or deadlock, resources (disk full, too many
// connections), a server shutting down or read-only (a failover). Data
// errors (22), constraint violations (23), errors in the SQL (42) and
// unsupported features cannot, and are not retried.
bool Retryable(const absl::Status& status);

// One connection. Not thread-safe: one thread uses it at a time. A lost
// connection is reopened (and its statements prepared again) by the next
// call; the call that lost it fails with UNAVAILABLE.
class Conn {
 public:
  // Connects to `conninfo` (a postgresql:// URI or key=value pairs) and
  // prepares `statements`. `what` names the database in errors, without
  // the password.
  static absl::StatusOr<std::unique_ptr<Conn>> Open(
      const std::string& conninfo, std::vector<Statement> statements);

  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;
  ~Conn();

  // Runs one or more statements without parameters (text results ignored).
  absl::Status Exec(std::string_view sql, std::string_view what);
  // Runs the prepared statement `name`.
  absl::StatusOr<Result> Run(const char* name, const Params& params,
                             std::string_view what);
  // As Run, for a statement that may run twice (a read, or one that is a
  // transaction of its own): when the connection was lost (a server
  // restart, a failover, an idle connection closed), reconnects and runs
  // it once more.
  absl::StatusOr<Result> RunRetryingOnce(const char* name,
                                         const Params& params,
                                         std::string_view what);
  // Runs `sql` unprepared with parameters.
  absl::StatusOr<Result> RunSql(const char* sql, const Params& params,
                                std::string_view what);

  // Whether a transaction is open (or failed and not yet rolled back).
  bool InTransaction() const;
  const std::string& display_name() const { return display_; }

 private:
  Conn(std::string conninfo, std::vector<Statement> statements);
  absl::Status Connect();
  absl::StatusOr<Result> Check(PGresult* res, std::string_view what);

  const std::string conninfo_;
  const std::vector<Statement> statements_;
  std::string display_;  // host:port/dbname, for errors
  PGconn* conn_ = nullptr;
};

// The host:port/dbname of a conninfo string, without user or password.
std::string DisplayName(const std::string& conninfo);

}  // namespace lossguard::storage::pg

#endif  // LOSSGUARD_STORAGE_SRC_PG_CONN_H_
