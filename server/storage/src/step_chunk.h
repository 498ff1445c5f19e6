// Packs a run's consecutive steps into one blob, so that a store writes one
// row per run and transaction instead of one per step.
//
// Format (version 1), all integers little-endian:
//   byte 0       format version (1)
//   per step     varint    zigzag(step - previous step); the first step's
//                          previous is 0
//                byte      presence flags: bit 0 val_loss, bit 1 grad_norm
//                8 bytes   lr, loss, [val_loss], [grad_norm], wall_time:
//                          IEEE-754 binary64 bits, so NaN (with its payload),
//                          +-inf, -0.0 and denormals read back bit for bit
// Absent optionals take no bytes: a step costs 26 to 42 bytes.

#ifndef LOSSGUARD_STORAGE_SRC_STEP_CHUNK_H_
#define LOSSGUARD_STORAGE_SRC_STEP_CHUNK_H_

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "lossguard/storage/run_store.h"

namespace lossguard::storage {

// The encoding of `steps` (any order; a store passes increasing steps).
std::string EncodeStepChunk(std::span<const StepRow> steps);

// Calls `fn` with each step of `chunk` in order until it returns false
// (then OK). Returns DataLoss, naming the byte offset, for a chunk with an
// unknown version, a truncated step, or a number of steps other than
// `expected_count`; `fn` has then seen the steps before the damage.
absl::Status DecodeStepChunk(std::string_view chunk, int64_t expected_count,
                             const std::function<bool(const StepRow&)>& fn);

}  // namespace lossguard::storage

#endif  // LOSSGUARD_STORAGE_SRC_STEP_CHUNK_H_
