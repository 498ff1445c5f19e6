#include "analyzers/src/gradient_detector.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"

namespace lossguard::analyzers {

void GradientDetector::OnGradNorm(const StepRecord& rec, double lr,
                                  double best_level, Findings* findings) {
  const double g = *rec.grad_norm;
  const double x = std::log(g);
  ++points_;
  if (std::isnan(level_)) {
    level_ = x;
    return;
  }
  const double dev = x - level_;
  const double sigma = noise_.Sigma();
  const double threshold =
      std::max(std::log(options_.grad_explosion_factor),
               options_.grad_explosion_sigmas * sigma);
  if (points_ > options_.grad_min_points && dev > threshold) {
    if (!exploding_) {
      exploding_ = true;
      Diagnosis d;
      d.kind = DiagnosisKind::kGradientExplosion;
      d.step = rec.step;
      d.onset = rec.step;
      d.severity = Clamp01(dev / std::log(1e4));
      d.confidence = Clamp01(0.5 + 0.5 * (dev - threshold) / threshold);
      d.loss_at_onset = rec.loss;
      d.best_loss = ExpOrNaN(best_level);
      d.lr_at_onset = lr;
      d.grad_norm_level = std::exp(level_);
      d.evidence = absl::StrFormat(
          "gradient norm %.4g is %.4gx its robust level %.4g (threshold "
          "%.4gx, %.1f robust sd)",
          g, std::exp(dev), std::exp(level_), std::exp(threshold),
          sigma > 0 ? dev / sigma : kInf);
      findings->Report(std::move(d));
    }
  } else if (dev < 0.5 * threshold) {
    if (exploding_) findings->Clear(DiagnosisKind::kGradientExplosion);
    exploding_ = false;
  }
  // Winsorized update keeps one explosion from becoming the new normal.
  const double clip = 3.0 * std::max(sigma, 1e-3);
  noise_.Add(dev);
  level_ += 2.0 / (options_.grad_ema_span + 1.0) * std::clamp(dev, -clip, clip);
}

}  // namespace lossguard::analyzers
