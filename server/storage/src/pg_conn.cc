#include "server/storage/src/pg_conn.h"

#include <bit>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lossguard::storage::pg {
namespace {

constexpr uint32_t kTextOid = 25;  // pg_type.oid of text

template <typename T>
std::string BigEndian(T v) {
  static_assert(std::is_unsigned_v<T>);
  std::string out(sizeof(T), '\0');
  for (size_t i = 0; i < sizeof(T); ++i) {
    out[i] = static_cast<char>((v >> (8 * (sizeof(T) - 1 - i))) & 0xff);
  }
  return out;
}

template <typename T>
T FromBigEndian(const char* p) {
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) {
    v = static_cast<T>((v << 8) | static_cast<unsigned char>(p[i]));
  }
  return v;
}

absl::StatusCode CodeOfSqlState(std::string_view state) {
  if (state.size() != 5) return absl::StatusCode::kUnavailable;  // no server
  const std::string_view cls = state.substr(0, 2);
  if (cls == "08" || cls == "57" || state == "25006") {
    return absl::StatusCode::kUnavailable;  // connection, shutdown, standby
  }
  if (cls == "40" || state == "55P03") return absl::StatusCode::kAborted;
  if (cls == "53") return absl::StatusCode::kResourceExhausted;
  if (cls == "22" || cls == "23" || cls == "54") {
    return absl::StatusCode::kInvalidArgument;
  }
  if (cls == "42" || cls == "0A") return absl::StatusCode::kFailedPrecondition;
  return absl::StatusCode::kInternal;  // 58 (I/O), XX and the rest
}

}  // namespace

bool Retryable(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:     // data, constraints, limits
    case absl::StatusCode::kFailedPrecondition:  // the SQL or the schema
    case absl::StatusCode::kDataLoss:            // a damaged chunk
      return false;
    default:
      return true;
  }
}

std::string DisplayName(const std::string& conninfo) {
  char* err = nullptr;
  PQconninfoOption* opts = PQconninfoParse(conninfo.c_str(), &err);
  if (opts == nullptr) {
    PQfreemem(err);
    return "(unparsable conninfo)";
  }
  std::string host, port, db;
  for (PQconninfoOption* o = opts; o->keyword != nullptr; ++o) {
    if (o->val == nullptr) continue;
    if (std::strcmp(o->keyword, "host") == 0) host = o->val;
    if (std::strcmp(o->keyword, "hostaddr") == 0 && host.empty()) host = o->val;
    if (std::strcmp(o->keyword, "port") == 0) port = o->val;
    if (std::strcmp(o->keyword, "dbname") == 0) db = o->val;
  }
  PQconninfoFree(opts);
  return absl::StrCat("postgresql ", host.empty() ? "(default host)" : host,
                      port.empty() ? "" : ":", port, "/", db);
}

// ---------------------------------------------------------------- Params

void Params::Add(std::string bytes, bool null) {
  values_.push_back(std::move(bytes));
  ptrs_.push_back(null ? nullptr : values_.back().data());
  lengths_.push_back(static_cast<int>(values_.back().size()));
  formats_.push_back(1);  // binary
}

Params& Params::Int8(int64_t v) {
  Add(BigEndian(static_cast<uint64_t>(v)));
  return *this;
}
Params& Params::Int4(int32_t v) {
  Add(BigEndian(static_cast<uint32_t>(v)));
  return *this;
}
Params& Params::Float8(double v) {
  Add(BigEndian(std::bit_cast<uint64_t>(v)));
  return *this;
}
Params& Params::Text(std::string_view v) {
  Add(std::string(v));
  return *this;
}
Params& Params::Bytes(std::string_view v) {
  Add(std::string(v));
  return *this;
}
Params& Params::Null() {
  Add(std::string(), true);
  return *this;
}
Params& Params::TextArray(const std::vector<std::string>& v) {
  // Binary array: ndim, has-nulls flag, element type, then per dimension
  // its length and lower bound, then each element's length and bytes.
  std::string out = BigEndian<uint32_t>(1) + BigEndian<uint32_t>(0) +
                    BigEndian<uint32_t>(kTextOid) +
                    BigEndian(static_cast<uint32_t>(v.size())) +
                    BigEndian<uint32_t>(1);
  for (const std::string& s : v) {
    out += BigEndian(static_cast<uint32_t>(s.size()));
    out += s;
  }
  Add(std::move(out));
  return *this;
}

// ---------------------------------------------------------------- Result

int64_t Result::affected() const {
  const char* n = PQcmdTuples(res_.get());
  return (n == nullptr || *n == '\0') ? 0 : std::strtoll(n, nullptr, 10);
}
int64_t Result::Int8(int row, int col) const {
  return static_cast<int64_t>(
      FromBigEndian<uint64_t>(PQgetvalue(res_.get(), row, col)));
}
int32_t Result::Int4(int row, int col) const {
  return static_cast<int32_t>(
      FromBigEndian<uint32_t>(PQgetvalue(res_.get(), row, col)));
}
double Result::Float8(int row, int col) const {
  return std::bit_cast<double>(
      FromBigEndian<uint64_t>(PQgetvalue(res_.get(), row, col)));
}
std::string_view Result::Bytes(int row, int col) const {
  return std::string_view(PQgetvalue(res_.get(), row, col),
                          static_cast<size_t>(
                              PQgetlength(res_.get(), row, col)));
}

// ---------------------------------------------------------------- Conn

Conn::Conn(std::string conninfo, std::vector<Statement> statements)
    : conninfo_(std::move(conninfo)),
      statements_(std::move(statements)),
      display_(DisplayName(conninfo_)) {}

Conn::~Conn() {
  if (conn_ != nullptr) PQfinish(conn_);
}

absl::StatusOr<std::unique_ptr<Conn>> Conn::Open(
    const std::string& conninfo, std::vector<Statement> statements) {
  std::unique_ptr<Conn> c(new Conn(conninfo, std::move(statements)));
  absl::Status s = c->Connect();
  if (!s.ok()) return s;
  return c;
}

absl::Status Conn::Connect() {
  if (conn_ != nullptr) {
    PQfinish(conn_);
    conn_ = nullptr;
  }
  conn_ = PQconnectdb(conninfo_.c_str());
  if (conn_ == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat(display_, ": out of memory connecting"));
  }
  if (PQstatus(conn_) != CONNECTION_OK) {
    std::string message = PQerrorMessage(conn_);
    while (!message.empty() && message.back() == '\n') message.pop_back();
    PQfinish(conn_);
    conn_ = nullptr;
    // A bad password or database name will not pass by itself, but a
    // server that is starting or restarting will: retry either way.
    return absl::UnavailableError(
        absl::StrCat(display_, ": cannot connect: ", message));
  }
  // Quiet NOTICEs (CREATE ... IF NOT EXISTS says "already exists").
  PQsetNoticeProcessor(conn_, [](void*, const char*) {}, nullptr);
  for (const Statement& st : statements_) {
    PGresult* res = PQprepare(conn_, st.name, st.sql, 0, nullptr);
    absl::StatusOr<Result> r =
        Check(res, absl::StrCat("prepare ", st.name));
    if (!r.ok()) {
      if (conn_ != nullptr) PQfinish(conn_);
      conn_ = nullptr;  // half prepared: start over next time
      return r.status();
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Result> Conn::Check(PGresult* res, std::string_view what) {
  const ExecStatusType st =
      res == nullptr ? PGRES_FATAL_ERROR : PQresultStatus(res);
  if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) return Result(res);
  std::string message = res != nullptr ? PQresultErrorMessage(res) : "";
  if (message.empty() && conn_ != nullptr) message = PQerrorMessage(conn_);
  while (!message.empty() && message.back() == '\n') message.pop_back();
  const char* state =
      res != nullptr ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : nullptr;
  absl::StatusCode code = CodeOfSqlState(state != nullptr ? state : "");
  if (conn_ != nullptr && PQstatus(conn_) == CONNECTION_BAD) {
    code = absl::StatusCode::kUnavailable;
    PQfinish(conn_);
    conn_ = nullptr;  // the next call reconnects
  }
  if (res != nullptr) PQclear(res);
  return absl::Status(code, absl::StrFormat("%s: %s: %s (SQLSTATE %s)",
                                            display_, what, message,
                                            state != nullptr ? state : "none"));
}

absl::Status Conn::Exec(std::string_view sql, std::string_view what) {
  if (conn_ == nullptr) {
    absl::Status s = Connect();
    if (!s.ok()) return s;
  }
  const std::string text(sql);
  absl::StatusOr<Result> r = Check(PQexec(conn_, text.c_str()), what);
  return r.status();
}

absl::StatusOr<Result> Conn::Run(const char* name, const Params& params,
                                 std::string_view what) {
  if (conn_ == nullptr) {
    absl::Status s = Connect();
    if (!s.ok()) return s;
  }
  return Check(PQexecPrepared(conn_, name, params.size(), params.values(),
                              params.lengths(), params.formats(), 1),
               what);
}

absl::StatusOr<Result> Conn::RunRetryingOnce(const char* name,
                                             const Params& params,
                                             std::string_view what) {
  absl::StatusOr<Result> r = Run(name, params, what);
  if (!r.ok() && conn_ == nullptr) r = Run(name, params, what);
  return r;
}

absl::StatusOr<Result> Conn::RunSql(const char* sql, const Params& params,
                                    std::string_view what) {
  if (conn_ == nullptr) {
    absl::Status s = Connect();
    if (!s.ok()) return s;
  }
  return Check(PQexecParams(conn_, sql, params.size(), nullptr,
                            params.values(), params.lengths(),
                            params.formats(), 1),
               what);
}

bool Conn::InTransaction() const {
  if (conn_ == nullptr) return false;
  const PGTransactionStatusType t = PQtransactionStatus(conn_);
  return t == PQTRANS_INTRANS || t == PQTRANS_INERROR;
}

}  // namespace lossguard::storage::pg
