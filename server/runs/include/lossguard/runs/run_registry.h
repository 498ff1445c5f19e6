#ifndef LOSSGUARD_RUNS_RUN_REGISTRY_H_
#define LOSSGUARD_RUNS_RUN_REGISTRY_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "lossguard/runs/run.h"
#include "lossguard/storage/run_store.h"

namespace lossguard::runs {

// Limits on what a client may send when starting a run.
struct RunLimits {
  size_t max_run_id_bytes = 256;
  size_t max_name_bytes = 1024;   // name and project
  size_t max_tags = 64;
  size_t max_tag_bytes = 1024;    // each key and each value
  size_t max_runs = 100000;       // runs held by one daemon
  size_t max_runs_per_project = 0;  // runs one project may hold; 0: no limit
};

// Checks a RunStart against `limits`: a run id of 1..max bytes of printable
// ASCII or UTF-8 (no control characters), bounded name, project and tags.
// InvalidArgument saying which field and why.
absl::Status ValidateRunStart(const v1::RunStart& start,
                              const RunLimits& limits);

// All runs the daemon knows, attached or not.
//
// Thread-safety: thread-safe. The registry's lock only guards the index;
// each Run has its own.
class RunRegistry {
 public:
  // `options`, `store` and `clock` must outlive the registry.
  RunRegistry(const RunOptions* options, const RunLimits& limits,
              storage::RunStore* store, Clock* clock);

  RunRegistry(const RunRegistry&) = delete;
  RunRegistry& operator=(const RunRegistry&) = delete;

  // Loads every stored run and rebuilds its state (see Run::Recover). Call
  // once, before serving.
  absl::Status Recover();

  // The run `start.run_id()`, created when new. InvalidArgument for a bad
  // RunStart, ResourceExhausted when the daemon holds max_runs runs.
  absl::StatusOr<std::shared_ptr<Run>> FindOrCreate(const v1::RunStart& start,
                                                    bool* created);
  // nullptr when unknown.
  std::shared_ptr<Run> Find(const std::string& run_id) const;

  struct ListResult {
    std::vector<v1::RunSummary> runs;
    std::string next_page_token;
  };
  // Runs of `project` (empty: all) in one of `states` (empty: all), newest
  // first (by creation time, then run id), at most `page_size`, starting
  // after `page_token` (from a previous call; empty: from the start).
  // InvalidArgument for a malformed token.
  absl::StatusOr<ListResult> List(const std::string& project,
                                  const std::vector<v1::RunState>& states,
                                  int page_size,
                                  const std::string& page_token) const;

  // Fleet (several daemons sharing one store). Replaces this daemon's copy
  // of `run_id` with one rebuilt from the store as its owner rebuilds it
  // after a restart (Run::Recover): the daemon is taking the run over.
  // Does nothing for a run the store does not hold.
  absl::Status Reload(const std::string& run_id);
  // Brings this daemon's copy of a run that another daemon owns up to date
  // with the store's `row` (Run::Follow), adding it when new here.
  absl::Status Follow(const storage::RunRow& row);

  size_t size() const;
  // Every run (a snapshot), for shutdown and metrics.
  std::vector<std::shared_ptr<Run>> All() const;

 private:
  // Newest first: descending creation time, then ascending run id.
  struct Key {
    double created;
    std::string run_id;
    bool operator<(const Key& o) const {
      if (created != o.created) return created > o.created;
      return run_id < o.run_id;
    }
  };

  const RunOptions* const options_;
  const RunLimits limits_;
  storage::RunStore* const store_;
  Clock* const clock_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Run>> runs_
      ABSL_GUARDED_BY(mu_);
  std::map<Key, std::shared_ptr<Run>> order_ ABSL_GUARDED_BY(mu_);
  // A run made from its stored `row` and rebuilt (Run::Recover).
  absl::StatusOr<std::shared_ptr<Run>> Rebuild(const storage::RunRow& row);
  // Adds `run` made from `row`, or puts it in place of the run of its id.
  void Put(const storage::RunRow& row, std::shared_ptr<Run> run);
  absl::flat_hash_map<std::string, size_t> project_runs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lossguard::runs

#endif  // LOSSGUARD_RUNS_RUN_REGISTRY_H_
