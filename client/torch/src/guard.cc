#include "lossguard/torch/guard.h"

#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <utility>

#include "absl/strings/str_format.h"
#include "lossguard/policy/advisor.h"
#include "lossguard/wire/convert.h"

namespace lossguard::torch {
namespace {

schedule::ScheduleConfig ResolveSchedule(schedule::ScheduleConfig config,
                                         ::torch::optim::Optimizer& opt) {
  if (!(config.base_lr > 0.0) && !opt.param_groups().empty()) {
    config.base_lr = opt.param_groups()[0].options().get_lr();
  }
  return config;
}

double Micros(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double, std::micro>(d).count();
}

}  // namespace

// The analyzers and policy in-process, for a guard without a daemon.
class Guard::Embedded {
 public:
  Embedded(const GuardOptions& o) : advisor_(o.analyzer, o.policy) {
    if (o.schedule.kind == schedule::ScheduleKind::kConstant) {
      advisor_.mutable_context()->planned_steps =
          std::max<int64_t>(o.planned_steps, 0);
    }
  }

  // Feeds one step; advice decided at it is appended to `out`.
  void Feed(const analyzers::StepRecord& rec, std::vector<v1::Advice>* out) {
    decided_.clear();
    if (!advisor_.Feed(rec, &decided_).ok()) return;
    advisor_.TakeDue(&decided_);
    for (const analyzers::Diagnosis& d : decided_) {
      if (d.kind == analyzers::DiagnosisKind::kLossSpike) continue;
      policy::Advice a = advisor_.Decide(d);
      advisor_.Record(d, a);
      out->push_back(wire::ToProto(a, d, next_id_++));
    }
  }

 private:
  policy::Advisor advisor_;
  std::vector<analyzers::Diagnosis> decided_;
  uint64_t next_id_ = 1;
};

// One step's values, still on the device until they are reported.
struct Guard::Pending {
  int64_t step = 0;
  double lr = 0.0;
  ::torch::Tensor loss;  // 0-dim, on the device
  ::torch::Tensor norm;  // 0-dim, float64, on the same device (undefined:
                         // not measured)
  int slot = -1;         // CUDA: the staging slot its copies go to
  std::optional<double> val_loss;
  // With rollback, a copy of the weights this step's loss was computed from
  // (those after optimizer step `step` - 1), taken every `snapshot_every`
  // steps; the step's loss tells whether it is good.
  std::optional<Snapshot> candidate;
};

// Pinned host buffers and an event per step in flight, made once and reused
// (a ring of GuardOptions::max_steps_in_flight slots): the copies of a
// step's loss and gradient norm go behind its work on the device and are
// read once their event says they are done. Reading the device tensors
// instead would wait for everything queued since, the next step's forward
// and backward included.
struct Guard::Staging {
  struct Slot {
    ::torch::Tensor loss;  // 0-dim, the loss's dtype, pinned
    ::torch::Tensor norm;  // 0-dim, float64, pinned
    std::optional<c10::Event> copied;
  };
  std::vector<Slot> slots;
};

Guard::Guard(Client* client, ::torch::optim::Optimizer& optimizer,
             GuardOptions options)
    : client_(client),
      optimizer_(optimizer),
      options_(std::move(options)),
      schedule_(ResolveSchedule(options_.schedule, optimizer)) {
  const auto& groups = optimizer_.param_groups();
  const double lr0 = groups.empty() ? 1.0 : groups[0].options().get_lr();
  for (const auto& g : groups) {
    ratios_.push_back(lr0 > 0.0 ? g.options().get_lr() / lr0 : 1.0);
  }
  clip_ = options_.clip_max_norm;
  if (client_ == nullptr) embedded_ = std::make_unique<Embedded>(options_);
  if (options_.rollback_module != nullptr) {
    // The weights before any step: the last resort of a rollback.
    snapshots_.push_back(TakeSnapshot(-1));
  }
}

Guard::Guard(::torch::optim::Optimizer& optimizer, GuardOptions options)
    : Guard(nullptr, optimizer, std::move(options)) {}

Guard::~Guard() = default;

double Guard::lr() const {
  const auto& groups = optimizer_.param_groups();
  return groups.empty() ? 0.0 : groups[0].options().get_lr();
}

void Guard::SetLr(double lr0) {
  auto& groups = optimizer_.param_groups();
  for (size_t i = 0; i < groups.size(); ++i) {
    groups[i].options().set_lr(lr0 * ratios_[i]);
  }
}

void Guard::BeforeStep(int64_t step) {
  if (ramp_left_ > 0) {
    // An LR ramp (ramp_lr): one more factor per step, on top of the
    // schedule.
    schedule_.Scale(ramp_factor_);
    --ramp_left_;
    if (ramp_left_ == 0 && ramp_decay_steps_ > 0) {
      // The ramp's last step: from the next one, the LR decays from here
      // to the end of the planned run.
      const double top = schedule_.LrAt(step);
      schedule_.RestartCosine(step + 1, ramp_decay_steps_, top,
                              std::min(ramp_decay_eta_min_, top));
      ramp_decay_steps_ = 0;
      SetLr(top);
      return;
    }
  }
  SetLr(schedule_.LrAt(step));
}

bool Guard::ShouldMeasure(int64_t step) const {
  if (!(options_.max_overhead > 0.0) || credit_us_ >= 0.0 || step < dense_until_) {
    return true;
  }
  // Rollback judges the snapshot of the weights after step s - 1 (s - 1 a
  // multiple of snapshot_every) by the loss of step s against that of step
  // s - 1: both are measured.
  if (options_.rollback_module != nullptr && options_.snapshot_every > 0) {
    const int64_t r = step % options_.snapshot_every;
    if (r == 0 || r == 1 % options_.snapshot_every) return true;
  }
  return false;
}

std::chrono::steady_clock::time_point Guard::Charge(
    std::chrono::steady_clock::time_point start, double waited_us) {
  const auto now = std::chrono::steady_clock::now();
  const double us = Micros(now - start) - waited_us;
  charged_us_ += us;
  credit_us_ -= us;
  return now;
}

void Guard::AfterBackward(int64_t step, const ::torch::Tensor& loss) {
  // The run's first steps (from wherever it starts) are measured densely.
  if (dense_until_ < 0) dense_until_ = step + std::max<int64_t>(options_.dense_steps, 0);
  // Dense steps are outside the budget: nothing is charged for them, so
  // that the budget resumes after them without a debt.
  const bool budget = options_.max_overhead > 0.0 && step >= dense_until_;
  const auto entry = std::chrono::steady_clock::now();
  if (budget) {
    // The step since the last call earns its share, less the guard's own
    // time in it.
    if (last_entry_.has_value()) {
      const double period_us = Micros(entry - *last_entry_);
      credit_us_ = std::min(0.0, credit_us_ + options_.max_overhead *
                                                  std::max(0.0, period_us - charged_us_));
    }
    last_entry_ = entry;
    charged_us_ = 0.0;
  }
  const bool measure = ShouldMeasure(step);
  // Earlier steps go out first: those whose values are ready by now, and
  // the oldest, waited for, while too many are in flight.
  double waited_us = 0.0;
  ReportPending(/*wait_all=*/false, &waited_us);
  // The start of the next stretch charged (read only under the budget).
  auto mark = budget ? Charge(entry, waited_us) : entry;
  step_ = step;

  // Global L2 norm of the gradients, before clipping, on the device and in
  // a handful of kernels whatever the number of parameters: _foreach_norm
  // is one fused launch on CUDA (as in torch.nn.utils.clip_grad_norm_ with
  // foreach), then one stack and one reduction, accumulated in double.
  ::torch::Tensor total;
  if ((measure && options_.grad_norm) || clip_.has_value()) {
    // The gradients themselves, not detached aliases (one dispatcher call
    // each): autograd records nothing of the norm and the clipping.
    ::torch::NoGradGuard no_grad;
    std::vector<::torch::Tensor> grads;
    for (const auto& group : optimizer_.param_groups()) {
      for (const auto& p : group.params()) {
        if (p.grad().defined()) grads.push_back(p.grad());
      }
    }
    total = grads.empty()
                ? ::torch::zeros({}, loss.options().dtype(::torch::kDouble))
                : at::linalg_vector_norm(::torch::stack(at::_foreach_norm(grads, 2)),
                                         2, at::OptionalIntArrayRef{},
                                         /*keepdim=*/false, ::torch::kDouble);
    if (clip_.has_value() && !grads.empty()) {
      // torch.nn.utils.clip_grad_norm_: no host sync either.
      ::torch::Tensor coef = (*clip_ / (total + 1e-6)).clamp_max(1.0);
      for (const auto& g : grads) g.mul_(coef.to(g.dtype()));
    }
  }
  // Clipping asked for measures the norm anyway: it is not the guard's
  // overhead.
  if (budget) {
    mark = clip_.has_value() ? std::chrono::steady_clock::now() : Charge(mark, 0.0);
  }

  if (measure) {
    Stage(step, lr(), loss, total);
    ++measured_steps_;
    unmeasured_step_ = -1;
    unmeasured_loss_ = ::torch::Tensor();
    if (budget) Charge(mark, 0.0);
    if (options_.rollback_module != nullptr && options_.snapshot_every > 0 &&
        step > 0 && (step - 1) % options_.snapshot_every == 0) {
      // The weights now are those after optimizer step `step` - 1 (a copy
      // of the model: rollback's cost, not counted as the guard's).
      pending_.back()->candidate = TakeSnapshot(step - 1);
    }
  } else {
    ++skipped_steps_;
    unmeasured_step_ = step;
    unmeasured_lr_ = lr();
    unmeasured_loss_ = loss;  // a reference, no device work
  }
  HandleAdvice(step);
}

void Guard::Stage(int64_t step, double lr, const ::torch::Tensor& loss,
                  ::torch::Tensor norm) {
  auto pending = std::make_unique<Pending>();
  pending->step = step;
  pending->lr = lr;
  pending->loss = loss.detach().reshape({});
  if (norm.defined()) {
    pending->norm = norm.device() == pending->loss.device()
                        ? std::move(norm)
                        : norm.to(pending->loss.device());
  }
  if (pending->loss.is_cuda()) {
    if (staging_ == nullptr) {
      staging_ = std::make_unique<Staging>();
      staging_->slots.resize(std::max(options_.max_steps_in_flight, 1));
    }
    Staging& st = *staging_;
    // The slot after the newest pending step's is free: at most
    // slots.size() - 1 steps are pending now, in consecutive slots.
    size_t i = 0;
    for (auto it = pending_.rbegin(); it != pending_.rend(); ++it) {
      if ((*it)->slot >= 0) {
        i = (static_cast<size_t>((*it)->slot) + 1) % st.slots.size();
        break;
      }
    }
    Staging::Slot& slot = st.slots[i];
    const auto pinned = ::torch::TensorOptions().pinned_memory(true);
    if (!slot.loss.defined() || slot.loss.scalar_type() != pending->loss.scalar_type()) {
      slot.loss = ::torch::empty({}, pinned.dtype(pending->loss.scalar_type()));
    }
    slot.loss.copy_(pending->loss, /*non_blocking=*/true);
    if (pending->norm.defined()) {
      if (!slot.norm.defined()) {
        slot.norm = ::torch::empty({}, pinned.dtype(::torch::kDouble));
      }
      slot.norm.copy_(pending->norm, /*non_blocking=*/true);
    }
    const c10::Device device = pending->loss.device();
    if (!slot.copied.has_value() || slot.copied->device_index() != device.index()) {
      slot.copied.emplace(device.type());
    }
    slot.copied->record(c10::impl::getDeviceGuardImpl(device.type())->getStream(device));
    pending->slot = static_cast<int>(i);
  }
  pending_.push_back(std::move(pending));
}

void Guard::StageUnmeasured() {
  if (unmeasured_step_ < 0 || !unmeasured_loss_.defined()) return;
  // At most max_steps_in_flight - 1 stay pending, so that its slot is free.
  ReportPending(/*wait_all=*/false, nullptr);
  Stage(unmeasured_step_, unmeasured_lr_, unmeasured_loss_, ::torch::Tensor());
  ++measured_steps_;
  --skipped_steps_;
  unmeasured_step_ = -1;
  unmeasured_loss_ = ::torch::Tensor();
}

void Guard::ReportValidation(int64_t step, double val_loss) {
  // A step not measured is, now that it has a validation loss.
  if (unmeasured_step_ == step) StageUnmeasured();
  if (!pending_.empty() && pending_.back()->step == step) {
    pending_.back()->val_loss = val_loss;
  }
  schedule_.ObserveMetric(val_loss);
  ReportPending(/*wait_all=*/true, nullptr);
  HandleAdvice(step);
}

void Guard::Flush() {
  // The last step goes out even if it was not measured: the curve's end.
  StageUnmeasured();
  ReportPending(/*wait_all=*/true, nullptr);
}

void Guard::ReportPending(bool wait_all, double* waited_us) {
  // On CUDA, at most max_steps_in_flight - 1 stay pending, so that the
  // step about to be staged finds its slot free.
  const size_t keep =
      wait_all ? 0 : static_cast<size_t>(std::max(options_.max_steps_in_flight, 1) - 1);
  while (!pending_.empty()) {
    Pending& p = *pending_.front();
    double loss = 0.0;
    std::optional<double> grad_norm;
    if (p.slot >= 0) {
      Staging::Slot& slot = staging_->slots[p.slot];
      if (!slot.copied->query()) {
        if (pending_.size() <= keep) return;  // not ready: reported later
        // (c10::Event::synchronize is not in every LibTorch this builds
        // with; CUDA's own event wait spins the same way by default.)
        const auto wait_start = std::chrono::steady_clock::now();
        while (!slot.copied->query()) std::this_thread::yield();
        if (waited_us != nullptr) {
          *waited_us += Micros(std::chrono::steady_clock::now() - wait_start);
        }
      }
      loss = slot.loss.item<double>();
      if (p.norm.defined()) grad_norm = slot.norm.item<double>();
    } else {
      loss = p.loss.item<double>();
      if (p.norm.defined()) grad_norm = p.norm.item<double>();
    }
    std::unique_ptr<Pending> done = std::move(pending_.front());
    pending_.pop_front();
    Report(*done, loss, grad_norm);
  }
}

void Guard::Report(Pending& p, double loss, std::optional<double> grad_norm) {
  if (std::isfinite(loss) && loss > peak_loss_) {
    peak_loss_ = loss;
    peak_step_ = p.step;
  }
  MaybeSnapshot(p, loss);
  analyzers::StepRecord rec;
  rec.step = p.step;
  rec.lr = p.lr;
  rec.loss = loss;
  rec.val_loss = p.val_loss;
  rec.grad_norm = grad_norm;
  if (options_.on_report) options_.on_report(rec);
  if (client_ != nullptr) {
    client_->Report(p.step, p.lr, loss, p.val_loss, grad_norm);
    return;
  }
  std::vector<v1::Advice> advice;
  embedded_->Feed(rec, &advice);
  for (v1::Advice& a : advice) embedded_advice_.push_back(std::move(a));
}

void Guard::MaybeSnapshot(Pending& p, double loss) {
  // A candidate holds the weights after step p.step - 1, from which `loss`
  // was computed: they are good if it is finite and not blowing up against
  // the loss before it.
  const bool follows = last_reported_step_ == p.step - 1;
  const double before = last_reported_loss_;
  last_reported_step_ = p.step;
  last_reported_loss_ = loss;
  if (!p.candidate.has_value()) return;
  if (follows && std::isfinite(before) && std::isfinite(loss) && loss <= 2.0 * before) {
    snapshots_.push_back(std::move(*p.candidate));
    while (static_cast<int>(snapshots_.size()) > std::max(options_.snapshots_kept, 1)) {
      snapshots_.erase(snapshots_.begin());
    }
  }
  p.candidate.reset();
}

Guard::Snapshot Guard::TakeSnapshot(int64_t step) const {
  Snapshot snap;
  snap.step = step;
  ::torch::NoGradGuard no_grad;
  for (const auto& t : options_.rollback_module->parameters()) {
    snap.tensors.push_back(t.detach().clone());
  }
  for (const auto& t : options_.rollback_module->buffers()) {
    snap.tensors.push_back(t.detach().clone());
  }
  return snap;
}

bool Guard::RollBack(int64_t onset, std::string* note) {
  const Snapshot* best = nullptr;
  for (const Snapshot& s : snapshots_) {
    if (s.step < onset) best = &s;
  }
  if (best == nullptr) return false;
  ::torch::NoGradGuard no_grad;
  size_t i = 0;
  for (auto& t : options_.rollback_module->parameters()) {
    t.copy_(best->tensors[i++]);
  }
  for (auto& t : options_.rollback_module->buffers()) {
    t.copy_(best->tensors[i++]);
  }
  // Momentum and moments built on the bad steps go too, and so do this
  // step's gradients (of the bad weights): the optimizer.step() that follows
  // skips parameters without a gradient.
  optimizer_.state().clear();
  for (auto& group : optimizer_.param_groups()) {
    for (auto& param : group.params()) param.mutable_grad() = ::torch::Tensor();
  }
  *note += absl::StrFormat("; weights rolled back to step %d", best->step);
  // Later snapshots hold the diverging weights.
  const int64_t kept_step = best->step;
  for (auto& p : pending_) p->candidate.reset();
  snapshots_.erase(std::remove_if(snapshots_.begin(), snapshots_.end(),
                                  [kept_step](const Snapshot& s) {
                                    return s.step > kept_step;
                                  }),
                   snapshots_.end());
  return true;
}

void Guard::HandleAdvice(int64_t step) {
  for (;;) {
    std::optional<v1::Advice> a;
    if (client_ != nullptr) {
      a = client_->PollAdvice();
    } else if (!embedded_advice_.empty()) {
      a = std::move(embedded_advice_.front());
      embedded_advice_.erase(embedded_advice_.begin());
    }
    if (!a.has_value()) return;
    Apply(step, *a);
  }
}

void Guard::Apply(int64_t step, const v1::Advice& advice) {
  GuardEvent event;
  event.step = step;
  event.advice = advice;
  bool apply = false;
  if (advice.has_action()) {
    switch (options_.mode) {
      case v1::AUTO:
        apply = true;
        break;
      case v1::ADVISE:
        apply = options_.accept ? options_.accept(advice) : false;
        break;
      default:
        break;
    }
  }
  // set_lr scales the schedule so that it gives the LR asked for; where the
  // schedule's LR is 0 (a warmup from 0, the end of a cosine cycle) no scale
  // gets there, so the action is not applied and the ack says why.
  std::string refusal = "rejected by the trainer";
  if (apply && advice.action().kind_case() == v1::Action::kSetLr &&
      !(schedule_.LrAt(step + 1) > 0.0)) {
    apply = false;
    refusal = absl::StrFormat(
        "not applied: the schedule's LR is 0 at step %d, so no scale of it "
        "gives %.4g",
        step + 1, advice.action().set_lr().lr());
    event.note = refusal;
  }
  if (apply) {
    const v1::Action& act = advice.action();
    const double before = lr();
    // The change takes effect from the next optimizer step.
    const int64_t next = step + 1;
    // Any other LR action, or a rollback, ends a ramp.
    if (act.kind_case() == v1::Action::kScaleLr ||
        act.kind_case() == v1::Action::kSetLr ||
        act.kind_case() == v1::Action::kRestartCosine ||
        act.restore_checkpoint()) {
      ramp_left_ = 0;
      ramp_decay_steps_ = 0;
    }
    switch (act.kind_case()) {
      case v1::Action::kRampLr: {
        // A factor within (1, 10] per step; more steps than 10,000 would
        // not be a ramp.
        const double f = act.ramp_lr().factor_per_step();
        if (f > 1.0 && f <= 10.0 && act.ramp_lr().steps() > 0) {
          ramp_factor_ = f;
          ramp_left_ = std::min<int64_t>(act.ramp_lr().steps(), 10000);
          const double top =
              before * std::pow(f, static_cast<double>(ramp_left_));
          event.note = absl::StrFormat(
              "LR ramp x%g per step for %d steps, from %.4g to %.4g", f,
              ramp_left_, before, top);
          ramp_decay_steps_ = std::max<int64_t>(act.ramp_lr().decay_steps(), 0);
          ramp_decay_eta_min_ = std::max(act.ramp_lr().decay_eta_min(), 0.0);
          if (ramp_decay_steps_ > 0) {
            absl::StrAppendFormat(&event.note,
                                  ", then a cosine decay to %.4g over %d steps",
                                  std::min(ramp_decay_eta_min_, top),
                                  ramp_decay_steps_);
          }
        } else {
          event.note = absl::StrFormat("LR ramp x%g for %d steps ignored",
                                       f, act.ramp_lr().steps());
        }
        break;
      }
      case v1::Action::kScaleLr:
        schedule_.Scale(act.scale_lr().factor());
        event.note = absl::StrFormat("LR x%g (%.4g -> %.4g)",
                                     act.scale_lr().factor(), before,
                                     schedule_.LrAt(next));
        break;
      case v1::Action::kSetLr: {
        schedule_.Scale(act.set_lr().lr() / schedule_.LrAt(next));
        event.note = absl::StrFormat("LR set to %.4g", act.set_lr().lr());
        break;
      }
      case v1::Action::kRestartCosine: {
        const auto& r = act.restart_cosine();
        schedule_.RestartCosine(next, r.t_0(), r.eta_max(), r.eta_min());
        event.note =
            r.eta_max() < before
                // A cut's decay to the end of the run (anneal_after_cut).
                ? absl::StrFormat("LR %.4g -> %.4g, then a cosine decay to "
                                  "%.4g over %d steps",
                                  before, r.eta_max(), r.eta_min(), r.t_0())
                : absl::StrFormat("cosine restarted: %.4g -> %.4g over %d "
                                  "steps",
                                  r.eta_max(), r.eta_min(), r.t_0());
        break;
      }
      case v1::Action::kEnableGradClip:
        clip_ = act.enable_grad_clip().max_norm();
        event.note =
            absl::StrFormat("gradient clipping at norm %.4g", *clip_);
        break;
      case v1::Action::kEarlyStop:
        stop_ = true;
        event.note = "early stop";
        break;
      case v1::Action::KIND_NOT_SET:
        break;
    }
    if (act.grad_clip_max_norm() > 0.0) {
      clip_ = act.grad_clip_max_norm();
      event.note += absl::StrFormat("; gradient clipping at norm %.4g", *clip_);
    }
    if (options_.rollback_module != nullptr && act.restore_checkpoint()) {
      // The newest good weights from before the trouble began: the
      // divergence's onset, or for a run stuck after a blow-up, the step of
      // its highest loss (the stagnation's onset comes after the damage).
      RollBack(advice.diagnosis().kind() == v1::DIVERGENCE
                   ? advice.diagnosis().onset()
                   : peak_step_,
               &event.note);
    }
    event.applied = true;
    // The correction's outcome is judged at full resolution.
    dense_until_ = std::max(dense_until_, step + 1 + std::max<int64_t>(options_.dense_steps, 0));
  }
  if (client_ != nullptr && advice.has_action() &&
      (options_.mode == v1::AUTO ||
       (options_.mode == v1::ADVISE && options_.accept))) {
    // Applied now, before this step's optimizer.step(): the next step's
    // loss is the first computed after it.
    client_->Ack(advice.advice_id(), apply,
                 apply ? event.note : refusal,
                 apply ? std::optional<int64_t>(step + 1) : std::nullopt);
  }
  if (options_.on_advice) options_.on_advice(advice, apply);
  events_.push_back(std::move(event));
}

}  // namespace lossguard::torch
