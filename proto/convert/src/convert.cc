#include "lossguard/wire/convert.h"

#include <cmath>
#include <string>

namespace lossguard::wire {

using analyzers::Diagnosis;
using analyzers::DiagnosisKind;
using policy::ActionKind;

v1::DiagnosisKind ToProto(DiagnosisKind kind) {
  switch (kind) {
    case DiagnosisKind::kDivergence:
      return v1::DIVERGENCE;
    case DiagnosisKind::kOscillation:
      return v1::OSCILLATION;
    case DiagnosisKind::kStagnation:
      return v1::STAGNATION;
    case DiagnosisKind::kOverfitting:
      return v1::OVERFITTING;
    case DiagnosisKind::kGradientExplosion:
      return v1::GRADIENT_EXPLOSION;
    case DiagnosisKind::kLossSpike:
      return v1::LOSS_SPIKE;
  }
  return v1::DIAGNOSIS_KIND_UNSPECIFIED;
}

std::optional<DiagnosisKind> FromProto(v1::DiagnosisKind kind) {
  for (DiagnosisKind k :
       {DiagnosisKind::kDivergence, DiagnosisKind::kOscillation,
        DiagnosisKind::kStagnation, DiagnosisKind::kOverfitting,
        DiagnosisKind::kGradientExplosion, DiagnosisKind::kLossSpike}) {
    if (ToProto(k) == kind) return k;
  }
  return std::nullopt;
}

v1::Diagnosis ToProto(const Diagnosis& d) {
  v1::Diagnosis p;
  p.set_kind(ToProto(d.kind));
  p.set_step(d.step);
  p.set_onset(d.onset);
  p.set_severity(d.severity);
  p.set_confidence(d.confidence);
  p.set_evidence(d.evidence);
  return p;
}

v1::Advice ToProto(const policy::Advice& a, const Diagnosis& d,
                   uint64_t advice_id) {
  v1::Advice p;
  p.set_advice_id(advice_id);
  p.set_at_step(a.at_step);
  *p.mutable_diagnosis() = ToProto(d);
  p.set_explanation(a.explanation.empty() ? a.reason : a.explanation);
  if (a.blocked_by != policy::GuardRail::kNone) {
    p.set_blocked_by(std::string(policy::GuardRailName(a.blocked_by)));
  }
  v1::Action* action = nullptr;
  switch (a.action) {
    case ActionKind::kNone:
      break;
    case ActionKind::kScaleLr:
      action = p.mutable_action();
      action->mutable_scale_lr()->set_factor(a.lr_factor);
      break;
    case ActionKind::kSetLr:
      action = p.mutable_action();
      action->mutable_set_lr()->set_lr(a.lr_to);
      break;
    case ActionKind::kRestartCosine: {
      action = p.mutable_action();
      v1::RestartCosine* r = action->mutable_restart_cosine();
      r->set_t_0(a.t_0);
      r->set_eta_max(a.eta_max);
      r->set_eta_min(a.eta_min);
      break;
    }
    case ActionKind::kEnableGradClip:
      action = p.mutable_action();
      action->mutable_enable_grad_clip()->set_max_norm(a.clip_max_norm);
      break;
    case ActionKind::kEarlyStop:
      action = p.mutable_action();
      action->mutable_early_stop();
      break;
    case ActionKind::kRampLr:
      action = p.mutable_action();
      action->mutable_ramp_lr()->set_factor_per_step(a.ramp_factor);
      action->mutable_ramp_lr()->set_steps(a.ramp_steps);
      if (a.anneal) {
        action->mutable_ramp_lr()->set_decay_steps(a.t_0);
        action->mutable_ramp_lr()->set_decay_eta_min(a.eta_min);
      }
      break;
  }
  if (action != nullptr && a.action != ActionKind::kEnableGradClip &&
      a.clip_max_norm > 0.0) {
    action->set_grad_clip_max_norm(a.clip_max_norm);
  }
  if (action != nullptr && a.restore_checkpoint) {
    action->set_restore_checkpoint(true);
  }
  return p;
}

policy::Advice FromProto(const v1::Advice& p, double lr_when_sent,
                         const policy::PolicyOptions& options) {
  policy::Advice a;
  a.diagnosis =
      FromProto(p.diagnosis().kind()).value_or(DiagnosisKind::kDivergence);
  a.at_step = p.at_step();
  if (!p.has_action()) return a;
  const v1::Action& act = p.action();
  a.lr_from = lr_when_sent;
  a.restore_checkpoint = act.restore_checkpoint();
  a.clip_max_norm = act.grad_clip_max_norm();
  switch (act.kind_case()) {
    case v1::Action::kScaleLr:
      a.action = ActionKind::kScaleLr;
      a.lr_factor = act.scale_lr().factor();
      a.lr_to = lr_when_sent * a.lr_factor;
      break;
    case v1::Action::kSetLr:
      a.action = ActionKind::kSetLr;
      a.lr_to = act.set_lr().lr();
      break;
    case v1::Action::kRestartCosine:
      a.action = ActionKind::kRestartCosine;
      a.t_0 = act.restart_cosine().t_0();
      a.eta_max = act.restart_cosine().eta_max();
      a.eta_min = act.restart_cosine().eta_min();
      // A restart below the LR it was sent at is an LR cut's decay to the
      // planned end (anneal_after_cut); its eta_max is the cut LR, which
      // with a rollback becomes the run's LR ceiling again.
      a.lr_to = a.eta_max;
      a.anneal = std::isfinite(lr_when_sent) && a.eta_max < lr_when_sent;
      break;
    case v1::Action::kEnableGradClip:
      a.action = ActionKind::kEnableGradClip;
      a.clip_max_norm = act.enable_grad_clip().max_norm();
      break;
    case v1::Action::kEarlyStop:
      a.action = ActionKind::kEarlyStop;
      break;
    case v1::Action::kRampLr:
      a.action = ActionKind::kRampLr;
      a.ramp_factor = act.ramp_lr().factor_per_step();
      a.ramp_steps = act.ramp_lr().steps();
      a.anneal = act.ramp_lr().decay_steps() > 0;
      a.t_0 = act.ramp_lr().decay_steps();
      a.eta_min = act.ramp_lr().decay_eta_min();
      a.ramp_until = policy::RampUntil(a.at_step, a.ramp_steps, options);
      break;
    case v1::Action::KIND_NOT_SET:
      break;
  }
  // Whether it raised the LR, and so got a watch window, as Decide judged
  // it. Records stored before lr_when_sent existed hold 0 there: a scale
  // says it by its factor, a restart is taken as a raise, a set as none;
  // and there is no LR to go back to after a blow-up.
  bool raised = false;
  if (std::isfinite(lr_when_sent) && lr_when_sent > 0.0) {
    policy::RunContext when_sent;
    when_sent.lr = lr_when_sent;
    raised = policy::RaisesLr(a, when_sent);
  } else {
    raised = (a.action == ActionKind::kScaleLr && a.lr_factor > 1.0) ||
             a.action == ActionKind::kRestartCosine;
    a.lr_from = 0.0;
    if (a.action == ActionKind::kScaleLr) a.lr_to = 0.0;
  }
  if (a.ramp_until == 0 && raised) {
    a.ramp_until = policy::RampUntil(a.at_step, 0, options);
  }
  return a;
}

analyzers::StepRecord FromProto(const v1::Step& s) {
  analyzers::StepRecord r;
  r.step = s.step();
  r.lr = s.lr();
  r.loss = s.loss();
  if (s.has_val_loss()) r.val_loss = s.val_loss();
  if (s.has_grad_norm()) r.grad_norm = s.grad_norm();
  return r;
}

v1::Step ToProto(const analyzers::StepRecord& r) {
  v1::Step s;
  s.set_step(r.step);
  s.set_lr(r.lr);
  s.set_loss(r.loss);
  if (r.val_loss) s.set_val_loss(*r.val_loss);
  if (r.grad_norm) s.set_grad_norm(*r.grad_norm);
  return s;
}

v1::LrSuggestion ToProto(const analyzers::LrSuggestion& s) {
  v1::LrSuggestion p;
  p.set_suggested_lr(s.suggested_lr);
  p.set_steep_lo_lr(s.steep_lo_lr);
  p.set_steep_hi_lr(s.steep_hi_lr);
  p.set_steep_mid_lr(s.steep_mid_lr);
  p.set_min_loss_lr(s.min_loss_lr);
  p.set_basin_lo_lr(s.basin_lo_lr);
  p.set_basin_hi_lr(s.basin_hi_lr);
  p.set_basin_mid_lr(s.basin_mid_lr);
  p.set_diverge_lr(s.diverge_lr);
  p.set_points_used(s.points_used);
  p.set_still_descending(s.still_descending);
  p.set_evidence(s.evidence);
  return p;
}

}  // namespace lossguard::wire
