#include "lossguard/curvefile/tfevents.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "tensorboard_event.pb.h"

namespace lossguard::curvefile {
namespace {

// The reflected CRC-32C table (polynomial 0x82F63B78).
constexpr std::array<uint32_t, 256> MakeCrcTable() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrcTable = MakeCrcTable();

uint64_t LoadLe64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}
uint32_t LoadLe32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

// IEEE half / bfloat16 bit patterns as doubles.
double HalfToDouble(uint16_t h) {
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (exp == 0) return sign * std::ldexp(mant, -24);
  if (exp == 31) {
    return mant ? std::numeric_limits<double>::quiet_NaN()
                : sign * std::numeric_limits<double>::infinity();
  }
  return sign * std::ldexp(mant + 1024, exp - 25);
}
double Bfloat16ToDouble(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  return static_cast<double>(std::bit_cast<float>(bits));
}

// The one value of a scalar tensor; false when it is not one.
bool TensorScalar(const tb::TensorProto& t, double* out) {
  switch (t.dtype()) {
    case tb::DT_FLOAT:
      if (t.float_val_size() >= 1) {
        *out = t.float_val(0);
        return true;
      }
      if (t.tensor_content().size() >= 4) {
        *out = std::bit_cast<float>(LoadLe32(t.tensor_content().data()));
        return true;
      }
      return false;
    case tb::DT_DOUBLE:
      if (t.double_val_size() >= 1) {
        *out = t.double_val(0);
        return true;
      }
      if (t.tensor_content().size() >= 8) {
        *out = std::bit_cast<double>(LoadLe64(t.tensor_content().data()));
        return true;
      }
      return false;
    case tb::DT_HALF:
    case tb::DT_BFLOAT16: {
      uint16_t bits;
      if (t.half_val_size() >= 1) {
        bits = static_cast<uint16_t>(t.half_val(0));
      } else if (t.tensor_content().size() >= 2) {
        bits = static_cast<uint16_t>(static_cast<unsigned char>(t.tensor_content()[0]) |
                                     (static_cast<unsigned char>(t.tensor_content()[1]) << 8));
      } else {
        return false;
      }
      *out = t.dtype() == tb::DT_HALF ? HalfToDouble(bits) : Bfloat16ToDouble(bits);
      return true;
    }
    default:
      return false;
  }
}

// "Loss/Train" -> "loss train": lower case, separators as spaces.
std::string Words(const std::string& tag) {
  std::string s = absl::AsciiStrToLower(tag);
  for (char& c : s) {
    if (c == '/' || c == '_' || c == '-' || c == '.' || c == ':') c = ' ';
  }
  return absl::StrCat(" ", s, " ");
}

bool HasWord(const std::string& words, const std::string& w) {
  return absl::StrContains(words, absl::StrCat(" ", w, " "));
}

bool IsValidation(const std::string& w) {
  return HasWord(w, "val") || HasWord(w, "valid") || HasWord(w, "validation") ||
         HasWord(w, "eval") || HasWord(w, "test") || absl::StrContains(w, "valid");
}

}  // namespace

uint32_t Crc32c(std::string_view data) {
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : data) c = kCrcTable[(c ^ b) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t MaskedCrc32c(std::string_view data) {
  const uint32_t crc = Crc32c(data);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

absl::StatusOr<std::map<std::string, std::vector<ScalarPoint>>> ParseTfEventScalars(
    std::string_view data, const std::string& name) {
  std::map<std::string, std::vector<ScalarPoint>> out;
  size_t pos = 0;
  tb::Event event;
  for (int64_t index = 0; pos < data.size(); ++index) {
    auto bad = [&](std::string_view what) {
      return absl::DataLossError(absl::StrFormat(
          "%s: record %d at byte %d: %s", name, index, pos, what));
    };
    if (data.size() - pos < 12) {
      return bad(absl::StrFormat("truncated header (%d of 12 bytes)", data.size() - pos));
    }
    const std::string_view header = data.substr(pos, 8);
    const uint64_t length = LoadLe64(data.data() + pos);
    if (LoadLe32(data.data() + pos + 8) != MaskedCrc32c(header)) {
      return bad("length checksum mismatch (not a TFRecord file, or corrupt)");
    }
    if (length > data.size() - pos - 12 || data.size() - pos - 12 - length < 4) {
      return bad(absl::StrFormat("truncated: %d bytes of data and its checksum "
                                 "announced, %d left",
                                 length + 4, data.size() - pos - 12));
    }
    const std::string_view payload = data.substr(pos + 12, length);
    if (LoadLe32(data.data() + pos + 12 + length) != MaskedCrc32c(payload)) {
      return bad("data checksum mismatch");
    }
    if (!event.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
      return bad("not a TensorBoard Event");
    }
    if (event.has_summary()) {
      for (const tb::Summary::Value& v : event.summary().value()) {
        double value;
        if (v.has_simple_value()) {
          value = v.simple_value();
        } else if (!v.has_tensor() || !TensorScalar(v.tensor(), &value)) {
          continue;  // an image, a histogram, text...
        }
        out[v.tag()].push_back({event.step(), event.wall_time(), value});
      }
    }
    pos += 12 + length + 4;
  }
  return out;
}

absl::StatusOr<std::map<std::string, std::vector<ScalarPoint>>> ReadTfEventScalars(
    const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  const std::string data((std::istreambuf_iterator<char>(in)),
                         std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return ParseTfEventScalars(data, path);
}

absl::StatusOr<TagMap> ChooseTags(const std::vector<std::string>& tags,
                                  const TagMap& given, const std::string& name) {
  TagMap m = given;
  for (const std::string* t : {&m.loss, &m.val_loss, &m.lr, &m.grad_norm}) {
    if (!t->empty() && std::find(tags.begin(), tags.end(), *t) == tags.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": no scalar tag \"", *t, "\"; its tags: ", absl::StrJoin(tags, ", ")));
    }
  }
  auto pick = [&](std::string* slot, auto match) {
    if (!slot->empty()) return;
    for (const std::string& t : tags) {
      if (!match(Words(t))) continue;
      if (slot->empty() || t.size() < slot->size()) *slot = t;
    }
  };
  pick(&m.loss, [](const std::string& w) {
    return absl::StrContains(w, "loss") && !IsValidation(w);
  });
  pick(&m.val_loss, [](const std::string& w) {
    return absl::StrContains(w, "loss") && IsValidation(w);
  });
  pick(&m.lr, [](const std::string& w) {
    return HasWord(w, "lr") || absl::StrContains(w, "learning rate");
  });
  pick(&m.grad_norm, [](const std::string& w) {
    return absl::StrContains(w, "grad") && absl::StrContains(w, "norm");
  });
  if (m.loss.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": no training-loss scalar found (name it with --loss-tag); its tags: ",
        tags.empty() ? "(none)" : absl::StrJoin(tags, ", ")));
  }
  return m;
}

absl::StatusOr<std::vector<analyzers::StepRecord>> ReadTfEventsCurve(
    const std::string& path, const TagMap& given, TagMap* used) {
  auto scalars = ReadTfEventScalars(path);
  if (!scalars.ok()) return scalars.status();
  std::vector<std::string> tags;
  for (const auto& [tag, points] : *scalars) tags.push_back(tag);
  absl::StatusOr<TagMap> m = ChooseTags(tags, given, path);
  if (!m.ok()) return m.status();
  if (used != nullptr) *used = *m;

  // step -> value, the last one logged winning (a resumed run rewrites).
  auto by_step = [&](const std::string& tag) {
    std::map<int64_t, double> s;
    if (tag.empty()) return s;
    for (const ScalarPoint& p : scalars->at(tag)) s[p.step] = p.value;
    return s;
  };
  const std::map<int64_t, double> loss = by_step(m->loss);
  const std::map<int64_t, double> val = by_step(m->val_loss);
  const std::map<int64_t, double> lr = by_step(m->lr);
  const std::map<int64_t, double> grad = by_step(m->grad_norm);

  std::vector<analyzers::StepRecord> rows;
  rows.reserve(loss.size());
  auto lr_it = lr.begin();
  double lr_now = std::numeric_limits<double>::quiet_NaN();
  for (const auto& [step, value] : loss) {
    while (lr_it != lr.end() && lr_it->first <= step) lr_now = (lr_it++)->second;
    analyzers::StepRecord r;
    r.step = step;
    r.lr = std::isfinite(lr_now) && lr_now >= 0 ? lr_now
                                                : std::numeric_limits<double>::quiet_NaN();
    r.loss = value;
    rows.push_back(r);
  }
  // Validation loss and gradient norm on the row of their step, or the next.
  auto attach = [&](const std::map<int64_t, double>& s, bool val_column) {
    for (const auto& [step, value] : s) {
      auto it = std::lower_bound(rows.begin(), rows.end(), step,
                                 [](const analyzers::StepRecord& r, int64_t st) {
                                   return r.step < st;
                                 });
      if (it == rows.end()) continue;
      (val_column ? it->val_loss : it->grad_norm) = value;
    }
  };
  attach(val, true);
  attach(grad, false);
  return rows;
}

bool LooksLikeTfEvents(const std::string& path) {
  if (absl::StrContains(path.substr(path.find_last_of('/') + 1), "tfevents")) {
    return true;
  }
  std::ifstream in(path, std::ios::binary);
  char head[12];
  if (!in.read(head, sizeof head)) return false;
  return LoadLe32(head + 8) == MaskedCrc32c(std::string_view(head, 8));
}

}  // namespace lossguard::curvefile
