#include "lossguard/runs/fleet.h"

#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace lossguard::runs {

Fleet::Fleet(const FleetOptions& options, RunRegistry* registry,
             storage::RunStore* store, LostCallback on_lost)
    : options_(options),
      registry_(registry),
      store_(store),
      leases_(store->leases()),
      on_lost_(std::move(on_lost)) {}

Fleet::~Fleet() { Stop(); }

absl::Status Fleet::Load() {
  if (leases_ == nullptr) {
    return absl::FailedPreconditionError(
        "a fleet needs a store that several daemons share (PostgreSQL)");
  }
  return SyncAll();
}

void Fleet::Start(const std::string& address) {
  {
    absl::MutexLock lock(&mu_);
    options_.address = address;
    if (options_.replica_id.empty()) options_.replica_id = address;
    started_ = true;
  }
  thread_ = std::thread([this] { Loop(); });
}

std::string Fleet::replica_id() const {
  absl::MutexLock lock(&mu_);
  return options_.replica_id;
}

std::string Fleet::address() const {
  absl::MutexLock lock(&mu_);
  return options_.address;
}

void Fleet::Stop() {
  {
    absl::MutexLock lock(&stop_mu_);
    if (stop_) return;
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
  std::vector<std::string> held;
  std::string replica_id;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [run_id, streams] : held_) held.push_back(run_id);
    held_.clear();
    replica_id = options_.replica_id;
  }
  for (const std::string& run_id : held) {
    leases_->Release(run_id, replica_id).IgnoreError();
  }
}

absl::StatusOr<Fleet::Claim> Fleet::Acquire(const std::string& run_id) {
  std::string replica_id, address;
  double lease_s = 0;
  {
    absl::MutexLock lock(&mu_);
    if (!started_) {
      return absl::UnavailableError("this daemon is starting; reconnect");
    }
    // Another stream of this run is being claimed here: wait for it.
    auto settled = [this, &run_id]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return !acquiring_.contains(run_id);
    };
    mu_.Await(absl::Condition(&settled));
    replica_id = options_.replica_id;
    address = options_.address;
    lease_s = options_.lease_s;
    Claim claim;
    if (auto it = held_.find(run_id); it != held_.end()) {
      // Another stream of a run served here (a trainer reconnecting before
      // its old stream ended): the lease is ours and renewed by the loop.
      ++it->second;
      claim.ours = true;
      claim.holder = {replica_id, address, lease_s};
      return claim;
    }
    // Not synced meanwhile; the database work below runs unlocked, so
    // taking over many runs at once (a daemon died) proceeds in parallel.
    acquiring_.insert(run_id);
  }
  Claim claim;
  absl::Status s;
  absl::StatusOr<storage::LeaseHolder> holder =
      leases_->Acquire(run_id, replica_id, address, lease_s);
  if (!holder.ok()) {
    s = holder.status();
  } else {
    claim.holder = *holder;
    claim.ours = holder->owner == replica_id;
  }
  if (s.ok() && claim.ours) {
    // Taken (or taken back): rebuild the run from what the store holds,
    // which includes what another daemon wrote while it served the run.
    // Our own writes still queued for it go first.
    store_->Flush().IgnoreError();
    s = registry_->Reload(run_id);
    if (!s.ok()) leases_->Release(run_id, replica_id).IgnoreError();
  }
  absl::MutexLock lock(&mu_);
  acquiring_.erase(run_id);
  if (!s.ok()) return s;
  if (claim.ours) held_[run_id] = 1;
  return claim;
}

void Fleet::Release(const std::string& run_id) {
  std::string replica_id;
  {
    absl::MutexLock lock(&mu_);
    replica_id = options_.replica_id;
    auto it = held_.find(run_id);
    if (it == held_.end()) return;  // lost meanwhile
    if (--it->second > 0) return;
    held_.erase(it);
  }
  // Its steps reach the store before another daemon may take the run.
  store_->Flush().IgnoreError();
  leases_->Release(run_id, replica_id).IgnoreError();
}

bool Fleet::Owns(const std::string& run_id) const {
  absl::MutexLock lock(&mu_);
  return held_.contains(run_id);
}

absl::Status Fleet::SyncRun(const std::string& run_id) {
  absl::StatusOr<std::optional<storage::RunRow>> row = store_->LoadRun(run_id);
  if (!row.ok()) return row.status();
  if (!row->has_value()) {
    return absl::NotFoundError(absl::StrCat("no run \"", run_id, "\""));
  }
  absl::StatusOr<std::optional<storage::LeaseHolder>> holder =
      leases_->Holder(run_id);
  if (!holder.ok()) return holder.status();
  const bool live = holder->has_value() && (*holder)->expires_in_s > 0;
  absl::MutexLock lock(&mu_);
  return SyncRowLocked(**row, live);
}

absl::Status Fleet::SyncRowLocked(const storage::RunRow& stored, bool live) {
  if (held_.contains(stored.run_id) || acquiring_.contains(stored.run_id)) {
    return absl::OkStatus();
  }
  // A run nobody serves (its daemon died, or its trainer left) reads as
  // DETACHED, whatever its serving daemon last stored.
  storage::RunRow row = stored;
  if (!live && row.state != static_cast<int>(v1::FINISHED)) {
    row.state = static_cast<int>(v1::DETACHED);
  }
  if (std::shared_ptr<Run> run = registry_->Find(row.run_id)) {
    const v1::RunSummary s = run->Summary();
    if (s.has_steps() == row.has_steps && s.last_step() == row.last_step &&
        s.steps_stored() == row.steps_stored &&
        static_cast<int>(s.state()) == row.state &&
        static_cast<int>(s.mode()) == row.mode &&
        s.updated_time() == row.updated_time && s.name() == row.name) {
      return absl::OkStatus();  // current
    }
  }
  return registry_->Follow(row);
}

absl::Status Fleet::SyncAll() {
  // Leases first: a run whose lease appears after this read is served, and
  // the next sync shows it so.
  absl::StatusOr<std::vector<std::string>> live_runs = leases_->LiveRuns();
  if (!live_runs.ok()) return live_runs.status();
  const absl::flat_hash_set<std::string> live(live_runs->begin(),
                                              live_runs->end());
  absl::StatusOr<std::vector<storage::RunRow>> rows = store_->LoadRuns();
  if (!rows.ok()) return rows.status();
  absl::Status first;
  for (const storage::RunRow& row : *rows) {
    absl::MutexLock lock(&mu_);  // per run: attaches need not wait long
    absl::Status s = SyncRowLocked(row, live.contains(row.run_id));
    if (!s.ok() && first.ok()) first = s;
  }
  return first;
}

void Fleet::RenewAll() {
  std::vector<std::string> held;
  std::string replica_id;
  double lease_s = 0;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [run_id, streams] : held_) held.push_back(run_id);
    replica_id = options_.replica_id;
    lease_s = options_.lease_s;
  }
  if (held.empty()) return;
  absl::StatusOr<std::vector<std::string>> lost =
      leases_->Renew(held, replica_id, lease_s);
  if (!lost.ok()) return;  // the database is away: try again next time
  for (const std::string& run_id : *lost) {
    {
      absl::MutexLock lock(&mu_);
      held_.erase(run_id);
    }
    on_lost_(run_id);
  }
}

void Fleet::Loop() {
  absl::Duration renew, sync;
  {
    absl::MutexLock lock(&mu_);
    renew = absl::Seconds(options_.renew_every_s);
    sync = absl::Seconds(options_.sync_every_s);
  }
  absl::Time next_renew = absl::Now() + renew;
  absl::Time next_sync = absl::Now() + sync;
  for (;;) {
    {
      absl::MutexLock lock(&stop_mu_);
      auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(stop_mu_) {
        return stop_;
      };
      stop_mu_.AwaitWithDeadline(absl::Condition(&stopping),
                                 std::min(next_renew, next_sync));
      if (stop_) return;
    }
    const absl::Time now = absl::Now();
    if (now >= next_renew) {
      RenewAll();
      next_renew = now + renew;
    }
    if (now >= next_sync) {
      SyncAll().IgnoreError();  // a run that fails now is retried next time
      next_sync = absl::Now() + sync;
    }
  }
}

}  // namespace lossguard::runs
