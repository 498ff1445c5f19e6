#ifndef LOSSGUARD_TRAINER_FASHION_MNIST_H_
#define LOSSGUARD_TRAINER_FASHION_MNIST_H_

#include <torch/torch.h>

#include <string>

#include "absl/status/statusor.h"

// Outside namespace lossguard: TORCH_MODULE names torch::nn unqualified, which
// inside lossguard would find lossguard::torch (the guard).
namespace lossguard_train {

// Where Debian's dataset-fashion-mnist puts the files.
inline constexpr char kFashionMnistDir[] = "/usr/share/datasets/fashion-mnist";

struct Dataset {
  ::torch::Tensor images;  // [N, 1, 28, 28] float32, normalised
  ::torch::Tensor labels;  // [N] int64
};

// Reads `{dir}/{train|t10k}-images-idx3-ubyte.gz` and the labels (IDX format,
// gzip) and normalises the pixels with the training set's mean and std.
// NotFound / DataLoss errors name the file.
absl::StatusOr<Dataset> ReadFashionMnist(const std::string& dir, bool train);

}  // namespace lossguard_train

#endif  // LOSSGUARD_TRAINER_FASHION_MNIST_H_
