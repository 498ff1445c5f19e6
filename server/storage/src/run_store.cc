#include "lossguard/storage/run_store.h"

namespace lossguard::storage {

bool IsPostgresUri(const std::string& db) {
  return db.starts_with("postgresql://") || db.starts_with("postgres://");
}

absl::StatusOr<std::optional<RunRow>> RunStore::LoadRun(
    const std::string& run_id) {
  absl::StatusOr<std::vector<RunRow>> runs = LoadRuns();
  if (!runs.ok()) return runs.status();
  for (RunRow& row : *runs) {
    if (row.run_id == run_id) return std::optional<RunRow>(std::move(row));
  }
  return std::optional<RunRow>();
}

}  // namespace lossguard::storage
