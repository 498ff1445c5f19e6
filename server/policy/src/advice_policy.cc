#include "lossguard/policy/advice_policy.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lossguard::policy {
namespace {

using analyzers::Diagnosis;
using analyzers::DiagnosisKind;

// "divergence at step 431 (onset 410, severity 0.90)"
std::string Situation(const Diagnosis& d) {
  return absl::StrFormat("%s at step %d (onset %d, severity %.2f)",
                         analyzers::KindName(d.kind), d.step, d.onset,
                         d.severity);
}

// `x` rounded to the nearest int64, saturated to the int64 range (NaN: 0).
int64_t RoundToInt64(double x) {
  if (std::isnan(x)) return 0;
  // 2^63 is exactly representable; int64 max is not.
  constexpr double kTwo63 = 9223372036854775808.0;
  if (x >= kTwo63) return std::numeric_limits<int64_t>::max();
  if (x <= -kTwo63) return std::numeric_limits<int64_t>::min();
  return std::llround(x);
}

// Why no LR move can be computed from `lr` (not finite or not positive).
std::string NoLrMoveReason(double lr) {
  return std::isnan(lr)
             ? std::string(
                   "the LR is not logged, so no LR change can be "
                   "computed")
             : absl::StrFormat("the LR is %g, which no factor can move", lr);
}

void Block(GuardRail rail, std::string reason, Advice* a) {
  a->action = ActionKind::kNone;
  a->blocked_by = rail;
  a->reason = std::move(reason);
}

// Makes `a` move the LR by `factor` from `ctx.lr`, stopping at the bound it
// moves towards: min_lr going down; going up, max_lr or `cap` (named
// `cap_name`) if that is lower. Blocks `a` when the LR cannot move that way.
void MoveLr(double factor, const RunContext& ctx, const PolicyOptions& o,
            Advice* a, double cap = std::numeric_limits<double>::infinity(),
            std::string_view cap_name = "") {
  const bool down = factor < 1.0;
  double bound = down ? o.min_lr : o.max_lr;
  std::string_view bound_name = down ? "min_lr" : "max_lr";
  if (!down && cap < bound) {
    bound = cap;
    bound_name = cap_name;
  }
  if (!down && ctx.lr_ceiling > 0.0 && ctx.lr_ceiling < bound) {
    // The run blew up at a larger LR; lossguard cut it to this one.
    bound = ctx.lr_ceiling;
    bound_name = "LR set after the blow-up";
  }
  if (!std::isfinite(ctx.lr) || ctx.lr <= 0.0) {
    Block(GuardRail::kNone, NoLrMoveReason(ctx.lr), a);
    return;
  }
  const double wanted = ctx.lr * factor;
  const double target =
      down ? std::max(wanted, bound) : std::min(wanted, bound);
  // (Within rounding of the LR itself counts as no move.)
  constexpr double kRel = 1e-9;
  if (down ? target >= ctx.lr * (1.0 - kRel) : target <= ctx.lr * (1.0 + kRel)) {
    Block(GuardRail::kLrBound,
          absl::StrFormat("the LR %g is already at or beyond %s %g", ctx.lr,
                          bound_name, bound),
          a);
    return;
  }
  a->action = target == wanted ? ActionKind::kScaleLr : ActionKind::kSetLr;
  a->lr_factor = target == wanted ? factor : 1.0;
  a->lr_from = ctx.lr;
  a->lr_to = target;
  if (a->action == ActionKind::kSetLr) a->lr_bound = std::string(bound_name);
}

// The action of `a` in words: "scale the LR x0.1, from 0.3 to 0.03".
std::string ActionPhrase(const Advice& a, const PolicyOptions& o) {
  std::string s;
  switch (a.action) {
    case ActionKind::kScaleLr:
      s = absl::StrFormat("scale the LR x%g, from %g to %g", a.lr_factor,
                          a.lr_from, a.lr_to);
      break;
    case ActionKind::kSetLr:
      if (a.lr_bound == "LR before the raise") {
        s = absl::StrFormat("set the LR back from %g to %g, the LR before "
                            "the raise",
                            a.lr_from, a.lr_to);
      } else if (absl::StartsWith(a.lr_bound, "LR range test")) {
        s = absl::StrFormat("set the LR from %g to %g", a.lr_from, a.lr_to);
      } else {
        s = absl::StrFormat("set the LR from %g to %g, the %s bound",
                            a.lr_from, a.lr_to, a.lr_bound);
      }
      break;
    case ActionKind::kRestartCosine:
      if (a.anneal) {
        s = absl::StrFormat(
            "lower the LR from %g to %g and decay it along a cosine to %g "
            "over the %d steps left of the planned run",
            a.lr_from, a.eta_max, a.eta_min, a.t_0);
      } else {
        s = absl::StrFormat(
            "restart the cosine cycle with t_0 %d steps, eta_max %g, eta_min "
            "%g",
            a.t_0, a.eta_max, a.eta_min);
      }
      break;
    case ActionKind::kEnableGradClip:
      break;  // the clipping clause below says it
    case ActionKind::kEarlyStop:
      s = "stop early and keep the best checkpoint";
      break;
    case ActionKind::kRampLr:
      s = absl::StrFormat(
          "ramp the LR x%g per step for %d steps, from %g up to %g (an LR "
          "range test in the run; where the loss blows up the LR is cut "
          "back below the edge)",
          a.ramp_factor, a.ramp_steps, a.lr_from, a.lr_to);
      if (a.anneal) {
        absl::StrAppendFormat(&s,
                              ", then decay it along a cosine to %g over the "
                              "%d steps left of the planned run",
                              a.eta_min, a.t_0);
      }
      break;
    case ActionKind::kNone:
      s = absl::StrCat("no action, because ", a.reason);
      break;
  }
  if (a.clip_max_norm > 0.0) {
    absl::StrAppend(
        &s, s.empty() ? "" : ", and ",
        absl::StrFormat("clip the gradient norm at %g (%gx the typical %g)",
                        a.clip_max_norm, o.clip_level_multiple,
                        a.clip_max_norm / o.clip_level_multiple));
  }
  return s;
}

// The LR a cosine cycle from `eta_max` ends at: restart_eta_min_fraction
// of it, no lower than min_lr and no higher than eta_max.
double CosineEtaMin(double eta_max, const PolicyOptions& o) {
  return std::min(eta_max,
                  std::max(o.min_lr, o.restart_eta_min_fraction * eta_max));
}

// Steps of the planned run left after an LR change at `ctx.step` (which
// applies from the next step) and `after` more steps, when a decay to the
// planned end applies (anneal_after_cut, a planned length, a constant LR)
// and at least restart_min_t0 are left; 0 otherwise.
int64_t DecayStepsLeft(const RunContext& ctx, const PolicyOptions& o,
                       int64_t after) {
  if (!o.anneal_after_cut || ctx.planned_steps <= 0 ||
      ctx.schedule != ScheduleHint::kConstant) {
    return 0;
  }
  const int64_t left =
      analyzers::StepsBetween(ctx.step, ctx.planned_steps) - 1 - after;
  return left >= std::max<int64_t>(o.restart_min_t0, 1) ? left : 0;
}

// When the range test over an LR ramp suggested an LR below `below` x the
// LR now, makes `a` set it (within the bounds) and returns true.
bool LandOnRampTest(double below, const RunContext& ctx, const PolicyOptions& o,
                    Advice* a) {
  if (!(ctx.ramp_suggested_lr > 0.0) || !std::isfinite(ctx.lr) ||
      ctx.ramp_suggested_lr >= ctx.lr * below) {
    return false;
  }
  MoveLr(ctx.ramp_suggested_lr / ctx.lr, ctx, o, a);
  if (a->action == ActionKind::kScaleLr) {
    a->action = ActionKind::kSetLr;
    a->lr_bound = "LR range test over the ramp";
  }
  return true;
}

// Fills the action of `a` for `d`; returns the rationale that precedes the
// action in the explanation ("" if none).
// What a stagnation diagnosis says about the model's state.
struct StagnationState {
  bool stuck_at_start = false;   // the loss has not left its initial level
  bool blew_up = false;          // it once rose far above it
  bool grads_collapsed = false;  // the gradient norm collapsed
  double grad_norm_level = 0.0;  // the typical gradient norm now (0: unknown)
  // Stuck at the start after a blow-up or with collapsed gradients: too
  // large an LR damaged the model.
  bool damaged() const { return stuck_at_start && (blew_up || grads_collapsed); }
};

StagnationState ReadStagnation(const Diagnosis& d, const RunContext& ctx,
                               const PolicyOptions& o) {
  StagnationState st;
  st.stuck_at_start =
      ctx.initial_loss > 0.0 &&
      d.loss_at_onset >= o.damaged_progress_ratio * ctx.initial_loss;
  st.blew_up = ctx.peak_loss >= o.damaged_peak_ratio * ctx.initial_loss;
  st.grad_norm_level =
      d.grad_norm_level > 0.0 ? d.grad_norm_level : ctx.grad_norm_level;
  st.grads_collapsed =
      ctx.initial_grad_norm > 0.0 && st.grad_norm_level > 0.0 &&
      st.grad_norm_level * o.damaged_grad_collapse <= ctx.initial_grad_norm;
  return st;
}

std::string Remedy(const Diagnosis& d, const RunContext& ctx,
                   const PolicyOptions& o, Advice* a) {
  const double grad_level =
      d.grad_norm_level > 0.0 ? d.grad_norm_level : ctx.grad_norm_level;
  switch (d.kind) {
    case DiagnosisKind::kDivergence: {
      if (LandOnRampTest(1.0, ctx, o, a)) {
        // The ramp blew up: its range test says where to land.
        a->restore_checkpoint = a->action == ActionKind::kSetLr;
        return absl::StrFormat("the LR ramp blew up; %s, so ", ctx.ramp_evidence);
      }
      if (ctx.raise_from_lr >= o.min_lr && ctx.step <= ctx.ramp_until &&
          std::isfinite(ctx.lr) && ctx.lr > ctx.raise_from_lr &&
          ctx.lr <= ctx.raise_to_lr * (1.0 + o.lr_tolerance)) {
        // The raise lossguard advised is the likely cause: back to the LR
        // the run was stable at, not x0.1 from the raised one (which would
        // land below it, on an LR already diagnosed as too small, and set
        // the ceiling there). That LR becomes the ceiling. (The LR still
        // at the one before the raise: the raise was not applied. Above
        // what it set: something else raised it.)
        a->action = ActionKind::kSetLr;
        a->lr_from = ctx.lr;
        a->lr_to = ctx.raise_from_lr;
        a->lr_bound = "LR before the raise";
        a->restore_checkpoint = true;
        if (ctx.grad_explosion_seen && grad_level > 0.0) {
          a->clip_max_norm = o.clip_level_multiple * grad_level;
        }
        return absl::StrFormat(
            "it came %d steps after lossguard raised the LR from %g to %g, "
            "so ",
            analyzers::StepsBetween(ctx.raise_step, ctx.step),
            ctx.raise_from_lr, ctx.raise_to_lr);
      }
      MoveLr(o.divergence_lr_factor, ctx, o, a);
      a->restore_checkpoint = a->action == ActionKind::kScaleLr ||
                              a->action == ActionKind::kSetLr;
      if (!ctx.grad_explosion_seen || grad_level <= 0.0) return "";
      a->clip_max_norm = o.clip_level_multiple * grad_level;
      if (a->action != ActionKind::kNone) {
        return "a gradient explosion preceded it, so ";
      }
      const std::string why = absl::StrCat(a->reason, ", so ");
      a->action = ActionKind::kEnableGradClip;
      a->blocked_by = GuardRail::kNone;
      a->reason.clear();
      return why;
    }
    case DiagnosisKind::kOscillation:
      if (LandOnRampTest(o.oscillation_lr_factor, ctx, o, a)) {
        return absl::StrFormat("the LR ramp reached swings; %s, so ",
                               ctx.ramp_evidence);
      }
      MoveLr(o.oscillation_lr_factor, ctx, o, a);
      return "";
    case DiagnosisKind::kStagnation: {
      if (LandOnRampTest(1.0, ctx, o, a)) {
        // The ramp ran its course: land on the range test's LR.
        return absl::StrFormat("the LR ramp is over; %s, so ", ctx.ramp_evidence);
      }
      const StagnationState st = ReadStagnation(d, ctx, o);
      const bool stuck_at_start = st.stuck_at_start;
      const bool blew_up = st.blew_up;
      const double level = st.grad_norm_level;
      const bool grads_collapsed = st.grads_collapsed;
      if (st.damaged() && std::isfinite(ctx.lr)) {
        MoveLr(o.divergence_lr_factor, ctx, o, a);
        a->restore_checkpoint = a->action == ActionKind::kScaleLr ||
                                a->action == ActionKind::kSetLr;
        return blew_up
                   ? absl::StrFormat(
                         "the loss is stuck at its initial level %.4g after "
                         "blowing up to %.4g (x%.1f): the LR damaged the "
                         "model rather than starved it, so ",
                         ctx.initial_loss, ctx.peak_loss,
                         ctx.peak_loss / ctx.initial_loss)
                   : absl::StrFormat(
                         "the loss is stuck at its initial level %.4g while "
                         "the gradient norm collapsed from %.3g to %.3g "
                         "(x%.2f): units died, the LR damaged the model "
                         "rather than starved it, so ",
                         ctx.initial_loss, ctx.initial_grad_norm, level,
                         level / ctx.initial_grad_norm);
      }
      if (!std::isfinite(ctx.lr)) {
        // No LR, no schedule: neither a raise nor a restart can be sized.
        Block(GuardRail::kNone,
              "the LR is not logged (schedule unknown), so no LR change can "
              "be computed",
              a);
        return "";
      }
      if (ctx.lr_ceiling > 0.0 &&
          ctx.lr >= ctx.lr_ceiling * (1.0 - o.lr_tolerance)) {
        // Flat at the LR a blow-up was cut to: every raise (towards the
        // peak, a restart) stops there, since it would head back to the LR
        // that blew the run up. The one LR move left is down, as
        // ReduceLROnPlateau does on a plateau. (Stagnation is only decided
        // far from converged.)
        MoveLr(o.divergence_lr_factor, ctx, o, a);
        return absl::StrFormat(
            "the loss is flat at the LR %g it was cut to after blowing up, "
            "and a raise would head back to the LR that blew it up: the LR "
            "is still too large to descend, so ",
            ctx.lr);
      }
      const bool decaying = ctx.schedule == ScheduleHint::kDecaying;
      const bool still_decaying =
          decaying && d.lr_at_onset > 0.0 &&
          ctx.lr < d.lr_at_onset * (1.0 - o.lr_tolerance);
      if (!still_decaying) {
        if (!decaying && ctx.early_rise >= o.overshoot_rise_factor) {
          // The very first updates raised the loss: too large an LR, which
          // a raise would make worse. As after a blow-up, the weights it
          // trained are restored and the LR it overshot at becomes the
          // ceiling (a later plateau must not read the cut as an early
          // decay to undo).
          MoveLr(o.divergence_lr_factor, ctx, o, a);
          a->restore_checkpoint = a->action == ActionKind::kScaleLr ||
                                  a->action == ActionKind::kSetLr;
          return absl::StrFormat(
              "the first updates raised the loss (the median of the 2nd to "
              "5th losses is %.2fx the first, %.4g) and it has made little "
              "progress since: the LR %g overshoots from the start, too "
              "large rather than too small, so ",
              ctx.early_rise, ctx.early_losses[0], ctx.lr);
        }
        if (!decaying) {
          // Not moved at all from the initial loss, nothing damaged (no
          // blow-up, gradients intact): the LR is starved by an order of
          // magnitude or more (within 3x of a good LR the loss would show
          // clear progress by now), so the bolder raise.
          const bool starved = stuck_at_start && !blew_up &&
                               ctx.initial_grad_norm > 0.0 && level > 0.0 &&
                               !grads_collapsed && ctx.lr_ceiling <= 0.0;
          const std::string starved_why =
              starved ? absl::StrFormat(
                            "the loss has not moved from its initial level "
                            "%.4g while the gradient norm stayed at %.3g "
                            "(%.2fx its first): the LR %g is starved",
                            ctx.initial_loss, level,
                            level / ctx.initial_grad_norm, ctx.lr)
                      : std::string();
          if (starved && o.starved_ramp && o.starved_ramp_factor > 1.0) {
            // Up to the bound a raise would stop at, found by MoveLr.
            MoveLr(o.starved_ramp_max_factor, ctx, o, a);
            if (a->action != ActionKind::kNone) {
              const double total = a->lr_to / ctx.lr;
              a->ramp_steps = std::max<int64_t>(
                  1, static_cast<int64_t>(std::floor(
                         std::log(total) / std::log(o.starved_ramp_factor))));
              a->ramp_factor = o.starved_ramp_factor;
              a->lr_to = ctx.lr * std::pow(a->ramp_factor,
                                           static_cast<double>(a->ramp_steps));
              a->lr_factor = 1.0;
              a->action = ActionKind::kRampLr;
              a->ramp_until = RampUntil(d.step, a->ramp_steps, o);
              if (const int64_t left = DecayStepsLeft(ctx, o, a->ramp_steps);
                  left > 0) {
                a->anneal = true;
                a->t_0 = left;
                a->eta_min = CosineEtaMin(a->lr_to, o);
              }
            }
            return absl::StrCat(starved_why, ", by how much the curve cannot say, so ");
          }
          MoveLr(starved ? o.stagnation_starved_lr_factor
                         : o.stagnation_lr_factor,
                 ctx, o, a);
          if (starved) return absl::StrCat(starved_why, ", so ");

          return ctx.schedule == ScheduleHint::kConstant
                     ? absl::StrFormat("the LR is constant at %g, so ", ctx.lr)
                     : "";
        }
        // Raise a decayed LR back towards the run's peak, never above it:
        // the peak is the largest LR the run has shown it can take.
        MoveLr(o.stagnation_lr_factor, ctx, o, a, ctx.max_lr_seen,
               "max LR seen");
        return absl::StrFormat(
            "the LR was decayed early (max %g, now %g) and is flat since the "
            "onset, so ",
            ctx.max_lr_seen, ctx.lr);
      }
      double eta_max = std::min(ctx.max_lr_seen, o.max_lr);
      if (ctx.lr_ceiling > 0.0) eta_max = std::min(eta_max, ctx.lr_ceiling);
      if (!(eta_max > ctx.lr)) {
        Block(GuardRail::kLrBound,
              absl::StrFormat("a restart at eta_max %g (max_lr %g) would not "
                              "raise the LR %g",
                              eta_max, o.max_lr, ctx.lr),
              a);
        return "";
      }
      a->action = ActionKind::kRestartCosine;
      a->lr_from = ctx.lr;
      a->eta_max = eta_max;
      a->eta_min = CosineEtaMin(eta_max, o);
      a->t_0 = std::max<int64_t>(
          o.restart_min_t0, RoundToInt64(static_cast<double>(ctx.steps_seen) *
                                         o.restart_t0_fraction));
      return absl::StrFormat(
          "the LR is still decaying (%g at the onset, %g now), so ",
          d.lr_at_onset, ctx.lr);
    }
    case DiagnosisKind::kOverfitting:
      if (ctx.overfitting_advised) {
        a->action = ActionKind::kEarlyStop;
        return "it persists after the LR was lowered, so ";
      }
      MoveLr(o.overfitting_lr_factor, ctx, o, a);
      return "";
    case DiagnosisKind::kGradientExplosion:
      if (grad_level <= 0.0) {
        Block(GuardRail::kNone, "no typical grad-norm level is known", a);
        return "";
      }
      a->action = ActionKind::kEnableGradClip;
      a->clip_max_norm = o.clip_level_multiple * grad_level;
      return "";
    case DiagnosisKind::kLossSpike:
      Block(GuardRail::kNone, "a loss spike that recovered needs none", a);
      return "";
  }
  Block(GuardRail::kNone, "the diagnosis kind is unknown", a);
  return "";
}

// Turns an LR cut by a factor in `a` into a cosine decay from the cut LR
// to the planned end of the run (PolicyOptions::anneal_after_cut) when the
// LR is constant and enough of the planned run is left; returns the
// rationale for the explanation ("" if `a` is left alone). Not a set-back
// to the LR before a raise (an LR already diagnosed as too small) nor a
// move stopped at a bound.
std::string AnnealCut(const RunContext& ctx, const PolicyOptions& o,
                      Advice* a) {
  const bool factor_cut =
      (a->action == ActionKind::kScaleLr && a->lr_factor < 1.0) ||
      (a->action == ActionKind::kSetLr &&
       absl::StartsWith(a->lr_bound, "LR range test") &&
       a->lr_to < a->lr_from);
  if (!factor_cut || !(a->lr_to > 0.0)) return "";
  const int64_t left = DecayStepsLeft(ctx, o, 0);
  if (left == 0) return "";
  a->action = ActionKind::kRestartCosine;
  a->anneal = true;
  a->t_0 = left;
  a->eta_max = a->lr_to;
  a->eta_min = CosineEtaMin(a->lr_to, o);
  return absl::StrFormat(
      "the LR is constant and the run is planned for %d steps; a cut by a "
      "factor lands within a few x of a good LR rather than on it, which a "
      "decay to the end forgives, so ",
      ctx.planned_steps);
}

}  // namespace

int64_t RampUntil(int64_t at_step, int64_t steps, const PolicyOptions& options) {
  return RoundToInt64(static_cast<double>(at_step) + static_cast<double>(steps) +
                      0.5 * static_cast<double>(options.cooldown_steps));
}

bool RaisesLr(const Advice& a, const RunContext& ctx) {
  switch (a.action) {
    case ActionKind::kScaleLr:
    case ActionKind::kSetLr:
      return a.lr_to > a.lr_from;
    case ActionKind::kRestartCosine:
      return std::isfinite(ctx.lr) && a.eta_max > ctx.lr;
    case ActionKind::kRampLr:
      return true;
    default:
      return false;
  }
}

bool EndsRamp(const Advice& a) {
  return a.action == ActionKind::kScaleLr || a.action == ActionKind::kSetLr ||
         a.action == ActionKind::kRestartCosine || a.restore_checkpoint;
}

std::string_view ActionName(ActionKind action) {
  switch (action) {
    case ActionKind::kNone:
      return "none";
    case ActionKind::kScaleLr:
      return "scale_lr";
    case ActionKind::kSetLr:
      return "set_lr";
    case ActionKind::kRestartCosine:
      return "restart_cosine";
    case ActionKind::kEnableGradClip:
      return "enable_grad_clip";
    case ActionKind::kEarlyStop:
      return "early_stop";
    case ActionKind::kRampLr:
      return "ramp_lr";
  }
  return "unknown";
}

std::string_view GuardRailName(GuardRail rail) {
  switch (rail) {
    case GuardRail::kNone:
      return "none";
    case GuardRail::kMinStepsSeen:
      return "min_steps_seen";
    case GuardRail::kMaxActions:
      return "max_actions";
    case GuardRail::kCooldown:
      return "cooldown";
    case GuardRail::kLrBound:
      return "lr_bound";
  }
  return "unknown";
}

std::string_view ScheduleName(ScheduleHint hint) {
  switch (hint) {
    case ScheduleHint::kUnknown:
      return "unknown";
    case ScheduleHint::kConstant:
      return "constant";
    case ScheduleHint::kDecaying:
      return "decaying";
  }
  return "unknown";
}

// An LR cut for a blow-up (the LR is still at or below the ceiling it set)
// after which the run diverges again or stays stuck at its initial loss,
// damaged: the cut was not enough, and waiting out the cooldown would spend
// the run's budget at an LR known to be too large. The cut's effect is
// given min_steps_seen steps to show.
static bool CutNotEnough(const Diagnosis& d, const RunContext& ctx,
                         const PolicyOptions& options) {
  if (!ctx.last_action_step.has_value() || !(ctx.lr_ceiling > 0.0) ||
      !std::isfinite(ctx.lr) ||
      ctx.lr > ctx.lr_ceiling * (1.0 + options.lr_tolerance) ||
      analyzers::StepsBetween(*ctx.last_action_step, ctx.step) <
          options.min_steps_seen) {
    return false;
  }
  return d.kind == DiagnosisKind::kDivergence ||
         (d.kind == DiagnosisKind::kStagnation &&
          ReadStagnation(d, ctx, options).damaged());
}

Advice Decide(const Diagnosis& d, const RunContext& ctx,
              const PolicyOptions& options) {
  Advice a;
  a.diagnosis = d.kind;
  a.at_step = d.step;
  const int64_t since_action =
      ctx.last_action_step.has_value()
          ? analyzers::StepsBetween(*ctx.last_action_step, ctx.step)
          : 0;
  const bool cut_not_enough = CutNotEnough(d, ctx, options);
  std::string why;
  if (d.kind == DiagnosisKind::kLossSpike) {
    why = Remedy(d, ctx, options, &a);
  } else if (ctx.steps_seen < options.min_steps_seen && !d.nonfinite) {
    // (A non-finite loss needs no more points to be sure of.)
    Block(GuardRail::kMinStepsSeen,
          absl::StrFormat("only %d steps were seen (min_steps_seen %d)",
                          ctx.steps_seen, options.min_steps_seen),
          &a);
  } else if (ctx.actions_taken >= options.max_actions) {
    Block(GuardRail::kMaxActions,
          absl::StrFormat("the run already had %d actions (max_actions %d)",
                          ctx.actions_taken, options.max_actions),
          &a);
  } else if (ctx.last_action_step.has_value() &&
             since_action < options.cooldown_steps && !d.nonfinite &&
             !cut_not_enough &&
             !(ctx.step <= ctx.ramp_until &&
               (d.kind == DiagnosisKind::kDivergence ||
                d.kind == DiagnosisKind::kOscillation ||
                d.kind == DiagnosisKind::kGradientExplosion ||
                (d.kind == DiagnosisKind::kStagnation &&
                 ctx.ramp_suggested_lr > 0.0)))) {
    // (A run that blew up again after an action cannot wait: the action
    // was not enough. Nor can one still diverging or damaged after a cut:
    // cut_not_enough.)
    Block(
        GuardRail::kCooldown,
        absl::StrFormat("the last action was %d steps ago (cooldown_steps %d)",
                        since_action, options.cooldown_steps),
        &a);
  } else {
    why = Remedy(d, ctx, options, &a);
    absl::StrAppend(&why, AnnealCut(ctx, options, &a));
  }
  if (RaisesLr(a, ctx) && a.ramp_until == 0) {
    // The raise's own outcome (a blow-up, swings) is answered at once, as a
    // ramp's is: the raise is its likely cause, and waiting out the
    // cooldown would spend the run at the LR that caused it.
    a.ramp_until = RampUntil(a.at_step, 0, options);
  }
  a.explanation =
      absl::StrCat(Situation(d), ": ", why, ActionPhrase(a, options), ".");
  return a;
}

ScheduleHint InferSchedule(double max_lr_seen, double current_lr,
                           double tolerance) {
  if (!(max_lr_seen > 0.0) || !std::isfinite(current_lr)) {
    return ScheduleHint::kUnknown;
  }
  return current_lr >= max_lr_seen * (1.0 - tolerance)
             ? ScheduleHint::kConstant
             : ScheduleHint::kDecaying;
}

void ObserveStep(const analyzers::StepRecord& rec, const PolicyOptions& options,
                 RunContext* ctx) {
  ctx->step = rec.step;
  ctx->lr = rec.lr;
  if (std::isfinite(rec.lr)) {
    ctx->max_lr_seen = std::max(ctx->max_lr_seen, rec.lr);
  }
  ++ctx->steps_seen;
  ctx->schedule = InferSchedule(ctx->max_lr_seen, rec.lr, options.lr_tolerance);
  if (std::isfinite(rec.loss) && rec.loss > 0.0) {
    if (ctx->initial_loss <= 0.0) ctx->initial_loss = rec.loss;
    ctx->peak_loss = std::max(ctx->peak_loss, rec.loss);
    constexpr int kEarly = RunContext::kEarlyLosses;
    if (ctx->early_count < kEarly) {
      ctx->early_losses[ctx->early_count++] = rec.loss;
      if (ctx->early_count == kEarly) {
        // The median of the 2nd to 5th: the mean of the two middle ones.
        double sum = 0.0;
        double lo = ctx->early_losses[1];
        double hi = ctx->early_losses[1];
        for (int i = 1; i < kEarly; ++i) {
          sum += ctx->early_losses[i];
          lo = std::min(lo, ctx->early_losses[i]);
          hi = std::max(hi, ctx->early_losses[i]);
        }
        static_assert(kEarly == 5, "the median below is of four values");
        ctx->early_rise = 0.5 * (sum - lo - hi) / ctx->early_losses[0];
      }
    }
  }
  if (ctx->initial_grad_norm <= 0.0 && rec.grad_norm.has_value() &&
      std::isfinite(*rec.grad_norm) && *rec.grad_norm > 0.0) {
    ctx->initial_grad_norm = *rec.grad_norm;
  }
}

void ObserveAdvice(const Diagnosis& d, const Advice& advice, RunContext* ctx) {
  if (d.kind == DiagnosisKind::kGradientExplosion) {
    ctx->grad_explosion_seen = true;
  }
  if (d.grad_norm_level > 0.0) ctx->grad_norm_level = d.grad_norm_level;
  if (advice.blocked_by == GuardRail::kCooldown) {
    ctx->deferred_kinds |= 1u << static_cast<unsigned>(d.kind);
  }
  if (advice.action == ActionKind::kNone) return;
  // An action answers every earlier deferral (the situation changed).
  ctx->deferred_kinds = 0;
  if (advice.restore_checkpoint && advice.lr_to > 0.0) {
    // The LR that blew the run up is not to be reached again.
    ctx->lr_ceiling = ctx->lr_ceiling > 0.0
                          ? std::min(ctx->lr_ceiling, advice.lr_to)
                          : advice.lr_to;
  }
  ctx->last_action_step = advice.at_step;
  ++ctx->actions_taken;
  // A ramp is on until its steps are done and its end judged; another LR
  // action or a rollback ends it (as the guard stops ramping then), while
  // clipping on the way does not.
  if (advice.ramp_until > 0) {
    ctx->ramp_until = advice.ramp_until;
  } else if (EndsRamp(advice)) {
    ctx->ramp_until = 0;
  }
  if (advice.ramp_until > 0 && advice.action != ActionKind::kRampLr &&
      advice.lr_from > 0.0) {
    // A one-shot raise.
    ctx->raise_from_lr = advice.lr_from;
    ctx->raise_to_lr = advice.action == ActionKind::kRestartCosine
                           ? advice.eta_max
                           : advice.lr_to;
    ctx->raise_step = advice.at_step;
  } else if (EndsRamp(advice) || advice.action == ActionKind::kRampLr) {
    ctx->raise_from_lr = 0.0;
    ctx->raise_to_lr = 0.0;
  }
  ctx->ramp_suggested_lr = 0.0;
  if (d.kind == DiagnosisKind::kOverfitting) ctx->overfitting_advised = true;
}

namespace {

constexpr uint32_t Bit(DiagnosisKind k) { return 1u << static_cast<unsigned>(k); }

bool CooledDown(const RunContext& ctx, const PolicyOptions& options) {
  return !ctx.last_action_step.has_value() ||
         analyzers::StepsBetween(*ctx.last_action_step, ctx.step) >=
             options.cooldown_steps;
}

}  // namespace

bool DeferredDue(const RunContext& ctx, const PolicyOptions& options) {
  if (ctx.deferred_kinds == 0) return false;
  if (CooledDown(ctx, options)) return true;
  // A divergence or stagnation that came while a cut for a blow-up was
  // still being given its min_steps_seen steps is looked at again once they
  // are over (TakeDeferred takes it if the cut was not enough), not after
  // the whole cooldown.
  return ctx.lr_ceiling > 0.0 &&
         (ctx.deferred_kinds & (Bit(DiagnosisKind::kDivergence) |
                                Bit(DiagnosisKind::kStagnation))) != 0 &&
         analyzers::StepsBetween(*ctx.last_action_step, ctx.step) >=
             options.min_steps_seen;
}

std::vector<Diagnosis> TakeDeferred(const std::vector<Diagnosis>& active,
                                    const PolicyOptions& options,
                                    RunContext* ctx) {
  std::vector<Diagnosis> due;
  if (!DeferredDue(*ctx, options)) return due;
  const bool cooled = CooledDown(*ctx, options);
  for (const Diagnosis& d : active) {
    if ((ctx->deferred_kinds & Bit(d.kind)) == 0) continue;
    if (!cooled && !CutNotEnough(d, *ctx, options)) continue;
    due.push_back(d);
    due.back().step = ctx->step;
    if (cooled) {
      absl::StrAppendFormat(&due.back().evidence,
                            "; still holds at step %d, after the cooldown",
                            ctx->step);
    } else {
      absl::StrAppendFormat(&due.back().evidence,
                            "; still holds at step %d, after the cut was "
                            "given its steps to show",
                            ctx->step);
    }
    if (!cooled) ctx->deferred_kinds &= ~Bit(d.kind);
  }
  if (cooled) ctx->deferred_kinds = 0;
  return due;
}

std::string_view OutcomeName(Outcome outcome) {
  switch (outcome) {
    case Outcome::kImproved:
      return "improved";
    case Outcome::kNoChange:
      return "no_change";
    case Outcome::kWorsened:
      return "worsened";
  }
  return "unknown";
}

OutcomeJudgement JudgeOutcome(DiagnosisKind kind, const OutcomeWindow& w,
                              const PolicyOptions& options) {
  OutcomeJudgement j;
  if (w.nonfinite_after) {
    j.outcome = Outcome::kWorsened;
    j.evidence = absl::StrFormat(
        "the loss turned non-finite within %d steps of the action",
        w.steps_after);
    return j;
  }
  const bool by_val = kind == DiagnosisKind::kOverfitting &&
                      w.val_before.has_value() && w.val_after.has_value();
  const char* what = by_val ? "validation loss" : "loss";
  const double before = by_val ? *w.val_before : w.loss_before;
  const double after = by_val ? *w.val_after : w.loss_after;
  if (!std::isfinite(before) || !std::isfinite(after) || before <= 0.0) {
    // A ratio means nothing here (a non-positive or unknown loss): compare
    // the difference's sign only.
    j.outcome = after < before   ? Outcome::kImproved
                : after > before ? Outcome::kWorsened
                                 : Outcome::kNoChange;
    j.evidence = absl::StrFormat("median %s %.4g before, %.4g in the %d steps after",
                                 what, before, after, w.steps_after);
    return j;
  }
  const double ratio = after / before;
  if (ratio <= options.outcome_improved_ratio) {
    j.outcome = Outcome::kImproved;
  } else if (ratio >= options.outcome_worsened_ratio) {
    j.outcome = Outcome::kWorsened;
  } else {
    j.outcome = Outcome::kNoChange;
  }
  j.evidence = absl::StrFormat(
      "median %s %.4g before the action, %.4g over the %d steps after "
      "(x%.3f; improved at or below x%.2f, worsened at or above x%.2f)",
      what, before, after, w.steps_after, ratio, options.outcome_improved_ratio,
      options.outcome_worsened_ratio);
  return j;
}

}  // namespace lossguard::policy
