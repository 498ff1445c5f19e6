#ifndef LOSSGUARD_ANALYZERS_TYPES_H_
#define LOSSGUARD_ANALYZERS_TYPES_H_

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

namespace lossguard::analyzers {

// `now - then` in steps, saturated to the int64 range instead of
// overflowing: steps may be any increasing int64 values (a log may jump from
// near INT64_MIN to near INT64_MAX).
inline int64_t StepsBetween(int64_t then, int64_t now) {
  int64_t d = 0;
  if (!__builtin_sub_overflow(now, then, &d)) return d;
  return now > then ? std::numeric_limits<int64_t>::max()
                    : std::numeric_limits<int64_t>::min();
}

// One optimizer step as a trainer reports it. `loss` may be NaN or infinite:
// that is data (a divergence signal), not an error.
struct StepRecord {
  int64_t step = 0;
  // Learning rate of the first param group; NaN when the log does not say.
  double lr = 0.0;
  double loss = 0.0;                // training loss of this step's minibatch
  std::optional<double> val_loss;   // validation loss, when measured
  std::optional<double> grad_norm;  // global L2 norm before clipping
};

enum class DiagnosisKind {
  kDivergence,         // loss rising for good / non-finite
  kOscillation,        // swings far beyond minibatch noise, no progress
  kStagnation,         // no meaningful progress far from convergence
  kOverfitting,        // val loss past its minimum, train loss falling
  kGradientExplosion,  // grad norm far above its recent robust level
  kLossSpike,          // a loss spike that recovered (an event)
};

// "divergence", "oscillation", "stagnation", "overfitting",
// "gradient_explosion", "loss_spike".
std::string_view KindName(DiagnosisKind kind);
// Inverse of KindName; nullopt for an unknown name.
std::optional<DiagnosisKind> KindFromName(std::string_view name);

// A finding of the analyzer, decided on the data seen so far.
struct Diagnosis {
  DiagnosisKind kind = DiagnosisKind::kDivergence;
  int64_t step = 0;         // step at which it was decided (a live run is told)
  int64_t onset = 0;        // estimate of the step where the condition began
  double severity = 0.0;    // [0,1]: how bad, kind-specific scale
  double confidence = 0.0;  // [0,1]: how sure
  std::string evidence;     // words with the numbers behind them
  // Numbers a policy can act on without parsing `evidence`.
  double loss_at_onset = 0.0;    // smoothed loss at the onset
  double best_loss = 0.0;        // best smoothed loss before the onset
  double lr_at_onset = 0.0;      // learning rate at the onset
  double grad_norm_level = 0.0;  // robust typical grad norm (0 if unknown)
  // Decided on a non-finite loss or gradient norm: unambiguous however few
  // steps were seen.
  bool nonfinite = false;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_TYPES_H_
