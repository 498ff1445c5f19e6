#include "lossguard/runs/curve_sampler.h"

#include <algorithm>
#include <cassert>
#include <cmath>

namespace lossguard::runs {
namespace {


}  // namespace

CurveSampler::CurveSampler(int64_t lo, int64_t hi, int max_points)
    : lo_(lo), hi_(hi), max_points_(max_points) {
  assert(lo <= hi && max_points >= 4);
  const uint64_t buckets = static_cast<uint64_t>(max_points / 4);
  // The span in steps, hi - lo + 1, computed without overflow.
  const uint64_t span_minus_1 =
      static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  // Wraps to 0 only for one bucket over the whole int64 range: then every
  // step falls in bucket 0.
  width_ = span_minus_1 / buckets + 1;
}

void CurveSampler::Add(const storage::StepRow& row) {
  if (row.step < lo_ || row.step > hi_) return;
  ++seen_;
  if (!bucketing_) {
    raw_.push_back(row);
    if (raw_.size() <= static_cast<size_t>(max_points_)) return;
    bucketing_ = true;
    std::vector<storage::StepRow> raw;
    raw.swap(raw_);
    for (const storage::StepRow& r : raw) {
      --seen_;
      Add(r);
    }
    return;
  }
  const uint64_t index =
      width_ == 0
          ? 0
          : (static_cast<uint64_t>(row.step) - static_cast<uint64_t>(lo_)) /
                width_;
  if (index != bucket_index_) {
    CloseBucket();
    bucket_index_ = index;
  }
  if (!std::isfinite(row.loss)) {
    if (!bucket_.nonfinite) bucket_.nonfinite = row;
  } else {
    if (!bucket_.low || row.loss < bucket_.low->loss) bucket_.low = row;
    if (!bucket_.high || row.loss > bucket_.high->loss) bucket_.high = row;
  }
  if (row.val_loss) bucket_.val = row;
}

void CurveSampler::CloseBucket() {
  std::vector<storage::StepRow> kept;
  for (const auto* p :
       {&bucket_.low, &bucket_.high, &bucket_.val, &bucket_.nonfinite}) {
    if (*p) kept.push_back(**p);
  }
  std::sort(kept.begin(), kept.end(),
            [](const storage::StepRow& a, const storage::StepRow& b) {
              return a.step < b.step;
            });
  for (size_t i = 0; i < kept.size(); ++i) {
    if (i > 0 && kept[i].step == kept[i - 1].step) continue;
    out_.push_back(kept[i]);
  }
  bucket_ = Bucket();
}

std::vector<storage::StepRow> CurveSampler::Finish() {
  if (!bucketing_) return std::move(raw_);
  CloseBucket();
  return std::move(out_);
}

}  // namespace lossguard::runs
