// Prints the LR of param group 0 for each step of a schedule, as JSON, for
// compare_with_torch.py:
//   schedule_dump '{"kind": "cosine", "base_lr": 0.1, "t_max": 50}' STEPS
//   schedule_dump '{"kind": "plateau", ...}' 0 METRIC METRIC ...
// For plateau, the LR after each metric is printed.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "lossguard/schedule/lr_schedule.h"
#include "nlohmann/json.hpp"

int main(int argc, char** argv) {
  using lossguard::schedule::ScheduleConfig;
  if (argc < 3) {
    std::fprintf(stderr, "usage: schedule_dump CONFIG_JSON STEPS [METRIC...]\n");
    return 2;
  }
  const nlohmann::json j = nlohmann::json::parse(argv[1]);
  ScheduleConfig c;
  c.kind = *lossguard::schedule::ScheduleKindFromName(j.at("kind").get<std::string>());
  c.base_lr = j.value("base_lr", c.base_lr);
  c.warmup_steps = j.value("warmup_steps", c.warmup_steps);
  c.warmup_start_factor = j.value("warmup_start_factor", c.warmup_start_factor);
  c.step_size = j.value("step_size", c.step_size);
  c.gamma = j.value("gamma", c.gamma);
  c.t_max = j.value("t_max", c.t_max);
  c.t_0 = j.value("t_0", c.t_0);
  c.t_mult = j.value("t_mult", c.t_mult);
  c.eta_min = j.value("eta_min", c.eta_min);
  c.max_lr = j.value("max_lr", c.max_lr);
  c.total_steps = j.value("total_steps", c.total_steps);
  c.pct_start = j.value("pct_start", c.pct_start);
  c.div_factor = j.value("div_factor", c.div_factor);
  c.final_div_factor = j.value("final_div_factor", c.final_div_factor);
  c.plateau_factor = j.value("factor", c.plateau_factor);
  c.plateau_patience = j.value("patience", c.plateau_patience);
  c.plateau_threshold = j.value("threshold", c.plateau_threshold);
  c.plateau_cooldown = j.value("cooldown", c.plateau_cooldown);
  c.plateau_min_lr = j.value("min_lr", c.plateau_min_lr);
  absl::Status s = lossguard::schedule::ValidateSchedule(c);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
    return 1;
  }
  lossguard::schedule::LrSchedule schedule(c);
  nlohmann::json out = nlohmann::json::array();
  const long steps = std::atol(argv[2]);
  for (long t = 0; t < steps; ++t) out.push_back(schedule.LrAt(t));
  for (int i = 3; i < argc; ++i) {
    schedule.ObserveMetric(std::atof(argv[i]));
    out.push_back(schedule.LrAt(0));
  }
  std::cout << out.dump() << "\n";
  return 0;
}
