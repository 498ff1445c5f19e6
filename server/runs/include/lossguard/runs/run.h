#ifndef LOSSGUARD_RUNS_RUN_H_
#define LOSSGUARD_RUNS_RUN_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "lossguard/policy/advice_policy.h"
#include "lossguard/policy/advisor.h"
#include "lossguard/storage/run_store.h"
#include "lossguard/v1/lossguard.pb.h"

namespace lossguard::runs {

namespace v1 = ::lossguard::v1;

// Wall clock, injected so tests control time (leveldb's Env idea).
class Clock {
 public:
  virtual ~Clock() = default;
  // Seconds since the Unix epoch.
  virtual double Now() const = 0;
};

// The system clock.
Clock* SystemClock();

// Something people watching the fleet want to hear about at once (a
// webhook): a run turned UNHEALTHY, or a trainer applied an action.
struct Alert {
  enum class Kind { kRunUnhealthy, kActionApplied };
  Kind kind = Kind::kRunUnhealthy;
  double time = 0.0;       // seconds since the Unix epoch
  v1::RunSummary summary;  // the run as it is now
  // kRunUnhealthy: the diagnosis that made it so; kActionApplied: the
  // advice's.
  v1::Diagnosis diagnosis;
  v1::AdviceRecord advice;  // kActionApplied: the advice as acked
};

// Everything a run needs to know about the daemon's configuration.
struct RunOptions {
  analyzers::AnalyzerOptions analyzer;
  policy::PolicyOptions policy;
  // Most advice records kept in memory per run (the store keeps them all);
  // older ones leave GetRunHealth's list first.
  int max_advice_in_memory = 64;
  // Losses remembered for judging an action's outcome (the medians before
  // and after it); at least policy.outcome_steps is useful.
  int outcome_loss_points = 128;
  // Called on every alert (not while recovering stored runs), with the
  // run's lock held: must not block (queue it) and must not call back into
  // the run. Empty: no alerts.
  std::function<void(const Alert&)> on_alert;
};

// Receives a run's events as they happen (a WatchRun stream). Called with
// the run's lock held: must not block and must not call back into the run.
class EventSink {
 public:
  virtual ~EventSink() = default;
  virtual void OnEvent(const v1::RunEvent& event) = 0;
  // The run finished: no more events will come.
  virtual void OnRunClosed() = 0;
};

// One run: its metadata, its analyzer and policy state, the attached
// trainer's session, its advice with their acks and outcomes, and its
// watchers. Writes go to the store (queued; see RunStore).
//
// Thread-safety: thread-safe. One mutex serializes everything, so the
// analyzer (which is not thread-safe) has exactly one user at a time.
// Held by shared_ptr (the registry makes them): the store's commit
// callbacks hold a weak_ptr.
class Run : public std::enable_shared_from_this<Run> {
 public:
  // Told when a batch's steps are durable in the store (OK; `last_step`:
  // the run's last step then, nullopt if it has none), or that the store
  // gave up on them. Called on the store's writer thread, or at once inside
  // Ingest (a store that applies at once) with the run's lock held: it must
  // not call back into the run.
  using DurableCallback = std::function<void(
      const absl::Status& status, std::optional<int64_t> last_step)>;

  Run(const storage::RunRow& row, const v1::RunConfig& config,
      const RunOptions* options, storage::RunStore* store, Clock* clock);
  ~Run();

  Run(const Run&) = delete;
  Run& operator=(const Run&) = delete;

  const std::string& run_id() const { return run_id_; }

  // Rebuilds state from the store after a daemon restart: replays the
  // stored steps through the analyzer (diagnoses already stored are not
  // repeated), loads advice history and rebuilds the policy's context.
  absl::Status Recover();

  // Brings the copy of a run that another daemon owns (a fleet sharing one
  // store) up to date with what the owner stored: metadata and state from
  // `row` (its latest stored row), the stored diagnoses and advice, and the
  // steps stored since this copy's last one, fed to the analyzer as a
  // replay. Writes nothing to the store. Cost: the new steps, plus the
  // run's events.
  absl::Status Follow(const storage::RunRow& row);

  // A trainer attaches (or re-attaches). Updates name/project/tags/config/
  // mode from `start`, makes this the run's current session (an earlier
  // session is superseded) and fills `accepted`. Returns the session id.
  uint64_t Attach(const v1::RunStart& start, v1::AttachAccepted* accepted);
  // The session ended (stream closed). The run becomes DETACHED unless it
  // finished or a newer session took over.
  void Detach(uint64_t session);
  // False once a newer Attach superseded `session`.
  bool IsCurrent(uint64_t session) const;

  // Feeds a batch. Steps at or below the last step held are duplicates: they
  // are skipped and counted in `*duplicates`. The rest must strictly
  // increase and have a finite non-negative lr (or NaN: not logged), else
  // InvalidArgument naming the step, and nothing of the batch is taken.
  // Losses and other values may be anything, non-finite included. Advice
  // for the trainer is appended to `*to_send`. `on_durable` (may be empty)
  // is told once every step held so far, this batch's included, is durable
  // (also for a batch of duplicates: they may still be queued).
  absl::Status Ingest(uint64_t session, const v1::StepBatch& batch,
                      std::vector<v1::Advice>* to_send, int64_t* duplicates,
                      DurableCallback on_durable = nullptr);
  // The trainer applied or rejected an advice. NotFound for an unknown
  // advice id; FailedPrecondition when it was acked already.
  absl::Status Ack(uint64_t session, const v1::AdviceAck& ack);
  // The trainer says the run is over: FINISHED, watchers are closed.
  void Finish(uint64_t session, const std::string& reason);

  v1::RunSummary Summary() const;
  // The last step held, or nullopt before the first.
  std::optional<int64_t> last_step() const;
  // The last step the store has made durable (<= last_step()); what an
  // attaching trainer is told the daemon holds, so it keeps the rest.
  std::optional<int64_t> durable_step() const;
  v1::RunHealth Health() const;
  v1::RunState state() const;
  double created_time() const;
  const std::string& project() const { return project_; }

  // Diagnoses and advice (newest kept in memory) within [from, to], as
  // markers for a plot.
  void Markers(int64_t from_step, int64_t to_step,
               std::vector<v1::Diagnosis>* diagnoses,
               std::vector<v1::Advice>* advice) const;

  // Adds a watcher; with `replay` the events kept in memory are sent first.
  // A finished run closes the watcher at once.
  void Subscribe(const std::shared_ptr<EventSink>& sink, bool replay);
  void Unsubscribe(const EventSink* sink);

 private:
  struct PendingOutcome {
    uint64_t advice_id = 0;
    // The record as acked: judged and stored from this copy, since the
    // in-memory list may have dropped it by then.
    v1::AdviceRecord record;
    analyzers::DiagnosisKind kind = analyzers::DiagnosisKind::kDivergence;
    int64_t applied_step = 0;  // last step held when the ack came
    // Steps before this one were computed before the action (the ack's
    // effective_step; INT64_MIN when not given).
    int64_t first_step = std::numeric_limits<int64_t>::min();
    int64_t steps_after = 0;
    double loss_before = 0.0;
    std::optional<double> val_before;
    bool nonfinite_after = false;
    std::vector<double> val_after;
  };

  v1::RunState ComputeStateLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UpdateStateLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::RunSummary SummaryLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PutRunLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishLocked(v1::RunEvent event) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void HandleDiagnosisLocked(const analyzers::Diagnosis& d,
                             std::vector<v1::Advice>* to_send)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sends advice for diagnosis `d` (recorded by the policy, stored,
  // published); `rolls_back`: the advice it undoes, 0 for none.
  void EmitAdviceLocked(const analyzers::Diagnosis& d, const policy::Advice& a,
                        uint64_t rolls_back, std::vector<v1::Advice>* to_send)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Undoes the LR raise `p` (judged WORSENED at `step`): SET_LR back to the
  // LR when it was sent.
  void RollBackLocked(const PendingOutcome& p, const std::string& evidence,
                      const v1::Step& step, std::vector<v1::Advice>* to_send)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TrackOutcomesLocked(const v1::Step& step, std::vector<v1::Advice>* to_send)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether an LR action advised after `advice_id` has been applied or is
  // waiting for its ack.
  bool LaterLrActionAppliedLocked(uint64_t advice_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PersistAdviceLocked(const v1::AdviceRecord& rec)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sets the outcome on `p.record` and on the in-memory copy (if still
  // there), and stores it.
  void SetOutcomeLocked(PendingOutcome& p, v1::Outcome outcome,
                        const std::string& evidence)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::AdviceRecord* FindAdviceLocked(uint64_t id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  double RecentLossMedianLocked(int points) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FeedLocked(const v1::Step& step, std::vector<v1::Advice>* to_send,
                  bool replaying) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string run_id_;
  const RunOptions* const options_;
  storage::RunStore* const store_;
  Clock* const clock_;

  // The last durable step (kNoStep: none), set by the store's commit
  // callbacks, which may run inside Ingest with mu_ held: not under mu_.
  static constexpr int64_t kNoStep = std::numeric_limits<int64_t>::min();
  std::atomic<int64_t> durable_step_{kNoStep};

  mutable absl::Mutex mu_;
  std::string project_;  // fixed at creation: the fleet index sorts by it
  std::string name_ ABSL_GUARDED_BY(mu_);
  std::string tags_json_ ABSL_GUARDED_BY(mu_);
  v1::RunSummary summary_ ABSL_GUARDED_BY(mu_);  // metadata and last values
  v1::RunConfig config_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // An UNHEALTHY alert was sent and the run has not been healthy since
  // (re-attaching or a restart does not repeat it).
  bool unhealthy_alerted_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t session_ ABSL_GUARDED_BY(mu_) = 0;  // current session, 0: none
  bool attached_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_session_ ABSL_GUARDED_BY(mu_) = 1;

  policy::Advisor advisor_ ABSL_GUARDED_BY(mu_);  // analyzer + policy memory
  std::vector<analyzers::Diagnosis> decided_ ABSL_GUARDED_BY(mu_);  // scratch
  std::vector<storage::StepRow> rows_ ABSL_GUARDED_BY(mu_);         // scratch

  std::deque<v1::Diagnosis> diagnoses_ ABSL_GUARDED_BY(mu_);  // newest last
  std::deque<v1::AdviceRecord> advice_ ABSL_GUARDED_BY(mu_);  // newest last
  uint64_t next_advice_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_diagnosis_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::vector<PendingOutcome> pending_ ABSL_GUARDED_BY(mu_);
  std::deque<double> recent_losses_ ABSL_GUARDED_BY(mu_);
  std::deque<double> recent_vals_ ABSL_GUARDED_BY(mu_);

  std::vector<std::shared_ptr<EventSink>> sinks_ ABSL_GUARDED_BY(mu_);
};

// A wire step as the store keeps it, and back.
storage::StepRow ToRow(const v1::Step& s);
v1::Step FromRow(const storage::StepRow& row);

}  // namespace lossguard::runs

#endif  // LOSSGUARD_RUNS_RUN_H_
