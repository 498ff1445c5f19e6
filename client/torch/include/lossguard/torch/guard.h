#ifndef LOSSGUARD_TORCH_GUARD_H_
#define LOSSGUARD_TORCH_GUARD_H_

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lossguard/analyzers/options.h"
#include "lossguard/analyzers/types.h"
#include "lossguard/client/client.h"
#include "lossguard/policy/advice_policy.h"
#include "lossguard/schedule/lr_schedule.h"
#include "lossguard/v1/lossguard.pb.h"

namespace lossguard::torch {

struct GuardOptions {
  // The LR schedule the guard runs (it owns the LR). base_lr <= 0 (the
  // default): the optimizer's LR of param group 0 at construction.
  schedule::ScheduleConfig schedule = {.base_lr = 0.0};
  // What to do with actions: AUTO applies them and acks; ADVISE asks
  // `accept` (no callback: not applied, not acked); OBSERVE ignores them.
  // With a client this should match the client's mode.
  v1::Mode mode = v1::AUTO;
  std::function<bool(const v1::Advice&)> accept;
  // Clip the global gradient norm from the start (as
  // torch.nn.utils.clip_grad_norm_); an enable_grad_clip action sets it
  // later. The reported norm is always the one before clipping.
  std::optional<double> clip_max_norm;
  // Called for every advice received (applied or not), on the training
  // thread, e.g. to print it.
  std::function<void(const v1::Advice&, bool applied)> on_advice;
  // Called with every step as it is reported (one step late or more, see
  // Guard), on the training thread: e.g. to log the curve the daemon sees.
  std::function<void(const analyzers::StepRecord&)> on_report;
  // Rollback: with a module, the guard keeps in-memory snapshots of its
  // parameters and buffers (BatchNorm statistics) every `snapshot_every`
  // steps (and one of the initial weights); a copy counts once the next
  // step's loss, computed from those weights, is finite and at most twice
  // the loss before it. When an action says restore_checkpoint (an LR cut
  // for a divergence, or for a run stuck at its initial loss after blowing
  // up), the guard first restores the newest snapshot from before the
  // trouble (the divergence's onset; the step of the run's highest loss),
  // clears the optimizer's state (momentum, Adam moments) and this step's
  // gradients (the optimizer.step() right after AfterBackward then changes
  // nothing), as a practitioner restarts from the last good checkpoint with
  // a lower LR: a run whose weights already hold NaN is rescued too. Costs
  // `snapshots_kept` + 1 copies of the model in memory.
  ::torch::nn::Module* rollback_module = nullptr;
  int64_t snapshot_every = 50;
  int snapshots_kept = 3;
  // On CUDA, how many steps may be in flight: staged (their loss and
  // gradient norm being copied to pinned memory behind their work) but not
  // yet read. A step is read as soon as its copy is done, without waiting;
  // AfterBackward waits for the oldest only when this many are in flight,
  // that is when the host runs that many steps ahead of the device. 1 waits
  // at every step for the previous step's copy (no slower on the steps
  // measured on an H200, README "Guard overhead"); 2 lets the host run a
  // whole step ahead without waiting. Reports and advice lag by up to as
  // many steps as are in flight (on the CPU, always one).
  int max_steps_in_flight = 2;
  // Measure and report the global gradient norm at every step. It is most
  // of the guard's host time on small steps (three kernel launches and
  // per-tensor work in _foreach_norm; README, "Guard overhead"); without it
  // gradient explosions are not diagnosed and clipping advice has no norm
  // to go by. Clipping, when on, measures it anyway.
  bool grad_norm = true;
  // The most the guard may add to a training step, as a fraction of the
  // step's time without it. Where measuring a step (the gradient norm's
  // launches, the copies, the report) costs more than that, as on a small
  // model whose step is bound by the host launching kernels, the guard
  // measures only some steps: it times its own work and the step, earns
  // `max_overhead` x the step's time at every step, and measures the next
  // step once what it spent is earned back. On a GPU-bound or CPU step
  // that is every step. The steps measured carry their own step numbers
  // (the analyzers read them like a coarser log), and a step is always
  // measured when rollback needs its loss or a validation loss is
  // reported with it. Clipping, when on, still clips every step. Waits
  // for the device (max_steps_in_flight) are not counted. 0 measures
  // every step.
  double max_overhead = 0.01;
  // ...except that the first `dense_steps` steps, and the `dense_steps`
  // after each action applied, are all measured, outside the budget: a bad
  // start and the outcome of a correction are judged at full resolution
  // (the analyzers' windows are 50-64 points), and the rest of a long run
  // pays the 1%.
  int64_t dense_steps = 100;
  // Embedded mode (no client): the analyzer's and the policy's options,
  // and the run's planned length in steps (0: unknown). With a constant
  // schedule and a known length, an LR cut decays the LR to the planned
  // end (policy::PolicyOptions::anneal_after_cut); a daemon learns the
  // length from the client's RunConfig (total_steps, schedule).
  analyzers::AnalyzerOptions analyzer;
  policy::PolicyOptions policy;
  int64_t planned_steps = 0;
};

// What the guard did with one advice.
struct GuardEvent {
  int64_t step = 0;  // the step at which it was handled
  v1::Advice advice;
  bool applied = false;
  std::string note;  // what changed, in words
};

// Wraps a LibTorch optimizer: owns its LR schedule, measures the gradient
// norm before clipping, reports each step to lossguard and applies the
// actions it sends back.
//
//   lossguard::torch::Guard guard(&client, optimizer, options);
//   for (int64_t step = 0; ; ++step) {
//     guard.BeforeStep(step);            // sets the LR of every group
//     auto loss = loss_fn(model(x), y);
//     optimizer.zero_grad();
//     loss.backward();
//     guard.AfterBackward(step, loss);   // measure, clip, report, act
//     optimizer.step();
//     if (guard.should_stop()) break;
//   }
//
// Values are read at least one step late (each step is reported at a later
// AfterBackward, or by ReportValidation / Flush): on CUDA they are copied
// to pinned memory without blocking and read once their copy is done, so
// the guard adds no host-device synchronisation to a step unless the host
// runs GuardOptions::max_steps_in_flight steps ahead of the device.
// ReportValidation and Flush read every step in flight. Where measuring
// a step costs more than GuardOptions::max_overhead of it (1%; a tiny
// model on a GPU), only some steps are measured and reported.
//
// Without a client (the second constructor) the same analyzers and policy
// run in-process (embedded mode).
//
// Thread-safety: not thread-safe; call it from the training loop only.
class Guard {
 public:
  // `client` and `optimizer` must outlive the guard.
  Guard(Client* client, ::torch::optim::Optimizer& optimizer,
        GuardOptions options);
  Guard(::torch::optim::Optimizer& optimizer, GuardOptions options);
  ~Guard();

  Guard(const Guard&) = delete;
  Guard& operator=(const Guard&) = delete;

  // Sets every param group's LR for optimizer step `step` (the schedule
  // with lossguard's corrections; the ratios between groups are kept).
  void BeforeStep(int64_t step);

  // After loss.backward(), before optimizer.step(): measures the global
  // gradient norm (unless GuardOptions::grad_norm is false and clipping is
  // off), clips the gradients when clipping is on, queues this step's
  // report and handles advice that has arrived.
  void AfterBackward(int64_t step, const ::torch::Tensor& loss);

  // The validation loss measured after optimizer step `step` (the last
  // one passed to AfterBackward): reported with that step, and fed to
  // ReduceLROnPlateau.
  void ReportValidation(int64_t step, double val_loss);

  // Reports what is pending (call at the end of training).
  void Flush();

  // Handles `advice` at step `step` as AfterBackward handles the daemon's
  // (applied in AUTO mode, or in ADVISE mode when `accept` agrees; acked
  // when there is a client): for advice that came another way.
  void Apply(int64_t step, const v1::Advice& advice);

  bool should_stop() const { return stop_; }
  bool ramping() const { return ramp_left_ > 0; }
  double lr() const;  // LR of param group 0 now
  std::optional<double> clip_max_norm() const { return clip_; }
  const std::vector<GuardEvent>& events() const { return events_; }
  // Steps measured and reported, and steps skipped to stay within
  // GuardOptions::max_overhead.
  int64_t measured_steps() const { return measured_steps_; }
  int64_t skipped_steps() const { return skipped_steps_; }
  const schedule::LrSchedule& schedule() const { return schedule_; }

 private:
  class Embedded;
  struct Pending;
  struct Staging;

  // Reports the pending steps that are ready, oldest first, waiting for
  // the oldest while too many are in flight; with `wait_all`, every one.
  // The time spent waiting for the device is added to `waited_us`
  // (nullable).
  void ReportPending(bool wait_all, double* waited_us);
  void Report(Pending& p, double loss, std::optional<double> grad_norm);
  // Judges the weights staged with `p` (if any) by its loss.
  void MaybeSnapshot(Pending& p, double loss);
  // Restores the newest snapshot taken before `onset`; false if none.
  bool RollBack(int64_t onset, std::string* note);
  void HandleAdvice(int64_t step);
  void SetLr(double lr0);
  // Whether step `step` is measured: within the overhead budget, or
  // needed by rollback.
  bool ShouldMeasure(int64_t step) const;
  // Stages `loss` (and `norm`, if defined) of step `step` to be reported.
  void Stage(int64_t step, double lr, const ::torch::Tensor& loss,
             ::torch::Tensor norm);
  // Stages the last step if it was not measured (for a validation loss,
  // or at the end).
  void StageUnmeasured();
  // Charges the guard's time since `start` (less `waited_us`) against the
  // overhead budget; returns the time now.
  std::chrono::steady_clock::time_point Charge(
      std::chrono::steady_clock::time_point start, double waited_us);

  Client* const client_;
  ::torch::optim::Optimizer& optimizer_;
  GuardOptions options_;
  schedule::LrSchedule schedule_;
  std::vector<double> ratios_;  // lr of group i / lr of group 0
  std::optional<double> clip_;
  bool stop_ = false;
  // An LR ramp in progress (ramp_lr): factor per step, steps left.
  double ramp_factor_ = 1.0;
  int64_t ramp_left_ = 0;
  // Then a cosine decay from the ramp's top (RampLr decay_steps): steps
  // (0: none) and the LR it ends at.
  int64_t ramp_decay_steps_ = 0;
  double ramp_decay_eta_min_ = 0.0;
  int64_t step_ = 0;  // last step seen
  double peak_loss_ = -1.0;  // highest finite loss reported, and its step
  int64_t peak_step_ = 0;
  std::deque<std::unique_ptr<Pending>> pending_;  // oldest first
  std::unique_ptr<Staging> staging_;  // CUDA only
  // The last step reported and its loss: a snapshot's loss before.
  int64_t last_reported_step_ = -2;
  double last_reported_loss_ = 0.0;
  std::unique_ptr<Embedded> embedded_;
  std::vector<v1::Advice> embedded_advice_;  // decided, not yet handled
  struct Snapshot {
    int64_t step = 0;
    std::vector<::torch::Tensor> tensors;  // parameters, then buffers
  };
  // A copy of the rollback module's parameters and buffers.
  Snapshot TakeSnapshot(int64_t step) const;
  std::vector<Snapshot> snapshots_;  // good ones, oldest first
  std::vector<GuardEvent> events_;
  // The overhead budget (max_overhead): microseconds earned and not yet
  // spent (at most 0: spending waits until it is earned back), the guard's
  // time charged since the last AfterBackward, and when that began.
  double credit_us_ = 0.0;
  double charged_us_ = 0.0;
  // Steps before this one are all measured (dense_steps); -1: the first
  // step has not come yet.
  int64_t dense_until_ = -1;
  std::optional<std::chrono::steady_clock::time_point> last_entry_;
  int64_t measured_steps_ = 0;
  int64_t skipped_steps_ = 0;
  // The last step not measured, its LR and its loss (on the device): staged
  // if a validation loss is reported with it.
  int64_t unmeasured_step_ = -1;
  double unmeasured_lr_ = 0.0;
  ::torch::Tensor unmeasured_loss_;
};

}  // namespace lossguard::torch

#endif  // LOSSGUARD_TORCH_GUARD_H_
