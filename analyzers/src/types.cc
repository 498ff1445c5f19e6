#include "lossguard/analyzers/types.h"

#include <array>
#include <utility>

namespace lossguard::analyzers {
namespace {

constexpr std::array<std::pair<DiagnosisKind, std::string_view>, 6> kNames = {{
    {DiagnosisKind::kDivergence, "divergence"},
    {DiagnosisKind::kOscillation, "oscillation"},
    {DiagnosisKind::kStagnation, "stagnation"},
    {DiagnosisKind::kOverfitting, "overfitting"},
    {DiagnosisKind::kGradientExplosion, "gradient_explosion"},
    {DiagnosisKind::kLossSpike, "loss_spike"},
}};

}  // namespace

std::string_view KindName(DiagnosisKind kind) {
  for (const auto& [k, name] : kNames) {
    if (k == kind) return name;
  }
  return "unknown";
}

std::optional<DiagnosisKind> KindFromName(std::string_view name) {
  for (const auto& [k, n] : kNames) {
    if (n == name) return k;
  }
  return std::nullopt;
}

}  // namespace lossguard::analyzers
