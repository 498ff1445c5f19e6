#include "lossguard/torch/lr_range_test.h"

#include <cmath>
#include <limits>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace lossguard::torch {
namespace {

// What the test changes, to be put back: the module's parameters and
// buffers, the optimizer's state and its groups' LRs.
class Snapshot {
 public:
  Snapshot(::torch::optim::Optimizer& optimizer, ::torch::nn::Module* module)
      : optimizer_(optimizer), module_(module) {
    ::torch::NoGradGuard no_grad;
    if (module_ != nullptr) {
      for (const auto& t : module_->parameters()) tensors_.push_back(t.detach().clone());
      for (const auto& t : module_->buffers()) tensors_.push_back(t.detach().clone());
    }
    ::torch::serialize::OutputArchive archive;
    optimizer_.save(archive);
    archive.save_to(state_);
    for (const auto& group : optimizer_.param_groups()) {
      lrs_.push_back(group.options().get_lr());
    }
  }

  void Restore() {
    ::torch::NoGradGuard no_grad;
    if (module_ != nullptr) {
      std::size_t i = 0;
      for (auto& t : module_->parameters()) t.copy_(tensors_[i++]);
      for (auto& t : module_->buffers()) t.copy_(tensors_[i++]);
    }
    optimizer_.state().clear();
    ::torch::serialize::InputArchive archive;
    state_.seekg(0);
    archive.load_from(state_);
    optimizer_.load(archive);
    auto& groups = optimizer_.param_groups();
    for (std::size_t g = 0; g < groups.size() && g < lrs_.size(); ++g) {
      groups[g].options().set_lr(lrs_[g]);
    }
  }

 private:
  ::torch::optim::Optimizer& optimizer_;
  ::torch::nn::Module* module_;
  std::vector<::torch::Tensor> tensors_;
  std::stringstream state_;
  std::vector<double> lrs_;
};

}  // namespace

absl::StatusOr<LrRangeTest> RunLrRangeTest(
    ::torch::optim::Optimizer& optimizer,
    const std::function<::torch::Tensor(int64_t step)>& step_loss,
    const LrRangeTestOptions& options) {
  if (!(options.start_lr > 0.0 && options.start_lr < options.end_lr) ||
      !std::isfinite(options.end_lr) || !(options.factor > 1.0) ||
      !std::isfinite(options.factor) || !(options.stop_factor > 1.0) ||
      options.max_steps <= 0) {
    return absl::InvalidArgumentError(
        "LR range test options out of range (need 0 < start_lr < end_lr, "
        "factor > 1, stop_factor > 1, max_steps > 0)");
  }
  auto& groups = optimizer.param_groups();
  if (groups.empty()) {
    return absl::InvalidArgumentError("the optimizer has no param group");
  }
  const double base = groups[0].options().get_lr();
  std::vector<double> ratios;
  for (const auto& group : groups) {
    ratios.push_back(base > 0.0 ? group.options().get_lr() / base : 1.0);
  }

  Snapshot snapshot(optimizer, options.restore_module);
  LrRangeTest test;
  test.stop_reason = absl::StrFormat("max_steps %d", options.max_steps);
  constexpr double kBeta = 0.98;
  double ema = 0.0;
  double best = std::numeric_limits<double>::infinity();
  try {
    double lr = options.start_lr;
    for (int64_t i = 0; i < options.max_steps; ++i, lr *= options.factor) {
      if (lr > options.end_lr * (1.0 + 1e-9)) {
        test.stop_reason = absl::StrFormat("the LR passed end_lr %g", options.end_lr);
        break;
      }
      for (std::size_t g = 0; g < groups.size(); ++g) {
        groups[g].options().set_lr(lr * ratios[g]);
      }
      optimizer.zero_grad();
      ::torch::Tensor loss = step_loss(i);
      const double value = loss.item<double>();
      test.lrs.push_back(lr);
      test.losses.push_back(value);
      if (!std::isfinite(value)) {
        test.stop_reason = absl::StrFormat("the loss was %g at lr %.3g", value, lr);
        break;
      }
      loss.backward();
      optimizer.step();
      ema = kBeta * ema + (1.0 - kBeta) * value;
      const double smooth =
          ema / (1.0 - std::pow(kBeta, static_cast<double>(i + 1)));
      best = std::min(best, smooth);
      if (smooth > options.stop_factor * best) {
        test.stop_reason = absl::StrFormat(
            "the smoothed loss %.4g passed %g x its best %.4g at lr %.3g", smooth,
            options.stop_factor, best, lr);
        break;
      }
    }
  } catch (...) {
    snapshot.Restore();
    throw;
  }
  snapshot.Restore();
  test.suggestion =
      analyzers::SuggestLearningRate(test.lrs, test.losses, options.analysis);
  return test;
}

}  // namespace lossguard::torch
