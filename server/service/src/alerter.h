#ifndef LOSSGUARD_SERVICE_SRC_ALERTER_H_
#define LOSSGUARD_SERVICE_SRC_ALERTER_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lossguard/runs/run.h"

namespace lossguard::service {

struct AlerterOptions {
  // http://host[:port]/path or https://...; the JSON is POSTed there.
  std::string url;
  // Attempts per alert (the first included), with exponential backoff from
  // `initial_backoff` (x2 each time, at most `max_backoff`). Connection
  // errors, 429 and 5xx are retried; other 4xx are not (the receiver
  // refuses the request itself).
  int max_attempts = 5;
  absl::Duration initial_backoff = absl::Milliseconds(500);
  absl::Duration max_backoff = absl::Seconds(30);
  absl::Duration timeout = absl::Seconds(5);  // per attempt
  // Alerts waiting at most; past this the oldest is dropped (and counted).
  int max_queued = 1000;
};

// Sends alerts (a run turned UNHEALTHY, an action was applied) as JSON
// POSTs to a webhook, from its own thread: Enqueue never blocks, so a slow
// or dead receiver never slows a run.
//
// The body: {"event": "run_unhealthy" | "action_applied", "time", "text"
// (one line for chat receivers), "run": {run_id, name, project, state,
// step, loss, val_loss, lr}, "diagnosis": {kind, step, onset, severity,
// confidence, evidence}, "advice": {advice_id, at_step, action,
// explanation, ack_reason} (action_applied only)}.
//
// Thread-safety: thread-safe.
class Alerter {
 public:
  // InvalidArgument for a URL that is not http(s)://host[:port][/path].
  static absl::Status ValidateUrl(const std::string& url);

  explicit Alerter(AlerterOptions options);
  ~Alerter();  // Stop()

  Alerter(const Alerter&) = delete;
  Alerter& operator=(const Alerter&) = delete;

  void Enqueue(const runs::Alert& alert);
  // Sends what is queued (one attempt each, within `grace`), then stops.
  void Stop(absl::Duration grace = absl::Seconds(2));

  int64_t sent() const { return sent_.load(); }
  int64_t failed() const { return failed_.load(); }    // gave up on it
  int64_t dropped() const { return dropped_.load(); }  // queue was full
  int64_t retries() const { return retries_.load(); }

  // The JSON body for `alert` (exposed for tests).
  static std::string Body(const runs::Alert& alert);

 private:
  void Loop();
  // One POST; true when delivered, `*retry` when it is worth another try.
  bool Post(const std::string& body, bool* retry);
  bool PostOnce(const std::string& body, bool* retry);

  const AlerterOptions options_;
  std::string scheme_host_port_;
  std::string path_;

  absl::Mutex mu_;
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time drain_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();

  std::atomic<int64_t> sent_{0};
  std::atomic<int64_t> failed_{0};
  std::atomic<int64_t> dropped_{0};
  std::atomic<int64_t> retries_{0};
  std::thread thread_;
};

}  // namespace lossguard::service

#endif  // LOSSGUARD_SERVICE_SRC_ALERTER_H_
