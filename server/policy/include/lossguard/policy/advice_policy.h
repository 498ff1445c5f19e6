#ifndef LOSSGUARD_POLICY_ADVICE_POLICY_H_
#define LOSSGUARD_POLICY_ADVICE_POLICY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lossguard/analyzers/types.h"

namespace lossguard::policy {

// What the trainer is advised to do.
enum class ActionKind {
  kNone,            // nothing (see Advice::reason)
  kScaleLr,         // multiply the LR by Advice::lr_factor
  kSetLr,           // set the LR to Advice::lr_to (a bound clipped the scale)
  kRestartCosine,   // restart a cosine cycle: t_0, eta_max, eta_min
  kEnableGradClip,  // clip the global grad norm at Advice::clip_max_norm
  kEarlyStop,       // stop training (keep the best checkpoint)
  kRampLr,          // grow the LR x ramp_factor per step for ramp_steps
};

// "none", "scale_lr", "set_lr", "restart_cosine", "enable_grad_clip",
// "early_stop", "ramp_lr".
std::string_view ActionName(ActionKind action);

// The guard rail that blocked an action, if any.
enum class GuardRail {
  kNone,
  kMinStepsSeen,  // too few steps seen to act on
  kMaxActions,    // the run has had its share of actions
  kCooldown,      // the last action is too recent
  kLrBound,       // the LR is already at the bound the action moves towards
};

// "none", "min_steps_seen", "max_actions", "cooldown", "lr_bound".
std::string_view GuardRailName(GuardRail rail);

// The LR schedule as far as the LR history shows it.
enum class ScheduleHint {
  kUnknown,   // no LR seen yet, or the current LR is not known
  kConstant,  // the current LR is (close to) the largest seen
  kDecaying,  // the current LR is clearly below the largest seen
};

// "unknown", "constant", "decaying".
std::string_view ScheduleName(ScheduleHint hint);

// Guard rails and remedies of the policy, with their defaults.
struct PolicyOptions {
  // Guard rails.
  // No action sets the LR below this.
  double min_lr = 1e-7;
  // No action sets the LR above this.
  double max_lr = 10.0;
  // Steps after an action during which no other action is taken (except on
  // a divergence decided on a non-finite value: it did not work; and, from
  // min_steps_seen steps after an LR cut for a blow-up, on a divergence or
  // a damaged stagnation while the LR is still at the cut's level: the cut
  // was not enough).
  int64_t cooldown_steps = 100;
  // Actions per run at most.
  int max_actions = 5;
  // Steps the analyzer must have seen before any action (except on a
  // divergence decided on a non-finite value, which is certain at once).
  int64_t min_steps_seen = 20;

  // Remedies.
  // LR factor on divergence.
  double divergence_lr_factor = 0.1;
  // LR factor on oscillation.
  double oscillation_lr_factor = 0.5;
  // LR factor on stagnation at a constant (or early-decayed) LR.
  double stagnation_lr_factor = 3.0;
  // LR factor on the first overfitting diagnosis.
  double overfitting_lr_factor = 0.5;
  // Gradient clipping max_norm, as a multiple of the typical grad norm.
  double clip_level_multiple = 2.0;
  // Cosine restart cycle length t_0, as a fraction of the steps seen.
  double restart_t0_fraction = 0.5;
  // Shortest cosine restart cycle, in steps.
  int64_t restart_min_t0 = 100;
  // Cosine restart eta_min, as a fraction of eta_max.
  double restart_eta_min_fraction = 0.01;
  // Relative LR change below which two LRs count as the same.
  double lr_tolerance = 0.05;
  // Stagnation right at the initial loss (smoothed loss at the onset at
  // least `damaged_progress_ratio` x the first loss) in a run whose loss
  // once rose above `damaged_peak_ratio` x the first loss (or see
  // damaged_grad_collapse) is a run damaged
  // by too large an LR (saturated or dead units; typically stuck at chance
  // level, ln(classes)): raising the LR would hurt. It gets the divergence
  // remedy instead, with restore_checkpoint. A 4x blow-up is far beyond
  // minibatch noise; 0.95 means "no progress at all".
  double damaged_peak_ratio = 4.0;
  double damaged_progress_ratio = 0.95;
  // ...or whose gradient norm level (an EMA, slow to fall) dropped this many
  // times below its first
  // gradient norm (dead units pass no gradient; a starved run, which has
  // not moved, keeps its initial gradient norm).
  double damaged_grad_collapse = 2.0;
  // A stagnation in a run whose first updates raised its loss (the median
  // of its 2nd to 5th losses at least this factor above the first, the
  // untrained model's) is an LR too large, overshooting from the start, not
  // too small: it gets the divergence cut, never a raise. An untrained
  // model's loss hardly varies between minibatches and a starved LR cannot
  // move it, so a 10% rise in the first updates is the LR's doing (the
  // analyzer's initial_blowup_factor reads it the same way).
  double overshoot_rise_factor = 1.1;
  // A constant-LR run stuck at its initial loss with its gradients intact
  // (no blow-up, norm not collapsed) is starved by an order of magnitude or
  // more, by how much nothing in the curve says: it gets an LR range test
  // in the run, a ramp of the LR by `starved_ramp_factor` per step up to
  // `starved_ramp_max_factor` x its LR (and max_lr). Where the loss blows
  // up on the way, the divergence remedy (x0.1 from the LR that did it,
  // with a rollback) lands the LR below the edge, as the range test's rule
  // does; during the ramp and `cooldown_steps` / 2 after it, divergence,
  // oscillation and gradient explosion are not held back by the cooldown.
  // false: a plain raise by `stagnation_starved_lr_factor` instead. In a
  // run with a constant LR and a known planned length, the ramp's top is
  // where a range test stopped, not a tuned LR, and it is treated as a cut
  // is (anneal_after_cut): after the ramp the LR decays to the planned end.
  bool starved_ramp = true;
  double starved_ramp_factor = 1.1;
  double starved_ramp_max_factor = 1000.0;
  // End the ramp on the LR range test over its own points (policy::Advisor,
  // analyzers::SuggestLearningRate) rather than at its top or x0.1 below
  // its blow-up. Off: in the rescue benchmark (bench/rescue.py) the
  // in-run range test landed Adam runs 3-4x below the reference LR (the
  // loss's response lags the growing LR as the model trains on), losing
  // two rescues and gaining none. (Measured with the earlier rule, the
  // middle of the steepest descent; the rule now lands ~3x higher, between
  // the steepest descent and the loss minimum, and was not measured here.)
  bool ramp_range_test = false;
  double stagnation_starved_lr_factor = 10.0;
  // An LR cut (or an LR ramp, see starved_ramp) in a run whose LR is
  // constant and whose planned length is
  // known (RunContext::planned_steps) starts a cosine decay from the cut LR
  // to restart_eta_min_fraction of it at the planned end, instead of
  // leaving the LR constant at the cut level. A cut by a fixed factor (x0.1
  // for a blow-up, x0.5 for swings) lands within a few x of a good LR, not
  // on it: at 3x the best LR a constant-LR run trains without any sign of
  // trouble but ends several points short, while a decay to the end makes
  // the result insensitive to a factor of a few (why decaying schedules
  // are the default in practice). Only with fewer than restart_min_t0
  // steps left, or the length unknown, is the cut a plain scale.
  bool anneal_after_cut = true;

  // --- judging an applied action afterwards ---
  // Steps after the action over which its effect is judged: the cooldown,
  // since that is how long the policy waits before acting again anyway.
  int64_t outcome_steps = 100;
  // The median loss of the last `outcome_steps` steps against the median of
  // as many before the action (validation loss for overfitting): at or below
  // this ratio the action improved things...
  double outcome_improved_ratio = 0.97;
  // ...at or above this one it made them worse (as does a non-finite loss
  // after it). In between: no change. Minibatch noise moves a median of
  // ~100 losses by a few percent at most, so neither band is noise.
  double outcome_worsened_ratio = 1.10;
};

// What the policy knows about the run besides the diagnosis. Kept up to date
// by ObserveStep and ObserveAdvice.
struct RunContext {
  int64_t step = 0;          // current step
  double lr = 0.0;           // LR at the current step (NaN: not logged)
  double max_lr_seen = 0.0;  // largest LR seen so far
  int64_t steps_seen = 0;    // steps fed to the analyzer so far
  std::optional<int64_t> last_action_step;  // step of the last action
  int actions_taken = 0;                    // actions advised so far
  bool grad_explosion_seen = false;  // a gradient explosion was diagnosed
  double grad_norm_level = 0.0;      // robust typical grad norm (0: unknown)
  bool overfitting_advised = false;  // an overfitting action was advised
  // The run's first finite loss and its highest finite loss so far
  // (ObserveStep): a run stuck at its initial loss after a blow-up is
  // damaged, not starved of LR.
  double initial_loss = 0.0;
  double peak_loss = 0.0;
  double initial_grad_norm = 0.0;  // the first finite, positive one
  // The run's planned length in steps (RunConfig::total_steps) when its
  // LR is planned to stay constant (schedule CONSTANT or unspecified);
  // 0: not known, or the run has a schedule of its own. Set by the owner
  // of the context (the daemon's run, the embedded guard).
  int64_t planned_steps = 0;
  // The first 5 finite, positive losses (ObserveStep) and, once they are
  // in, the median of the 2nd to 5th over the first: above 1 when the
  // first updates raised the loss (0: not known yet).
  static constexpr int kEarlyLosses = 5;
  double early_losses[kEarlyLosses] = {};
  int early_count = 0;
  double early_rise = 0.0;
  // Kinds whose diagnosis was blocked by the cooldown (bit = 1 << kind):
  // reconsidered once it ends, if they still hold (see TakeDeferred).
  uint32_t deferred_kinds = 0;
  // After an LR cut for a blow-up (restore_checkpoint), the LR it set: no
  // later raise or cosine restart goes above it (0: no ceiling).
  double lr_ceiling = 0.0;
  // Until this step an LR raise lossguard advised is being watched (a
  // ramp: while it is on and its end is judged; a raise or a cosine
  // restart: half a cooldown): the divergence, oscillation or gradient
  // explosion it may cause is not held back by the cooldown (0: none).
  int64_t ramp_until = 0;
  // lossguard's last one-shot raise (a scale or set above the LR then, a
  // cosine restart; not a ramp), until another LR action: the LR before
  // it, the LR it set (a restart: eta_max) and its step. A divergence while
  // the raise is watched, with the LR above the first and at most the
  // second, goes back to the LR before it (raise_from_lr 0: none).
  double raise_from_lr = 0.0;
  double raise_to_lr = 0.0;
  int64_t raise_step = 0;
  // The LR the range test over the ramp's points suggests (the middle of
  // its steepest descent; see policy::Advisor), once the ramp has ended or
  // blown up; 0: none. The next divergence, oscillation or stagnation
  // advice sets the LR to it; any action clears it.
  double ramp_suggested_lr = 0.0;
  std::string ramp_evidence;  // the range test's evidence
  ScheduleHint schedule = ScheduleHint::kUnknown;
};

// The policy's answer to one diagnosis. Parameters not used by `action`
// keep their defaults.
struct Advice {
  analyzers::DiagnosisKind diagnosis = analyzers::DiagnosisKind::kDivergence;
  int64_t at_step = 0;  // the diagnosis's step
  ActionKind action = ActionKind::kNone;
  double lr_factor = 1.0;      // kScaleLr: new LR = lr_factor x lr_from
  double lr_from = 0.0;        // kScaleLr, kSetLr, kRestartCosine: the LR now
  double lr_to = 0.0;          // kScaleLr, kSetLr: the LR to use
  std::string lr_bound;        // kSetLr: the bound that stopped the move:
                               // "min_lr", "max_lr" or "max LR seen"
  double clip_max_norm = 0.0;  // kEnableGradClip, or with an LR action
  // With an LR cut: the weights are likely damaged (a divergence, or a run
  // stuck at its initial loss after blowing up), restore a good checkpoint.
  bool restore_checkpoint = false;
                               // after a gradient explosion; 0: no clipping
  int64_t t_0 = 0;             // kRestartCosine: cycle length in steps
  double eta_max = 0.0;        // kRestartCosine: LR at the cycle's start
  double eta_min = 0.0;        // kRestartCosine: LR at the cycle's end
  // kRestartCosine: the cycle is an LR cut's decay to the planned end
  // (PolicyOptions::anneal_after_cut); lr_to is eta_max. kRampLr: after
  // the ramp, the LR decays along a cosine from its top to eta_min over
  // t_0 steps, the rest of the planned run.
  bool anneal = false;
  double ramp_factor = 1.0;    // kRampLr: LR factor per step
  int64_t ramp_steps = 0;      // kRampLr: steps of the ramp
  int64_t ramp_until = 0;      // an LR raise: RunContext::ramp_until it sets
  GuardRail blocked_by = GuardRail::kNone;  // set when a guard rail blocked
  std::string reason;                       // kNone: why no action
  std::string explanation;                  // one sentence, with the numbers
};

// Decides the advice for diagnosis `d` given the run context `ctx`:
//   divergence         -> LR x0.1, plus gradient clipping if a gradient
//                         explosion was seen before; within the watch
//                         window of a raise lossguard advised, the LR
//                         before that raise instead
//   oscillation        -> LR x0.5
//   stagnation         -> LR x3 when the LR is constant; LR x3 but no
//                         higher than the largest LR seen when it was
//                         decayed before the stall (flat since the onset);
//                         restart the cosine cycle when the LR is still
//                         decaying (ctx.lr below d.lr_at_onset by more than
//                         lr_tolerance); nothing when the LR is not logged
//   overfitting        -> LR x0.5 the first time, early stop after that
//   gradient_explosion -> clip at clip_level_multiple x the grad-norm level
//   loss_spike         -> no action
// A cut by a factor (x0.1, x0.5, or onto an LR ramp's range test) in a run
// with a constant LR and a known planned length becomes a cosine decay from
// the cut LR to the planned end (anneal_after_cut; kRestartCosine with
// `anneal` set and t_0 the steps left).
// Guard rails (min_steps_seen, max_actions, cooldown_steps, then the LR
// bounds) turn an action into kNone with `blocked_by` and `reason` set; an
// LR move that would cross a bound stops at the bound (kSetLr). No LR action
// is computed from an LR that is not logged (NaN). Step arithmetic
// saturates, so any int64 steps are safe.
// A pure function: thread-safe.
Advice Decide(const analyzers::Diagnosis& d, const RunContext& ctx,
              const PolicyOptions& options = PolicyOptions());

// The schedule hint from the LR history: kConstant when `current_lr` is
// within `tolerance` (relative) of `max_lr_seen`, kDecaying when below it,
// kUnknown before any positive LR or when `current_lr` is NaN (not logged).
ScheduleHint InferSchedule(double max_lr_seen, double current_lr,
                           double tolerance);

// The step until which an LR ramp of `steps` steps advised at `at_step`
// keeps its cooldown exemption (RunContext::ramp_until): its steps, plus
// half a cooldown for its end to show. Saturates.
int64_t RampUntil(int64_t at_step, int64_t steps, const PolicyOptions& options);

// Whether `advice` ends an LR ramp in progress: another LR action or a
// rollback does (the guards stop ramping then); clipping does not.
bool EndsRamp(const Advice& advice);

// Whether `advice` raises the LR of the run in `ctx`: a scale or set above
// the LR now, a cosine restart above it, a ramp. Decide gives a raise a
// watch window (Advice::ramp_until, RampUntil with no ramp steps).
bool RaisesLr(const Advice& advice, const RunContext& ctx);

// Brings `ctx` up to date with one more step fed to the analyzer.
void ObserveStep(const analyzers::StepRecord& rec, const PolicyOptions& options,
                 RunContext* ctx);

// Records diagnosis `d` and the advice sent for it, as a live run would:
// an action sets last_action_step and counts; an overfitting action sets
// overfitting_advised; a gradient explosion and a grad-norm level are noted.
void ObserveAdvice(const analyzers::Diagnosis& d, const Advice& advice,
                   RunContext* ctx);

// The cooldown delays an action, it does not cancel it: a diagnosis blocked
// by it is deferred (ObserveAdvice records it). Once the cooldown is over,
// TakeDeferred returns those of `active` (the analyzer's diagnoses that
// still hold) whose kind was deferred, re-dated to `ctx.step`, and forgets
// the deferral; the caller Decides on each as on a new diagnosis. After a
// cut for a blow-up, a divergence or damaged stagnation deferred while the
// cut was given its min_steps_seen steps comes back as soon as they are
// over (the cut was not enough: see Decide), not after the cooldown.
std::vector<analyzers::Diagnosis> TakeDeferred(
    const std::vector<analyzers::Diagnosis>& active,
    const PolicyOptions& options, RunContext* ctx);
// Whether TakeDeferred would return anything (cheap: no analyzer call).
bool DeferredDue(const RunContext& ctx, const PolicyOptions& options);

// What an applied action did to the run.
enum class Outcome {
  kImproved,
  kNoChange,
  kWorsened,
};

std::string_view OutcomeName(Outcome outcome);

// The loss before and after an applied action, as the run saw it.
struct OutcomeWindow {
  double loss_before = 0.0;  // median training loss of the steps before
  double loss_after = 0.0;   // median training loss of the steps after
  bool nonfinite_after = false;  // a non-finite loss after the action
  // Median validation loss before / after, when validation ran in both.
  std::optional<double> val_before;
  std::optional<double> val_after;
  int64_t steps_after = 0;  // steps seen since the action
};

struct OutcomeJudgement {
  Outcome outcome = Outcome::kNoChange;
  std::string evidence;  // the numbers behind it
};

// Judges an applied action of the advice for `kind` (a pure function). The
// validation loss decides for overfitting when both medians are known; the
// training loss decides otherwise.
OutcomeJudgement JudgeOutcome(analyzers::DiagnosisKind kind,
                              const OutcomeWindow& window,
                              const PolicyOptions& options = PolicyOptions());

}  // namespace lossguard::policy

#endif  // LOSSGUARD_POLICY_ADVICE_POLICY_H_
