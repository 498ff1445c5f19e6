// libFuzzer target: the TensorBoard event file reader
// (client/curvefile/tfevents.h).
//
// Each input is read twice: as it is, and with every TFRecord frame's two
// CRCs recomputed (so that mutations reach the Event parsing and the curve
// past the checksums). Besides "no crash, no sanitizer report" it checks:
//   - an error is DataLoss "NAME: record I at byte B: ..." where the bytes
//     before B read without error and hold exactly I frames;
//   - the scalars read, written again as event records (double tensors),
//     read back the same, tag by tag, in order;
//   - LooksLikeTfEvents says yes to a non-empty file that reads;
//   - the curve (ReadTfEventsCurve) has one row per distinct step of the
//     loss tag, strictly increasing, with the last loss logged for it, an lr
//     that is NaN or a finite number >= 0, val_loss and grad_norm only when
//     such a tag was chosen; a chosen loss tag is one of the file's tags; a
//     tag asked for that is not there is InvalidArgument.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "fuzz_common.h"
#include "lossguard/curvefile/tfevents.h"
#include "tensorboard_event.pb.h"

namespace lossguard::fuzz {
namespace {

using curvefile::ScalarPoint;
using Scalars = std::map<std::string, std::vector<ScalarPoint>>;

uint64_t Le64(std::string_view s, size_t at) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i)
    v = (v << 8) | static_cast<unsigned char>(s[at + i]);
  return v;
}

void PutLe32(std::string* s, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) (*s)[at + i] = static_cast<char>(v >> (8 * i));
}

std::string Le64Bytes(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

std::string Frame(const std::string& payload) {
  std::string rec = Le64Bytes(payload.size()) + std::string(4, '\0') + payload +
                    std::string(4, '\0');
  PutLe32(&rec, 8, curvefile::MaskedCrc32c(rec.substr(0, 8)));
  PutLe32(&rec, 12 + payload.size(), curvefile::MaskedCrc32c(payload));
  return rec;
}

// `data` with the CRCs of every whole frame set right; stops at the first
// frame that does not fit.
std::string FixCrcs(std::string_view data) {
  std::string out(data);
  size_t pos = 0;
  while (out.size() - pos >= 12) {
    PutLe32(&out, pos + 8,
            curvefile::MaskedCrc32c(std::string_view(out).substr(pos, 8)));
    const uint64_t len = Le64(out, pos);
    if (len > out.size() - pos - 12 || out.size() - pos - 12 - len < 4) break;
    PutLe32(
        &out, pos + 12 + len,
        curvefile::MaskedCrc32c(std::string_view(out).substr(pos + 12, len)));
    pos += 12 + len + 4;
  }
  return out;
}

// How many frames `data` holds, counted independently of the reader (which
// must have read them all for `data` to have no error).
int64_t CountFrames(std::string_view data) {
  int64_t n = 0;
  size_t pos = 0;
  while (data.size() - pos >= 12) {
    const uint64_t len = Le64(data, pos);
    if (len > data.size() - pos - 12 || data.size() - pos - 12 - len < 4) break;
    pos += 12 + len + 4;
    ++n;
  }
  return n;
}

// "NAME: record I at byte B: what" -> I and B.
bool ParseError(std::string_view m, std::string_view name, int64_t* index,
                int64_t* byte) {
  const std::string prefix = std::string(name) + ": record ";
  if (!StartsWith(m, prefix)) return false;
  m.remove_prefix(prefix.size());
  const size_t at = m.find(" at byte ");
  if (at == std::string_view::npos) return false;
  if (!ParseInt(m.substr(0, at), index)) return false;
  m.remove_prefix(at + 9);
  const size_t colon = m.find(": ");
  if (colon == std::string_view::npos) return false;
  return ParseInt(m.substr(0, colon), byte);
}

// The scalars written again as an event file: one Event per point, the
// value as a one-element double tensor (exact for float, double and half).
std::string Rewrite(const Scalars& scalars) {
  std::string out;
  for (const auto& [tag, points] : scalars) {
    for (const ScalarPoint& p : points) {
      tb::Event e;
      e.set_wall_time(p.wall_time);
      e.set_step(p.step);
      tb::Summary::Value* v = e.mutable_summary()->add_value();
      v->set_tag(tag);
      v->mutable_tensor()->set_dtype(tb::DT_DOUBLE);
      v->mutable_tensor()->add_double_val(p.value);
      out += Frame(e.SerializeAsString());
    }
  }
  return out;
}

void CheckSameScalars(const Scalars& a, const Scalars& b) {
  FUZZ_CHECK(a.size() == b.size(), "rewrite: %d tags, then %d", a.size(),
             b.size());
  for (auto ia = a.begin(), ib = b.begin(); ia != a.end(); ++ia, ++ib) {
    FUZZ_CHECK(ia->first == ib->first, "rewrite: tags differ");
    FUZZ_CHECK(ia->second.size() == ib->second.size(),
               "rewrite: tag has %d points, then %d", ia->second.size(),
               ib->second.size());
    for (size_t i = 0; i < ia->second.size(); ++i) {
      const ScalarPoint& p = ia->second[i];
      const ScalarPoint& q = ib->second[i];
      FUZZ_CHECK(p.step == q.step && SameDouble(p.wall_time, q.wall_time) &&
                     SameDouble(p.value, q.value),
                 "rewrite: point %d differs", i);
    }
  }
}

void CheckCurve(MemFile& file, const Scalars& scalars) {
  const std::string& name = file.path();
  std::vector<std::string> tags;
  for (const auto& [tag, points] : scalars) tags.push_back(tag);

  curvefile::TagMap used;
  auto curve = curvefile::ReadTfEventsCurve(name, {}, &used);
  absl::StatusOr<curvefile::TagMap> chosen =
      curvefile::ChooseTags(tags, {}, name);
  if (!chosen.ok()) {
    FUZZ_CHECK(chosen.status().code() == absl::StatusCode::kInvalidArgument,
               "%s", chosen.status().ToString().c_str());
    FUZZ_CHECK(!curve.ok() && curve.status() == chosen.status(),
               "curve and ChooseTags disagree");
    return;
  }
  FUZZ_CHECK(curve.ok(), "tags chosen, then %s",
             curve.status().ToString().c_str());
  FUZZ_CHECK(used.loss == chosen->loss && used.val_loss == chosen->val_loss &&
                 used.lr == chosen->lr && used.grad_norm == chosen->grad_norm,
             "curve used other tags than ChooseTags chose");
  FUZZ_CHECK(scalars.count(used.loss) == 1, "loss tag not in the file");
  for (const std::string* t : {&used.val_loss, &used.lr, &used.grad_norm}) {
    FUZZ_CHECK(t->empty() || scalars.count(*t) == 1, "tag not in the file");
  }

  std::map<int64_t, double> loss;  // the last value of each step
  for (const ScalarPoint& p : scalars.at(used.loss)) loss[p.step] = p.value;
  FUZZ_CHECK(curve->size() == loss.size(), "%d rows for %d loss steps",
             curve->size(), loss.size());
  auto it = loss.begin();
  for (size_t i = 0; i < curve->size(); ++i, ++it) {
    const analyzers::StepRecord& r = (*curve)[i];
    FUZZ_CHECK(r.step == it->first, "row %d: step %d, not %d", i, r.step,
               it->first);
    FUZZ_CHECK(SameDouble(r.loss, it->second), "row %d: not the last loss", i);
    FUZZ_CHECK(std::isnan(r.lr) || (std::isfinite(r.lr) && r.lr >= 0),
               "row %d: lr %g", i, r.lr);
    FUZZ_CHECK(!r.val_loss || !used.val_loss.empty(), "val_loss, no tag");
    FUZZ_CHECK(!r.grad_norm || !used.grad_norm.empty(), "grad_norm, no tag");
  }

  // The loss tag named explicitly: the same curve. A tag that is not there
  // is an error.
  curvefile::TagMap given;
  given.loss = used.loss;
  auto again = curvefile::ReadTfEventsCurve(name, given, nullptr);
  FUZZ_CHECK(again.ok() && again->size() == curve->size(), "loss tag given: %s",
             again.status().ToString().c_str());
  given.lr = used.loss + "\x01missing";
  if (scalars.count(given.lr) == 0) {
    auto missing = curvefile::ReadTfEventsCurve(name, given, nullptr);
    FUZZ_CHECK(missing.status().code() == absl::StatusCode::kInvalidArgument,
               "a missing tag: %s", missing.status().ToString().c_str());
  }
}

void Check(MemFile& file, const std::string& data) {
  const std::string& name = file.path();
  absl::StatusOr<Scalars> scalars = curvefile::ParseTfEventScalars(data, name);
  if (!scalars.ok()) {
    FUZZ_CHECK(scalars.status().code() == absl::StatusCode::kDataLoss, "%s",
               scalars.status().ToString().c_str());
    int64_t index = -1, byte = -1;
    FUZZ_CHECK(ParseError(Message(scalars.status()), name, &index, &byte),
               "message names no record and byte: %s",
               Message(scalars.status()));
    FUZZ_CHECK(
        byte >= 0 && static_cast<size_t>(byte) < data.size() && index >= 0,
        "record %d at byte %d of %d", index, byte, data.size());
    const std::string before = data.substr(0, static_cast<size_t>(byte));
    FUZZ_CHECK(curvefile::ParseTfEventScalars(before, name).ok(),
               "the records before the bad one do not read");
    FUZZ_CHECK(CountFrames(before) == index, "record %d after %d frames", index,
               CountFrames(before));
    return;
  }
  // The same through the file: ReadTfEventScalars and the curve.
  file.Write(data);
  auto from_file = curvefile::ReadTfEventScalars(name);
  FUZZ_CHECK(from_file.ok(), "file: %s", from_file.status().ToString().c_str());
  CheckSameScalars(*scalars, *from_file);
  FUZZ_CHECK(data.empty() || curvefile::LooksLikeTfEvents(name),
             "an event file that reads does not look like one");

  auto rewritten = curvefile::ParseTfEventScalars(Rewrite(*scalars), name);
  FUZZ_CHECK(rewritten.ok(), "rewrite: %s",
             rewritten.status().ToString().c_str());
  CheckSameScalars(*scalars, *rewritten);

  CheckCurve(file, *scalars);
}

const bool quiet = QuietProtobuf();
MemFile* file = new MemFile();

}  // namespace
}  // namespace lossguard::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  using namespace lossguard::fuzz;
  const std::string data(reinterpret_cast<const char*>(bytes), size);
  Check(*file, data);
  const std::string fixed = FixCrcs(data);
  if (fixed != data) Check(*file, fixed);
  return 0;
}
