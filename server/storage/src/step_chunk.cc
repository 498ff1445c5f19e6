#include "server/storage/src/step_chunk.h"

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "lossguard/storage/run_store.h"

namespace lossguard::storage {
namespace {

constexpr uint8_t kVersion = 1;
constexpr uint8_t kHasValLoss = 1 << 0;
constexpr uint8_t kHasGradNorm = 1 << 1;

// The most bytes one step takes: a 10-byte varint, flags, 5 doubles.
constexpr size_t kMaxStepBytes = 10 + 1 + 5 * 8;

char* PutVarint(uint64_t v, char* at) {
  while (v >= 0x80) {
    *at++ = static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  *at++ = static_cast<char>(v);
  return at;
}

// Writes the 8 bytes of `d`'s bits, least significant first, at `at`.
char* PutDouble(double d, char* at) {
  uint64_t bits = std::bit_cast<uint64_t>(d);
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(at, &bits, sizeof(bits));
  } else {
    for (int i = 0; i < 8; ++i) {
      at[i] = static_cast<char>(bits & 0xff);
      bits >>= 8;
    }
  }
  return at + 8;
}

// Reads from a chunk, remembering where it is for error messages.
class Reader {
 public:
  explicit Reader(std::string_view data) : data_(data) {}

  size_t offset() const { return pos_; }
  bool done() const { return pos_ == data_.size(); }

  bool Byte(uint8_t* b) {
    if (pos_ >= data_.size()) return false;
    *b = static_cast<uint8_t>(data_[pos_++]);
    return true;
  }

  bool Varint(uint64_t* v) {
    uint64_t result = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b;
      if (!Byte(&b)) return false;
      // The tenth byte may only carry the top bit of a 64-bit value.
      if (shift == 63 && b > 1) return false;
      result |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) {
        *v = result;
        return true;
      }
    }
    return false;
  }

  bool Double(double* d) {
    if (data_.size() - pos_ < 8) return false;
    uint64_t bits = 0;
    if constexpr (std::endian::native == std::endian::little) {
      std::memcpy(&bits, data_.data() + pos_, sizeof(bits));
    } else {
      for (int i = 7; i >= 0; --i) {
        bits = (bits << 8) | static_cast<uint8_t>(data_[pos_ + i]);
      }
    }
    pos_ += 8;
    *d = std::bit_cast<double>(bits);
    return true;
  }

 private:
  std::string_view data_;
  size_t pos_ = 0;
};

}  // namespace

std::string EncodeStepChunk(std::span<const StepRow> steps) {
  // Written through a pointer into a buffer sized for the worst case, then
  // cut to what was used.
  std::string out(1 + steps.size() * kMaxStepBytes, '\0');
  char* p = out.data();
  *p++ = static_cast<char>(kVersion);
  uint64_t previous = 0;
  for (const StepRow& s : steps) {
    // Unsigned arithmetic: any two int64 steps have a delta that wraps
    // back exactly.
    const uint64_t delta = static_cast<uint64_t>(s.step) - previous;
    previous = static_cast<uint64_t>(s.step);
    const int64_t signed_delta = static_cast<int64_t>(delta);
    p = PutVarint((delta << 1) ^ static_cast<uint64_t>(signed_delta >> 63), p);
    uint8_t flags = 0;
    if (s.val_loss.has_value()) flags |= kHasValLoss;
    if (s.grad_norm.has_value()) flags |= kHasGradNorm;
    *p++ = static_cast<char>(flags);
    p = PutDouble(s.lr, p);
    p = PutDouble(s.loss, p);
    if (s.val_loss.has_value()) p = PutDouble(*s.val_loss, p);
    if (s.grad_norm.has_value()) p = PutDouble(*s.grad_norm, p);
    p = PutDouble(s.wall_time, p);
  }
  out.resize(static_cast<size_t>(p - out.data()));
  return out;
}

absl::Status DecodeStepChunk(std::string_view chunk, int64_t expected_count,
                             const std::function<bool(const StepRow&)>& fn) {
  Reader in(chunk);
  uint8_t version = 0;
  if (!in.Byte(&version) || version != kVersion) {
    return absl::DataLossError(absl::StrFormat(
        "step chunk of %d bytes: unknown format version %d (this lossguardd "
        "reads version %d)",
        chunk.size(), chunk.empty() ? -1 : static_cast<int>(version),
        kVersion));
  }
  uint64_t previous = 0;
  int64_t count = 0;
  while (!in.done()) {
    const size_t at = in.offset();
    uint64_t zigzag = 0;
    uint8_t flags = 0;
    StepRow row;
    bool ok = in.Varint(&zigzag) && in.Byte(&flags) &&
              (flags & ~(kHasValLoss | kHasGradNorm)) == 0 &&
              in.Double(&row.lr) && in.Double(&row.loss);
    if (ok && (flags & kHasValLoss) != 0) {
      double v = 0.0;
      ok = in.Double(&v);
      row.val_loss = v;
    }
    if (ok && (flags & kHasGradNorm) != 0) {
      double v = 0.0;
      ok = in.Double(&v);
      row.grad_norm = v;
    }
    ok = ok && in.Double(&row.wall_time);
    if (!ok) {
      return absl::DataLossError(absl::StrFormat(
          "step chunk of %d bytes: step %d (at byte %d) is truncated or has "
          "unknown flags",
          chunk.size(), count, at));
    }
    const uint64_t delta = (zigzag >> 1) ^ (~(zigzag & 1) + 1);
    previous += delta;
    row.step = static_cast<int64_t>(previous);
    ++count;
    if (count > expected_count) break;
    if (!fn(row)) return absl::OkStatus();
  }
  if (count != expected_count) {
    return absl::DataLossError(absl::StrFormat(
        "step chunk of %d bytes holds %s%d steps where its row says %d",
        chunk.size(), count > expected_count ? "more than " : "",
        count > expected_count ? expected_count : count, expected_count));
  }
  return absl::OkStatus();
}

}  // namespace lossguard::storage
