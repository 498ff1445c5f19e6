// A fresh PostgreSQL database per test, on the server that ctest's
// pg_server fixture starts (tests/pg/pg_server.sh). ctest points
// $LOSSGUARD_TEST_PG_FILE at the file holding that server's conninfo; run
// by hand without it, PostgreSQL tests skip (Available() is false). Under
// ctest a missing server is a failure, not a skip.

#ifndef LOSSGUARD_TESTS_PG_PG_TEST_DB_H_
#define LOSSGUARD_TESTS_PG_PG_TEST_DB_H_

#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <string>

namespace lossguard::testing_pg {

// The admin conninfo of the test server: "" when not configured.
inline std::string ServerConninfo() {
  const char* file = std::getenv("LOSSGUARD_TEST_PG_FILE");
  if (file == nullptr || *file == '\0') return "";
  std::ifstream in(file);
  std::string conninfo;
  std::getline(in, conninfo);
  if (conninfo.empty()) {
    ADD_FAILURE() << "LOSSGUARD_TEST_PG_FILE=" << file
                  << " names no conninfo: did the pg_server fixture "
                     "(tests/pg/pg_server.sh start) run?";
  }
  return conninfo;
}

inline bool Available() { return !ServerConninfo().empty(); }

// Runs `sql` on `conninfo`; a failure is a test failure.
inline bool AdminExec(const std::string& conninfo, const std::string& sql) {
  PGconn* c = PQconnectdb(conninfo.c_str());
  bool ok = PQstatus(c) == CONNECTION_OK;
  if (!ok) {
    ADD_FAILURE() << "connect " << conninfo << ": " << PQerrorMessage(c);
  } else {
    PGresult* r = PQexec(c, sql.c_str());
    ok = PQresultStatus(r) == PGRES_COMMAND_OK ||
         PQresultStatus(r) == PGRES_TUPLES_OK;
    if (!ok) ADD_FAILURE() << sql << ": " << PQresultErrorMessage(r);
    PQclear(r);
  }
  PQfinish(c);
  return ok;
}

// Creates a database of its own on the test server; drops it (closing any
// connection left) when destroyed.
class TestDatabase {
 public:
  TestDatabase() : server_(ServerConninfo()) {
    if (server_.empty()) return;
    static std::atomic<int> counter{0};
    name_ = "lossguard_test_" + std::to_string(getpid()) + "_" +
            std::to_string(counter++);
    if (AdminExec(server_, "CREATE DATABASE " + name_)) {
      conninfo_ = server_ + " dbname=" + name_;  // the last dbname wins
    }
  }
  TestDatabase(const TestDatabase&) = delete;
  TestDatabase& operator=(const TestDatabase&) = delete;
  ~TestDatabase() {
    if (!conninfo_.empty()) {
      AdminExec(server_, "DROP DATABASE IF EXISTS " + name_ + " WITH (FORCE)");
    }
  }

  // libpq conninfo of the new database; "" when there is no server.
  const std::string& conninfo() const { return conninfo_; }
  // The same as a postgresql:// URI (what lossguardd --db takes).
  std::string uri() const {
    std::string host, port, user;
    PQconninfoOption* opts = PQconninfoParse(server_.c_str(), nullptr);
    for (PQconninfoOption* o = opts; o != nullptr && o->keyword != nullptr;
         ++o) {
      if (o->val == nullptr) continue;
      const std::string k = o->keyword;
      if (k == "host") host = o->val;
      if (k == "port") port = o->val;
      if (k == "user") user = o->val;
    }
    PQconninfoFree(opts);
    return "postgresql://" + user + "@" + host + ":" + port + "/" + name_;
  }

 private:
  std::string server_;
  std::string name_;
  std::string conninfo_;
};

}  // namespace lossguard::testing_pg

#endif  // LOSSGUARD_TESTS_PG_PG_TEST_DB_H_
