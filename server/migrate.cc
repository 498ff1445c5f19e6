// lossguard-migrate: copies every run (metadata, steps, diagnoses, advice)
// from one store to another, e.g. a SQLite file to PostgreSQL when a team
// moves to several daemons. Stop the daemons using the source first; the
// target may be in use (runs it already holds keep their steps). Running it
// again after an interruption copies what is missing.
//
//   lossguard-migrate --from ./lossguard.db
//                     --to postgresql://lossguard@db:5432/lossguard

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "lossguard/storage/run_store.h"

ABSL_FLAG(std::string, from, "", "the source: a SQLite file or postgresql://...");
ABSL_FLAG(std::string, to, "", "the target: a SQLite file or postgresql://...");

namespace {

absl::StatusOr<std::unique_ptr<lossguard::storage::RunStore>> Open(
    const std::string& db, bool create) {
  if (lossguard::storage::IsPostgresUri(db)) {
    return lossguard::storage::OpenPostgresStore(db);
  }
  if (!create && !std::filesystem::exists(db)) {
    return absl::NotFoundError(db + ": no such file");
  }
  return lossguard::storage::OpenSqliteStore(db);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "lossguard-migrate --from ./lossguard.db --to postgresql://user@host/db");
  absl::ParseCommandLine(argc, argv);
  const std::string from = absl::GetFlag(FLAGS_from);
  const std::string to = absl::GetFlag(FLAGS_to);
  if (from.empty() || to.empty() || from == to) {
    std::fprintf(stderr, "lossguard-migrate: give --from and --to (different)\n");
    return 2;
  }
  auto source = Open(from, /*create=*/false);
  if (!source.ok()) {
    std::fprintf(stderr, "lossguard-migrate: %s\n",
                 std::string(source.status().message()).c_str());
    return 1;
  }
  auto target = Open(to, /*create=*/true);
  if (!target.ok()) {
    std::fprintf(stderr, "lossguard-migrate: %s\n",
                 std::string(target.status().message()).c_str());
    return 1;
  }
  // Progress on a terminal only.
  const bool tty = isatty(STDERR_FILENO) != 0;
  absl::StatusOr<lossguard::storage::CopyStats> copied = lossguard::storage::CopyStore(
      **source, **target,
      [tty](const lossguard::storage::RunRow& run, const lossguard::storage::CopyStats& s) {
        if (!tty) return;
        std::fprintf(stderr, "\r%lld runs, %lld steps, %lld events (%s)       ",
                     static_cast<long long>(s.runs), static_cast<long long>(s.steps),
                     static_cast<long long>(s.events), run.run_id.c_str());
      });
  if (tty) std::fprintf(stderr, "\n");
  if (!copied.ok()) {
    std::fprintf(stderr, "lossguard-migrate: %s\n",
                 std::string(copied.status().message()).c_str());
    return 1;
  }
  std::printf("copied %lld runs, %lld steps, %lld events\n",
              static_cast<long long>(copied->runs), static_cast<long long>(copied->steps),
              static_cast<long long>(copied->events));
  return 0;
}
