// The write side that the SQLite and PostgreSQL stores share: a queue of
// writes, one writer thread that commits them in batched transactions,
// retries with backoff, Flush, backlog notifications and statistics. A
// backend supplies only CommitBatch (one transaction) and says which errors
// may pass.

#ifndef LOSSGUARD_STORAGE_SRC_BATCHING_STORE_H_
#define LOSSGUARD_STORAGE_SRC_BATCHING_STORE_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "lossguard/storage/run_store.h"

namespace lossguard::storage {

// How the writer batches and retries.
struct BatchingOptions {
  int max_ops_per_transaction = 4096;  // steps count one op each
  int writer_nice = 10;                // 0: the process's priority
  double retry_initial_backoff_s = 0.05;
  double retry_max_backoff_s = 5.0;
};

class BatchingStore : public RunStore {
 public:
  using SteadyClock = std::chrono::steady_clock;

  struct StepsWrite {
    std::string run_id;
    std::vector<StepRow> steps;
  };

  // One queued write.
  struct WriteOp {
    std::variant<RunRow, StepsWrite, EventRow> write;
    SteadyClock::time_point queued_at;
    CommitCallback on_commit;  // may be empty

    // Steps count one op each toward max_ops_per_transaction.
    int64_t Steps() const {
      const StepsWrite* s = std::get_if<StepsWrite>(&write);
      return s != nullptr ? static_cast<int64_t>(s->steps.size()) : 0;
    }
  };

  BatchingStore(const BatchingStore&) = delete;
  BatchingStore& operator=(const BatchingStore&) = delete;
  ~BatchingStore() override;

  void PutRun(const RunRow& run) override { Enqueue(run, 0, nullptr); }
  using RunStore::AppendSteps;
  void AppendSteps(const std::string& run_id, std::vector<StepRow> steps,
                   CommitCallback on_commit) override;
  void PutEvent(const EventRow& event) override { Enqueue(event, 0, nullptr); }
  absl::Status Flush() override;
  void NotifyWhenBacklogBelow(int64_t below_steps,
                              std::function<void()> resume) override;
  StoreStats Stats() const override;

  // The new steps of each run in the transaction being built: a backend's
  // CommitBatch adds every StepsWrite here, then writes runs() as chunks.
  // Writer thread only.
  class StepCollector {
   public:
    struct Pending {
      int64_t key = 0;  // the backend's key of the run
      std::string run_id;
      std::vector<StepRow> steps;
      size_t source_op = 0;  // the op whose steps were moved into `steps`
    };
    // Adds the steps of batch[index] (a StepsWrite) for the run with `key`,
    // keeping only those above `*last_step` (updated to the last one kept):
    // a resend after a reconnect duplicates nothing, and every stored range
    // follows the previous one. A run's first append in the batch (the
    // usual case) is moved in whole, then compacted in place.
    void Add(std::vector<WriteOp>& batch, size_t index, int64_t key,
             std::optional<int64_t>* last_step);
    const std::vector<Pending>& runs() const { return runs_; }
    // The transaction failed: moves the steps back into their ops (a retry
    // filters them again), then clears.
    void GiveBack(std::vector<WriteOp>& batch);
    void Clear();

   private:
    std::vector<Pending> runs_;
    absl::flat_hash_map<int64_t, size_t> index_;  // key -> runs_
  };

 protected:
  explicit BatchingStore(const BatchingOptions& options);

  // Starts the writer thread: the last statement of a backend's
  // constructor, once everything CommitBatch uses exists.
  void StartWriter();
  // Commits what is queued and stops the writer: the first statement of a
  // backend's destructor, before anything CommitBatch uses goes away.
  void StopWriter();

  // Applies `batch` in one transaction, on the writer thread. On error it
  // rolls back and leaves the batch as it was (to retry), and steps it
  // moved out are moved back. Sets `*inserted_steps` to the steps it added.
  virtual absl::Status CommitBatch(std::vector<WriteOp>& batch,
                                   int64_t* inserted_steps) = 0;
  // Whether a failed CommitBatch may succeed later (it is then retried).
  virtual bool Retryable(const absl::Status& status) const = 0;

 private:
  struct BacklogWaiter {
    int64_t below_steps;
    std::function<void()> resume;
  };

  void Enqueue(std::variant<RunRow, StepsWrite, EventRow> write, int64_t steps,
               CommitCallback on_commit);
  void WriterLoop();

  const BatchingOptions options_;

  mutable absl::Mutex mu_;
  absl::CondVar work_cv_;  // signalled when queue_ grows or stop_ is set
  absl::CondVar done_cv_;  // signalled when ops_done_ grows
  std::deque<WriteOp> queue_ ABSL_GUARDED_BY(mu_);
  int64_t ops_queued_ ABSL_GUARDED_BY(mu_) = 0;  // ever queued
  int64_t ops_done_ ABSL_GUARDED_BY(mu_) = 0;    // committed or dropped
  int64_t queued_steps_ ABSL_GUARDED_BY(mu_) = 0;
  // The batch the writer is committing (taken off queue_).
  int64_t in_flight_ops_ ABSL_GUARDED_BY(mu_) = 0;
  SteadyClock::time_point in_flight_queued_at_ ABSL_GUARDED_BY(mu_);
  int64_t committed_steps_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t transactions_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status first_error_ ABSL_GUARDED_BY(mu_);
  // The error of the batch being retried; OK when none is.
  absl::Status failing_ ABSL_GUARDED_BY(mu_);
  std::string last_error_ ABSL_GUARDED_BY(mu_);
  std::vector<BacklogWaiter> waiters_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;

  std::thread writer_;
};

}  // namespace lossguard::storage

#endif  // LOSSGUARD_STORAGE_SRC_BATCHING_STORE_H_
