#ifndef LOSSGUARD_RUNS_FLEET_H_
#define LOSSGUARD_RUNS_FLEET_H_

#include <functional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "lossguard/runs/run_registry.h"
#include "lossguard/storage/run_store.h"

namespace lossguard::runs {

struct FleetOptions {
  // This daemon's id in the lease table: unique in the fleet (a pod name,
  // or host:port).
  std::string replica_id;
  // host:port where trainers reach this daemon (set by Fleet::Start): what
  // a daemon that does not own a run tells the trainer to use instead.
  std::string address;
  // A lease lasts this long unless renewed: how long the runs of a daemon
  // that died wait before another daemon may take them over.
  double lease_s = 10.0;
  // Leases held are renewed this often (a third of lease_s leaves two
  // renewals' slack for a slow database).
  double renew_every_s = 3.0;
  // Runs other daemons own are brought up to date from the store this
  // often, so ListRuns, GetRunHealth and GetCurve answer from any daemon.
  double sync_every_s = 1.0;
};

// One daemon's part in a fleet of daemons sharing one store with leases
// (PostgreSQL): a run is served (its trainer attached, its analyzer fed,
// its advice decided, its steps written) by the daemon holding its lease;
// the others keep a read-only copy, refreshed from the store.
//
// A trainer attaching here takes the run's lease when it is free, expired
// or ours; the run is then rebuilt from the store (it may have moved here
// from a daemon that died) before the trainer resumes from the last stored
// step. When another live daemon holds it, the trainer is told where. The
// lease is given up when the run's last stream here ends, and renewed
// while one is open; a lease found taken over (this daemon was paused past
// its expiry) ends the run's streams here through `on_lost`.
//
// Thread-safety: thread-safe. Acquire, Release and SyncRun make database
// round trips: call them from a worker thread, not a gRPC callback.
class Fleet {
 public:
  // Called (on the fleet's thread) for a run whose lease this daemon lost:
  // its Attach streams must end. Must not block.
  using LostCallback = std::function<void(const std::string& run_id)>;

  // `registry` and `store` (whose leases() is not null) outlive the fleet.
  Fleet(const FleetOptions& options, RunRegistry* registry,
        storage::RunStore* store, LostCallback on_lost);
  ~Fleet();
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;

  // Loads every run of the store as a read-only copy. Call once, before
  // serving.
  absl::Status Load();
  // Starts renewing and syncing, as `address` (host:port trainers reach
  // this daemon at; also the replica id when options.replica_id is empty).
  // Until then Acquire answers UNAVAILABLE. Call once, after Load.
  void Start(const std::string& address);
  // Stops the thread and gives up every lease held, so other daemons may
  // take the runs over at once.
  void Stop();

  struct Claim {
    bool ours = false;
    storage::LeaseHolder holder;  // who holds it (ourselves when ours)
  };
  // A trainer attaches to `run_id`. When the lease is ours (taken or
  // already held), the run is this daemon's to serve and each such Claim
  // needs one Release; otherwise `holder` says who serves it.
  absl::StatusOr<Claim> Acquire(const std::string& run_id);
  // An Attach stream whose Acquire was ours ended.
  void Release(const std::string& run_id);
  // Brings one run another daemon owns up to date now (a read of a run
  // this daemon has not synced yet). NotFound when the store lacks it.
  absl::Status SyncRun(const std::string& run_id);
  bool Owns(const std::string& run_id) const;
  // This daemon's id and address (empty before Start).
  std::string replica_id() const;
  std::string address() const;

 private:
  void Loop();
  void RenewAll();
  absl::Status SyncAll();
  // Follows `row` unless this daemon holds the run (or is taking it) or
  // its copy is current. `live`: some daemon holds an unexpired lease on
  // it (else it reads as DETACHED unless finished).
  absl::Status SyncRowLocked(const storage::RunRow& row, bool live)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  FleetOptions options_ ABSL_GUARDED_BY(mu_);  // address, id set by Start
  RunRegistry* const registry_;
  storage::RunStore* const store_;
  storage::LeaseTable* const leases_;
  const LostCallback on_lost_;

  // Guards ownership (held_, acquiring_): a run is never followed while it
  // is served or being taken over here. Held across the database reads of
  // one run's sync, not across an Acquire's lease call or reload.
  mutable absl::Mutex mu_;
  // Runs whose lease this daemon holds -> their open Attach streams here.
  absl::flat_hash_map<std::string, int> held_ ABSL_GUARDED_BY(mu_);
  // Runs an Acquire is taking (database work in progress, unlocked).
  absl::flat_hash_set<std::string> acquiring_ ABSL_GUARDED_BY(mu_);
  bool started_ ABSL_GUARDED_BY(mu_) = false;

  absl::Mutex stop_mu_;
  bool stop_ ABSL_GUARDED_BY(stop_mu_) = false;
  std::thread thread_;
};

}  // namespace lossguard::runs

#endif  // LOSSGUARD_RUNS_FLEET_H_
