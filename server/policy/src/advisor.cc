#include "lossguard/policy/advisor.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_format.h"
#include "lossguard/analyzers/lr_range_test.h"

namespace lossguard::policy {
namespace {

// A ramp's range test needs this many points (the analysis' own minimum).
constexpr size_t kMinRampPoints = 20;
// The LR has stopped growing for this many steps: the ramp ran its course.
constexpr int kRampDoneFlatSteps = 3;

}  // namespace

Advisor::Advisor(const analyzers::AnalyzerOptions& analyzer,
                 const PolicyOptions& policy)
    : options_(policy), analyzer_(analyzer) {}

absl::Status Advisor::Feed(const analyzers::StepRecord& rec,
                           std::vector<analyzers::Diagnosis>* decided) {
  const size_t before = decided->size();
  absl::Status s = analyzer_.Feed(rec, decided);
  if (!s.ok()) return s;
  ObserveStep(rec, options_, &ctx_);
  if (!ramp_.on || !options_.ramp_range_test) return absl::OkStatus();

  // Watching an LR ramp: collect its points while the LR grows.
  const double lr = rec.lr;
  if (std::isfinite(lr) && lr > ramp_.last_lr * (1.0 + 1e-9)) {
    if (ramp_.lrs.size() < static_cast<size_t>(std::max<int64_t>(ramp_.steps, 1)) + 1) {
      ramp_.lrs.push_back(lr);
      ramp_.losses.push_back(rec.loss);
    }
    ramp_.last_lr = lr;
    ramp_.flat = 0;
  } else if (std::isfinite(lr) && lr < ramp_.last_lr / 1.5) {
    ramp_.on = false;  // cut: an action landed, the ramp is over
    ctx_.ramp_until = 0;
    return absl::OkStatus();
  } else if (std::isfinite(lr) && !ramp_.lrs.empty()) {
    ++ramp_.flat;  // (a step that does not log its LR says nothing)
  }
  bool trouble = false;
  for (size_t i = before; i < decided->size(); ++i) {
    const analyzers::DiagnosisKind k = (*decided)[i].kind;
    trouble |= k == analyzers::DiagnosisKind::kDivergence ||
               k == analyzers::DiagnosisKind::kOscillation;
  }
  if (trouble) {
    // The ramp found the edge: the range test over its points says where
    // below it to land (used by the divergence or oscillation advice).
    SuggestFromRamp();
  } else if (ramp_.flat >= kRampDoneFlatSteps) {
    // The ramp ran its course without blowing up: land where its range
    // test says, if that is below the top of the ramp.
    ramp_.on = false;
    SuggestFromRamp();
    if (ctx_.ramp_suggested_lr > 0.0 && ctx_.ramp_suggested_lr < lr / 1.5) {
      analyzers::Diagnosis d;
      d.kind = analyzers::DiagnosisKind::kStagnation;
      d.step = rec.step;
      d.onset = ramp_.advised_step;
      d.severity = 0.5;
      d.confidence = 0.8;
      d.loss_at_onset = rec.loss;
      d.best_loss = rec.loss;
      d.lr_at_onset = lr;
      d.evidence = ctx_.ramp_evidence;
      decided->push_back(std::move(d));
    } else {
      ctx_.ramp_suggested_lr = 0.0;
    }
  }
  return absl::OkStatus();
}

void Advisor::SuggestFromRamp() {
  ctx_.ramp_suggested_lr = 0.0;
  ctx_.ramp_evidence.clear();
  if (ramp_.lrs.size() < kMinRampPoints) return;
  absl::StatusOr<analyzers::LrSuggestion> s =
      analyzers::SuggestLearningRate(ramp_.lrs, ramp_.losses);
  if (!s.ok()) return;
  ctx_.ramp_suggested_lr = s->suggested_lr;
  ctx_.ramp_evidence = absl::StrFormat(
      "the LR range test over the ramp's %d points (LR %g to %g) puts the "
      "LR at %g: %s",
      ramp_.lrs.size(), ramp_.lrs.front(), ramp_.lrs.back(), s->suggested_lr,
      s->evidence);
}

void Advisor::Record(const analyzers::Diagnosis& d, const Advice& advice) {
  ObserveAdvice(d, advice, &ctx_);
  if (advice.action == ActionKind::kRampLr) {
    ramp_ = Ramp();
    ramp_.on = true;
    ramp_.advised_step = advice.at_step;
    ramp_.steps = advice.ramp_steps;
    ramp_.last_lr = ctx_.lr;
  } else if (EndsRamp(advice)) {
    ramp_.on = false;
  }
}

void Advisor::TakeDue(std::vector<analyzers::Diagnosis>* due) {
  if (!DeferredDue(ctx_, options_)) return;
  for (analyzers::Diagnosis& d : TakeDeferred(analyzer_.Active(), options_, &ctx_)) {
    due->push_back(std::move(d));
  }
}

}  // namespace lossguard::policy
