#ifndef LOSSGUARD_CURVEFILE_TFEVENTS_H_
#define LOSSGUARD_CURVEFILE_TFEVENTS_H_

// TensorBoard event files (events.out.tfevents.*) as training curves.
//
// The file is a sequence of TFRecords, each
//   uint64 length | uint32 masked_crc32c(length) | data[length] |
//   uint32 masked_crc32c(data)
// (little-endian; masked_crc = ((crc >> 15) | (crc << 17)) + 0xa282ead8,
// crc = CRC-32C), whose data is a serialized tensorboard Event. Scalars are
// read from Summary values: simple_value (PyTorch's SummaryWriter, TF1) or
// a one-element float/double/half tensor (TF2's tf.summary.scalar).

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lossguard/analyzers/types.h"

namespace lossguard::curvefile {

// CRC-32C (Castagnoli) of `data`, and TFRecord's masked form of it.
uint32_t Crc32c(std::string_view data);
uint32_t MaskedCrc32c(std::string_view data);

// One scalar point of one tag.
struct ScalarPoint {
  int64_t step = 0;
  double wall_time = 0.0;
  double value = 0.0;
};

// Every scalar of an event file, by tag, in file order. A record whose
// framing or checksum is wrong, or whose Event does not parse, is an error
// naming the file, the record's index and its byte offset (DataLoss); the
// file is not read past it.
absl::StatusOr<std::map<std::string, std::vector<ScalarPoint>>> ReadTfEventScalars(
    const std::string& path);
// The same from bytes in memory; messages name it `name`.
absl::StatusOr<std::map<std::string, std::vector<ScalarPoint>>> ParseTfEventScalars(
    std::string_view data, const std::string& name);

// Which tags are the curve's columns. Empty: chosen from the tags present
// (see ChooseTags).
struct TagMap {
  std::string loss;
  std::string val_loss;
  std::string lr;
  std::string grad_norm;
};

// Picks the columns among `tags` (case-insensitive, '/', '_', '-' and '.'
// alike): loss = the loss tag that is not validation ("loss", "train/loss",
// "Loss/train", "train_loss", ... ; the shortest when several); val_loss =
// a loss tag naming val/valid/validation/eval/test; lr = "lr",
// "learning_rate", "lr-SGD", "lr/group0", ...; grad_norm = a tag naming
// grad(ient) and norm. Tags already set in `given` are kept (and must
// exist). InvalidArgument when no loss tag is found, listing the tags.
absl::StatusOr<TagMap> ChooseTags(const std::vector<std::string>& tags,
                                  const TagMap& given, const std::string& name);

// The curve of an event file: one row per step that has a training loss
// (the last value when a step was logged twice, as after a restart),
// in step order; the LR carried forward from its last logged value (NaN
// before the first); validation loss and gradient norm on the row of their
// step, or the next row when their step has no training loss. `*tags` says
// which tags were used.
absl::StatusOr<std::vector<analyzers::StepRecord>> ReadTfEventsCurve(
    const std::string& path, const TagMap& given, TagMap* tags);

// True when `path` is named like an event file or starts with a valid
// TFRecord frame.
bool LooksLikeTfEvents(const std::string& path);

}  // namespace lossguard::curvefile

#endif  // LOSSGUARD_CURVEFILE_TFEVENTS_H_
