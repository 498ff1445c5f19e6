#include "lossguard/runs/run.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "lossguard/wire/convert.h"
#include "nlohmann/json.hpp"

namespace lossguard::runs {
namespace {

using analyzers::Diagnosis;
using analyzers::DiagnosisKind;
using policy::ActionKind;
using wire::FromProto;
using wire::ToProto;

class SystemClockImpl final : public Clock {
 public:
  double Now() const override {
    return std::chrono::duration<double>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

double Median(std::vector<double> v) {
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  const size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + mid, v.end());
  double m = v[mid];
  if (v.size() % 2 == 0) {
    m = 0.5 * (m + *std::max_element(v.begin(), v.begin() + mid));
  }
  return m;
}

bool IsAtRisk(DiagnosisKind k) {
  return k == DiagnosisKind::kOscillation || k == DiagnosisKind::kStagnation ||
         k == DiagnosisKind::kGradientExplosion;
}

}  // namespace

Clock* SystemClock() {
  static SystemClockImpl* clock = new SystemClockImpl();
  return clock;
}

storage::StepRow ToRow(const v1::Step& s) {
  storage::StepRow row;
  row.step = s.step();
  row.lr = s.lr();
  row.loss = s.loss();
  if (s.has_val_loss()) row.val_loss = s.val_loss();
  if (s.has_grad_norm()) row.grad_norm = s.grad_norm();
  row.wall_time = s.wall_time();
  return row;
}

v1::Step FromRow(const storage::StepRow& row) {
  v1::Step step;
  step.set_step(row.step);
  step.set_lr(row.lr);
  step.set_loss(row.loss);
  if (row.val_loss) step.set_val_loss(*row.val_loss);
  if (row.grad_norm) step.set_grad_norm(*row.grad_norm);
  step.set_wall_time(row.wall_time);
  return step;
}

namespace {

// The run's planned length when its LR is planned to stay constant (see
// policy::RunContext::planned_steps); 0 otherwise.
int64_t PlannedConstantSteps(const v1::RunConfig& config) {
  const bool constant = config.schedule() == v1::CONSTANT ||
                        config.schedule() == v1::SCHEDULE_UNSPECIFIED;
  return constant && config.total_steps() > 0 ? config.total_steps() : 0;
}

// The summary's tags from their stored form, a JSON object of strings
// (anything else is ignored).
void SetTagsFromJson(const std::string& tags_json, v1::RunSummary* summary) {
  summary->clear_tags();
  const nlohmann::json tags =
      nlohmann::json::parse(tags_json, nullptr, /*allow_exceptions=*/false);
  if (!tags.is_object()) return;
  for (const auto& [k, v] : tags.items()) {
    if (v.is_string()) (*summary->mutable_tags())[k] = v.get<std::string>();
  }
}

}  // namespace

Run::Run(const storage::RunRow& row, const v1::RunConfig& config,
         const RunOptions* options, storage::RunStore* store, Clock* clock)
    : run_id_(row.run_id),
      options_(options),
      store_(store),
      clock_(clock),
      project_(row.project),
      name_(row.name),
      tags_json_(row.tags_json),
      config_(config),
      advisor_(options->analyzer, options->policy) {
  summary_.set_run_id(row.run_id);
  summary_.set_name(row.name);
  summary_.set_project(row.project);
  summary_.set_mode(v1::Mode_IsValid(row.mode) ? static_cast<v1::Mode>(row.mode)
                                               : v1::OBSERVE);
  SetTagsFromJson(row.tags_json, &summary_);
  summary_.set_state(row.state == v1::FINISHED ? v1::FINISHED : v1::DETACHED);
  finished_ = row.state == v1::FINISHED;
  summary_.set_created_time(row.created_time);
  summary_.set_updated_time(row.updated_time);
  summary_.set_has_steps(row.has_steps);
  summary_.set_last_step(row.last_step);
  summary_.set_steps_stored(row.steps_stored);
  if (row.has_steps) durable_step_.store(row.last_step);
  advisor_.mutable_context()->planned_steps = PlannedConstantSteps(config_);
}

Run::~Run() = default;

absl::Status Run::Recover() {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<std::vector<storage::EventRow>> events =
      store_->ReadEvents(run_id_);
  if (!events.ok()) return events.status();
  for (const storage::EventRow& e : *events) {
    if (e.type == storage::EventRow::Type::kDiagnosis) {
      v1::Diagnosis d;
      if (!d.ParseFromString(e.payload)) {
        return absl::DataLossError(absl::StrCat(
            "run ", run_id_, ": diagnosis ", e.id, " does not parse"));
      }
      diagnoses_.push_back(std::move(d));
      next_diagnosis_id_ = std::max(next_diagnosis_id_, e.id + 1);
    } else {
      v1::AdviceRecord r;
      if (!r.ParseFromString(e.payload)) {
        return absl::DataLossError(absl::StrCat(
            "run ", run_id_, ": advice ", e.id, " does not parse"));
      }
      next_advice_id_ = std::max(next_advice_id_, e.id + 1);
      if (r.outcome() == v1::PENDING) {
        // Its before-and-after window did not survive the restart.
        r.set_outcome(v1::NOT_JUDGED);
        r.set_outcome_evidence(
            "the daemon restarted before the outcome window closed");
        PersistAdviceLocked(r);
      }
      // Rebuild the policy's memory of its own actions through the same
      // policy::ObserveAdvice as when they were sent (LR ceiling after a
      // blow-up cut, the watch window of a raise or a ramp, the LR before
      // a raise, counts, overfitting advised). Not rebuilt: cooldown
      // deferrals, and the Advisor's range test over a ramp in progress.
      const policy::Advice a =
          FromProto(r.advice(), r.lr_when_sent(), options_->policy);
      analyzers::Diagnosis d;
      d.kind = a.diagnosis;
      d.step = r.advice().diagnosis().step();
      policy::ObserveAdvice(d, a, advisor_.mutable_context());
      advice_.push_back(std::move(r));
    }
  }
  while (diagnoses_.size() > static_cast<size_t>(options_->max_advice_in_memory)) {
    diagnoses_.pop_front();
  }
  while (advice_.size() > static_cast<size_t>(options_->max_advice_in_memory)) {
    advice_.pop_front();
  }
  // Replay the curve: the analyzer's and the policy's state come back, the
  // diagnoses it decides again are already stored.
  int64_t replayed = 0;
  absl::Status feed_error;
  absl::Status s = store_->ReadSteps(
      run_id_, std::numeric_limits<int64_t>::min(),
      std::numeric_limits<int64_t>::max(), [&](const storage::StepRow& row) {
        mu_.AssertHeld();  // ReadSteps calls back here, under Recover's lock
        FeedLocked(FromRow(row), nullptr, /*replaying=*/true);
        ++replayed;
        return true;
      });
  if (!s.ok()) return s;
  summary_.set_steps_stored(std::max<int64_t>(summary_.steps_stored(), replayed));
  summary_.set_has_steps(replayed > 0 || summary_.has_steps());
  UpdateStateLocked();
  // Alerted before the restart (or would have been): not again.
  for (const Diagnosis& d : advisor_.analyzer().Active()) {
    if (d.kind == DiagnosisKind::kDivergence ||
        d.kind == DiagnosisKind::kOverfitting) {
      unhealthy_alerted_ = true;
    }
  }
  return absl::OkStatus();
}

absl::Status Run::Follow(const storage::RunRow& row) {
  absl::MutexLock lock(&mu_);
  // Metadata and state as the owner last stored them.
  name_ = row.name;
  tags_json_ = row.tags_json;
  summary_.set_name(row.name);
  SetTagsFromJson(row.tags_json, &summary_);
  if (v1::Mode_IsValid(row.mode)) {
    summary_.set_mode(static_cast<v1::Mode>(row.mode));
  }
  v1::RunConfig config;
  if (config.ParseFromString(row.config)) config_ = std::move(config);
  advisor_.mutable_context()->planned_steps = PlannedConstantSteps(config_);
  if (v1::RunState_IsValid(row.state) && row.state != v1::RUN_STATE_UNSPECIFIED) {
    summary_.set_state(static_cast<v1::RunState>(row.state));
  }
  finished_ = row.state == v1::FINISHED;
  summary_.set_updated_time(row.updated_time);

  // The diagnoses and advice as stored (acks and outcomes included).
  absl::StatusOr<std::vector<storage::EventRow>> events =
      store_->ReadEvents(run_id_);
  if (!events.ok()) return events.status();
  diagnoses_.clear();
  advice_.clear();
  for (const storage::EventRow& e : *events) {
    if (e.type == storage::EventRow::Type::kDiagnosis) {
      v1::Diagnosis d;
      if (d.ParseFromString(e.payload)) diagnoses_.push_back(std::move(d));
      next_diagnosis_id_ = std::max(next_diagnosis_id_, e.id + 1);
    } else {
      v1::AdviceRecord r;
      if (r.ParseFromString(e.payload)) advice_.push_back(std::move(r));
      next_advice_id_ = std::max(next_advice_id_, e.id + 1);
    }
  }
  while (diagnoses_.size() > static_cast<size_t>(options_->max_advice_in_memory)) {
    diagnoses_.pop_front();
  }
  while (advice_.size() > static_cast<size_t>(options_->max_advice_in_memory)) {
    advice_.pop_front();
  }

  // The steps stored since this copy's last one, through the analyzer.
  const int64_t from = summary_.has_steps()
                           ? summary_.last_step() + 1
                           : std::numeric_limits<int64_t>::min();
  absl::Status s = store_->ReadSteps(
      run_id_, from, std::numeric_limits<int64_t>::max(),
      [&](const storage::StepRow& row) {
        mu_.AssertHeld();  // ReadSteps calls back here, under Follow's lock
        FeedLocked(FromRow(row), nullptr, /*replaying=*/true);
        return true;
      });
  if (!s.ok()) return s;
  summary_.set_steps_stored(row.steps_stored);
  if (row.has_steps) durable_step_.store(row.last_step);
  return absl::OkStatus();
}

uint64_t Run::Attach(const v1::RunStart& start, v1::AttachAccepted* accepted) {
  absl::MutexLock lock(&mu_);
  const uint64_t session = next_session_++;
  session_ = session;
  attached_ = true;
  finished_ = false;  // re-attaching a finished run continues it
  if (!start.name().empty()) name_ = start.name();
  summary_.set_name(name_);
  summary_.clear_tags();
  nlohmann::json tags = nlohmann::json::object();
  for (const auto& [k, v] : start.tags()) {
    (*summary_.mutable_tags())[k] = v;
    tags[k] = v;
  }
  tags_json_ = tags.dump();
  if (start.has_config()) config_ = start.config();
  advisor_.mutable_context()->planned_steps = PlannedConstantSteps(config_);
  summary_.set_mode(start.mode() == v1::MODE_UNSPECIFIED ? v1::OBSERVE
                                                          : start.mode());
  accepted->set_run_id(run_id_);
  // What is durable, not what is held: the trainer keeps (and resends) the
  // steps still queued for the store, so a crash loses none of them.
  const std::optional<int64_t> durable = durable_step();
  accepted->set_has_steps(durable.has_value());
  accepted->set_last_step(durable.value_or(0));
  PutRunLocked();
  UpdateStateLocked();
  return session;
}

void Run::Detach(uint64_t session) {
  absl::MutexLock lock(&mu_);
  if (session != session_) return;
  attached_ = false;
  UpdateStateLocked();
}

bool Run::IsCurrent(uint64_t session) const {
  absl::MutexLock lock(&mu_);
  return session == session_;
}

absl::Status Run::Ingest(uint64_t session, const v1::StepBatch& batch,
                         std::vector<v1::Advice>* to_send,
                         int64_t* duplicates, DurableCallback on_durable) {
  absl::MutexLock lock(&mu_);
  if (session != session_) {
    return absl::AbortedError(
        "a newer Attach for this run superseded this stream");
  }
  // Validate the whole batch first: nothing of a bad batch is taken. The
  // batch must strictly increase; its leading steps at or below the last
  // step held are duplicates (resent after a reconnect).
  int64_t dups = 0;
  int first_new = 0;
  for (int i = 0; i < batch.steps_size(); ++i) {
    const v1::Step& s = batch.steps(i);
    if (i > 0 && s.step() <= batch.steps(i - 1).step()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "step %d follows step %d in the batch: steps must increase",
          s.step(), batch.steps(i - 1).step()));
    }
    if (summary_.has_steps() && s.step() <= summary_.last_step()) {
      ++dups;
      first_new = i + 1;
      continue;
    }
    if (!std::isnan(s.lr()) && (!std::isfinite(s.lr()) || s.lr() < 0.0)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "step %d: lr %g is not a finite non-negative number (NaN means "
          "not logged)",
          s.step(), s.lr()));
    }
  }
  if (duplicates != nullptr) *duplicates = dups;
  rows_.clear();
  for (int i = first_new; i < batch.steps_size(); ++i) {
    const v1::Step& s = batch.steps(i);
    FeedLocked(s, to_send, /*replaying=*/false);
    rows_.push_back(ToRow(s));
  }
  const bool fed = !rows_.empty();
  if (fed || on_durable) {
    // Appended under the lock, so the store sees the run's steps in order.
    // With no new steps and a callback, an empty append marks the point
    // after the steps already queued.
    const std::optional<int64_t> last =
        summary_.has_steps() ? std::optional<int64_t>(summary_.last_step())
                             : std::nullopt;
    storage::RunStore::CommitCallback on_commit =
        [weak = weak_from_this(), last,
         on_durable = std::move(on_durable)](const absl::Status& s) {
          if (s.ok() && last.has_value()) {
            if (std::shared_ptr<Run> run = weak.lock()) {
              // Commits of one run come in order: the step only grows.
              run->durable_step_.store(*last);
            }
          }
          if (on_durable) on_durable(s, last);
        };
    store_->AppendSteps(run_id_, std::move(rows_), std::move(on_commit));
    rows_.clear();
    if (fed) summary_.set_updated_time(clock_->Now());
  }
  UpdateStateLocked();
  return absl::OkStatus();
}

void Run::FeedLocked(const v1::Step& step, std::vector<v1::Advice>* to_send,
                     bool replaying) {
  const analyzers::StepRecord rec = FromProto(step);
  decided_.clear();
  // Validated by the caller (or stored after validation): Feed cannot fail.
  absl::Status s = advisor_.Feed(rec, &decided_);
  if (!s.ok()) return;
  summary_.set_has_steps(true);
  summary_.set_last_step(step.step());
  summary_.set_last_loss(step.loss());
  summary_.set_last_lr(step.lr());
  if (step.has_val_loss()) summary_.set_last_val_loss(step.val_loss());
  if (!replaying) summary_.set_steps_stored(summary_.steps_stored() + 1);

  if (!replaying) TrackOutcomesLocked(step, to_send);
  recent_losses_.push_back(step.loss());
  while (recent_losses_.size() >
         static_cast<size_t>(options_->outcome_loss_points)) {
    recent_losses_.pop_front();
  }
  if (step.has_val_loss() && std::isfinite(step.val_loss())) {
    recent_vals_.push_back(step.val_loss());
    while (recent_vals_.size() > 3) recent_vals_.pop_front();
  }
  if (replaying) {
    // The diagnoses are stored already; the policy's memory of them is not.
    policy::RunContext* ctx = advisor_.mutable_context();
    for (const Diagnosis& d : decided_) {
      if (d.kind == DiagnosisKind::kGradientExplosion) {
        ctx->grad_explosion_seen = true;
      }
      if (d.grad_norm_level > 0.0) ctx->grad_norm_level = d.grad_norm_level;
    }
    return;
  }
  for (const Diagnosis& d : decided_) HandleDiagnosisLocked(d, to_send);
  decided_.clear();
  advisor_.TakeDue(&decided_);
  for (const Diagnosis& d : decided_) HandleDiagnosisLocked(d, to_send);
}

void Run::HandleDiagnosisLocked(const Diagnosis& d,
                                std::vector<v1::Advice>* to_send) {
  const double now = clock_->Now();
  v1::Diagnosis pd = ToProto(d);
  const uint64_t diag_id = next_diagnosis_id_++;
  store_->PutEvent({.run_id = run_id_,
                    .type = storage::EventRow::Type::kDiagnosis,
                    .id = diag_id,
                    .step = d.step,
                    .payload = pd.SerializeAsString()});
  diagnoses_.push_back(pd);
  while (diagnoses_.size() > static_cast<size_t>(options_->max_advice_in_memory)) {
    diagnoses_.pop_front();
  }
  {
    v1::RunEvent e;
    e.set_step(d.step);
    e.set_time(now);
    *e.mutable_diagnosis() = pd;
    PublishLocked(std::move(e));
  }
  if (d.kind == DiagnosisKind::kLossSpike) return;  // an event, no advice

  policy::Advice a = advisor_.Decide(d);
  const bool observe = summary_.mode() == v1::OBSERVE;
  if (observe && a.action != ActionKind::kNone) {
    // OBSERVE: say what would have been done, do not count it as done.
    a.explanation = absl::StrCat("OBSERVE mode, no action sent. Would advise ",
                                 std::string(policy::ActionName(a.action)), ": ",
                                 a.explanation);
    a.action = ActionKind::kNone;
  }
  EmitAdviceLocked(d, a, 0, to_send);
}

void Run::EmitAdviceLocked(const Diagnosis& d, const policy::Advice& a,
                           uint64_t rolls_back, std::vector<v1::Advice>* to_send) {
  const double now = clock_->Now();
  advisor_.Record(d, a);
  v1::AdviceRecord rec;
  *rec.mutable_advice() = ToProto(a, d, next_advice_id_++);
  if (rolls_back != 0) rec.mutable_advice()->set_rolls_back(rolls_back);
  rec.set_lr_when_sent(summary_.last_lr());
  rec.set_status(rec.advice().has_action() ? v1::SENT : v1::INFORMATIONAL);
  rec.set_outcome(v1::NOT_JUDGED);
  PersistAdviceLocked(rec);
  advice_.push_back(rec);
  while (advice_.size() > static_cast<size_t>(options_->max_advice_in_memory)) {
    advice_.pop_front();
  }
  {
    v1::RunEvent e;
    e.set_step(d.step);
    e.set_time(now);
    *e.mutable_advice() = rec.advice();
    PublishLocked(std::move(e));
  }
  if (to_send != nullptr && attached_) to_send->push_back(rec.advice());
}

void Run::PersistAdviceLocked(const v1::AdviceRecord& rec) {
  store_->PutEvent({.run_id = run_id_,
                    .type = storage::EventRow::Type::kAdvice,
                    .id = rec.advice().advice_id(),
                    .step = rec.advice().at_step(),
                    .payload = rec.SerializeAsString()});
}

void Run::SetOutcomeLocked(PendingOutcome& p, v1::Outcome outcome,
                           const std::string& evidence) {
  p.record.set_outcome(outcome);
  p.record.set_outcome_evidence(evidence);
  if (v1::AdviceRecord* rec = FindAdviceLocked(p.advice_id)) {
    rec->set_outcome(outcome);
    rec->set_outcome_evidence(evidence);
  }
  PersistAdviceLocked(p.record);
}

v1::AdviceRecord* Run::FindAdviceLocked(uint64_t id) {
  for (v1::AdviceRecord& r : advice_) {
    if (r.advice().advice_id() == id) return &r;
  }
  return nullptr;
}

double Run::RecentLossMedianLocked(int points) const {
  std::vector<double> v;
  const size_t n = std::min(recent_losses_.size(), static_cast<size_t>(points));
  for (size_t i = recent_losses_.size() - n; i < recent_losses_.size(); ++i) {
    if (std::isfinite(recent_losses_[i])) v.push_back(recent_losses_[i]);
  }
  return Median(std::move(v));
}

absl::Status Run::Ack(uint64_t session, const v1::AdviceAck& ack) {
  absl::MutexLock lock(&mu_);
  if (session != session_) {
    return absl::AbortedError(
        "a newer Attach for this run superseded this stream");
  }
  v1::AdviceRecord* rec = FindAdviceLocked(ack.advice_id());
  if (rec == nullptr || !rec->advice().has_action()) {
    return absl::NotFoundError(absl::StrFormat(
        "no action with advice id %d in run %s", ack.advice_id(), run_id_));
  }
  if (rec->status() != v1::SENT) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "advice %d was acked already", ack.advice_id()));
  }
  rec->set_status(ack.applied() ? v1::APPLIED : v1::REJECTED);
  rec->set_ack_reason(ack.reason());
  const int window = static_cast<int>(
      std::min<int64_t>(options_->policy.outcome_steps,
                        options_->outcome_loss_points));
  const bool early_stop = rec->advice().action().has_early_stop();
  if (ack.applied() && !early_stop) {
    rec->set_outcome(v1::PENDING);
    PendingOutcome p;
    p.advice_id = ack.advice_id();
    p.record = *rec;
    p.kind = FromProto(rec->advice().diagnosis().kind())
                 .value_or(DiagnosisKind::kDivergence);
    p.applied_step = summary_.last_step();
    if (ack.has_effective_step()) p.first_step = ack.effective_step();
    p.loss_before = RecentLossMedianLocked(window);
    if (!recent_vals_.empty()) {
      p.val_before = Median({recent_vals_.begin(), recent_vals_.end()});
    }
    pending_.push_back(std::move(p));
  }
  PersistAdviceLocked(*rec);
  if (ack.applied() && options_->on_alert) {
    Alert a;
    a.kind = Alert::Kind::kActionApplied;
    a.time = clock_->Now();
    a.summary = SummaryLocked();
    a.diagnosis = rec->advice().diagnosis();
    a.advice = *rec;
    options_->on_alert(a);
  }
  v1::RunEvent e;
  e.set_step(summary_.last_step());
  e.set_time(clock_->Now());
  v1::AckEvent* ae = e.mutable_ack();
  ae->set_advice_id(ack.advice_id());
  ae->set_applied(ack.applied());
  ae->set_reason(ack.reason());
  PublishLocked(std::move(e));
  return absl::OkStatus();
}

namespace {

// Whether `action` raised the LR above `lr_before` (a ramp, a cosine restart,
// a scale up, a set above it) and the LR `lr_now` still is above it.
bool RaisedTheLr(const v1::Action& action, double lr_before, double lr_now) {
  if (!(lr_before > 0.0) || !(lr_now > 1.05 * lr_before)) return false;
  switch (action.kind_case()) {
    case v1::Action::kRampLr:
      return action.ramp_lr().factor_per_step() > 1.0;
    case v1::Action::kRestartCosine:
      return action.restart_cosine().eta_max() > lr_before;
    case v1::Action::kScaleLr:
      return action.scale_lr().factor() > 1.0;
    case v1::Action::kSetLr:
      return action.set_lr().lr() > lr_before;
    default:
      return false;
  }
}

}  // namespace

bool Run::LaterLrActionAppliedLocked(uint64_t advice_id) const {
  for (const v1::AdviceRecord& r : advice_) {
    // Applied, or sent and not yet acked (it will be, in AUTO mode).
    if (r.advice().advice_id() <= advice_id ||
        (r.status() != v1::APPLIED && r.status() != v1::SENT)) {
      continue;
    }
    switch (r.advice().action().kind_case()) {
      case v1::Action::kScaleLr:
      case v1::Action::kSetLr:
      case v1::Action::kRampLr:
      case v1::Action::kRestartCosine:
        return true;
      default:
        break;
    }
  }
  return false;
}

void Run::RollBackLocked(const PendingOutcome& p, const std::string& evidence,
                         const v1::Step& step, std::vector<v1::Advice>* to_send) {
  const v1::Advice& original = p.record.advice();
  const double lr_before = p.record.lr_when_sent();
  Diagnosis d;
  d.kind = p.kind;
  d.step = step.step();
  d.onset = p.applied_step;
  d.severity = 0.5;
  d.confidence = 0.9;
  d.lr_at_onset = step.lr();
  d.evidence = absl::StrFormat("advice #%d (%s at step %d) raised the LR from %.3g to %.3g and "
                               "made things worse: %s",
                               original.advice_id(),
                               v1::Action::descriptor()
                                   ->FindFieldByNumber(original.action().kind_case())
                                   ->name(),
                               original.at_step(), lr_before, step.lr(), evidence);
  policy::Advice a;
  a.diagnosis = d.kind;
  a.at_step = d.step;
  a.action = ActionKind::kSetLr;
  a.lr_from = step.lr();
  a.lr_to = lr_before;
  a.explanation = absl::StrFormat(
      "Rolling back advice #%d: its LR raise made the loss worse, so the LR goes back to "
      "%.3g, where it was before.",
      original.advice_id(), lr_before);
  EmitAdviceLocked(d, a, original.advice_id(), to_send);
}

void Run::TrackOutcomesLocked(const v1::Step& step, std::vector<v1::Advice>* to_send) {
  if (pending_.empty()) return;
  const int64_t window = options_->policy.outcome_steps;
  for (auto it = pending_.begin(); it != pending_.end();) {
    PendingOutcome& p = *it;
    if (step.step() < p.first_step) {
      ++it;  // computed before the action took effect
      continue;
    }
    ++p.steps_after;
    if (!std::isfinite(step.loss())) p.nonfinite_after = true;
    if (step.has_val_loss() && std::isfinite(step.val_loss())) {
      p.val_after.push_back(step.val_loss());
      if (p.val_after.size() > 3) p.val_after.erase(p.val_after.begin());
    }
    if (p.steps_after < window) {
      ++it;
      continue;
    }
    // The loss of this step joins the window before it is judged.
    recent_losses_.push_back(step.loss());
    policy::OutcomeWindow w;
    w.loss_before = p.loss_before;
    w.loss_after = RecentLossMedianLocked(static_cast<int>(
        std::min<int64_t>(window, options_->outcome_loss_points)));
    recent_losses_.pop_back();
    w.nonfinite_after = p.nonfinite_after;
    w.val_before = p.val_before;
    if (!p.val_after.empty()) w.val_after = Median(p.val_after);
    w.steps_after = p.steps_after;
    policy::OutcomeJudgement j = policy::JudgeOutcome(p.kind, w, options_->policy);
    v1::Outcome outcome = j.outcome == policy::Outcome::kImproved ? v1::IMPROVED
                          : j.outcome == policy::Outcome::kWorsened
                              ? v1::WORSENED
                              : v1::NO_CHANGE;
    SetOutcomeLocked(p, outcome, j.evidence);
    // An LR raise that made things worse is undone (in ADVISE and AUTO:
    // only they apply actions). A cut that did is not: the loss went on
    // rising despite it, and the policy cuts again (cut_not_enough).
    // Not when a later LR action was applied (or sent) meanwhile (a cut
    // for the blow-up the raise led to): it answered the raise already,
    // and going back to the LR before the raise would undo it too.
    const bool roll_back = outcome == v1::WORSENED &&
                           RaisedTheLr(p.record.advice().action(),
                                       p.record.lr_when_sent(), step.lr()) &&
                           !LaterLrActionAppliedLocked(p.advice_id);
    v1::RunEvent e;
    e.set_step(step.step());
    e.set_time(clock_->Now());
    v1::OutcomeEvent* oe = e.mutable_outcome();
    oe->set_advice_id(p.advice_id);
    oe->set_outcome(outcome);
    oe->set_evidence(j.evidence);
    PublishLocked(std::move(e));
    if (roll_back) RollBackLocked(p, j.evidence, step, to_send);
    it = pending_.erase(it);
  }
}

void Run::Finish(uint64_t session, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (session != session_) return;
  finished_ = true;
  for (PendingOutcome& p : pending_) {
    SetOutcomeLocked(p, v1::NOT_JUDGED,
                     absl::StrCat("the run finished ", p.steps_after,
                                  " steps after the action"));
  }
  pending_.clear();
  (void)reason;
  UpdateStateLocked();
  for (const auto& sink : sinks_) sink->OnRunClosed();
  sinks_.clear();
}

v1::RunState Run::ComputeStateLocked() const {
  if (finished_) return v1::FINISHED;
  if (!attached_) return v1::DETACHED;
  bool at_risk = false;
  for (const Diagnosis& d : advisor_.analyzer().Active()) {
    if (d.kind == DiagnosisKind::kDivergence ||
        d.kind == DiagnosisKind::kOverfitting) {
      return v1::UNHEALTHY;
    }
    if (IsAtRisk(d.kind)) at_risk = true;
  }
  return at_risk ? v1::AT_RISK : v1::HEALTHY;
}

void Run::UpdateStateLocked() {
  const v1::RunState state = ComputeStateLocked();
  if (state == summary_.state()) return;
  summary_.set_state(state);
  summary_.set_updated_time(clock_->Now());
  PutRunLocked();
  v1::RunEvent e;
  e.set_step(summary_.last_step());
  e.set_time(clock_->Now());
  e.mutable_state()->set_state(state);
  PublishLocked(std::move(e));
  if (state == v1::HEALTHY || state == v1::AT_RISK) unhealthy_alerted_ = false;
  if (state == v1::UNHEALTHY && !unhealthy_alerted_ && options_->on_alert) {
    unhealthy_alerted_ = true;
    Alert a;
    a.kind = Alert::Kind::kRunUnhealthy;
    a.time = clock_->Now();
    a.summary = SummaryLocked();
    for (const Diagnosis& d : advisor_.analyzer().Active()) {
      if (d.kind == DiagnosisKind::kDivergence ||
          d.kind == DiagnosisKind::kOverfitting) {
        a.diagnosis = ToProto(d);
        break;
      }
    }
    options_->on_alert(a);
  }
}

void Run::PutRunLocked() {
  storage::RunRow row;
  row.run_id = run_id_;
  row.name = name_;
  row.project = project_;
  row.tags_json = tags_json_;
  row.config = config_.SerializeAsString();
  row.mode = summary_.mode();
  row.state = summary_.state();
  row.created_time = summary_.created_time();
  row.updated_time = summary_.updated_time();
  store_->PutRun(row);
}

void Run::PublishLocked(v1::RunEvent event) {
  if (sinks_.empty()) return;
  event.set_run_id(run_id_);
  for (const auto& sink : sinks_) sink->OnEvent(event);
}

v1::RunState Run::state() const {
  absl::MutexLock lock(&mu_);
  return summary_.state();
}

double Run::created_time() const {
  absl::MutexLock lock(&mu_);
  return summary_.created_time();
}

std::optional<int64_t> Run::durable_step() const {
  const int64_t step = durable_step_.load();
  if (step == kNoStep) return std::nullopt;
  return step;
}

std::optional<int64_t> Run::last_step() const {
  absl::MutexLock lock(&mu_);
  if (!summary_.has_steps()) return std::nullopt;
  return summary_.last_step();
}

v1::RunSummary Run::Summary() const {
  absl::MutexLock lock(&mu_);
  return SummaryLocked();
}

v1::RunSummary Run::SummaryLocked() const {
  v1::RunSummary s = summary_;
  s.clear_active();
  for (const Diagnosis& d : advisor_.analyzer().Active()) s.add_active(ToProto(d.kind));
  return s;
}

v1::RunHealth Run::Health() const {
  absl::MutexLock lock(&mu_);
  v1::RunHealth h;
  *h.mutable_summary() = summary_;
  *h.mutable_config() = config_;
  for (const Diagnosis& d : advisor_.analyzer().Active()) {
    h.mutable_summary()->add_active(ToProto(d.kind));
    *h.add_active_diagnoses() = ToProto(d);
  }
  for (const v1::AdviceRecord& r : advice_) *h.add_advice() = r;
  return h;
}

void Run::Markers(int64_t from_step, int64_t to_step,
                  std::vector<v1::Diagnosis>* diagnoses,
                  std::vector<v1::Advice>* advice) const {
  absl::MutexLock lock(&mu_);
  for (const v1::Diagnosis& d : diagnoses_) {
    if (d.step() >= from_step && d.step() <= to_step) diagnoses->push_back(d);
  }
  for (const v1::AdviceRecord& r : advice_) {
    const int64_t s = r.advice().at_step();
    if (s >= from_step && s <= to_step) advice->push_back(r.advice());
  }
}

void Run::Subscribe(const std::shared_ptr<EventSink>& sink, bool replay) {
  absl::MutexLock lock(&mu_);
  if (replay) {
    // Past diagnoses and advice, merged in step order.
    std::vector<v1::RunEvent> past;
    for (const v1::Diagnosis& d : diagnoses_) {
      v1::RunEvent e;
      e.set_run_id(run_id_);
      e.set_step(d.step());
      *e.mutable_diagnosis() = d;
      past.push_back(std::move(e));
    }
    for (const v1::AdviceRecord& r : advice_) {
      v1::RunEvent e;
      e.set_run_id(run_id_);
      e.set_step(r.advice().at_step());
      *e.mutable_advice() = r.advice();
      past.push_back(std::move(e));
    }
    std::stable_sort(past.begin(), past.end(),
                     [](const v1::RunEvent& a, const v1::RunEvent& b) {
                       return a.step() < b.step();
                     });
    for (const v1::RunEvent& e : past) sink->OnEvent(e);
  }
  v1::RunEvent e;
  e.set_run_id(run_id_);
  e.set_step(summary_.last_step());
  e.set_time(clock_->Now());
  e.mutable_state()->set_state(summary_.state());
  sink->OnEvent(e);
  if (finished_) {
    sink->OnRunClosed();
    return;
  }
  sinks_.push_back(sink);
}

void Run::Unsubscribe(const EventSink* sink) {
  absl::MutexLock lock(&mu_);
  sinks_.erase(std::remove_if(sinks_.begin(), sinks_.end(),
                              [sink](const std::shared_ptr<EventSink>& s) {
                                return s.get() == sink;
                              }),
               sinks_.end());
}

}  // namespace lossguard::runs
