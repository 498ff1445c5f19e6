#include "server/storage/src/step_chunk.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "lossguard/storage/run_store.h"

namespace lossguard::storage {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

std::vector<StepRow> Decode(const std::string& chunk, int64_t count,
                            absl::Status* status) {
  std::vector<StepRow> out;
  *status = DecodeStepChunk(chunk, count, [&](const StepRow& row) {
    out.push_back(row);
    return true;
  });
  return out;
}

uint64_t Bits(double d) { return std::bit_cast<uint64_t>(d); }

TEST(StepChunkTest, RoundTripsEveryValueBitForBit) {
  const double nan_with_payload = std::bit_cast<double>(0x7ff8dead0000beefULL);
  const double neg_nan = -std::numeric_limits<double>::quiet_NaN();
  const double denormal = std::numeric_limits<double>::denorm_min();
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<StepRow> steps = {
      {.step = kMin, .lr = -0.0, .loss = nan_with_payload,
       .val_loss = std::nullopt, .grad_norm = std::nullopt, .wall_time = 0},
      {.step = -1, .lr = denormal, .loss = inf, .val_loss = neg_nan,
       .grad_norm = -inf, .wall_time = 1e308},
      {.step = 0, .lr = 1e-7, .loss = 2.5, .val_loss = 2.25,
       .grad_norm = std::nullopt, .wall_time = 1.7e9},
      {.step = 1, .lr = 0.1, .loss = 0.0, .val_loss = std::nullopt,
       .grad_norm = 3.0, .wall_time = 1.7e9 + 1},
      {.step = kMax, .lr = 1, .loss = 1, .val_loss = 1, .grad_norm = 1,
       .wall_time = -5},
      // Not increasing: the codec keeps any order; stores pass increasing.
      {.step = 5, .lr = 1, .loss = 1, .val_loss = std::nullopt,
       .grad_norm = std::nullopt, .wall_time = 0},
  };
  const std::string chunk = EncodeStepChunk(steps);
  absl::Status status;
  const std::vector<StepRow> got = Decode(chunk, 6, &status);
  ASSERT_TRUE(status.ok()) << status;
  ASSERT_EQ(got.size(), steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(got[i].step, steps[i].step);
    EXPECT_EQ(Bits(got[i].lr), Bits(steps[i].lr));
    EXPECT_EQ(Bits(got[i].loss), Bits(steps[i].loss));
    ASSERT_EQ(got[i].val_loss.has_value(), steps[i].val_loss.has_value());
    if (steps[i].val_loss) {
      EXPECT_EQ(Bits(*got[i].val_loss), Bits(*steps[i].val_loss));
    }
    ASSERT_EQ(got[i].grad_norm.has_value(), steps[i].grad_norm.has_value());
    if (steps[i].grad_norm) {
      EXPECT_EQ(Bits(*got[i].grad_norm), Bits(*steps[i].grad_norm));
    }
    EXPECT_EQ(Bits(got[i].wall_time), Bits(steps[i].wall_time));
  }
}

TEST(StepChunkTest, ConsecutiveStepsCostOneByteOfStepNumber) {
  std::vector<StepRow> steps;
  for (int64_t s = 1000000; s < 1000100; ++s) {
    steps.push_back({.step = s, .lr = 0.1, .loss = 1.0});
  }
  // 1 version byte; the first step's delta takes 3 bytes (zigzag 2e6),
  // every other 1; a flags byte and 3 doubles each.
  EXPECT_EQ(EncodeStepChunk(steps).size(), 1u + 3 + 99 + 100 * (1 + 24));
}

TEST(StepChunkTest, EmptyChunkHoldsNoSteps) {
  absl::Status status;
  EXPECT_TRUE(Decode(EncodeStepChunk({}), 0, &status).empty());
  EXPECT_TRUE(status.ok()) << status;
}

TEST(StepChunkTest, StopsWhenTheCallbackSaysSo) {
  std::vector<StepRow> steps;
  for (int64_t s = 0; s < 10; ++s) steps.push_back({.step = s});
  std::vector<int64_t> seen;
  const absl::Status status =
      DecodeStepChunk(EncodeStepChunk(steps), 10, [&](const StepRow& row) {
        seen.push_back(row.step);
        return row.step < 2;
      });
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_THAT(seen, ElementsAre(0, 1, 2));
}

TEST(StepChunkTest, DamageIsDataLossAfterTheGoodSteps) {
  std::vector<StepRow> steps;
  for (int64_t s = 0; s < 3; ++s) steps.push_back({.step = s, .loss = 1.0});
  const std::string chunk = EncodeStepChunk(steps);  // 1 + 3 x 26 bytes
  ASSERT_EQ(chunk.size(), 79u);
  absl::Status status;

  // Truncated in the third step.
  std::vector<StepRow> got = Decode(chunk.substr(0, 70), 3, &status);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(), HasSubstr("step 2 (at byte 53)"));
  EXPECT_EQ(got.size(), 2u);

  // The row says more or fewer steps than the chunk holds.
  got = Decode(chunk, 4, &status);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(), HasSubstr("holds 3 steps where its row says 4"));
  got = Decode(chunk, 2, &status);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(), HasSubstr("more than 2"));
  EXPECT_EQ(got.size(), 2u);

  // Unknown version, empty blob, unknown flag bits.
  std::string other = chunk;
  other[0] = 9;
  Decode(other, 3, &status);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(), HasSubstr("unknown format version 9"));
  Decode("", 0, &status);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  other = chunk;
  other[2] = 0x04;  // the first step's flags byte
  got = Decode(other, 3, &status);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(got.empty());

  // A varint that never ends.
  Decode(std::string("\x01") + std::string(12, '\xff'), 1, &status);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace lossguard::storage
