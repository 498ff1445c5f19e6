#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "lossguard/storage/run_store.h"

namespace lossguard::storage {
namespace {

// Steps handed to the target per AppendSteps.
constexpr size_t kBatchSteps = 4096;

}  // namespace

absl::StatusOr<CopyStats> CopyStore(
    RunStore& from, RunStore& to,
    const std::function<void(const RunRow&, const CopyStats&)>& progress) {
  absl::StatusOr<std::vector<RunRow>> runs = from.LoadRuns();
  if (!runs.ok()) return runs.status();
  CopyStats stats;
  for (const RunRow& run : *runs) {
    to.PutRun(run);
    std::vector<StepRow> batch;
    batch.reserve(kBatchSteps);
    absl::Status s = from.ReadSteps(
        run.run_id, INT64_MIN, INT64_MAX, [&](const StepRow& row) {
          batch.push_back(row);
          if (batch.size() == kBatchSteps) {
            stats.steps += static_cast<int64_t>(batch.size());
            to.AppendSteps(run.run_id, std::move(batch));
            batch = {};
            batch.reserve(kBatchSteps);
          }
          return true;
        });
    if (!s.ok()) return s;
    stats.steps += static_cast<int64_t>(batch.size());
    if (!batch.empty()) to.AppendSteps(run.run_id, std::move(batch));
    absl::StatusOr<std::vector<EventRow>> events = from.ReadEvents(run.run_id);
    if (!events.ok()) return events.status();
    for (const EventRow& e : *events) to.PutEvent(e);
    stats.events += static_cast<int64_t>(events->size());
    ++stats.runs;
    // A run at a time reaches the target before the next is read, so the
    // target's backlog (and this process's memory) stays one run's worth.
    s = to.Flush();
    if (!s.ok()) return s;
    if (progress) progress(run, stats);
  }
  return stats;
}

}  // namespace lossguard::storage
