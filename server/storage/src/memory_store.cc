// The in-memory RunStore: every write applies at once under one mutex, with
// the SQLite store's semantics (steps kept above the last stored one,
// events upserted by (type, id), a write for an unknown run creates it,
// reads in order).

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "lossguard/storage/run_store.h"

namespace lossguard::storage {
namespace {

// Steps handed to a ReadSteps callback per lock: the callback runs without
// the lock held, so it may call the store (even write to it).
constexpr size_t kReadChunk = 1024;

// Thread-safe: one mutex guards all state; callbacks run outside it.
class MemoryStore final : public RunStore {
 public:
  MemoryStore() = default;
  MemoryStore(const MemoryStore&) = delete;
  MemoryStore& operator=(const MemoryStore&) = delete;

  void PutRun(const RunRow& run) override {
    absl::MutexLock lock(&mu_);
    RunData& data = FindOrCreate(run.run_id);
    data.row = run;
    data.row.has_steps = false;
    data.row.last_step = 0;
    data.row.steps_stored = 0;
    ++transactions_;
  }

  using RunStore::AppendSteps;
  void AppendSteps(const std::string& run_id, std::vector<StepRow> steps,
                   CommitCallback on_commit) override {
    if (!steps.empty()) {
      absl::MutexLock lock(&mu_);
      RunData& data = FindOrCreate(run_id);
      // Only steps above the last stored one, as the SQLite store keeps
      // them: a resend duplicates nothing.
      for (StepRow& step : steps) {
        if (!data.steps.empty() && step.step <= data.steps.rbegin()->first) {
          continue;
        }
        const int64_t key = step.step;
        data.steps.emplace_hint(data.steps.end(), key, std::move(step));
        ++committed_steps_;
      }
      ++transactions_;
    }
    // Applied at once: as durable as this store gets.
    if (on_commit) on_commit(absl::OkStatus());
  }

  void PutEvent(const EventRow& event) override {
    absl::MutexLock lock(&mu_);
    RunData& data = FindOrCreate(event.run_id);
    data.events.insert_or_assign(
        std::make_pair(static_cast<int>(event.type), event.id), event);
    ++transactions_;
  }

  absl::Status Flush() override { return absl::OkStatus(); }

  void NotifyWhenBacklogBelow(int64_t /*below_steps*/,
                              std::function<void()> resume) override {
    // Nothing is ever queued.
    resume();
  }

  StoreStats Stats() const override {
    absl::MutexLock lock(&mu_);
    StoreStats stats;
    stats.committed_steps = committed_steps_;
    stats.transactions = transactions_;
    return stats;
  }

  absl::StatusOr<std::vector<RunRow>> LoadRuns() override {
    absl::MutexLock lock(&mu_);
    std::vector<RunRow> runs;
    runs.reserve(runs_.size());
    for (const auto& [run_id, data] : runs_) {
      RunRow row = data.row;
      row.has_steps = !data.steps.empty();
      row.last_step = row.has_steps ? data.steps.rbegin()->first : 0;
      row.steps_stored = static_cast<int64_t>(data.steps.size());
      runs.push_back(std::move(row));
    }
    return runs;
  }

  absl::Status ReadSteps(
      const std::string& run_id, int64_t from_step, int64_t to_step,
      const std::function<bool(const StepRow&)>& fn) override {
    std::vector<StepRow> chunk;
    int64_t next = from_step;
    while (next <= to_step) {
      chunk.clear();
      bool more = false;
      {
        absl::MutexLock lock(&mu_);
        auto run = runs_.find(run_id);
        if (run == runs_.end()) return absl::OkStatus();
        const std::map<int64_t, StepRow>& steps = run->second.steps;
        for (auto it = steps.lower_bound(next);
             it != steps.end() && it->first <= to_step; ++it) {
          if (chunk.size() == kReadChunk) {
            more = true;
            next = it->first;
            break;
          }
          chunk.push_back(it->second);
        }
      }
      for (const StepRow& step : chunk) {
        if (!fn(step)) return absl::OkStatus();
      }
      if (!more) break;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<EventRow>> ReadEvents(
      const std::string& run_id) override {
    absl::MutexLock lock(&mu_);
    std::vector<EventRow> events;
    auto run = runs_.find(run_id);
    if (run == runs_.end()) return events;
    events.reserve(run->second.events.size());
    for (const auto& [key, event] : run->second.events) {
      events.push_back(event);
    }
    return events;
  }

 private:
  struct RunData {
    RunRow row;
    std::map<int64_t, StepRow> steps;
    // Keyed by (type, id): the order ReadEvents promises.
    std::map<std::pair<int, uint64_t>, EventRow> events;
  };

  // The run `run_id`, created with empty metadata (as the SQLite store's
  // minimal row) when steps or events arrive before its PutRun.
  RunData& FindOrCreate(const std::string& run_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto [it, inserted] = runs_.try_emplace(run_id);
    if (inserted) it->second.row.run_id = run_id;
    return it->second;
  }

  mutable absl::Mutex mu_;
  std::map<std::string, RunData> runs_ ABSL_GUARDED_BY(mu_);  // by run_id
  int64_t committed_steps_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t transactions_ ABSL_GUARDED_BY(mu_) = 0;  // writes applied
};

}  // namespace

std::unique_ptr<RunStore> NewMemoryStore() {
  return std::make_unique<MemoryStore>();
}

}  // namespace lossguard::storage
