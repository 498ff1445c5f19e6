#ifndef LOSSGUARD_TRAINER_MODELS_H_
#define LOSSGUARD_TRAINER_MODELS_H_

#include <torch/torch.h>

#include <memory>
#include <string>

// Outside namespace lossguard: TORCH_MODULE names torch::nn unqualified, which
// inside lossguard would find lossguard::torch (the guard).
namespace lossguard_train {

// Two conv blocks (conv 3x3, ReLU, max-pool) and two linear layers: a plain
// CNN without normalisation, the kind a too-large LR throws off quickly.
struct PlainCnnImpl : ::torch::nn::Module {
  PlainCnnImpl();
  ::torch::Tensor forward(::torch::Tensor x);
  ::torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  ::torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(PlainCnn);

// A small ResNet: a 3x3 stem and three stages of one BasicBlock each
// (16, 32, 64 channels; BatchNorm; stride 2 between stages), global
// average pooling, a linear head.
struct BasicBlockImpl : ::torch::nn::Module {
  BasicBlockImpl(int64_t in, int64_t out, int64_t stride);
  ::torch::Tensor forward(::torch::Tensor x);
  ::torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  ::torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  ::torch::nn::Sequential shortcut{nullptr};
};
TORCH_MODULE(BasicBlock);

struct SmallResNetImpl : ::torch::nn::Module {
  SmallResNetImpl();
  ::torch::Tensor forward(::torch::Tensor x);
  ::torch::nn::Conv2d stem{nullptr};
  ::torch::nn::BatchNorm2d bn{nullptr};
  BasicBlock b1{nullptr}, b2{nullptr}, b3{nullptr};
  ::torch::nn::Linear head{nullptr};
};
TORCH_MODULE(SmallResNet);

}  // namespace lossguard_train

#endif  // LOSSGUARD_TRAINER_MODELS_H_
