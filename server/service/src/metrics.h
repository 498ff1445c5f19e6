#ifndef LOSSGUARD_SERVICE_SRC_METRICS_H_
#define LOSSGUARD_SERVICE_SRC_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

#include "lossguard/runs/run_registry.h"
#include "lossguard/storage/run_store.h"
#include "lossguard/v1/lossguard.pb.h"

namespace lossguard::service {

// The daemon's Prometheus metrics, counted by the service as it works and
// rendered in the text exposition format (version 0.0.4) for /metrics.
// Counters are lock-free; gauges of the fleet and the store are read at
// render time.
//
// Thread-safety: every method may be called from any thread.
class Metrics {
 public:
  // Latency buckets of batch ingest (seconds): analysis + queueing for the
  // store, from the batch's arrival to its BatchReceived being queued.
  static constexpr std::array<double, 12> kLatencyBuckets = {
      25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3,
      2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3};

  void BatchIngested(int64_t steps, int64_t duplicates, double seconds);
  void BatchRejected() { batches_rejected_.fetch_add(1, std::memory_order_relaxed); }
  void AdviceSent(const v1::Advice& advice);
  void AckReceived(bool applied);

  // Everything, with the fleet's runs by state, the open streams and the
  // store's queue and write lag read now.
  std::string Render(const runs::RunRegistry& registry,
                     const storage::RunStore& store, int64_t attach_streams,
                     int64_t watch_streams) const;

 private:
  static constexpr int kKinds = 7;    // v1::DiagnosisKind values
  static constexpr int kActions = 7;  // none + the Action oneof's 6 kinds

  std::atomic<int64_t> steps_{0};
  std::atomic<int64_t> duplicates_{0};
  std::atomic<int64_t> batches_{0};
  std::atomic<int64_t> batches_rejected_{0};
  std::array<std::atomic<int64_t>, kLatencyBuckets.size() + 1> latency_{};
  std::atomic<int64_t> latency_sum_ns_{0};
  std::array<std::atomic<int64_t>, kKinds> diagnoses_{};
  std::array<std::array<std::atomic<int64_t>, kActions>, kKinds> advice_{};
  std::atomic<int64_t> acks_applied_{0};
  std::atomic<int64_t> acks_rejected_{0};
};

}  // namespace lossguard::service

#endif  // LOSSGUARD_SERVICE_SRC_METRICS_H_
