#ifndef LOSSGUARD_TORCH_LR_RANGE_TEST_H_
#define LOSSGUARD_TORCH_LR_RANGE_TEST_H_

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lossguard/analyzers/lr_range_test.h"

namespace lossguard::torch {

struct LrRangeTestOptions {
  // The LR of param group 0 goes from `start_lr`, x`factor` a step (x1.06:
  // ~40 steps a decade, as LR finders run it), until it would pass
  // `end_lr`; every other group keeps its ratio to group 0 (layer-wise
  // LRs).
  double start_lr = 1e-7;
  double end_lr = 10.0;
  double factor = 1.06;
  // The test stops early at a non-finite loss, or once the debiased EMA
  // (beta 0.98) of the loss passes `stop_factor` x its best (fastai's and
  // Lightning's rule), or after `max_steps` steps.
  double stop_factor = 4.0;
  int64_t max_steps = 1000;
  // With a module, its parameters and buffers are put back afterwards, so
  // training starts from the same weights at the suggested LR. The
  // optimizer's state (momentum, Adam moments) and LRs always are.
  ::torch::nn::Module* restore_module = nullptr;
  // How the curve is read (analyzers::SuggestLearningRate).
  analyzers::LrRangeTestOptions analysis;
};

// A finished range test: the curve and its reading.
struct LrRangeTest {
  std::vector<double> lrs;     // group 0's LR at each step
  std::vector<double> losses;  // that step's minibatch loss
  std::string stop_reason;
  // The suggestion, or why the curve gives none (FailedPrecondition: no
  // usable descent; InvalidArgument: too few points).
  absl::StatusOr<analyzers::LrSuggestion> suggestion;
};

// Runs an LR range test on `optimizer`: at step i it sets the LRs, calls
// `step_loss(i)` for the loss of step i's minibatch (the forward pass only),
// then zero_grad, backward and step. The same rule reads the curve as
// `lossguard lr-find` and lossguardd's SuggestLearningRate do.
//
// Errors: InvalidArgument when the options are out of range (need 0 <
// start_lr < end_lr, factor > 1, stop_factor > 1, max_steps > 0) or the
// optimizer has no param group. What `step_loss` throws propagates, after
// the restore.
absl::StatusOr<LrRangeTest> RunLrRangeTest(
    ::torch::optim::Optimizer& optimizer,
    const std::function<::torch::Tensor(int64_t step)>& step_loss,
    const LrRangeTestOptions& options = LrRangeTestOptions());

}  // namespace lossguard::torch

#endif  // LOSSGUARD_TORCH_LR_RANGE_TEST_H_
