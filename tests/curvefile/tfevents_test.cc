// TensorBoard event files: the TFRecord framing and its CRC-32C against
// the published check values, scalars in the forms writers use, the tags
// chosen as columns, and broken files (truncated, corrupted, not TFRecord).
// TensorBoard itself is not packaged in Debian 12, so the files are written
// here record by record, to the format's specification.

#include "lossguard/curvefile/tfevents.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tensorboard_event.pb.h"

namespace lossguard::curvefile {
namespace {

using ::testing::HasSubstr;

std::string Le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}
std::string Le32(uint32_t v) {
  std::string s(4, '\0');
  for (int i = 0; i < 4; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

// One TFRecord holding `data`.
std::string Record(const std::string& data) {
  const std::string len = Le64(data.size());
  return len + Le32(MaskedCrc32c(len)) + data + Le32(MaskedCrc32c(data));
}

std::string EventRecord(const tb::Event& e) { return Record(e.SerializeAsString()); }

tb::Event Scalar(int64_t step, const std::string& tag, float v) {
  tb::Event e;
  e.set_wall_time(1.7e9 + step);
  e.set_step(step);
  tb::Summary::Value* val = e.mutable_summary()->add_value();
  val->set_tag(tag);
  val->set_simple_value(v);
  return e;
}

tb::Event FileVersion() {
  tb::Event e;
  e.set_wall_time(1.7e9);
  e.set_file_version("brain.Event:2");
  return e;
}

std::string WriteFile(const std::string& name, const std::string& bytes) {
  const std::string dir = ::testing::TempDir() + "/tfevents_test_run";
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// RFC 3720 (iSCSI), appendix B.4: CRC-32C check values.
TEST(Crc32cTest, MatchesPublishedCheckValues) {
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(std::string(32, '\xff')), 0x62A8AB43u);
  std::string inc(32, '\0');
  for (int i = 0; i < 32; ++i) inc[i] = static_cast<char>(i);
  EXPECT_EQ(Crc32c(inc), 0x46DD794Eu);
  // TFRecord's mask: rotate right by 15, add 0xa282ead8.
  const uint32_t crc = Crc32c("123456789");
  EXPECT_EQ(MaskedCrc32c("123456789"), ((crc >> 15) | (crc << 17)) + 0xa282ead8u);
}

TEST(TfEventsTest, ReadsSimpleValuesAndScalarTensors) {
  std::string bytes = EventRecord(FileVersion());
  bytes += EventRecord(Scalar(0, "Loss/train", 2.5f));
  // TF2 tf.summary.scalar: a float tensor; a double one in tensor_content;
  // a half one (1.0 = 0x3c00).
  tb::Event e;
  e.set_step(1);
  auto* v = e.mutable_summary()->add_value();
  v->set_tag("Loss/train");
  v->mutable_tensor()->set_dtype(tb::DT_FLOAT);
  v->mutable_tensor()->add_float_val(2.0f);
  v = e.mutable_summary()->add_value();
  v->set_tag("lr");
  v->mutable_tensor()->set_dtype(tb::DT_DOUBLE);
  const double lr = 0.1;
  std::string content(8, '\0');
  std::memcpy(content.data(), &lr, 8);
  v->mutable_tensor()->set_tensor_content(content);
  v = e.mutable_summary()->add_value();
  v->set_tag("grad_norm");
  v->mutable_tensor()->set_dtype(tb::DT_HALF);
  v->mutable_tensor()->add_half_val(0x3c00);
  v = e.mutable_summary()->add_value();
  v->set_tag("image");  // not a scalar: skipped
  bytes += EventRecord(e);
  auto s = ParseTfEventScalars(bytes, "mem");
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->size(), 3u);
  ASSERT_EQ(s->at("Loss/train").size(), 2u);
  EXPECT_EQ(s->at("Loss/train")[0].value, 2.5);
  EXPECT_EQ(s->at("Loss/train")[1].value, 2.0);
  EXPECT_EQ(s->at("Loss/train")[1].step, 1);
  EXPECT_EQ(s->at("lr")[0].value, 0.1);
  EXPECT_EQ(s->at("grad_norm")[0].value, 1.0);
}

TEST(TfEventsTest, BrokenFilesAreDataLossNamingRecordAndOffset) {
  std::string good = EventRecord(FileVersion()) + EventRecord(Scalar(0, "loss", 2.3f)) +
                     EventRecord(Scalar(1, "loss", 2.2f));
  const size_t third = EventRecord(FileVersion()).size() +
                       EventRecord(Scalar(0, "loss", 2.3f)).size();
  // Truncated in the last record's data.
  auto t = ParseTfEventScalars(good.substr(0, good.size() - 7), "f");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(t.status().message()),
              HasSubstr("f: record 2 at byte " + std::to_string(third) + ": truncated"));
  // Truncated in a header.
  auto h = ParseTfEventScalars(good.substr(0, third + 5), "f");
  ASSERT_FALSE(h.ok());
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("truncated header"));
  // One flipped bit in a payload.
  std::string flipped = good;
  flipped[third + 14] ^= 0x01;
  auto f = ParseTfEventScalars(flipped, "f");
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("record 2 at byte"));
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("data checksum mismatch"));
  // Not a TFRecord file at all (a CSV).
  auto g = ParseTfEventScalars("step,lr,loss\n0,0.1,2.3\n1,0.1,2.2\n", "f.csv");
  ASSERT_FALSE(g.ok());
  EXPECT_THAT(std::string(g.status().message()), HasSubstr("length checksum mismatch"));
  // A valid frame around bytes that are not an Event.
  auto n = ParseTfEventScalars(Record("\xff\xff\xff"), "f");
  ASSERT_FALSE(n.ok());
  EXPECT_THAT(std::string(n.status().message()), HasSubstr("not a TensorBoard Event"));
  // Empty: no records, no scalars.
  auto empty = ParseTfEventScalars("", "f");
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST(TfEventsTest, ChoosesColumnsByTagName) {
  auto m = ChooseTags({"Loss/train", "Loss/val", "lr-SGD", "grad_norm", "accuracy/val"}, {}, "f");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->loss, "Loss/train");
  EXPECT_EQ(m->val_loss, "Loss/val");
  EXPECT_EQ(m->lr, "lr-SGD");
  EXPECT_EQ(m->grad_norm, "grad_norm");
  m = ChooseTags({"train_loss", "valid_loss", "learning_rate", "loss_scale_value"}, {}, "f");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->loss, "train_loss");
  EXPECT_EQ(m->val_loss, "valid_loss");
  EXPECT_EQ(m->lr, "learning_rate");
  EXPECT_EQ(m->grad_norm, "");
  // Given tags win, and must exist.
  TagMap given;
  given.loss = "loss_scale_value";
  m = ChooseTags({"train_loss", "loss_scale_value"}, given, "f");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->loss, "loss_scale_value");
  given.loss = "nope";
  EXPECT_THAT(std::string(ChooseTags({"train_loss"}, given, "f").status().message()),
              HasSubstr("no scalar tag \"nope\"; its tags: train_loss"));
  EXPECT_THAT(std::string(ChooseTags({"accuracy"}, {}, "f").status().message()),
              HasSubstr("no training-loss scalar found"));
}

TEST(TfEventsTest, CurveHasARowPerLossStepWithLrCarriedAndValAttached) {
  std::string bytes = EventRecord(FileVersion());
  bytes += EventRecord(Scalar(0, "lr", 0.1f));
  for (int s = 0; s < 10; ++s) bytes += EventRecord(Scalar(s, "train/loss", 2.0f - 0.1f * s));
  bytes += EventRecord(Scalar(5, "lr", 0.01f));
  bytes += EventRecord(Scalar(4, "val/loss", 1.9f));    // on step 4's row
  bytes += EventRecord(Scalar(100, "val/loss", 1.0f));  // after the last row: dropped
  // A resumed run logs steps 8 and 9 again: the last values win.
  bytes += EventRecord(Scalar(8, "train/loss", 1.5f));
  bytes += EventRecord(Scalar(9, "train/loss", 1.4f));
  const std::string path = WriteFile("events.out.tfevents.1700000000.host", bytes);
  EXPECT_TRUE(LooksLikeTfEvents(path));
  TagMap used;
  auto rows = ReadTfEventsCurve(path, {}, &used);
  ASSERT_TRUE(rows.ok()) << rows.status();
  EXPECT_EQ(used.loss, "train/loss");
  EXPECT_EQ(used.val_loss, "val/loss");
  EXPECT_EQ(used.lr, "lr");
  ASSERT_EQ(rows->size(), 10u);
  for (int s = 0; s < 10; ++s) EXPECT_EQ((*rows)[s].step, s);
  EXPECT_FLOAT_EQ((*rows)[4].lr, 0.1f);
  EXPECT_FLOAT_EQ((*rows)[5].lr, 0.01f);
  EXPECT_FLOAT_EQ((*rows)[9].lr, 0.01f);
  EXPECT_FLOAT_EQ(*(*rows)[4].val_loss, 1.9f);
  EXPECT_FALSE((*rows)[9].val_loss.has_value());
  EXPECT_FLOAT_EQ((*rows)[8].loss, 1.5f);
  EXPECT_FLOAT_EQ((*rows)[9].loss, 1.4f);
}

TEST(TfEventsTest, CsvIsNotMistakenForAnEventFile) {
  const std::string path = WriteFile("curve.csv", "step,lr,loss\n0,0.1,2.3\n");
  EXPECT_FALSE(LooksLikeTfEvents(path));
  const std::string unnamed = WriteFile("curve.bin", Record(FileVersion().SerializeAsString()));
  EXPECT_TRUE(LooksLikeTfEvents(unnamed));  // by its first frame
}

}  // namespace
}  // namespace lossguard::curvefile
