#include "lossguard/schedule/lr_schedule.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <numbers>

#include "absl/strings/str_format.h"

namespace lossguard::schedule {
namespace {

// (1 + cos(pi * pct)) / 2 between `from` (pct 0) and `to` (pct 1): torch's
// cosine annealing.
double CosineBetween(double from, double to, double pct) {
  return to + (from - to) / 2.0 * (std::cos(std::numbers::pi * pct) + 1.0);
}

}  // namespace

std::string_view ScheduleKindName(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kConstant:
      return "constant";
    case ScheduleKind::kStep:
      return "step";
    case ScheduleKind::kCosine:
      return "cosine";
    case ScheduleKind::kCosineWarmRestarts:
      return "cosine_restarts";
    case ScheduleKind::kOneCycle:
      return "onecycle";
    case ScheduleKind::kPlateau:
      return "plateau";
  }
  return "constant";
}

std::optional<ScheduleKind> ScheduleKindFromName(std::string_view name) {
  for (ScheduleKind k :
       {ScheduleKind::kConstant, ScheduleKind::kStep, ScheduleKind::kCosine,
        ScheduleKind::kCosineWarmRestarts, ScheduleKind::kOneCycle,
        ScheduleKind::kPlateau}) {
    if (ScheduleKindName(k) == name) return k;
  }
  return std::nullopt;
}

absl::Status ValidateSchedule(const ScheduleConfig& c) {
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(what);
  };
  if (!(c.base_lr > 0.0) || !std::isfinite(c.base_lr)) {
    return bad(absl::StrFormat("base_lr %g must be finite and > 0", c.base_lr));
  }
  if (c.warmup_steps < 0) return bad("warmup_steps must be >= 0");
  if (c.warmup_steps > 0 &&
      !(c.warmup_start_factor > 0.0 && c.warmup_start_factor <= 1.0)) {
    return bad("warmup_start_factor must be in (0, 1]");
  }
  if (c.warmup_steps > 0 && c.kind == ScheduleKind::kOneCycle) {
    return bad("onecycle warms up by itself: no warmup_steps with it");
  }
  if (!(c.eta_min >= 0.0)) return bad("eta_min must be >= 0");
  switch (c.kind) {
    case ScheduleKind::kConstant:
      break;
    case ScheduleKind::kStep:
      if (c.step_size <= 0) return bad("step_size must be > 0");
      if (!(c.gamma > 0.0)) return bad("gamma must be > 0");
      break;
    case ScheduleKind::kCosine:
      if (c.t_max <= 0) return bad("t_max must be > 0");
      break;
    case ScheduleKind::kCosineWarmRestarts:
      if (c.t_0 <= 0) return bad("t_0 must be > 0");
      if (c.t_mult < 1) return bad("t_mult must be >= 1");
      break;
    case ScheduleKind::kOneCycle:
      if (!(c.max_lr > 0.0)) return bad("max_lr must be > 0");
      if (c.total_steps <= 1) return bad("total_steps must be > 1");
      if (!(c.pct_start > 0.0 && c.pct_start < 1.0)) {
        return bad("pct_start must be in (0, 1)");
      }
      // torch divides by (pct_start * total_steps - 1): at least 2 steps up.
      if (c.pct_start * static_cast<double>(c.total_steps) < 2.0) {
        return bad("pct_start * total_steps must be >= 2");
      }
      if (!(c.div_factor > 0.0) || !(c.final_div_factor > 0.0)) {
        return bad("div_factor and final_div_factor must be > 0");
      }
      break;
    case ScheduleKind::kPlateau:
      if (!(c.plateau_factor > 0.0 && c.plateau_factor < 1.0)) {
        return bad("plateau factor must be in (0, 1)");
      }
      if (c.plateau_patience < 0 || c.plateau_cooldown < 0) {
        return bad("plateau patience and cooldown must be >= 0");
      }
      if (!(c.plateau_threshold >= 0.0) || !(c.plateau_min_lr >= 0.0)) {
        return bad("plateau threshold and min_lr must be >= 0");
      }
      break;
  }
  return absl::OkStatus();
}

LrSchedule::LrSchedule(const ScheduleConfig& config) : config_(config) {
  assert(ValidateSchedule(config).ok());
  plateau_lr_ = config.base_lr;
}

double LrSchedule::ScheduledAt(int64_t step) const {
  const ScheduleConfig& c = config_;
  step = std::max<int64_t>(step, 0);
  if (c.warmup_steps > 0 && step < c.warmup_steps) {
    // LinearLR(start_factor, 1.0, warmup_steps).
    const double f = c.warmup_start_factor +
                     (1.0 - c.warmup_start_factor) *
                         static_cast<double>(step) /
                         static_cast<double>(c.warmup_steps);
    return c.base_lr * f;
  }
  const int64_t t = step - c.warmup_steps;  // the schedule's own step
  switch (c.kind) {
    case ScheduleKind::kConstant:
      return c.base_lr;
    case ScheduleKind::kStep:
      return c.base_lr * std::pow(c.gamma, static_cast<double>(t / c.step_size));
    case ScheduleKind::kCosine:
      // Periodic past T_max, as torch's CosineAnnealingLR is.
      return CosineBetween(c.base_lr, c.eta_min,
                           static_cast<double>(t) /
                               static_cast<double>(c.t_max));
    case ScheduleKind::kCosineWarmRestarts: {
      int64_t t_cur = t;
      int64_t t_i = c.t_0;
      if (c.t_mult == 1) {
        t_cur = t % c.t_0;
      } else {
        while (t_cur >= t_i) {
          t_cur -= t_i;
          t_i *= c.t_mult;
        }
      }
      return CosineBetween(c.base_lr, c.eta_min,
                           static_cast<double>(t_cur) /
                               static_cast<double>(t_i));
    }
    case ScheduleKind::kOneCycle: {
      const double initial = c.max_lr / c.div_factor;
      const double min_lr = initial / c.final_div_factor;
      const double up_end =
          c.pct_start * static_cast<double>(c.total_steps) - 1.0;
      const double down_end = static_cast<double>(c.total_steps) - 1.0;
      const double s = std::min<double>(static_cast<double>(t), down_end);
      if (s <= up_end) return CosineBetween(initial, c.max_lr, s / up_end);
      return CosineBetween(c.max_lr, min_lr,
                           (s - up_end) / (down_end - up_end));
    }
    case ScheduleKind::kPlateau:
      return plateau_lr_;
  }
  return c.base_lr;
}

double LrSchedule::LrAt(int64_t step) const {
  if (restart_at_.has_value() && step >= *restart_at_) {
    const int64_t t = (step - *restart_at_) % restart_t0_;
    return correction_ *
           CosineBetween(restart_eta_max_, restart_eta_min_,
                         static_cast<double>(t) /
                             static_cast<double>(restart_t0_));
  }
  return correction_ * ScheduledAt(step);
}

bool LrSchedule::ObserveMetric(double metric) {
  // A NaN metric counts as a bad epoch, as in torch (it is never better).
  if (config_.kind != ScheduleKind::kPlateau) return false;
  const ScheduleConfig& c = config_;
  // mode 'min', threshold_mode 'rel'.
  if (!plateau_has_best_ || metric < plateau_best_ * (1.0 - c.plateau_threshold)) {
    plateau_best_ = metric;
    plateau_has_best_ = true;
    plateau_bad_ = 0;
  } else {
    ++plateau_bad_;
  }
  if (plateau_cooldown_left_ > 0) {
    --plateau_cooldown_left_;
    plateau_bad_ = 0;
  }
  if (plateau_bad_ > c.plateau_patience) {
    const double reduced =
        std::max(plateau_lr_ * c.plateau_factor, c.plateau_min_lr);
    plateau_cooldown_left_ = c.plateau_cooldown;
    plateau_bad_ = 0;
    if (plateau_lr_ - reduced > c.plateau_eps) {
      plateau_lr_ = reduced;
      return true;
    }
  }
  return false;
}

void LrSchedule::Scale(double factor) { correction_ *= factor; }

void LrSchedule::RestartCosine(int64_t at_step, int64_t t_0, double eta_max,
                               double eta_min) {
  restart_at_ = at_step;
  restart_t0_ = std::max<int64_t>(t_0, 1);
  restart_eta_max_ = eta_max;
  restart_eta_min_ = eta_min;
  correction_ = 1.0;
}

}  // namespace lossguard::schedule
