#include "lossguard/storage/run_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <stdlib.h>

#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "tests/pg/pg_test_db.h"

namespace lossguard::storage {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kAllSteps = std::numeric_limits<int64_t>::max();
constexpr int64_t kFirstStep = std::numeric_limits<int64_t>::min();

// A fresh directory under the test temp dir, removed with its contents.
class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::path(::testing::TempDir()) / "lossguard_store_XXXXXX")
            .string();
    if (mkdtemp(pattern.data()) == nullptr) {
      ADD_FAILURE() << "mkdtemp " << pattern << " failed";
    }
    path_ = pattern;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A connection of the test's own to a store's database file.
class RawDb {
 public:
  explicit RawDb(const std::string& path, int flags = SQLITE_OPEN_READWRITE) {
    EXPECT_EQ(sqlite3_open_v2(path.c_str(), &db_, flags, nullptr), SQLITE_OK)
        << path;
  }
  RawDb(const RawDb&) = delete;
  RawDb& operator=(const RawDb&) = delete;
  ~RawDb() { sqlite3_close_v2(db_); }

  void Exec(const char* sql) {
    ASSERT_EQ(sqlite3_exec(db_, sql, nullptr, nullptr, nullptr), SQLITE_OK)
        << sql << ": " << sqlite3_errmsg(db_);
  }

  // Every row of `sql`, each column as text ("NULL" for NULL).
  std::vector<std::vector<std::string>> Query(const char* sql) {
    std::vector<std::vector<std::string>> rows;
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db_, sql, -1, &stmt, nullptr), SQLITE_OK)
        << sql << ": " << sqlite3_errmsg(db_);
    if (stmt == nullptr) return rows;
    int rc;
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
      std::vector<std::string> row;
      for (int i = 0; i < sqlite3_column_count(stmt); ++i) {
        const unsigned char* text = sqlite3_column_text(stmt, i);
        row.push_back(text == nullptr ? "NULL"
                                      : reinterpret_cast<const char*>(text));
      }
      rows.push_back(std::move(row));
    }
    EXPECT_EQ(rc, SQLITE_DONE) << sql << ": " << sqlite3_errmsg(db_);
    sqlite3_finalize(stmt);
    return rows;
  }

 private:
  sqlite3* db_ = nullptr;
};

RunRow MakeRun(const std::string& run_id) {
  RunRow run;
  run.run_id = run_id;
  run.name = "name of " + run_id;
  run.project = "proj";
  run.tags_json = R"({"lr": "sweep", "seed": "3"})";
  constexpr char kConfig[] = "\x00\x01\xff config bytes\x00";
  run.config = std::string(kConfig, sizeof(kConfig) - 1);  // NULs included
  run.mode = 2;
  run.state = 3;
  run.created_time = 1.7e9 + 0.25;
  run.updated_time = 1.7e9 + 60.5;
  return run;
}

StepRow MakeStep(int64_t step) {
  StepRow row;
  row.step = step;
  row.lr = 0.001 * static_cast<double>(step % 7 + 1);
  row.loss = 10.0 / static_cast<double>(step + 2);
  if (step % 3 != 0) row.val_loss = row.loss + 0.125;
  if (step % 2 == 0) row.grad_norm = 1.0 + static_cast<double>(step) / 8.0;
  row.wall_time = 1.7e9 + static_cast<double>(step) * 0.5;
  return row;
}

std::vector<StepRow> MakeSteps(int64_t from, int64_t to) {
  std::vector<StepRow> steps;
  for (int64_t s = from; s <= to; ++s) steps.push_back(MakeStep(s));
  return steps;
}

EventRow MakeEvent(const std::string& run_id, EventRow::Type type, uint64_t id,
                   int64_t step, std::string payload) {
  EventRow event;
  event.run_id = run_id;
  event.type = type;
  event.id = id;
  event.step = step;
  event.payload = std::move(payload);
  return event;
}

// NaN matches any NaN (SQLite keeps the class, not the payload); every other
// value must match bit for bit (so -0.0 is not 0.0).
void ExpectSameDouble(double got, double want, const char* what) {
  if (std::isnan(want)) {
    EXPECT_TRUE(std::isnan(got)) << what << ": got " << got;
  } else {
    EXPECT_EQ(std::bit_cast<uint64_t>(got), std::bit_cast<uint64_t>(want))
        << what << ": got " << got << ", want " << want;
  }
}

void ExpectSameOptional(const std::optional<double>& got,
                        const std::optional<double>& want, const char* what) {
  ASSERT_EQ(got.has_value(), want.has_value()) << what;
  if (want.has_value()) ExpectSameDouble(*got, *want, what);
}

void ExpectSameStep(const StepRow& got, const StepRow& want) {
  SCOPED_TRACE(absl::StrCat("step ", want.step));
  EXPECT_EQ(got.step, want.step);
  ExpectSameDouble(got.lr, want.lr, "lr");
  ExpectSameDouble(got.loss, want.loss, "loss");
  ExpectSameOptional(got.val_loss, want.val_loss, "val_loss");
  ExpectSameOptional(got.grad_norm, want.grad_norm, "grad_norm");
  ExpectSameDouble(got.wall_time, want.wall_time, "wall_time");
}

void ExpectSameSteps(const std::vector<StepRow>& got,
                     const std::vector<StepRow>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) ExpectSameStep(got[i], want[i]);
}

void ExpectSameMetadata(const RunRow& got, const RunRow& want) {
  SCOPED_TRACE(want.run_id);
  EXPECT_EQ(got.run_id, want.run_id);
  EXPECT_EQ(got.name, want.name);
  EXPECT_EQ(got.project, want.project);
  EXPECT_EQ(got.tags_json, want.tags_json);
  EXPECT_EQ(got.config, want.config);
  EXPECT_EQ(got.mode, want.mode);
  EXPECT_EQ(got.state, want.state);
  ExpectSameDouble(got.created_time, want.created_time, "created_time");
  ExpectSameDouble(got.updated_time, want.updated_time, "updated_time");
}

void ExpectSameEvent(const EventRow& got, const EventRow& want) {
  EXPECT_EQ(got.run_id, want.run_id);
  EXPECT_EQ(got.type, want.type);
  EXPECT_EQ(got.id, want.id);
  EXPECT_EQ(got.step, want.step);
  EXPECT_EQ(got.payload, want.payload);
}

std::vector<StepRow> ReadSteps(RunStore& store, const std::string& run_id,
                               int64_t from = kFirstStep,
                               int64_t to = kAllSteps) {
  std::vector<StepRow> steps;
  absl::Status s = store.ReadSteps(run_id, from, to, [&](const StepRow& row) {
    steps.push_back(row);
    return true;
  });
  EXPECT_TRUE(s.ok()) << s;
  return steps;
}

std::vector<RunRow> LoadRuns(RunStore& store) {
  absl::StatusOr<std::vector<RunRow>> runs = store.LoadRuns();
  EXPECT_TRUE(runs.ok()) << runs.status();
  return runs.ok() ? *runs : std::vector<RunRow>();
}

std::vector<EventRow> ReadEvents(RunStore& store, const std::string& run_id) {
  absl::StatusOr<std::vector<EventRow>> events = store.ReadEvents(run_id);
  EXPECT_TRUE(events.ok()) << events.status();
  return events.ok() ? *events : std::vector<EventRow>();
}

std::vector<int64_t> StepNumbers(const std::vector<StepRow>& steps) {
  std::vector<int64_t> numbers;
  for (const StepRow& s : steps) numbers.push_back(s.step);
  return numbers;
}

std::unique_ptr<RunStore> OpenOrFail(const std::string& path,
                                     const SqliteOptions& options = {}) {
  absl::StatusOr<std::unique_ptr<RunStore>> store =
      OpenSqliteStore(path, options);
  EXPECT_TRUE(store.ok()) << store.status();
  return store.ok() ? *std::move(store) : nullptr;
}

// ---------------------------------------------------------------------------
// The same tests against both backends.

enum class Backend { kSqlite, kMemory, kPostgres };

class RunStoreTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    switch (GetParam()) {
      case Backend::kMemory:
        store_ = NewMemoryStore();
        break;
      case Backend::kSqlite:
        store_ = OpenOrFail(DbPath());
        break;
      case Backend::kPostgres: {
        if (!testing_pg::Available()) {
          GTEST_SKIP() << "no PostgreSQL test server (run under ctest, "
                          "whose pg_server fixture starts one)";
        }
        pg_ = std::make_unique<testing_pg::TestDatabase>();
        ASSERT_FALSE(pg_->conninfo().empty());
        absl::StatusOr<std::unique_ptr<RunStore>> store =
            OpenPostgresStore(pg_->conninfo());
        ASSERT_TRUE(store.ok()) << store.status();
        store_ = *std::move(store);
        break;
      }
    }
    ASSERT_NE(store_, nullptr);
  }
  void TearDown() override { store_.reset(); }

  std::string DbPath() const { return dir_.path() + "/runs.db"; }

  TempDir dir_;
  std::unique_ptr<testing_pg::TestDatabase> pg_;  // dropped after store_
  std::unique_ptr<RunStore> store_;  // closed before dir_ is removed
};

INSTANTIATE_TEST_SUITE_P(
    Backends, RunStoreTest,
    ::testing::Values(Backend::kSqlite, Backend::kMemory, Backend::kPostgres),
    [](const ::testing::TestParamInfo<Backend>& info) {
      switch (info.param) {
        case Backend::kSqlite:
          return "Sqlite";
        case Backend::kMemory:
          return "Memory";
        case Backend::kPostgres:
          return "Postgres";
      }
      return "Unknown";
    });

TEST_P(RunStoreTest, RoundTripsRunStepsAndEvents) {
  const RunRow run = MakeRun("run-a");
  const std::vector<StepRow> steps = MakeSteps(0, 9);
  const EventRow diag = MakeEvent("run-a", EventRow::Type::kDiagnosis, 1, 4,
                                  std::string("diag\0x", 6));
  const EventRow advice = MakeEvent("run-a", EventRow::Type::kAdvice, 1, 5,
                                    std::string("adv\0ice", 7));
  store_->PutRun(run);
  store_->AppendSteps("run-a", steps);
  store_->PutEvent(advice);
  store_->PutEvent(diag);
  ASSERT_TRUE(store_->Flush().ok());

  std::vector<RunRow> runs = LoadRuns(*store_);
  ASSERT_EQ(runs.size(), 1u);
  ExpectSameMetadata(runs[0], run);
  EXPECT_TRUE(runs[0].has_steps);
  EXPECT_EQ(runs[0].last_step, 9);
  EXPECT_EQ(runs[0].steps_stored, 10);
  ExpectSameSteps(ReadSteps(*store_, "run-a"), steps);
  std::vector<EventRow> events = ReadEvents(*store_, "run-a");
  ASSERT_EQ(events.size(), 2u);
  ExpectSameEvent(events[0], diag);  // diagnoses sort before advice
  ExpectSameEvent(events[1], advice);
}

TEST_P(RunStoreTest, SpecialDoublesRoundTripExactly) {
  const double denorm = std::numeric_limits<double>::denorm_min();
  const double big = std::numeric_limits<double>::max();
  std::vector<StepRow> steps = {
      {.step = 0,
       .lr = kNaN,
       .loss = kNaN,
       .val_loss = kNaN,
       .grad_norm = kNaN,
       .wall_time = kNaN},
      {.step = 1,
       .lr = kInf,
       .loss = -kInf,
       .val_loss = kInf,
       .grad_norm = -kInf,
       .wall_time = kInf},
      {.step = 2,
       .lr = denorm,
       .loss = -denorm,
       .val_loss = 4.9e-320,
       .grad_norm = -2.2250738585072e-310,
       .wall_time = 1e-323},
      {.step = 3,
       .lr = 1e308,
       .loss = -1e308,
       .val_loss = big,
       .grad_norm = std::numeric_limits<double>::lowest(),
       .wall_time = 1e308},
      {.step = 4,
       .lr = -0.0,
       .loss = 0.0,
       .val_loss = -0.0,
       .grad_norm = std::nullopt,
       .wall_time = -0.0},
      // Integral values that SQLite could store as integers.
      {.step = 5,
       .lr = 1.0,
       .loss = 9007199254740993.0,
       .val_loss = 1e18,
       .grad_norm = -3.0,
       .wall_time = 1700000000.0},
      {.step = 6,
       .lr = 0.1,
       .loss = kNaN,
       .val_loss = std::nullopt,
       .grad_norm = std::nullopt,
       .wall_time = 0.3},
      {.step = 7,
       .lr = kNaN,
       .loss = 2.5,
       .val_loss = std::nullopt,
       .grad_norm = kNaN,
       .wall_time = -kInf},
  };
  RunRow run = MakeRun("special");
  run.created_time = kNaN;
  run.updated_time = -kInf;
  store_->PutRun(run);
  store_->AppendSteps("special", steps);
  ASSERT_TRUE(store_->Flush().ok());

  ExpectSameSteps(ReadSteps(*store_, "special"), steps);
  std::vector<RunRow> runs = LoadRuns(*store_);
  ASSERT_EQ(runs.size(), 1u);
  ExpectSameMetadata(runs[0], run);
}

TEST_P(RunStoreTest, ResentStepsAreStoredOnce) {
  store_->AppendSteps("r", MakeSteps(0, 9));
  // A reconnecting client resends an overlap, with other values: the
  // stored copy wins.
  std::vector<StepRow> resend = MakeSteps(5, 14);
  for (StepRow& s : resend) s.loss = 1234.0;
  store_->AppendSteps("r", resend);
  store_->AppendSteps("r", MakeSteps(0, 14));
  ASSERT_TRUE(store_->Flush().ok());

  std::vector<StepRow> want = MakeSteps(0, 9);
  for (int64_t s = 10; s <= 14; ++s) want.push_back(resend[s - 5]);
  ExpectSameSteps(ReadSteps(*store_, "r"), want);
  std::vector<RunRow> runs = LoadRuns(*store_);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].steps_stored, 15);
  EXPECT_EQ(runs[0].last_step, 14);
  EXPECT_EQ(store_->Stats().committed_steps, 15);
}

TEST_P(RunStoreTest, StepsAtOrBelowTheLastStoredStepAreIgnored) {
  store_->AppendSteps("r", MakeSteps(10, 19));
  store_->AppendSteps("r", MakeSteps(0, 4));    // below: a stale resend
  store_->AppendSteps("r", MakeSteps(15, 22));  // 20..22 are new
  std::vector<StepRow> unordered = MakeSteps(30, 30);
  unordered.push_back(MakeStep(25));  // out of order within one append
  unordered.push_back(MakeStep(31));
  store_->AppendSteps("r", unordered);
  ASSERT_TRUE(store_->Flush().ok());
  std::vector<int64_t> want;
  for (int64_t s = 10; s <= 22; ++s) want.push_back(s);
  want.push_back(30);
  want.push_back(31);
  EXPECT_EQ(StepNumbers(ReadSteps(*store_, "r")), want);
  std::vector<RunRow> runs = LoadRuns(*store_);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].steps_stored, 15);
  EXPECT_EQ(runs[0].last_step, 31);
  EXPECT_EQ(store_->Stats().committed_steps, 15);
}

// Many small appends (one chunk each in the SQLite store) and one long one
// (split into several): every range reads exactly its steps.
TEST_P(RunStoreTest, ReadStepsAcrossManyAppendsAndLongOnes) {
  std::vector<StepRow> all;
  int64_t step = -50;
  for (int batch = 0; batch < 200; ++batch) {
    std::vector<StepRow> steps;
    for (int i = 0; i < 1 + batch % 7; ++i) {
      steps.push_back(MakeStep(step));
      step += 1 + batch % 3;  // gaps of 0 to 2 steps
    }
    all.insert(all.end(), steps.begin(), steps.end());
    store_->AppendSteps("r", std::move(steps));
  }
  std::vector<StepRow> long_append;
  for (int i = 0; i < 10000; ++i) long_append.push_back(MakeStep(step++));
  all.insert(all.end(), long_append.begin(), long_append.end());
  store_->AppendSteps("r", std::move(long_append));
  ASSERT_TRUE(store_->Flush().ok());

  ExpectSameSteps(ReadSteps(*store_, "r"), all);
  const int64_t first = all.front().step;
  const int64_t last = all.back().step;
  const int64_t ranges[][2] = {{first, first},     {first - 10, first + 3},
                               {0, 0},             {100, 137},
                               {101, 101},         {4000, 4200},
                               {last - 5000, last}, {last, last + 10},
                               {last + 1, kAllSteps}, {-1000, -60}};
  for (const auto& [from, to] : ranges) {
    SCOPED_TRACE(absl::StrCat("range ", from, "..", to));
    std::vector<StepRow> want;
    for (const StepRow& row : all) {
      if (row.step >= from && row.step <= to) want.push_back(row);
    }
    ExpectSameSteps(ReadSteps(*store_, "r", from, to), want);
  }
  std::vector<RunRow> runs = LoadRuns(*store_);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].steps_stored, static_cast<int64_t>(all.size()));
  EXPECT_EQ(runs[0].last_step, last);
}

// Commit callbacks run once the steps are durable, in the order the writes
// were made; an empty append with a callback marks the point after every
// earlier write.
TEST_P(RunStoreTest, CommitCallbacksRunInOrderOnceDurable) {
  std::vector<std::string> calls;
  absl::Mutex mu;
  auto record = [&](std::string what) {
    return [&, what](const absl::Status& s) {
      absl::MutexLock lock(&mu);
      calls.push_back(absl::StrCat(what, s.ok() ? "" : " failed"));
    };
  };
  store_->AppendSteps("a", MakeSteps(0, 9), record("a 0-9"));
  store_->AppendSteps("b", MakeSteps(0, 4), record("b 0-4"));
  store_->AppendSteps("a", MakeSteps(5, 9), record("a resend"));
  store_->AppendSteps("a", {}, record("a marker"));
  ASSERT_TRUE(store_->Flush().ok());  // and the callbacks have run
  {
    absl::MutexLock lock(&mu);
    EXPECT_THAT(calls, ElementsAre("a 0-9", "b 0-4", "a resend", "a marker"));
  }
  // A marker stores nothing and creates no run.
  store_->AppendSteps("ghost", {}, [](const absl::Status&) {});
  ASSERT_TRUE(store_->Flush().ok());
  EXPECT_EQ(LoadRuns(*store_).size(), 2u);
}

TEST_P(RunStoreTest, EventsUpsertByKeyAndReadInTypeIdOrder) {
  using Type = EventRow::Type;
  const uint64_t huge = (uint64_t{1} << 63) + 5;  // past int64's range
  store_->PutEvent(MakeEvent("r", Type::kAdvice, 2, 20, "advice 2 proposed"));
  store_->PutEvent(MakeEvent("r", Type::kAdvice, huge, 30, "advice huge"));
  store_->PutEvent(MakeEvent("r", Type::kDiagnosis, 7, 10, "diag 7"));
  store_->PutEvent(MakeEvent("r", Type::kAdvice, 1, 15, "advice 1"));
  store_->PutEvent(MakeEvent("other", Type::kAdvice, 2, 99, "other run"));
  // The advice's later status replaces its payload (and step).
  store_->PutEvent(MakeEvent("r", Type::kAdvice, 2, 21, "advice 2 acked"));
  ASSERT_TRUE(store_->Flush().ok());

  std::vector<EventRow> events = ReadEvents(*store_, "r");
  ASSERT_EQ(events.size(), 4u);
  ExpectSameEvent(events[0], MakeEvent("r", Type::kDiagnosis, 7, 10, "diag 7"));
  ExpectSameEvent(events[1], MakeEvent("r", Type::kAdvice, 1, 15, "advice 1"));
  ExpectSameEvent(events[2],
                  MakeEvent("r", Type::kAdvice, 2, 21, "advice 2 acked"));
  ExpectSameEvent(events[3],
                  MakeEvent("r", Type::kAdvice, huge, 30, "advice huge"));
  std::vector<EventRow> other = ReadEvents(*store_, "other");
  ASSERT_EQ(other.size(), 1u);
  EXPECT_EQ(other[0].payload, "other run");
}

TEST_P(RunStoreTest, ReadStepsHonoursRangeAndEarlyStop) {
  std::vector<StepRow> steps;
  for (int64_t s = 0; s < 100; s += 5) steps.push_back(MakeStep(s));
  store_->AppendSteps("r", steps);
  ASSERT_TRUE(store_->Flush().ok());

  EXPECT_THAT(StepNumbers(ReadSteps(*store_, "r", 25, 40)),
              ElementsAre(25, 30, 35, 40));
  EXPECT_THAT(StepNumbers(ReadSteps(*store_, "r", 26, 39)),
              ElementsAre(30, 35));
  EXPECT_THAT(StepNumbers(ReadSteps(*store_, "r", 96, kAllSteps)),
              ElementsAre());
  EXPECT_THAT(StepNumbers(ReadSteps(*store_, "r", 40, 25)), ElementsAre());
  EXPECT_THAT(StepNumbers(ReadSteps(*store_, "r", kFirstStep, 0)),
              ElementsAre(0));

  std::vector<int64_t> seen;
  absl::Status s =
      store_->ReadSteps("r", 10, kAllSteps, [&](const StepRow& row) {
        seen.push_back(row.step);
        return seen.size() < 3;
      });
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_THAT(seen, ElementsAre(10, 15, 20));
}

TEST_P(RunStoreTest, ReadStepsCallbackMayReadTheStoreAgain) {
  store_->AppendSteps("a", MakeSteps(0, 2999));
  store_->AppendSteps("b", MakeSteps(0, 1));
  ASSERT_TRUE(store_->Flush().ok());
  int64_t rows = 0;
  int64_t nested_rows = 0;
  absl::Status s =
      store_->ReadSteps("a", kFirstStep, kAllSteps, [&](const StepRow& row) {
        ++rows;
        if (row.step % 1000 == 0) {
          nested_rows += static_cast<int64_t>(ReadSteps(*store_, "b").size());
          nested_rows += static_cast<int64_t>(LoadRuns(*store_).size());
        }
        return true;
      });
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(rows, 3000);
  EXPECT_EQ(nested_rows, 3 * (2 + 2));
}

TEST_P(RunStoreTest, UnknownRunReadsEmpty) {
  store_->AppendSteps("known", MakeSteps(0, 3));
  ASSERT_TRUE(store_->Flush().ok());
  EXPECT_TRUE(ReadSteps(*store_, "unknown").empty());
  EXPECT_TRUE(ReadEvents(*store_, "unknown").empty());
  EXPECT_TRUE(ReadSteps(*store_, "").empty());
  EXPECT_EQ(LoadRuns(*store_).size(), 1u);
}

TEST_P(RunStoreTest, EmptyStoreLoadsNoRuns) {
  EXPECT_TRUE(LoadRuns(*store_).empty());
  EXPECT_TRUE(store_->Flush().ok());
}

TEST_P(RunStoreTest, InterleavedRunsKeepPerRunOrder) {
  constexpr int kRuns = 8;
  constexpr int64_t kChunks = 40;
  constexpr int64_t kChunkSize = 25;
  // One producer thread per run, all writing at once.
  std::vector<std::thread> producers;
  for (int r = 0; r < kRuns; ++r) {
    producers.emplace_back([this, r] {
      const std::string run_id = absl::StrCat("run-", r);
      store_->PutRun(MakeRun(run_id));
      for (int64_t c = 0; c < kChunks; ++c) {
        store_->AppendSteps(
            run_id, MakeSteps(c * kChunkSize, (c + 1) * kChunkSize - 1));
        if (c % 10 == 0) {
          store_->PutEvent(MakeEvent(run_id, EventRow::Type::kDiagnosis,
                                     static_cast<uint64_t>(c), c, run_id));
        }
      }
    });
  }
  for (std::thread& t : producers) t.join();
  ASSERT_TRUE(store_->Flush().ok());

  const std::vector<StepRow> want = MakeSteps(0, kChunks * kChunkSize - 1);
  std::vector<RunRow> runs = LoadRuns(*store_);
  ASSERT_EQ(runs.size(), static_cast<size_t>(kRuns));
  for (int r = 0; r < kRuns; ++r) {
    const std::string run_id = absl::StrCat("run-", r);
    SCOPED_TRACE(run_id);
    EXPECT_EQ(runs[r].run_id, run_id);  // ordered by run_id
    EXPECT_EQ(runs[r].steps_stored, kChunks * kChunkSize);
    EXPECT_EQ(runs[r].last_step, kChunks * kChunkSize - 1);
    ExpectSameSteps(ReadSteps(*store_, run_id), want);
    std::vector<EventRow> events = ReadEvents(*store_, run_id);
    ASSERT_EQ(events.size(), 4u);
    for (size_t i = 0; i < events.size(); ++i) {
      EXPECT_EQ(events[i].id, i * 10);
      EXPECT_EQ(events[i].payload, run_id);
    }
  }
}

TEST_P(RunStoreTest, WritesBeforePutRunCreateTheRun) {
  store_->AppendSteps("late", MakeSteps(0, 4));
  store_->PutEvent(
      MakeEvent("evt-only", EventRow::Type::kAdvice, 1, 3, "payload"));
  ASSERT_TRUE(store_->Flush().ok());
  std::vector<RunRow> runs = LoadRuns(*store_);
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[0].run_id, "evt-only");
  EXPECT_FALSE(runs[0].has_steps);
  EXPECT_EQ(runs[0].steps_stored, 0);
  EXPECT_EQ(runs[1].run_id, "late");
  EXPECT_EQ(runs[1].name, "");
  EXPECT_TRUE(runs[1].has_steps);
  EXPECT_EQ(runs[1].last_step, 4);

  // The PutRun that comes later fills in the metadata; steps stay.
  const RunRow run = MakeRun("late");
  store_->PutRun(run);
  ASSERT_TRUE(store_->Flush().ok());
  runs = LoadRuns(*store_);
  ASSERT_EQ(runs.size(), 2u);
  ExpectSameMetadata(runs[1], run);
  EXPECT_EQ(runs[1].steps_stored, 5);
  ExpectSameSteps(ReadSteps(*store_, "late"), MakeSteps(0, 4));
}

TEST_P(RunStoreTest, PutRunReplacesMetadataAndIgnoresStepFields) {
  RunRow run = MakeRun("r");
  run.has_steps = true;  // read-only fields: ignored by PutRun
  run.last_step = 77;
  run.steps_stored = 78;
  store_->PutRun(run);
  run.state = 5;
  run.name = "renamed";
  run.updated_time += 30.0;
  store_->PutRun(run);
  ASSERT_TRUE(store_->Flush().ok());
  std::vector<RunRow> runs = LoadRuns(*store_);
  ASSERT_EQ(runs.size(), 1u);
  ExpectSameMetadata(runs[0], run);
  EXPECT_FALSE(runs[0].has_steps);
  EXPECT_EQ(runs[0].last_step, 0);
  EXPECT_EQ(runs[0].steps_stored, 0);
}

TEST_P(RunStoreTest, LoadRunReadsOneRowOrNothing) {
  store_->PutRun(MakeRun("a"));
  store_->PutRun(MakeRun("b"));
  store_->AppendSteps("b", MakeSteps(5, 14));
  ASSERT_TRUE(store_->Flush().ok());
  absl::StatusOr<std::optional<RunRow>> b = store_->LoadRun("b");
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_TRUE(b->has_value());
  ExpectSameMetadata(**b, MakeRun("b"));
  EXPECT_TRUE((*b)->has_steps);
  EXPECT_EQ((*b)->last_step, 14);
  EXPECT_EQ((*b)->steps_stored, 10);
  absl::StatusOr<std::optional<RunRow>> none = store_->LoadRun("c");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());
}

TEST_P(RunStoreTest, EmptyAppendWritesNothing) {
  store_->AppendSteps("r", {});
  ASSERT_TRUE(store_->Flush().ok());
  EXPECT_TRUE(LoadRuns(*store_).empty());
}

TEST_P(RunStoreTest, FlushReturnsOkAndEmptiesTheBacklog) {
  for (int64_t c = 0; c < 20; ++c) {
    store_->AppendSteps("r", MakeSteps(c * 50, c * 50 + 49));
  }
  store_->PutRun(MakeRun("r"));
  EXPECT_TRUE(store_->Flush().ok());
  const StoreStats stats = store_->Stats();
  EXPECT_EQ(stats.queued_ops, 0);
  EXPECT_EQ(stats.queued_steps, 0);
  EXPECT_EQ(stats.committed_steps, 1000);
  EXPECT_GE(stats.transactions, 1);
  EXPECT_EQ(stats.oldest_queued_age_s, 0.0);
  EXPECT_EQ(stats.last_error, "");
  // Nothing new: a second flush returns at once.
  EXPECT_TRUE(store_->Flush().ok());
}

TEST_P(RunStoreTest, NotifyWhenBacklogBelowRunsAtOnceWhenAlreadyBelow) {
  store_->AppendSteps("r", MakeSteps(0, 9));
  ASSERT_TRUE(store_->Flush().ok());
  const std::thread::id caller = std::this_thread::get_id();
  int calls = 0;
  std::thread::id ran_on;
  store_->NotifyWhenBacklogBelow(1, [&] {
    ++calls;
    ran_on = std::this_thread::get_id();
  });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(ran_on, caller);
}

// ---------------------------------------------------------------------------
// SQLite only.

class SqliteStoreTest : public ::testing::Test {
 protected:
  std::string DbPath() const { return dir_.path() + "/runs.db"; }

  TempDir dir_;
};

TEST_F(SqliteStoreTest, ReopenRestoresEverything) {
  const RunRow run_a = MakeRun("a");
  const RunRow run_b = MakeRun("b");
  std::vector<StepRow> steps_a = MakeSteps(0, 499);
  steps_a[100].loss = kNaN;
  steps_a[101].loss = kInf;
  steps_a[102].grad_norm = -kInf;
  const EventRow event =
      MakeEvent("a", EventRow::Type::kAdvice, 3, 200, "advice 3 acked");
  {
    std::unique_ptr<RunStore> store = OpenOrFail(DbPath());
    ASSERT_NE(store, nullptr);
    store->PutRun(run_a);
    store->PutRun(run_b);
    store->AppendSteps("a", steps_a);
    store->AppendSteps("b", MakeSteps(0, 9));
    store->PutEvent(event);
    // No Flush(): the destructor commits what is queued.
  }
  std::unique_ptr<RunStore> store = OpenOrFail(DbPath());
  ASSERT_NE(store, nullptr);
  std::vector<RunRow> runs = LoadRuns(*store);
  ASSERT_EQ(runs.size(), 2u);
  ExpectSameMetadata(runs[0], run_a);
  EXPECT_EQ(runs[0].steps_stored, 500);
  EXPECT_EQ(runs[0].last_step, 499);
  ExpectSameMetadata(runs[1], run_b);
  EXPECT_EQ(runs[1].last_step, 9);
  ExpectSameSteps(ReadSteps(*store, "a"), steps_a);
  ExpectSameSteps(ReadSteps(*store, "b"), MakeSteps(0, 9));
  std::vector<EventRow> events = ReadEvents(*store, "a");
  ASSERT_EQ(events.size(), 1u);
  ExpectSameEvent(events[0], event);

  // The trainer reconnects and resends from step 490: only new steps land,
  // in the run that was already there.
  store->AppendSteps("a", MakeSteps(490, 519));
  ASSERT_TRUE(store->Flush().ok());
  EXPECT_EQ(store->Stats().committed_steps, 20);
  runs = LoadRuns(*store);
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[0].steps_stored, 520);
  EXPECT_EQ(runs[0].last_step, 519);
}

TEST_F(SqliteStoreTest, DatabaseIsIntactAndUsesTheDocumentedEncoding) {
  {
    std::unique_ptr<RunStore> store = OpenOrFail(DbPath());
    ASSERT_NE(store, nullptr);
    store->PutRun(MakeRun("r"));
    store->AppendSteps("r", {{.step = 0,
                              .lr = 0.1,
                              .loss = kNaN,
                              .val_loss = std::nullopt,
                              .grad_norm = kNaN,
                              .wall_time = 5.0},
                             {.step = 1,
                              .lr = 0.1,
                              .loss = kInf,
                              .val_loss = 2.0,
                              .grad_norm = std::nullopt,
                              .wall_time = 6.0}});
    store->PutEvent(MakeEvent("r", EventRow::Type::kDiagnosis, 1, 0, "d"));
    ASSERT_TRUE(store->Flush().ok());

    // Checked while the store is open too: WAL lets this reader in.
    RawDb db(DbPath());
    EXPECT_EQ(db.Query("PRAGMA integrity_check"),
              std::vector<std::vector<std::string>>{{"ok"}});
  }
  RawDb db(DbPath());
  EXPECT_EQ(db.Query("PRAGMA integrity_check"),
            std::vector<std::vector<std::string>>{{"ok"}});
  EXPECT_EQ(db.Query("PRAGMA foreign_key_check"),
            std::vector<std::vector<std::string>>{});
  EXPECT_EQ(db.Query("PRAGMA user_version"),
            std::vector<std::vector<std::string>>{{"2"}});
  EXPECT_EQ(db.Query("PRAGMA journal_mode"),
            std::vector<std::vector<std::string>>{{"wal"}});
  // One chunk: a version byte, then per step a varint step delta, a flags
  // byte and 8 bytes per present double. Step 0: lr, loss, grad_norm (NaN
  // is a value), wall_time; step 1: lr, loss, val_loss, wall_time.
  EXPECT_EQ(db.Query("SELECT first_step, last_step, n_steps, length(data), "
                     "hex(substr(data, 1, 3)), hex(substr(data, 36, 2)) "
                     "FROM step_chunks"),
            (std::vector<std::vector<std::string>>{
                {"0", "1", "2", "69", "010002", "0201"}}));
  EXPECT_EQ(db.Query("SELECT run_id, step_count, last_step FROM runs"),
            (std::vector<std::vector<std::string>>{{"r", "2", "1"}}));
}

// A database written by the version 1 schema (a row per step, NaN as NULL
// with a nan_mask bit) is converted on open; everything reads back.
TEST_F(SqliteStoreTest, OpenConvertsAVersion1Database) {
  {
    RawDb db(DbPath(), SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    db.Exec(R"sql(
      PRAGMA journal_mode=WAL;
      CREATE TABLE runs (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL DEFAULT '', project TEXT NOT NULL DEFAULT '',
        tags_json TEXT NOT NULL DEFAULT '', config BLOB NOT NULL DEFAULT x'',
        mode INTEGER NOT NULL DEFAULT 0, state INTEGER NOT NULL DEFAULT 0,
        created_time REAL DEFAULT 0, updated_time REAL DEFAULT 0);
      CREATE TABLE steps (run INTEGER NOT NULL REFERENCES runs(id)
        ON DELETE CASCADE, step INTEGER NOT NULL,
        lr, loss, val_loss, grad_norm, wall_time,
        nan_mask INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run, step))
        WITHOUT ROWID;
      CREATE TABLE events (run INTEGER NOT NULL REFERENCES runs(id)
        ON DELETE CASCADE, type INTEGER NOT NULL, id INTEGER NOT NULL,
        step INTEGER NOT NULL, payload BLOB NOT NULL,
        PRIMARY KEY (run, type, id)) WITHOUT ROWID;
      INSERT INTO runs (id, run_id, name, state) VALUES
        (1, 'a', 'run a', 2), (2, 'b', 'run b', 3), (3, 'empty', '', 1);
      INSERT INTO steps VALUES
        (1, 0, 0.1, 2.5, NULL, 1.5, 100.0, 0),
        (1, 1, 0.1, NULL, 2.0, NULL, 101.0, 2),
        (1, 2, 0.1, 1e308, NULL, NULL, 102.0, 8),
        (2, 7, 0.2, 1.25, 1.5, 0.5, 200.0, 0);
      INSERT INTO events VALUES (1, 2, 1, 1, x'0102');
      PRAGMA user_version = 1;
    )sql");
  }
  {
    std::unique_ptr<RunStore> store = OpenOrFail(DbPath());
    ASSERT_NE(store, nullptr);
    std::vector<RunRow> runs = LoadRuns(*store);
    ASSERT_EQ(runs.size(), 3u);
    EXPECT_EQ(runs[0].name, "run a");
    EXPECT_EQ(runs[0].steps_stored, 3);
    EXPECT_EQ(runs[0].last_step, 2);
    EXPECT_EQ(runs[1].steps_stored, 1);
    EXPECT_EQ(runs[1].last_step, 7);
    EXPECT_FALSE(runs[2].has_steps);
    EXPECT_EQ(runs[2].steps_stored, 0);
    ExpectSameSteps(ReadSteps(*store, "a"),
                    {{.step = 0, .lr = 0.1, .loss = 2.5, .val_loss = std::nullopt,
                      .grad_norm = 1.5, .wall_time = 100.0},
                     {.step = 1, .lr = 0.1, .loss = kNaN, .val_loss = 2.0,
                      .grad_norm = std::nullopt, .wall_time = 101.0},
                     {.step = 2, .lr = 0.1, .loss = 1e308,
                      .val_loss = std::nullopt, .grad_norm = kNaN,
                      .wall_time = 102.0}});
    EXPECT_THAT(StepNumbers(ReadSteps(*store, "b")), ElementsAre(7));
    ASSERT_EQ(ReadEvents(*store, "a").size(), 1u);
    // New steps follow the converted ones; a resend is still ignored.
    store->AppendSteps("a", MakeSteps(1, 4));
    ASSERT_TRUE(store->Flush().ok());
    EXPECT_THAT(StepNumbers(ReadSteps(*store, "a")), ElementsAre(0, 1, 2, 3, 4));
  }
  RawDb db(DbPath());
  EXPECT_EQ(db.Query("PRAGMA user_version"),
            std::vector<std::vector<std::string>>{{"2"}});
  EXPECT_EQ(db.Query("SELECT count(*) FROM sqlite_schema WHERE name = 'steps'"),
            std::vector<std::vector<std::string>>{{"0"}});
  EXPECT_EQ(db.Query("PRAGMA integrity_check"),
            std::vector<std::vector<std::string>>{{"ok"}});
}

// A chunk damaged on disk is a DataLoss naming the database and the run;
// the steps before the damage were delivered, the store stays usable.
TEST_F(SqliteStoreTest, DamagedChunkReadsAsDataLoss) {
  std::unique_ptr<RunStore> store = OpenOrFail(DbPath());
  ASSERT_NE(store, nullptr);
  store->AppendSteps("r", MakeSteps(0, 9));
  store->AppendSteps("other", MakeSteps(0, 9));
  ASSERT_TRUE(store->Flush().ok());
  {
    RawDb db(DbPath());
    db.Exec("UPDATE step_chunks SET data = substr(data, 1, 100) "
            "WHERE run = (SELECT id FROM runs WHERE run_id = 'r')");
  }
  std::vector<int64_t> seen;
  absl::Status s = store->ReadSteps("r", 0, kAllSteps, [&](const StepRow& row) {
    seen.push_back(row.step);
    return true;
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr(DbPath()));
  EXPECT_THAT(s.message(), HasSubstr("run r"));
  EXPECT_THAT(seen, ElementsAre(0, 1));
  EXPECT_EQ(ReadSteps(*store, "other").size(), 10u);
}

TEST_F(SqliteStoreTest, OpenInMissingDirectoryFailsNamingThePath) {
  const std::string path = dir_.path() + "/no/such/dir/runs.db";
  absl::StatusOr<std::unique_ptr<RunStore>> store = OpenSqliteStore(path);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(store.status().message(), HasSubstr(path));
  EXPECT_THAT(store.status().message(), HasSubstr("unable to open"));
}

TEST_F(SqliteStoreTest, OpenDirectoryFails) {
  absl::StatusOr<std::unique_ptr<RunStore>> store =
      OpenSqliteStore(dir_.path());
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr(dir_.path()));
}

TEST_F(SqliteStoreTest, OpenFileThatIsNotADatabaseFails) {
  {
    std::ofstream out(DbPath());
    for (int i = 0; i < 200; ++i) out << "step,lr,loss\n" << i << ",0.1,2.5\n";
  }
  absl::StatusOr<std::unique_ptr<RunStore>> store = OpenSqliteStore(DbPath());
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(store.status().message(), HasSubstr(DbPath()));
  EXPECT_THAT(store.status().message(), HasSubstr("not a database"));
  // The file is left alone.
  EXPECT_GT(std::filesystem::file_size(DbPath()), 2000u);
}

TEST_F(SqliteStoreTest, OpenRefusesANewerSchemaVersion) {
  {
    RawDb db(DbPath(), SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    db.Exec("CREATE TABLE future (x); PRAGMA user_version = 3;");
  }
  absl::StatusOr<std::unique_ptr<RunStore>> store = OpenSqliteStore(DbPath());
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(store.status().message(), HasSubstr(DbPath()));
  EXPECT_THAT(store.status().message(), HasSubstr("schema version 3"));
}

TEST_F(SqliteStoreTest, StatsCountTransactionsAndCommittedSteps) {
  SqliteOptions options;
  options.max_ops_per_transaction = 1;  // one write per transaction
  std::unique_ptr<RunStore> store = OpenOrFail(DbPath(), options);
  ASSERT_NE(store, nullptr);
  store->PutRun(MakeRun("r"));
  store->AppendSteps("r", MakeSteps(0, 99));  // one op, however many steps
  store->AppendSteps("r", MakeSteps(90, 109));
  store->PutEvent(MakeEvent("r", EventRow::Type::kAdvice, 1, 5, "p"));
  ASSERT_TRUE(store->Flush().ok());
  StoreStats stats = store->Stats();
  EXPECT_EQ(stats.transactions, 4);
  EXPECT_EQ(stats.committed_steps, 110);  // the 10 resent are not counted
  EXPECT_EQ(stats.queued_ops, 0);
  EXPECT_EQ(stats.queued_steps, 0);
  EXPECT_EQ(stats.oldest_queued_age_s, 0.0);
  EXPECT_EQ(stats.last_error, "");
}

// Another connection holds the write lock, so nothing can commit: writes
// queue up, the backlog shows in Stats() and holds back the resume callback;
// once the lock goes, the whole backlog commits in at most two transactions
// (the one the writer was waiting to begin, and everything queued behind).
TEST_F(SqliteStoreTest, BacklogQueuesWhileLockedThenCommitsInOneBatch) {
  SqliteOptions options;
  options.busy_timeout_ms = 600000;  // the writer waits for the lock
  std::unique_ptr<RunStore> store = OpenOrFail(DbPath(), options);
  ASSERT_NE(store, nullptr);
  auto blocker = std::make_unique<RawDb>(DbPath());
  blocker->Exec("BEGIN IMMEDIATE");

  const auto start = std::chrono::steady_clock::now();
  constexpr int64_t kOps = 200;
  for (int64_t i = 0; i < kOps; ++i) {
    store->AppendSteps("r", MakeSteps(i * 10, i * 10 + 9));
  }
  StoreStats stats = store->Stats();
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  EXPECT_EQ(stats.queued_ops, kOps);
  EXPECT_EQ(stats.queued_steps, kOps * 10);
  EXPECT_EQ(stats.committed_steps, 0);
  EXPECT_EQ(stats.transactions, 0);
  EXPECT_GT(stats.oldest_queued_age_s, 0.0);
  EXPECT_LE(stats.oldest_queued_age_s, elapsed);

  absl::Notification resumed;
  store->NotifyWhenBacklogBelow(500, [&] { resumed.Notify(); });
  EXPECT_FALSE(resumed.HasBeenNotified());  // 2000 steps queued

  blocker->Exec("COMMIT");
  blocker.reset();
  ASSERT_TRUE(store->Flush().ok());
  resumed.WaitForNotification();
  stats = store->Stats();
  EXPECT_EQ(stats.queued_ops, 0);
  EXPECT_EQ(stats.queued_steps, 0);
  EXPECT_EQ(stats.committed_steps, kOps * 10);
  EXPECT_GE(stats.transactions, 1);
  EXPECT_LE(stats.transactions, 2);
  EXPECT_EQ(ReadSteps(*store, "r").size(), static_cast<size_t>(kOps * 10));
}

// A write that fails for a reason that may pass (here: another connection
// holds the database locked) is rolled back, reported, and retried until
// it commits: nothing accepted is lost, and its callback fires only then.
TEST_F(SqliteStoreTest, FailingWriteIsReportedAndRetriedUntilItCommits) {
  SqliteOptions options;
  options.busy_timeout_ms = 0;  // fail at once on a locked database
  options.retry_initial_backoff_s = 0.001;
  options.retry_max_backoff_s = 0.01;
  std::unique_ptr<RunStore> store = OpenOrFail(DbPath(), options);
  ASSERT_NE(store, nullptr);
  store->AppendSteps("r", MakeSteps(0, 4));
  ASSERT_TRUE(store->Flush().ok());

  auto blocker = std::make_unique<RawDb>(DbPath());
  blocker->Exec("BEGIN IMMEDIATE");
  absl::Notification durable;
  absl::Status durable_status = absl::UnknownError("not called");
  store->AppendSteps("r", MakeSteps(5, 9), [&](const absl::Status& s) {
    durable_status = s;
    durable.Notify();
  });
  store->PutEvent(MakeEvent("r", EventRow::Type::kAdvice, 1, 7, "kept"));
  // Flush does not wait for a failing write: it says why at once.
  const absl::Status error = store->Flush();
  EXPECT_EQ(error.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(error.message(), HasSubstr(DbPath()));
  EXPECT_THAT(error.message(), HasSubstr("locked"));
  StoreStats stats = store->Stats();
  EXPECT_THAT(stats.last_error, HasSubstr(DbPath()));
  EXPECT_EQ(stats.queued_steps, 5);  // kept, not dropped
  EXPECT_EQ(stats.committed_steps, 5);
  EXPECT_FALSE(durable.HasBeenNotified());
  // Reads still work while another connection writes.
  EXPECT_THAT(StepNumbers(ReadSteps(*store, "r")), ElementsAre(0, 1, 2, 3, 4));

  blocker->Exec("ROLLBACK");
  blocker.reset();
  ASSERT_TRUE(durable.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_TRUE(durable_status.ok()) << durable_status;
  store->AppendSteps("r", MakeSteps(10, 14));
  // Flush reports the first error since open, even after later successes.
  EXPECT_EQ(store->Flush().code(), absl::StatusCode::kUnavailable);
  stats = store->Stats();
  EXPECT_EQ(stats.committed_steps, 15);
  EXPECT_EQ(stats.queued_ops, 0);
  EXPECT_EQ(ReadSteps(*store, "r").size(), 15u);
  ASSERT_EQ(ReadEvents(*store, "r").size(), 1u);

  store.reset();
  RawDb db(DbPath());
  EXPECT_EQ(db.Query("PRAGMA integrity_check"),
            std::vector<std::vector<std::string>>{{"ok"}});
}

// A full disk (here: the file capped at 40 pages of 4 KiB) gives a clear
// error, keeps the failing write for a retry, and harms nothing committed.
TEST_F(SqliteStoreTest, FullDiskIsReportedAndCommittedDataStaysIntact) {
  SqliteOptions options;
  options.max_page_count = 40;
  options.retry_initial_backoff_s = 0.001;
  options.retry_max_backoff_s = 0.01;
  std::unique_ptr<RunStore> store = OpenOrFail(DbPath(), options);
  ASSERT_NE(store, nullptr);
  store->AppendSteps("r", MakeSteps(0, 99));
  ASSERT_TRUE(store->Flush().ok());
  // About 40 bytes a step: 20,000 steps need far more than 40 pages.
  store->AppendSteps("r", MakeSteps(100, 20099));
  const absl::Status full = store->Flush();
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_THAT(full.message(), HasSubstr(DbPath()));
  EXPECT_THAT(full.message(), HasSubstr("full"));
  EXPECT_EQ(store->Stats().queued_steps, 20000);  // kept for the retry
  EXPECT_TRUE(store->Stats().failing);
  EXPECT_EQ(ReadSteps(*store, "r").size(), 100u);
  store.reset();  // gives the write up at close

  RawDb db(DbPath());
  EXPECT_EQ(db.Query("PRAGMA integrity_check"),
            std::vector<std::vector<std::string>>{{"ok"}});
  std::unique_ptr<RunStore> reopened = OpenOrFail(DbPath());
  ASSERT_NE(reopened, nullptr);
  ExpectSameSteps(ReadSteps(*reopened, "r"), MakeSteps(0, 99));
}

// Still failing when the store closes: tried once more, then given up,
// and the callback says so.
TEST_F(SqliteStoreTest, WriteStillFailingAtCloseIsGivenUpAndReported) {
  SqliteOptions options;
  options.busy_timeout_ms = 0;
  options.retry_initial_backoff_s = 0.001;
  options.retry_max_backoff_s = 0.01;
  std::unique_ptr<RunStore> store = OpenOrFail(DbPath(), options);
  ASSERT_NE(store, nullptr);
  RawDb blocker(DbPath());
  blocker.Exec("BEGIN IMMEDIATE");
  absl::Status durable_status = absl::UnknownError("not called");
  store->AppendSteps("r", MakeSteps(0, 4),
                     [&](const absl::Status& s) { durable_status = s; });
  EXPECT_EQ(store->Flush().code(), absl::StatusCode::kUnavailable);
  store.reset();
  EXPECT_EQ(durable_status.code(), absl::StatusCode::kUnavailable);
  blocker.Exec("ROLLBACK");
}

TEST_F(SqliteStoreTest, SynchronousFullStoresAndReopens) {
  SqliteOptions options;
  options.synchronous_full = true;
  options.max_ops_per_transaction = 7;
  {
    std::unique_ptr<RunStore> store = OpenOrFail(DbPath(), options);
    ASSERT_NE(store, nullptr);
    for (int64_t i = 0; i < 30; ++i) store->AppendSteps("r", {MakeStep(i)});
    ASSERT_TRUE(store->Flush().ok());
    EXPECT_GE(store->Stats().transactions, 5);  // at most 7 ops in each
  }
  std::unique_ptr<RunStore> store = OpenOrFail(DbPath(), options);
  ASSERT_NE(store, nullptr);
  ExpectSameSteps(ReadSteps(*store, "r"), MakeSteps(0, 29));
}


// ---------------------------------------------------------------------------
// PostgreSQL only: reopening, lost connections, several daemons sharing one
// database, and the run leases.

class PostgresStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!testing_pg::Available()) {
      GTEST_SKIP() << "no PostgreSQL test server (run under ctest)";
    }
    db_ = std::make_unique<testing_pg::TestDatabase>();
    ASSERT_FALSE(db_->conninfo().empty());
  }

  std::unique_ptr<RunStore> Open(const PostgresOptions& options = {}) {
    absl::StatusOr<std::unique_ptr<RunStore>> store =
        OpenPostgresStore(db_->conninfo(), options);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? *std::move(store) : nullptr;
  }

  // Runs `sql` on the test database.
  void Exec(const std::string& sql) {
    testing_pg::AdminExec(db_->conninfo(), sql);
  }

  std::unique_ptr<testing_pg::TestDatabase> db_;
};

TEST_F(PostgresStoreTest, ReopenRestoresEverything) {
  const RunRow run_a = MakeRun("a");
  std::vector<StepRow> steps_a = MakeSteps(0, 9999);  // three chunks
  steps_a[100].loss = kNaN;
  steps_a[101].loss = kInf;
  steps_a[102].grad_norm = -kInf;
  const EventRow event =
      MakeEvent("a", EventRow::Type::kAdvice, ~uint64_t{0}, 200, "advice");
  {
    std::unique_ptr<RunStore> store = Open();
    ASSERT_NE(store, nullptr);
    store->PutRun(run_a);
    store->AppendSteps("a", steps_a);
    store->PutEvent(event);
    // No Flush(): the destructor commits what is queued.
  }
  std::unique_ptr<RunStore> store = Open();
  ASSERT_NE(store, nullptr);
  std::vector<RunRow> runs = LoadRuns(*store);
  ASSERT_EQ(runs.size(), 1u);
  ExpectSameMetadata(runs[0], run_a);
  EXPECT_EQ(runs[0].steps_stored, 10000);
  EXPECT_EQ(runs[0].last_step, 9999);
  ExpectSameSteps(ReadSteps(*store, "a"), steps_a);
  ExpectSameSteps(ReadSteps(*store, "a", 4000, 4200), MakeSteps(4000, 4200));
  std::vector<EventRow> events = ReadEvents(*store, "a");
  ASSERT_EQ(events.size(), 1u);
  ExpectSameEvent(events[0], event);
}

TEST_F(PostgresStoreTest, OpenRefusesANewerSchemaVersion) {
  { ASSERT_NE(Open(), nullptr); }
  Exec("UPDATE lossguard_schema SET version = 99");
  absl::StatusOr<std::unique_ptr<RunStore>> store =
      OpenPostgresStore(db_->conninfo());
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(store.status().message(), HasSubstr("schema version 99"));
}

TEST_F(PostgresStoreTest, UnreachableServerFailsNamingItWithoutPassword) {
  absl::StatusOr<std::unique_ptr<RunStore>> store = OpenPostgresStore(
      "postgresql://someone:secret@127.0.0.1:1/nowhere?connect_timeout=5");
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("127.0.0.1:1/nowhere"));
  EXPECT_THAT(store.status().message(),
              ::testing::Not(HasSubstr("secret")));
}

TEST_F(PostgresStoreTest, LostConnectionIsRetriedAndNothingIsLost) {
  PostgresOptions options;
  options.retry_initial_backoff_s = 0.01;
  options.retry_max_backoff_s = 0.05;
  std::unique_ptr<RunStore> store = Open(options);
  ASSERT_NE(store, nullptr);
  store->PutRun(MakeRun("r"));
  store->AppendSteps("r", MakeSteps(0, 99));
  ASSERT_TRUE(store->Flush().ok());
  // The server drops every connection of the store (as a restart or a
  // failover would); the next writes reconnect.
  Exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
       "WHERE datname = current_database() AND pid <> pg_backend_pid()");
  for (int64_t c = 1; c < 10; ++c) {
    store->AppendSteps("r", MakeSteps(c * 100, c * 100 + 99));
  }
  absl::Status s = store->Flush();
  if (!s.ok()) {  // the first attempt may fail and be retried
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
    while (store->Stats().queued_ops > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  ExpectSameSteps(ReadSteps(*store, "r"), MakeSteps(0, 999));
}

TEST_F(PostgresStoreTest, TwoDaemonsWritingOneRunNeverOverlap) {
  // A daemon that lost its lease without noticing keeps writing the run
  // that another daemon took over: whatever interleaving, the stored steps
  // are each step once, in order.
  std::unique_ptr<RunStore> a = Open();
  std::unique_ptr<RunStore> b = Open();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  a->AppendSteps("r", MakeSteps(0, 99));
  ASSERT_TRUE(a->Flush().ok());
  b->AppendSteps("r", MakeSteps(50, 199));  // b resumes from what it read
  ASSERT_TRUE(b->Flush().ok());
  // a's cache says 99; the database says 199.
  a->AppendSteps("r", MakeSteps(100, 249));
  absl::Status s = a->Flush();
  if (!s.ok()) {
    EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
    EXPECT_THAT(s.message(), HasSubstr("another daemon"));
    while (a->Stats().queued_ops > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  EXPECT_EQ(StepNumbers(ReadSteps(*b, "r")), StepNumbers(MakeSteps(0, 249)));
  std::vector<RunRow> runs = LoadRuns(*b);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].steps_stored, 250);
  EXPECT_EQ(runs[0].last_step, 249);
}

TEST_F(PostgresStoreTest, LeasesAreExclusiveUntilTheyExpire) {
  std::unique_ptr<RunStore> a = Open();
  std::unique_ptr<RunStore> b = Open();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  LeaseTable* la = a->leases();
  LeaseTable* lb = b->leases();
  ASSERT_NE(la, nullptr);
  ASSERT_NE(lb, nullptr);

  absl::StatusOr<std::optional<LeaseHolder>> none = la->Holder("r");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());

  absl::StatusOr<LeaseHolder> got = la->Acquire("r", "da", "a:1", 30);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->owner, "da");
  EXPECT_GT(got->expires_in_s, 25);
  // Another daemon is told who holds it and where.
  got = lb->Acquire("r", "db", "b:1", 30);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->owner, "da");
  EXPECT_EQ(got->address, "a:1");
  // The holder renews; the other cannot.
  absl::StatusOr<std::vector<std::string>> lost =
      la->Renew({"r", "never-held"}, "da", 30);
  ASSERT_TRUE(lost.ok()) << lost.status();
  EXPECT_THAT(*lost, ElementsAre("never-held"));
  lost = lb->Renew({"r"}, "db", 30);
  ASSERT_TRUE(lost.ok());
  EXPECT_THAT(*lost, ElementsAre("r"));

  // Expired (as if "da" died 30 s ago): "db" takes it over, and "da"
  // learns at its next renewal that it lost it.
  Exec("UPDATE run_leases SET expires_at = now() - interval '1 second'");
  got = lb->Acquire("r", "db", "b:1", 30);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->owner, "db");
  lost = la->Renew({"r"}, "da", 30);
  ASSERT_TRUE(lost.ok());
  EXPECT_THAT(*lost, ElementsAre("r"));

  absl::StatusOr<std::vector<std::string>> live = la->LiveRuns();
  ASSERT_TRUE(live.ok()) << live.status();
  EXPECT_THAT(*live, ElementsAre("r"));
  ASSERT_TRUE(la->Acquire("s", "da", "a:1", 30).ok());
  Exec("UPDATE run_leases SET expires_at = now() - interval '1 second' "
       "WHERE run_id = 's'");
  live = la->LiveRuns();
  ASSERT_TRUE(live.ok());
  EXPECT_THAT(*live, ElementsAre("r"));  // "s" expired

  // Released by its holder, it is free for anyone at once; a release by
  // another daemon does nothing.
  ASSERT_TRUE(la->Release("r", "da").ok());
  EXPECT_EQ((*la->Holder("r"))->owner, "db");
  ASSERT_TRUE(lb->Release("r", "db").ok());
  got = la->Acquire("r", "da", "a:1", 30);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->owner, "da");
}

TEST_F(PostgresStoreTest, CopyStoreMovesASqliteDatabaseAndCanBeRunAgain) {
  TempDir dir;
  std::unique_ptr<RunStore> sqlite = OpenOrFail(dir.path() + "/runs.db");
  ASSERT_NE(sqlite, nullptr);
  std::vector<StepRow> steps_a = MakeSteps(0, 9999);
  steps_a[7].loss = kNaN;
  sqlite->PutRun(MakeRun("a"));
  sqlite->AppendSteps("a", steps_a);
  sqlite->PutEvent(MakeEvent("a", EventRow::Type::kDiagnosis, 1, 40, "d"));
  sqlite->PutEvent(MakeEvent("a", EventRow::Type::kAdvice, 1, 41, "x"));
  sqlite->PutRun(MakeRun("b"));  // no steps
  ASSERT_TRUE(sqlite->Flush().ok());

  std::unique_ptr<RunStore> pg = Open();
  ASSERT_NE(pg, nullptr);
  int progress_calls = 0;
  absl::StatusOr<CopyStats> copied =
      CopyStore(*sqlite, *pg, [&](const RunRow&, const CopyStats&) {
        ++progress_calls;
      });
  ASSERT_TRUE(copied.ok()) << copied.status();
  EXPECT_EQ(copied->runs, 2);
  EXPECT_EQ(copied->steps, 10000);
  EXPECT_EQ(copied->events, 2);
  EXPECT_EQ(progress_calls, 2);
  std::vector<RunRow> runs = LoadRuns(*pg);
  ASSERT_EQ(runs.size(), 2u);
  ExpectSameMetadata(runs[0], MakeRun("a"));
  EXPECT_EQ(runs[0].steps_stored, 10000);
  ExpectSameMetadata(runs[1], MakeRun("b"));
  EXPECT_FALSE(runs[1].has_steps);
  ExpectSameSteps(ReadSteps(*pg, "a"), steps_a);
  std::vector<EventRow> events = ReadEvents(*pg, "a");
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[1].payload, "x");

  // Again (an interrupted copy rerun): nothing is doubled.
  ASSERT_TRUE(CopyStore(*sqlite, *pg).ok());
  runs = LoadRuns(*pg);
  EXPECT_EQ(runs[0].steps_stored, 10000);
  EXPECT_EQ(ReadSteps(*pg, "a").size(), 10000u);
  EXPECT_EQ(ReadEvents(*pg, "a").size(), 2u);
}

TEST_F(PostgresStoreTest, SqliteAndMemoryStoresHaveNoLeases) {
  TempDir dir;
  std::unique_ptr<RunStore> sqlite = OpenOrFail(dir.path() + "/runs.db");
  ASSERT_NE(sqlite, nullptr);
  EXPECT_EQ(sqlite->leases(), nullptr);
  EXPECT_EQ(NewMemoryStore()->leases(), nullptr);
}

}  // namespace
}  // namespace lossguard::storage
