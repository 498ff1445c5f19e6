#include "trainer/models.h"

// Outside namespace lossguard: TORCH_MODULE names torch::nn unqualified, which
// inside lossguard would find lossguard::torch (the guard).
namespace lossguard_train {

namespace nn = ::torch::nn;
namespace F = ::torch::nn::functional;

PlainCnnImpl::PlainCnnImpl() {
  conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(1, 16, 3).padding(1)));
  conv2 = register_module("conv2", nn::Conv2d(nn::Conv2dOptions(16, 32, 3).padding(1)));
  fc1 = register_module("fc1", nn::Linear(32 * 7 * 7, 128));
  fc2 = register_module("fc2", nn::Linear(128, 10));
}

::torch::Tensor PlainCnnImpl::forward(::torch::Tensor x) {
  x = F::max_pool2d(::torch::relu(conv1->forward(x)), F::MaxPool2dFuncOptions(2));
  x = F::max_pool2d(::torch::relu(conv2->forward(x)), F::MaxPool2dFuncOptions(2));
  x = ::torch::relu(fc1->forward(x.flatten(1)));
  return fc2->forward(x);
}

BasicBlockImpl::BasicBlockImpl(int64_t in, int64_t out, int64_t stride) {
  conv1 = register_module(
      "conv1", nn::Conv2d(nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false)));
  bn1 = register_module("bn1", nn::BatchNorm2d(out));
  conv2 = register_module(
      "conv2", nn::Conv2d(nn::Conv2dOptions(out, out, 3).padding(1).bias(false)));
  bn2 = register_module("bn2", nn::BatchNorm2d(out));
  shortcut = nn::Sequential();
  if (stride != 1 || in != out) {
    shortcut->push_back(nn::Conv2d(nn::Conv2dOptions(in, out, 1).stride(stride).bias(false)));
    shortcut->push_back(nn::BatchNorm2d(out));
  }
  shortcut = register_module("shortcut", shortcut);
}

::torch::Tensor BasicBlockImpl::forward(::torch::Tensor x) {
  ::torch::Tensor y = ::torch::relu(bn1->forward(conv1->forward(x)));
  y = bn2->forward(conv2->forward(y));
  ::torch::Tensor s = shortcut->is_empty() ? x : shortcut->forward(x);
  return ::torch::relu(y + s);
}

SmallResNetImpl::SmallResNetImpl() {
  stem = register_module("stem", nn::Conv2d(nn::Conv2dOptions(1, 16, 3).padding(1).bias(false)));
  bn = register_module("bn", nn::BatchNorm2d(16));
  b1 = register_module("b1", BasicBlock(16, 16, 1));
  b2 = register_module("b2", BasicBlock(16, 32, 2));
  b3 = register_module("b3", BasicBlock(32, 64, 2));
  head = register_module("head", nn::Linear(64, 10));
}

::torch::Tensor SmallResNetImpl::forward(::torch::Tensor x) {
  x = ::torch::relu(bn->forward(stem->forward(x)));
  x = b3->forward(b2->forward(b1->forward(x)));
  x = F::adaptive_avg_pool2d(x, F::AdaptiveAvgPool2dFuncOptions(1)).flatten(1);
  return head->forward(x);
}

}  // namespace lossguard_train
