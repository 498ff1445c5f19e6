// lossguard-train: a CNN on Fashion-MNIST (Debian's dataset-fashion-mnist)
// with LibTorch, optionally attached to lossguardd.
//
//   lossguard-train --lr 0.5 --steps 600 --server 127.0.0.1:7077 --mode auto
//   lossguard-train --lr-range-test
//
// The LR schedule is run by the lossguard guard (torch's formulas), which
// also measures the gradient norm, reports every step and, attached in AUTO
// mode (or --embedded), applies lossguard's corrections.

#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "lossguard/torch/lr_range_test.h"
#include "lossguard/client/client.h"
#include "lossguard/schedule/lr_schedule.h"
#include "lossguard/torch/guard.h"
#include "nlohmann/json.hpp"
#include "trainer/fashion_mnist.h"
#include "trainer/models.h"

ABSL_FLAG(std::string, data, lossguard_train::kFashionMnistDir,
          "directory with Fashion-MNIST's *-ubyte.gz files");
ABSL_FLAG(std::string, model, "cnn", "cnn (plain CNN) or resnet (small ResNet, BatchNorm)");
ABSL_FLAG(std::string, device, "auto", "auto, cpu or cuda");
ABSL_FLAG(double, lr, 0.05, "initial learning rate");
ABSL_FLAG(std::string, optimizer, "sgd", "sgd, adam or adamw");
ABSL_FLAG(double, momentum, 0.9, "SGD momentum");
ABSL_FLAG(double, weight_decay, 0.0, "weight decay");
ABSL_FLAG(int64_t, batch_size, 64, "minibatch size");
ABSL_FLAG(int64_t, epochs, 0, "epochs over the training subset (0: use --steps)");
ABSL_FLAG(int64_t, steps, 600, "optimizer steps (when --epochs is 0)");
ABSL_FLAG(std::string, schedule, "constant",
          "constant, step, cosine, cosine_restarts, onecycle or plateau");
ABSL_FLAG(int64_t, warmup, 0, "linear warmup steps");
ABSL_FLAG(int64_t, train_subset, 10000, "training images used (0: all 60000)");
ABSL_FLAG(int64_t, val_size, 2000, "validation images (from the test set)");
ABSL_FLAG(int64_t, eval_every, 50, "steps between validations");
ABSL_FLAG(uint64_t, seed, 1, "random seed");
ABSL_FLAG(std::string, server, "", "lossguardd address (empty: unattached)");
ABSL_FLAG(std::string, token, "", "bearer token for lossguardd (default $LOSSGUARD_TOKEN)");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA of lossguardd's certificate: TLS (default $LOSSGUARD_TLS_CA)");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate (mTLS)");
ABSL_FLAG(std::string, tls_key, "", "PEM key of --tls_cert");
ABSL_FLAG(std::string, mode, "auto", "observe, advise or auto (with --server or --embedded)");
ABSL_FLAG(bool, embedded, false, "run lossguard's analyzers in-process (no daemon)");
ABSL_FLAG(std::string, run_id, "", "run id (default: derived from the flags and the time)");
ABSL_FLAG(std::string, project, "fashion-mnist", "project name");
ABSL_FLAG(bool, lr_range_test, false, "run an LR range test and print the suggested LR");
ABSL_FLAG(std::string, metrics_out, "", "write the final metrics as JSON here");
ABSL_FLAG(std::string, curve_out, "",
          "write every reported step here as a curve CSV (step, lr, loss, "
          "val_loss, grad_norm: the corpus format, readable by lossguard "
          "analyze); needs the guard");
ABSL_FLAG(int64_t, timing_warmup, 0,
          "steps left out of ms_per_step (the first CUDA/cuDNN steps load "
          "kernels and pick algorithms); the clock starts after them");
ABSL_FLAG(int32_t, steps_in_flight, lossguard::torch::GuardOptions{}.max_steps_in_flight,
          "on CUDA, steps whose loss and gradient norm may still be on their "
          "way from the device before the guard waits (1: wait at every step "
          "for the previous one's)");
ABSL_FLAG(bool, grad_norm, true,
          "measure and report the gradient norm at every step (false: the "
          "loss only; gradient explosions are not diagnosed)");
ABSL_FLAG(double, max_overhead, lossguard::torch::GuardOptions{}.max_overhead,
          "the most the guard may add to a step, as a fraction of its time: "
          "on steps too short for that it measures only some steps (0: "
          "every step)");
ABSL_FLAG(int64_t, dense_steps, lossguard::torch::GuardOptions{}.dense_steps,
          "steps measured whatever --max_overhead at the start and after each "
          "correction applied");
ABSL_FLAG(bool, quiet, false, "print only advice and the summary");
ABSL_FLAG(bool, guard, true,
          "false: no lossguard at all, the schedule set directly (the "
          "baseline of bench/guard_overhead.py); only when unattached");

namespace {

using lossguard::v1::Advice;
namespace v1 = lossguard::v1;

struct Eval {
  double loss = 0.0;
  double accuracy = 0.0;
};

Eval Evaluate(torch::nn::Module& module,
              const std::function<torch::Tensor(torch::Tensor)>& forward,
              const torch::Tensor& images, const torch::Tensor& labels,
              torch::Device device) {
  torch::NoGradGuard no_grad;
  module.eval();
  double loss_sum = 0.0;
  int64_t correct = 0;
  const int64_t n = images.size(0);
  for (int64_t i = 0; i < n; i += 500) {
    const int64_t j = std::min(n, i + 500);
    torch::Tensor x = images.slice(0, i, j).to(device);
    torch::Tensor y = labels.slice(0, i, j).to(device);
    torch::Tensor logits = forward(x);
    loss_sum += torch::cross_entropy_loss(logits, y, {}, at::Reduction::Sum)
                    .item<double>();
    correct += logits.argmax(1).eq(y).sum().item<int64_t>();
  }
  module.train();
  return {loss_sum / static_cast<double>(n),
          static_cast<double>(correct) / static_cast<double>(n)};
}

std::string ActionText(const Advice& a) {
  if (!a.has_action()) return "no action";
  const v1::Action& act = a.action();
  switch (act.kind_case()) {
    case v1::Action::kScaleLr:
      return absl::StrFormat("scale LR x%g", act.scale_lr().factor());
    case v1::Action::kSetLr:
      return absl::StrFormat("set LR %g", act.set_lr().lr());
    case v1::Action::kRestartCosine:
      return absl::StrFormat("cosine %g -> %g over %d steps",
                             act.restart_cosine().eta_max(),
                             act.restart_cosine().eta_min(),
                             act.restart_cosine().t_0());
    case v1::Action::kEnableGradClip:
      return absl::StrFormat("clip grad norm at %g",
                             act.enable_grad_clip().max_norm());
    case v1::Action::kEarlyStop:
      return "early stop";
    case v1::Action::kRampLr:
      return absl::StrFormat(
          "ramp LR x%g/step for %d steps%s", act.ramp_lr().factor_per_step(),
          act.ramp_lr().steps(),
          act.ramp_lr().decay_steps() > 0
              ? absl::StrFormat(", then cosine to %g over %d steps",
                                act.ramp_lr().decay_eta_min(),
                                act.ramp_lr().decay_steps())
              : std::string());
    case v1::Action::KIND_NOT_SET:
      break;
  }
  return "no action";
}

// absl flags are spelled with underscores; accept --metrics-out for
// --metrics_out too (the name part only, never the value).
std::vector<char*> DashesToUnderscores(int argc, char** argv,
                                       std::vector<std::string>* storage) {
  storage->reserve(argc);
  std::vector<char*> out;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (i > 0 && a.size() > 2 && a.rfind("--", 0) == 0) {
      const size_t end = std::min(a.find('='), a.size());
      for (size_t k = 2; k < end; ++k) {
        if (a[k] == '-') a[k] = '_';
      }
    }
    storage->push_back(std::move(a));
    out.push_back(storage->back().data());
  }
  out.push_back(nullptr);
  return out;
}

// The schedule as the wire names it (RunConfig::schedule).
lossguard::v1::Schedule ToProto(lossguard::schedule::ScheduleKind kind) {
  using lossguard::schedule::ScheduleKind;
  switch (kind) {
    case ScheduleKind::kConstant:
      return lossguard::v1::CONSTANT;
    case ScheduleKind::kStep:
      return lossguard::v1::STEP_DECAY;
    case ScheduleKind::kCosine:
      return lossguard::v1::COSINE;
    case ScheduleKind::kCosineWarmRestarts:
      return lossguard::v1::COSINE_WARM_RESTARTS;
    case ScheduleKind::kOneCycle:
      return lossguard::v1::ONE_CYCLE;
    case ScheduleKind::kPlateau:
      return lossguard::v1::REDUCE_ON_PLATEAU;
  }
  return lossguard::v1::SCHEDULE_UNSPECIFIED;
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "lossguard-train: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "lossguard-train [--lr 0.05] [--server 127.0.0.1:7077 --mode auto]");
  std::vector<std::string> arg_storage;
  std::vector<char*> args = DashesToUnderscores(argc, argv, &arg_storage);
  absl::ParseCommandLine(argc, args.data());
  // Debian builds abseil without NDEBUG, which leaves Mutex deadlock
  // detection on: a global graph updated under a global lock on every
  // Lock(). The tests keep it; the binaries turn it off.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  const bool quiet = absl::GetFlag(FLAGS_quiet);

  torch::manual_seed(absl::GetFlag(FLAGS_seed));
  const std::string dev = absl::GetFlag(FLAGS_device);
  if (dev != "auto" && dev != "cpu" && dev != "cuda") {
    return Fail("--device must be auto, cpu or cuda");
  }
  if (dev == "cuda" && !torch::cuda::is_available()) {
    return Fail("--device cuda: no CUDA device available");
  }
  const torch::Device device((dev == "cuda" || (dev == "auto" &&
                                               torch::cuda::is_available()))
                                 ? torch::kCUDA
                                 : torch::kCPU);

  auto train = lossguard_train::ReadFashionMnist(absl::GetFlag(FLAGS_data), true);
  if (!train.ok()) return Fail(std::string(train.status().message()));
  auto test = lossguard_train::ReadFashionMnist(absl::GetFlag(FLAGS_data), false);
  if (!test.ok()) return Fail(std::string(test.status().message()));

  // A seeded subset of the training set, and the first val_size test images.
  torch::Tensor perm = torch::randperm(train->images.size(0));
  const int64_t subset = absl::GetFlag(FLAGS_train_subset);
  if (subset > 0 && subset < train->images.size(0)) {
    perm = perm.slice(0, 0, subset);
  }
  torch::Tensor x_train = train->images.index_select(0, perm).to(device);
  torch::Tensor y_train = train->labels.index_select(0, perm).to(device);
  const int64_t val_size =
      std::min<int64_t>(absl::GetFlag(FLAGS_val_size), test->images.size(0));
  torch::Tensor x_val = test->images.slice(0, 0, val_size);
  torch::Tensor y_val = test->labels.slice(0, 0, val_size);
  const int64_t n = x_train.size(0);

  // Model.
  std::shared_ptr<torch::nn::Module> module;
  std::function<torch::Tensor(torch::Tensor)> forward;
  const std::string model_name = absl::GetFlag(FLAGS_model);
  if (model_name == "cnn") {
    lossguard_train::PlainCnn m;
    m->to(device);
    module = m.ptr();
    forward = [m](torch::Tensor x) mutable { return m->forward(x); };
  } else if (model_name == "resnet") {
    lossguard_train::SmallResNet m;
    m->to(device);
    module = m.ptr();
    forward = [m](torch::Tensor x) mutable { return m->forward(x); };
  } else {
    return Fail("--model must be cnn or resnet");
  }

  // Optimizer.
  const double lr = absl::GetFlag(FLAGS_lr);
  if (!(lr > 0.0)) return Fail("--lr must be > 0");
  const std::string opt_name = absl::GetFlag(FLAGS_optimizer);
  const double wd = absl::GetFlag(FLAGS_weight_decay);
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  if (opt_name == "sgd") {
    optimizer = std::make_unique<torch::optim::SGD>(
        module->parameters(), torch::optim::SGDOptions(lr)
                                  .momentum(absl::GetFlag(FLAGS_momentum))
                                  .weight_decay(wd));
  } else if (opt_name == "adam") {
    optimizer = std::make_unique<torch::optim::Adam>(
        module->parameters(), torch::optim::AdamOptions(lr).weight_decay(wd));
  } else if (opt_name == "adamw") {
    optimizer = std::make_unique<torch::optim::AdamW>(
        module->parameters(), torch::optim::AdamWOptions(lr).weight_decay(wd));
  } else {
    return Fail("--optimizer must be sgd, adam or adamw");
  }
  const int64_t batch = absl::GetFlag(FLAGS_batch_size);
  if (batch <= 0) return Fail("--batch-size must be > 0");
  const int64_t epochs = absl::GetFlag(FLAGS_epochs);
  const int64_t steps =
      epochs > 0 ? epochs * ((n + batch - 1) / batch) : absl::GetFlag(FLAGS_steps);
  if (steps <= 0) return Fail("--steps must be > 0");
  const int64_t eval_every = std::max<int64_t>(1, absl::GetFlag(FLAGS_eval_every));

  // Minibatch order: a fresh seeded permutation every epoch.
  torch::Tensor order;
  auto batch_at = [&](int64_t step) {
    const int64_t per_epoch = (n + batch - 1) / batch;
    const int64_t k = step % per_epoch;
    if (k == 0) order = torch::randperm(n, torch::TensorOptions().device(device));
    torch::Tensor idx = order.slice(0, k * batch, std::min(n, (k + 1) * batch));
    return std::make_pair(x_train.index_select(0, idx), y_train.index_select(0, idx));
  };

  // --- LR range test -------------------------------------------------------
  if (absl::GetFlag(FLAGS_lr_range_test)) {
    // LR grown exponentially from 1e-7 to 10 over `steps` steps (fastai's and
    // Smith's test), stopped when the smoothed loss passes 4x its best.
    const int64_t range_steps = std::max<int64_t>(steps, 100);
    lossguard::torch::LrRangeTestOptions range;
    range.factor = std::pow(range.end_lr / range.start_lr,
                            1.0 / static_cast<double>(range_steps - 1));
    range.max_steps = range_steps;
    absl::StatusOr<lossguard::torch::LrRangeTest> test =
        lossguard::torch::RunLrRangeTest(
            *optimizer,
            [&](int64_t s) {
              auto [x, y] = batch_at(s);
              return torch::nn::functional::cross_entropy(forward(x), y);
            },
            range);
    if (!test.ok()) return Fail(std::string(test.status().message()));
    const auto& suggestion = test->suggestion;
    nlohmann::ordered_json j;
    j["points"] = test->lrs.size();
    j["stop_reason"] = test->stop_reason;
    if (suggestion.ok()) {
      std::printf("suggested lr %.3g\n%s\n", suggestion->suggested_lr,
                  suggestion->evidence.c_str());
      j["suggested_lr"] = suggestion->suggested_lr;
      j["evidence"] = suggestion->evidence;
    } else {
      std::printf("no suggestion: %s\n", std::string(suggestion.status().message()).c_str());
      j["error"] = std::string(suggestion.status().message());
    }
    j["lr"] = test->lrs;
    j["loss"] = test->losses;
    if (!absl::GetFlag(FLAGS_metrics_out).empty()) {
      std::ofstream(absl::GetFlag(FLAGS_metrics_out)) << j.dump(1) << "\n";
    }
    return suggestion.ok() ? 0 : 1;
  }

  // --- guard and client ----------------------------------------------------
  v1::Mode mode = v1::AUTO;
  const std::string mode_name = absl::GetFlag(FLAGS_mode);
  if (mode_name == "observe") {
    mode = v1::OBSERVE;
  } else if (mode_name == "advise") {
    mode = v1::ADVISE;
  } else if (mode_name != "auto") {
    return Fail("--mode must be observe, advise or auto");
  }
  const std::string server = absl::GetFlag(FLAGS_server);
  const bool embedded = absl::GetFlag(FLAGS_embedded);
  const bool attached = !server.empty() || embedded;

  lossguard::torch::GuardOptions gopts;
  auto kind = lossguard::schedule::ScheduleKindFromName(absl::GetFlag(FLAGS_schedule));
  if (!kind) return Fail("--schedule: unknown schedule");
  gopts.schedule.kind = *kind;
  gopts.schedule.warmup_steps = absl::GetFlag(FLAGS_warmup);
  gopts.schedule.t_max = steps - gopts.schedule.warmup_steps;
  gopts.schedule.t_0 = std::max<int64_t>(1, steps / 4);
  gopts.schedule.step_size = std::max<int64_t>(1, steps / 3);
  gopts.schedule.max_lr = lr;
  gopts.schedule.total_steps = steps;
  gopts.schedule.plateau_patience = 2;  // in validations
  gopts.planned_steps = steps;
  {
    auto check = gopts.schedule;
    check.base_lr = lr;
    absl::Status s = lossguard::schedule::ValidateSchedule(check);
    if (!s.ok()) return Fail(absl::StrCat("--schedule: ", s.message()));
  }
  // Unattached, the guard only runs the schedule (embedded analysis, no
  // actions): the same code path, minus lossguard.
  gopts.mode = attached ? mode : v1::OBSERVE;
  gopts.rollback_module = attached ? module.get() : nullptr;
  gopts.snapshot_every = eval_every;
  gopts.max_steps_in_flight = absl::GetFlag(FLAGS_steps_in_flight);
  gopts.grad_norm = absl::GetFlag(FLAGS_grad_norm);
  gopts.max_overhead = absl::GetFlag(FLAGS_max_overhead);
  gopts.dense_steps = absl::GetFlag(FLAGS_dense_steps);
  if (gopts.dense_steps < 0) return Fail("--dense_steps must be at least 0");
  if (!(gopts.max_overhead >= 0.0)) return Fail("--max_overhead must be at least 0");
  if (gopts.max_steps_in_flight < 1) return Fail("--steps_in_flight must be at least 1");
  struct Received {
    int64_t step;
    Advice advice;
    bool applied;
  };
  std::vector<Received> received;
  int64_t current_step = 0;
  std::FILE* curve = nullptr;
  const std::string curve_path = absl::GetFlag(FLAGS_curve_out);
  if (!curve_path.empty()) {
    if (!absl::GetFlag(FLAGS_guard)) return Fail("--curve_out needs the guard");
    curve = std::fopen(curve_path.c_str(), "w");
    if (curve == nullptr) {
      return Fail(absl::StrCat("--curve_out: cannot write ", curve_path));
    }
    std::fputs("step,lr,loss,val_loss,grad_norm\n", curve);
    gopts.on_report = [curve](const lossguard::analyzers::StepRecord& r) {
      auto opt = [](const std::optional<double>& v) {
        return v.has_value() ? absl::StrFormat("%.9g", *v) : std::string();
      };
      std::fprintf(curve, "%lld,%.9g,%.9g,%s,%s\n",
                   static_cast<long long>(r.step), r.lr, r.loss,
                   opt(r.val_loss).c_str(), opt(r.grad_norm).c_str());
    };
  }
  gopts.on_advice = [&](const Advice& a, bool applied) {
    received.push_back({current_step, a, applied});
    if (!attached) return;
    std::printf("lossguard @ step %lld: %s -> %s%s\n    %s\n",
                static_cast<long long>(current_step),
                v1::DiagnosisKind_Name(a.diagnosis().kind()).c_str(),
                ActionText(a).c_str(), applied ? " (applied)" : "",
                a.diagnosis().evidence().c_str());
    std::fflush(stdout);
  };

  std::unique_ptr<lossguard::Client> client;
  if (!server.empty()) {
    lossguard::ClientOptions co;
    co.server = server;
    co.credentials.token = absl::GetFlag(FLAGS_token);
    co.credentials.tls_ca_file = absl::GetFlag(FLAGS_tls_ca);
    co.credentials.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
    co.credentials.tls_key_file = absl::GetFlag(FLAGS_tls_key);
    lossguard::CredentialsFromEnvironment(&co.credentials);
    co.run_id = absl::GetFlag(FLAGS_run_id);
    if (co.run_id.empty()) {
      co.run_id = absl::StrFormat("%s-%s-lr%g-s%d-%d", model_name, opt_name, lr,
                                  absl::GetFlag(FLAGS_seed),
                                  absl::ToUnixMillis(absl::Now()));
    }
    co.name = co.run_id;
    co.project = absl::GetFlag(FLAGS_project);
    co.mode = mode;
    co.tags = {{"model", model_name}, {"device", device.str()}};
    co.config.set_optimizer(opt_name);
    co.config.set_base_lr(lr);
    co.config.set_batch_size(batch);
    co.config.set_total_steps(steps);
    co.config.set_schedule(ToProto(gopts.schedule.kind));
    co.config.set_warmup_steps(gopts.schedule.warmup_steps);
    co.config.set_weight_decay(wd);
    co.config.set_momentum(absl::GetFlag(FLAGS_momentum));
    client = std::make_unique<lossguard::Client>(co);
    std::printf("attached to lossguardd at %s as run %s (%s)\n", server.c_str(),
                co.run_id.c_str(), mode_name.c_str());
  }
  const bool use_guard = absl::GetFlag(FLAGS_guard);
  if (!use_guard && attached) return Fail("--guard=false needs no --server or --embedded");
  std::unique_ptr<lossguard::torch::Guard> guard;
  if (use_guard) {
    guard = client ? std::make_unique<lossguard::torch::Guard>(client.get(), *optimizer, gopts)
                   : std::make_unique<lossguard::torch::Guard>(*optimizer, gopts);
  }
  // Without the guard: the same schedule, set on the optimizer directly.
  auto plain_schedule = gopts.schedule;
  plain_schedule.base_lr = lr;
  lossguard::schedule::LrSchedule schedule(plain_schedule);
  auto current_lr = [&] {
    return optimizer->param_groups()[0].options().get_lr();
  };

  // --- training --------------------------------------------------------------
  if (!quiet) {
    std::printf("training %s (%s, lr %g, %s schedule) on %lld images, %lld steps, %s\n",
                model_name.c_str(), opt_name.c_str(), lr,
                absl::GetFlag(FLAGS_schedule).c_str(), static_cast<long long>(n),
                static_cast<long long>(steps), device.str().c_str());
  }
  const auto start = std::chrono::steady_clock::now();
  // Time spent evaluating, subtracted for the training time per step (on
  // CUDA the device is synchronised around each evaluation, which happens
  // anyway when its loss is read).
  double eval_seconds = 0.0;
  // Host time spent in the guard's per-step calls (BeforeStep,
  // AfterBackward), waits for the device included.
  double guard_seconds = 0.0;
  auto seconds_since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize();
  };
  Eval last_eval;
  int64_t done = 0;
  const int64_t timing_warmup =
      std::clamp<int64_t>(absl::GetFlag(FLAGS_timing_warmup), 0,
                          std::max<int64_t>(steps - 1, 0));
  auto timed_start = start;
  for (int64_t step = 0; step < steps; ++step) {
    current_step = step;
    if (step == timing_warmup && step > 0) {
      sync();
      timed_start = std::chrono::steady_clock::now();
      eval_seconds = 0.0;
      guard_seconds = 0.0;
    }
    if (guard) {
      const auto guard_start = std::chrono::steady_clock::now();
      guard->BeforeStep(step);
      guard_seconds += seconds_since(guard_start);
    } else {
      for (auto& g : optimizer->param_groups()) g.options().set_lr(schedule.LrAt(step));
    }
    auto [x, y] = batch_at(step);
    optimizer->zero_grad();
    torch::Tensor loss = torch::nn::functional::cross_entropy(forward(x), y);
    loss.backward();
    if (guard) {
      const auto guard_start = std::chrono::steady_clock::now();
      guard->AfterBackward(step, loss);
      guard_seconds += seconds_since(guard_start);
    }
    optimizer->step();
    done = step + 1;
    if ((step + 1) % eval_every == 0 || step + 1 == steps) {
      sync();
      const auto eval_start = std::chrono::steady_clock::now();
      const double train_loss = loss.item<double>();
      last_eval = Evaluate(*module, forward, x_val, y_val, device);
      if (guard) {
        guard->ReportValidation(step, last_eval.loss);
      } else {
        schedule.ObserveMetric(last_eval.loss);
      }
      if (!quiet) {
        std::printf("step %5lld  lr %-9.3g loss %-9.4g val_loss %-9.4g val_acc %.3f\n",
                    static_cast<long long>(step + 1), current_lr(), train_loss,
                    last_eval.loss, last_eval.accuracy);
        std::fflush(stdout);
      }
      eval_seconds += std::chrono::duration<double>(
                          std::chrono::steady_clock::now() - eval_start)
                          .count();
    }
    if (guard && guard->should_stop()) {
      std::printf("stopping early at step %lld (lossguard)\n",
                  static_cast<long long>(step + 1));
      break;
    }
  }
  if (guard) guard->Flush();
  if (curve != nullptr && std::fclose(curve) != 0) {
    return Fail(absl::StrCat("--curve_out: writing ", curve_path, " failed"));
  }
  sync();
  const double train_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - timed_start)
          .count() -
      eval_seconds;
  const int64_t timed_steps = std::max<int64_t>(done - timing_warmup, 1);
  // The final evaluation on the validation set.
  last_eval = Evaluate(*module, forward, x_val, y_val, device);
  double train_loss = 0.0;
  {
    // Mean training loss over (up to) the last 10 batches, in eval mode.
    torch::NoGradGuard no_grad;
    int k = 0;
    for (int64_t s = std::max<int64_t>(0, done - 10); s < done; ++s, ++k) {
      auto [x, y] = batch_at(s);
      train_loss += torch::nn::functional::cross_entropy(forward(x), y).item<double>();
    }
    train_loss /= std::max(k, 1);
  }
  const double wall = std::chrono::duration<double>(
                          std::chrono::steady_clock::now() - start)
                          .count();
  if (client) {
    client->Finish("training ended", absl::Seconds(10));
    const lossguard::ClientStats st = client->stats();
    if (st.connects == 0) {
      std::fprintf(stderr, "lossguard-train: never attached to lossguardd at %s: %s\n",
                   server.c_str(), st.last_error.c_str());
    }
  }

  std::printf("final: val_acc %.4f val_loss %.4g train_loss %.4g after %lld steps, %.1f s%s\n",
              last_eval.accuracy, last_eval.loss, train_loss,
              static_cast<long long>(done), wall,
              attached ? absl::StrFormat(", %d advice received", received.size()).c_str()
                       : " (unattended)");

  if (guard && attached && guard->skipped_steps() > 0) {
    // Steps too short for the guard's budget: say how coarse the curve was.
    std::printf("lossguard measured %lld of %lld steps (--max_overhead %g)\n",
                static_cast<long long>(guard->measured_steps()),
                static_cast<long long>(guard->measured_steps() + guard->skipped_steps()),
                gopts.max_overhead);
  }

  const std::string out = absl::GetFlag(FLAGS_metrics_out);
  if (!out.empty()) {
    nlohmann::ordered_json j;
    j["model"] = model_name;
    j["optimizer"] = opt_name;
    j["lr"] = lr;
    j["schedule"] = absl::GetFlag(FLAGS_schedule);
    j["seed"] = absl::GetFlag(FLAGS_seed);
    j["device"] = device.str();
    j["attached"] = attached;
    j["mode"] = attached ? mode_name : "unattended";
    j["steps"] = done;
    j["wall_time_s"] = wall;
    j["train_time_s"] = train_seconds;  // wall time minus evaluations
    j["ms_per_step"] = 1000.0 * train_seconds / static_cast<double>(timed_steps);
    if (guard) j["guard_us_per_step"] = 1e6 * guard_seconds / static_cast<double>(timed_steps);
    j["timed_steps"] = timed_steps;
    if (guard) {
      // Steps reported to lossguard, and steps left out to keep within
      // --max_overhead.
      j["guard_measured_steps"] = guard->measured_steps();
      j["guard_skipped_steps"] = guard->skipped_steps();
    }
    j["final_lr"] = current_lr();
    j["guard"] = use_guard;
    j["train_loss"] = std::isfinite(train_loss) ? nlohmann::json(train_loss) : nlohmann::json(nullptr);
    j["val_loss"] = std::isfinite(last_eval.loss) ? nlohmann::json(last_eval.loss) : nlohmann::json(nullptr);
    j["val_accuracy"] = last_eval.accuracy;
    nlohmann::ordered_json advice = nlohmann::ordered_json::array();
    for (const Received& r : received) {
      std::string note;
      for (const auto& e : guard->events()) {  // (received is empty without)
        if (e.advice.advice_id() == r.advice.advice_id() && e.step == r.step) note = e.note;
      }
      advice.push_back({{"step", r.step},
                        {"diagnosis", v1::DiagnosisKind_Name(r.advice.diagnosis().kind())},
                        {"evidence", r.advice.diagnosis().evidence()},
                        {"action", ActionText(r.advice)},
                        {"applied", r.applied},
                        {"note", note}});
    }
    j["advice"] = advice;
    std::ofstream f(out);
    f << j.dump(1) << "\n";
    if (!f) return Fail(absl::StrCat("cannot write ", out));
  }
  return 0;
}
