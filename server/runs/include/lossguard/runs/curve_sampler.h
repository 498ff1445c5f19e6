#ifndef LOSSGUARD_RUNS_CURVE_SAMPLER_H_
#define LOSSGUARD_RUNS_CURVE_SAMPLER_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "lossguard/storage/run_store.h"

namespace lossguard::runs {

// Downsamples a curve for plotting in one pass, in memory bounded by the
// output: the step range [lo, hi] is cut into equal buckets of steps and
// each bucket keeps its lowest and highest finite losses, so spikes and dips
// survive at any zoom, its first non-finite loss (where the run blew up),
// and its last point that carries a validation loss. At most `max_points`
// points come out, in step order; a range that holds fewer points keeps
// them all.
//
// Thread-safety: none needed; one sampler per request.
class CurveSampler {
 public:
  // Requires lo <= hi and max_points >= 4.
  CurveSampler(int64_t lo, int64_t hi, int max_points);

  // Points in increasing step order; those outside [lo, hi] are ignored.
  void Add(const storage::StepRow& row);

  int64_t points_seen() const { return seen_; }
  // The kept points, in step order.
  std::vector<storage::StepRow> Finish();

 private:
  struct Bucket {
    std::optional<storage::StepRow> low, high, val, nonfinite;
  };
  void CloseBucket();

  const int64_t lo_, hi_;
  const int max_points_;
  uint64_t width_ = 1;  // steps per bucket (0: one bucket, all of int64)
  int64_t seen_ = 0;
  // While no more than max_points points came in, all are kept as they are.
  std::vector<storage::StepRow> raw_;
  bool bucketing_ = false;
  uint64_t bucket_index_ = 0;
  Bucket bucket_;
  std::vector<storage::StepRow> out_;
};

}  // namespace lossguard::runs

#endif  // LOSSGUARD_RUNS_CURVE_SAMPLER_H_
