#include "trainer/fashion_mnist.h"

#include <zlib.h>

#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"

// Outside namespace lossguard: TORCH_MODULE names torch::nn unqualified, which
// inside lossguard would find lossguard::torch (the guard).
namespace lossguard_train {
namespace {

absl::StatusOr<std::vector<uint8_t>> ReadGzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::NotFoundError(absl::StrCat(
        path, ": cannot open (install Debian's dataset-fashion-mnist)"));
  }
  std::vector<uint8_t> out;
  uint8_t buf[1 << 16];
  int n = 0;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.insert(out.end(), buf, buf + n);
  int err = 0;
  const char* msg = gzerror(f, &err);
  const bool failed = n < 0 || (err != Z_OK && err != Z_STREAM_END);
  const std::string why = failed ? msg : "";
  gzclose(f);
  if (failed) return absl::DataLossError(absl::StrCat(path, ": ", why));
  return out;
}

uint32_t BigEndian(const std::vector<uint8_t>& b, size_t at) {
  return (uint32_t{b[at]} << 24) | (uint32_t{b[at + 1]} << 16) |
         (uint32_t{b[at + 2]} << 8) | uint32_t{b[at + 3]};
}

}  // namespace

absl::StatusOr<Dataset> ReadFashionMnist(const std::string& dir, bool train) {
  const std::string prefix = absl::StrCat(dir, "/", train ? "train" : "t10k");
  const std::string images_path = prefix + "-images-idx3-ubyte.gz";
  const std::string labels_path = prefix + "-labels-idx1-ubyte.gz";
  auto images = ReadGzip(images_path);
  if (!images.ok()) return images.status();
  auto labels = ReadGzip(labels_path);
  if (!labels.ok()) return labels.status();
  // IDX: magic 0x00000803 (images: n, rows, cols) / 0x00000801 (labels: n).
  if (images->size() < 16 || BigEndian(*images, 0) != 0x803) {
    return absl::DataLossError(absl::StrCat(images_path, ": not IDX images"));
  }
  if (labels->size() < 8 || BigEndian(*labels, 0) != 0x801) {
    return absl::DataLossError(absl::StrCat(labels_path, ": not IDX labels"));
  }
  const int64_t n = BigEndian(*images, 4);
  const int64_t rows = BigEndian(*images, 8), cols = BigEndian(*images, 12);
  if (rows != 28 || cols != 28 ||
      static_cast<int64_t>(images->size()) != 16 + n * rows * cols) {
    return absl::DataLossError(absl::StrCat(images_path, ": bad size"));
  }
  if (BigEndian(*labels, 4) != n ||
      static_cast<int64_t>(labels->size()) != 8 + n) {
    return absl::DataLossError(
        absl::StrCat(labels_path, ": does not match ", images_path));
  }
  Dataset d;
  d.images = ::torch::from_blob(images->data() + 16, {n, 1, rows, cols},
                                ::torch::kUInt8)
                 .to(::torch::kFloat32)
                 .div_(255.0);
  // Fashion-MNIST's training-set mean and std.
  d.images.sub_(0.2860).div_(0.3530);
  d.labels = ::torch::from_blob(labels->data() + 8, {n}, ::torch::kUInt8)
                 .to(::torch::kInt64);
  return d;
}

}  // namespace lossguard_train
