#include "server/storage/src/batching_store.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>

#include "absl/time/time.h"

namespace lossguard::storage {

BatchingStore::BatchingStore(const BatchingOptions& options)
    : options_(options) {}

BatchingStore::~BatchingStore() {
  // A backend calls StopWriter first; this only guards against one that
  // forgot (its CommitBatch would then race with its own destruction).
  StopWriter();
}

void BatchingStore::StartWriter() {
  writer_ = std::thread([this] { WriterLoop(); });
}

void BatchingStore::StopWriter() {
  if (!writer_.joinable()) return;
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    work_cv_.Signal();
  }
  writer_.join();
}

void BatchingStore::Enqueue(std::variant<RunRow, StepsWrite, EventRow> write,
                            int64_t steps, CommitCallback on_commit) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(
      {std::move(write), SteadyClock::now(), std::move(on_commit)});
  ++ops_queued_;
  queued_steps_ += steps;
  work_cv_.Signal();
}

void BatchingStore::AppendSteps(const std::string& run_id,
                                std::vector<StepRow> steps,
                                CommitCallback on_commit) {
  if (steps.empty() && !on_commit) return;
  const int64_t n = static_cast<int64_t>(steps.size());
  Enqueue(StepsWrite{run_id, std::move(steps)}, n, std::move(on_commit));
}

absl::Status BatchingStore::Flush() {
  absl::MutexLock lock(&mu_);
  const int64_t target = ops_queued_;
  while (ops_done_ < target && failing_.ok()) done_cv_.Wait(&mu_);
  if (!failing_.ok()) return failing_;
  return first_error_;
}

void BatchingStore::NotifyWhenBacklogBelow(int64_t below_steps,
                                           std::function<void()> resume) {
  // "Fewer than 0 steps" never holds; wait for an empty backlog instead,
  // so that every callback runs once.
  if (below_steps < 1) below_steps = 1;
  {
    absl::MutexLock lock(&mu_);
    if (queued_steps_ >= below_steps) {
      waiters_.push_back({below_steps, std::move(resume)});
      return;
    }
  }
  resume();
}

StoreStats BatchingStore::Stats() const {
  const SteadyClock::time_point now = SteadyClock::now();
  absl::MutexLock lock(&mu_);
  StoreStats stats;
  stats.queued_ops = ops_queued_ - ops_done_;
  stats.queued_steps = queued_steps_;
  stats.committed_steps = committed_steps_;
  stats.transactions = transactions_;
  std::optional<SteadyClock::time_point> oldest;
  if (in_flight_ops_ > 0) {
    oldest = in_flight_queued_at_;
  } else if (!queue_.empty()) {
    oldest = queue_.front().queued_at;
  }
  if (oldest.has_value() && now > *oldest) {
    stats.oldest_queued_age_s =
        std::chrono::duration<double>(now - *oldest).count();
  }
  stats.last_error = last_error_;
  stats.failing = !failing_.ok();
  return stats;
}

void BatchingStore::StepCollector::Add(std::vector<WriteOp>& batch,
                                       size_t index, int64_t key,
                                       std::optional<int64_t>* last_step) {
  StepsWrite& write = std::get<StepsWrite>(batch[index].write);
  auto [it, added] = index_.try_emplace(key, runs_.size());
  if (added) runs_.push_back({key, write.run_id, {}, index});
  std::vector<StepRow>& out = runs_[it->second].steps;
  const size_t start = out.size();
  if (start == 0) {
    out = std::move(write.steps);
  } else {
    out.insert(out.end(), write.steps.begin(), write.steps.end());
  }
  size_t kept = start;
  for (size_t i = start; i < out.size(); ++i) {
    if (last_step->has_value() && out[i].step <= **last_step) continue;
    *last_step = out[i].step;
    if (kept != i) out[kept] = out[i];
    ++kept;
  }
  out.resize(kept);
}

void BatchingStore::StepCollector::GiveBack(std::vector<WriteOp>& batch) {
  for (Pending& p : runs_) {
    std::get<StepsWrite>(batch[p.source_op].write).steps = std::move(p.steps);
  }
  Clear();
}

void BatchingStore::StepCollector::Clear() {
  runs_.clear();
  index_.clear();
}

void BatchingStore::WriterLoop() {
  if (options_.writer_nice > 0) {
    // Linux applies a nice value to one thread when given its id. Failing
    // (a sandbox without the right) leaves the default priority.
    setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()),
                std::min(19, options_.writer_nice));
  }
  const int64_t max_ops = std::max(1, options_.max_ops_per_transaction);
  std::vector<WriteOp> batch;
  std::vector<BacklogWaiter> ready;
  int64_t batch_steps = 0;
  absl::Duration backoff = absl::Seconds(options_.retry_initial_backoff_s);
  for (;;) {
    if (batch.empty()) {  // else: retrying it
      batch_steps = 0;
      absl::MutexLock lock(&mu_);
      while (queue_.empty() && !stop_) work_cv_.Wait(&mu_);
      if (queue_.empty()) return;  // stopping, and everything is committed
      int64_t weight = 0;
      while (!queue_.empty()) {
        const int64_t w = std::max<int64_t>(1, queue_.front().Steps());
        if (!batch.empty() && weight + w > max_ops) break;
        weight += w;
        batch_steps += queue_.front().Steps();
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      in_flight_ops_ = static_cast<int64_t>(batch.size());
      in_flight_queued_at_ = batch.front().queued_at;
    }

    int64_t inserted_steps = 0;
    absl::Status status = CommitBatch(batch, &inserted_steps);

    if (!status.ok() && Retryable(status)) {
      absl::MutexLock lock(&mu_);
      if (first_error_.ok()) first_error_ = status;
      last_error_ = std::string(status.message());
      if (!stop_) {
        // Keep the batch; Flush callers learn of the failure at once.
        failing_ = status;
        done_cv_.SignalAll();
        work_cv_.WaitWithTimeout(&mu_, backoff);
        backoff = std::min(backoff * 2,
                           absl::Seconds(options_.retry_max_backoff_s));
        continue;
      }
      // Closing, and it failed again: give the batch up.
    }
    backoff = absl::Seconds(options_.retry_initial_backoff_s);

    if (status.ok()) {
      // No longer failing before anyone hears of the commit: a Flush called
      // from a commit callback's aftermath must wait, not report the old
      // error at once.
      absl::MutexLock lock(&mu_);
      failing_ = absl::OkStatus();
    }
    // Callbacks before the batch counts as done: once Flush returns, the
    // callbacks of every write queued before it have run.
    for (WriteOp& op : batch) {
      if (op.on_commit) op.on_commit(status);
    }
    {
      absl::MutexLock lock(&mu_);
      failing_ = absl::OkStatus();
      in_flight_ops_ = 0;
      ops_done_ += static_cast<int64_t>(batch.size());
      queued_steps_ -= batch_steps;
      if (status.ok()) {
        ++transactions_;
        committed_steps_ += inserted_steps;
      } else {
        if (first_error_.ok()) first_error_ = status;
        last_error_ = std::string(status.message());
      }
      for (auto it = waiters_.begin(); it != waiters_.end();) {
        if (queued_steps_ < it->below_steps) {
          ready.push_back(std::move(*it));
          it = waiters_.erase(it);
        } else {
          ++it;
        }
      }
      done_cv_.SignalAll();
    }
    batch.clear();
    for (BacklogWaiter& waiter : ready) waiter.resume();
    ready.clear();
  }
}

}  // namespace lossguard::storage
