#ifndef LOSSGUARD_SCHEDULE_LR_SCHEDULE_H_
#define LOSSGUARD_SCHEDULE_LR_SCHEDULE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lossguard::schedule {

// The learning-rate schedules of torch.optim.lr_scheduler, with the same
// formulas and defaults (PyTorch 1.13 / 2.x), for trainers whose framework
// lacks them (LibTorch 1.13 has only StepLR) and so that lossguard's
// corrections compose with the schedule instead of fighting it.
enum class ScheduleKind {
  kConstant,
  kStep,                // StepLR(step_size, gamma)
  kCosine,              // CosineAnnealingLR(T_max, eta_min)
  kCosineWarmRestarts,  // CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)
  kOneCycle,            // OneCycleLR(max_lr, total_steps, pct_start, 'cos',
                        //            div_factor, final_div_factor)
  kPlateau,             // ReduceLROnPlateau('min', factor, patience,
                        //   threshold, 'rel', cooldown, min_lr, eps)
};

std::string_view ScheduleKindName(ScheduleKind kind);
// "constant", "step", "cosine", "cosine_restarts", "onecycle", "plateau".
std::optional<ScheduleKind> ScheduleKindFromName(std::string_view name);

// Every parameter, with torch's defaults where torch has one. LRs are in
// absolute units of the first param group; other groups keep their ratio
// to it.
struct ScheduleConfig {
  ScheduleKind kind = ScheduleKind::kConstant;
  double base_lr = 0.1;  // the optimizer's initial LR (group 0)

  // Linear warmup first (LinearLR(start_factor, 1.0, warmup_steps) chained
  // with the schedule through SequentialLR(milestones=[warmup_steps])): the
  // schedule then starts from its own step 0. 0: none. Not with OneCycle,
  // which warms up by itself.
  int64_t warmup_steps = 0;
  double warmup_start_factor = 1.0 / 3.0;  // LinearLR's default

  // kStep
  int64_t step_size = 1000;
  double gamma = 0.1;
  // kCosine (T_max) and kCosineWarmRestarts (T_0, T_mult)
  int64_t t_max = 1000;
  int64_t t_0 = 1000;
  int64_t t_mult = 1;
  double eta_min = 0.0;
  // kOneCycle
  double max_lr = 0.1;
  int64_t total_steps = 1000;
  double pct_start = 0.3;
  double div_factor = 25.0;
  double final_div_factor = 1e4;
  // kPlateau (stepped once per validation)
  double plateau_factor = 0.1;
  int plateau_patience = 10;
  double plateau_threshold = 1e-4;
  int plateau_cooldown = 0;
  double plateau_min_lr = 0.0;
  double plateau_eps = 1e-8;
};

absl::Status ValidateSchedule(const ScheduleConfig& config);

// The LR of param group 0 at each optimizer step, plus lossguard's
// corrections on top of the schedule.
//
// Step t is the t-th optimizer step (0-based): LrAt(t) is what torch's
// scheduler has set after t calls to scheduler.step(), i.e. the LR used
// for optimizer step t. ReduceLROnPlateau is driven by ObserveMetric (its
// scheduler.step(metric)).
//
// Thread-safety: not thread-safe; one owner (the training loop).
class LrSchedule {
 public:
  // Requires ValidateSchedule(config).ok().
  explicit LrSchedule(const ScheduleConfig& config);

  // The LR for optimizer step `step` (>= 0), corrections included.
  double LrAt(int64_t step) const;

  // ReduceLROnPlateau.step(metric); other kinds ignore it. Returns true when
  // the LR was reduced.
  bool ObserveMetric(double metric);

  // --- lossguard's corrections ---
  // Every LR from now on is multiplied by `factor` (scale_lr), on top of
  // earlier corrections.
  void Scale(double factor);
  // From `at_step` on, the LR follows cosine annealing with warm restarts
  // (T_0 = t_0, T_mult 1) from eta_max down to eta_min (restart_cosine);
  // earlier corrections no longer apply.
  void RestartCosine(int64_t at_step, int64_t t_0, double eta_max,
                     double eta_min);

  const ScheduleConfig& config() const { return config_; }
  double correction() const { return correction_; }

 private:
  double ScheduledAt(int64_t step) const;  // without corrections

  ScheduleConfig config_;
  double correction_ = 1.0;
  // kPlateau state
  double plateau_lr_ = 0.0;
  double plateau_best_ = 0.0;
  bool plateau_has_best_ = false;
  int plateau_bad_ = 0;
  int plateau_cooldown_left_ = 0;
  // restart_cosine override
  std::optional<int64_t> restart_at_;
  int64_t restart_t0_ = 0;
  double restart_eta_max_ = 0.0;
  double restart_eta_min_ = 0.0;
};

}  // namespace lossguard::schedule

#endif  // LOSSGUARD_SCHEDULE_LR_SCHEDULE_H_
