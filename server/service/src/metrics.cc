#include "server/service/src/metrics.h"

#include <algorithm>
#include <map>
#include <memory>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lossguard::service {
namespace {

constexpr const char* kActionNames[] = {"none",           "scale_lr",
                                        "set_lr",         "restart_cosine",
                                        "enable_grad_clip", "early_stop",
                                        "ramp_lr"};

// The action's index in kActionNames (0: none).
int ActionIndex(const v1::Advice& a) {
  if (!a.has_action()) return 0;
  switch (a.action().kind_case()) {
    case v1::Action::kScaleLr:
      return 1;
    case v1::Action::kSetLr:
      return 2;
    case v1::Action::kRestartCosine:
      return 3;
    case v1::Action::kEnableGradClip:
      return 4;
    case v1::Action::kEarlyStop:
      return 5;
    case v1::Action::kRampLr:
      return 6;
    case v1::Action::KIND_NOT_SET:
      break;
  }
  return 0;
}

int64_t Load(const std::atomic<int64_t>& a) {
  return a.load(std::memory_order_relaxed);
}

// "# HELP ...\n# TYPE ...\n" of one metric family.
void Family(std::string* out, const char* name, const char* type,
            const char* help) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ",
                  type, "\n");
}

// A family holding one unlabelled sample.
void Sample(std::string* out, const char* name, const char* type, const char* help,
            int64_t value) {
  Family(out, name, type, help);
  absl::StrAppend(out, name, " ", value, "\n");
}

std::string KindLabel(int kind) {
  return absl::AsciiStrToLower(
      v1::DiagnosisKind_Name(static_cast<v1::DiagnosisKind>(kind)));
}

}  // namespace

void Metrics::BatchIngested(int64_t steps, int64_t duplicates, double seconds) {
  steps_.fetch_add(steps, std::memory_order_relaxed);
  duplicates_.fetch_add(duplicates, std::memory_order_relaxed);
  batches_.fetch_add(1, std::memory_order_relaxed);
  const size_t b = static_cast<size_t>(
      std::lower_bound(kLatencyBuckets.begin(), kLatencyBuckets.end(), seconds) -
      kLatencyBuckets.begin());
  latency_[b].fetch_add(1, std::memory_order_relaxed);
  latency_sum_ns_.fetch_add(static_cast<int64_t>(seconds * 1e9),
                            std::memory_order_relaxed);
}

void Metrics::AdviceSent(const v1::Advice& a) {
  const int kind = std::clamp<int>(a.diagnosis().kind(), 0, kKinds - 1);
  const int action = ActionIndex(a);
  diagnoses_[kind].fetch_add(1, std::memory_order_relaxed);
  advice_[kind][action].fetch_add(1, std::memory_order_relaxed);
}

void Metrics::AckReceived(bool applied) {
  (applied ? acks_applied_ : acks_rejected_).fetch_add(1, std::memory_order_relaxed);
}

std::string Metrics::Render(const runs::RunRegistry& registry,
                            const storage::RunStore& store,
                            int64_t attach_streams,
                            int64_t watch_streams) const {
  std::string out;
  std::map<v1::RunState, int64_t> by_state;
  for (int s = v1::HEALTHY; s <= v1::DETACHED; ++s) {
    by_state[static_cast<v1::RunState>(s)] = 0;
  }
  for (const std::shared_ptr<runs::Run>& run : registry.All()) {
    ++by_state[run->state()];
  }
  Family(&out, "lossguard_runs", "gauge", "Runs the daemon holds, by state.");
  for (const auto& [state, n] : by_state) {
    absl::StrAppend(&out, "lossguard_runs{state=\"",
                    absl::AsciiStrToLower(v1::RunState_Name(state)), "\"} ", n,
                    "\n");
  }
  Sample(&out, "lossguard_attach_streams", "gauge",
         "Open Attach streams (attached trainers).",
         attach_streams);
  Sample(&out, "lossguard_watch_streams", "gauge",
         "Open WatchRun streams.",
         watch_streams);
  Sample(&out, "lossguard_steps_ingested_total", "counter",
         "Steps accepted from trainers (duplicates not counted).",
         Load(steps_));
  Sample(&out, "lossguard_steps_duplicate_total", "counter",
         "Steps resent after a reconnect and skipped as already held.",
         Load(duplicates_));
  Sample(&out, "lossguard_batches_rejected_total", "counter",
         "Step batches refused (bad input, over the limits).",
         Load(batches_rejected_));

  Family(&out, "lossguard_ingest_latency_seconds", "histogram",
         "Time to analyse a step batch and queue it for the store.");
  int64_t cumulative = 0;
  for (size_t i = 0; i < kLatencyBuckets.size(); ++i) {
    cumulative += Load(latency_[i]);
    absl::StrAppendFormat(&out, "lossguard_ingest_latency_seconds_bucket{le=\"%g\"} %d\n",
                          kLatencyBuckets[i], cumulative);
  }
  cumulative += Load(latency_[kLatencyBuckets.size()]);
  absl::StrAppendFormat(&out,
                        "lossguard_ingest_latency_seconds_bucket{le=\"+Inf\"} %d\n"
                        "lossguard_ingest_latency_seconds_sum %.9f\n"
                        "lossguard_ingest_latency_seconds_count %d\n",
                        cumulative, static_cast<double>(Load(latency_sum_ns_)) * 1e-9,
                        cumulative);

  Family(&out, "lossguard_diagnoses_total", "counter",
         "Diagnoses decided on live runs, by kind (recovered loss spikes are "
         "events and not counted).");
  for (int k = 1; k < kKinds; ++k) {
    if (k == v1::LOSS_SPIKE) continue;
    absl::StrAppend(&out, "lossguard_diagnoses_total{kind=\"", KindLabel(k), "\"} ",
                    Load(diagnoses_[k]), "\n");
  }
  Family(&out, "lossguard_advice_total", "counter",
         "Advice sent to trainers, by diagnosis kind and action (none: "
         "informational, or withheld by a guard rail).");
  for (int k = 1; k < kKinds; ++k) {
    for (int a = 0; a < kActions; ++a) {
      const int64_t n = Load(advice_[k][a]);
      if (n == 0 && a != 0) continue;
      if (k == v1::LOSS_SPIKE) continue;
      absl::StrAppend(&out, "lossguard_advice_total{kind=\"", KindLabel(k),
                      "\",action=\"", kActionNames[a], "\"} ", n, "\n");
    }
  }
  Family(&out, "lossguard_advice_acks_total", "counter",
         "Acks of advice from trainers: applied or rejected.");
  absl::StrAppend(&out, "lossguard_advice_acks_total{result=\"applied\"} ",
                  Load(acks_applied_), "\n",
                  "lossguard_advice_acks_total{result=\"rejected\"} ",
                  Load(acks_rejected_), "\n");

  const storage::StoreStats st = store.Stats();
  Sample(&out, "lossguard_store_queued_ops", "gauge",
         "Store writes accepted and not yet committed.",
         st.queued_ops);
  Sample(&out, "lossguard_store_queued_steps", "gauge",
         "Steps among the queued store writes.",
         st.queued_steps);
  Sample(&out, "lossguard_store_committed_steps_total", "counter",
         "Steps committed to the store since it opened.",
         st.committed_steps);
  Sample(&out, "lossguard_store_transactions_total", "counter",
         "Store transactions committed since it opened.",
         st.transactions);
  Family(&out, "lossguard_store_write_lag_seconds", "gauge",
         "Age of the oldest store write not yet committed (0: none queued).");
  absl::StrAppendFormat(&out, "lossguard_store_write_lag_seconds %.6f\n",
                        st.oldest_queued_age_s);
  Sample(&out, "lossguard_store_write_errors", "gauge",
         "1 when a store write has failed since it opened, else 0.",
         st.last_error.empty() ? 0 : 1);
  Sample(&out, "lossguard_store_failing", "gauge",
         "1 while a store write is failing and being retried (disk full, "
         "database locked, I/O error): confirmations to trainers wait.",
         st.failing ? 1 : 0);
  return out;
}

}  // namespace lossguard::service
