#ifndef LOSSGUARD_CLIENT_CLIENT_H_
#define LOSSGUARD_CLIENT_CLIENT_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "lossguard/client/credentials.h"
#include "lossguard/v1/lossguard.pb.h"

namespace lossguard {

// What a trainer tells the daemon about itself, and how the client behaves.
struct ClientOptions {
  // host:port of lossguardd.
  std::string server = "127.0.0.1:7077";
  // Token and TLS (credentials.h). A certificate or CA that cannot be read
  // leaves the client unconnected, saying why in ClientStats::last_error;
  // training goes on.
  Credentials credentials;
  // The run, chosen by the trainer: re-attaching with the same id resumes
  // it. Required.
  std::string run_id;
  std::string name;
  std::string project;
  std::map<std::string, std::string> tags;
  v1::RunConfig config;
  v1::Mode mode = v1::OBSERVE;

  // --- batching ---
  // Steps sent in one batch at most (the daemon's limit is 10,000).
  int max_batch_steps = 1000;
  // A step waits at most this long before it is sent (latency of advice vs.
  // messages per second).
  absl::Duration max_batch_delay = absl::Milliseconds(20);

  // --- buffering while the daemon is away ---
  // Steps kept until the daemon confirms it holds them. Past this many the
  // oldest are dropped and counted (ClientStats::dropped_steps): training
  // never waits for the daemon, and memory stays bounded (~64 B a step).
  int64_t max_buffered_steps = 1000000;

  // --- reconnecting ---
  absl::Duration initial_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(5);
  // How long a connection attempt waits for the daemon's `accepted`.
  absl::Duration attach_timeout = absl::Seconds(10);
  // How long the destructor waits for the daemon to take what is buffered
  // (0: drop it at once). The end of training waits at most this long.
  absl::Duration close_timeout = absl::Seconds(2);

  // Called on the client's reader thread for every advice, in addition to
  // the queue that PollAdvice reads. Must not block for long.
  std::function<void(const v1::Advice&)> on_advice;
};

struct ClientStats {
  bool connected = false;
  int64_t connects = 0;          // successful attaches (1 + reconnects)
  int64_t reported_steps = 0;    // accepted by Report()
  int64_t rejected_steps = 0;    // refused by Report() (see Report)
  int64_t dropped_steps = 0;     // buffered too long, dropped (oldest first)
  int64_t buffered_steps = 0;    // not yet confirmed by the daemon
  std::optional<int64_t> confirmed_step;  // last step the daemon holds
  int64_t advice_received = 0;
  // Times a daemon of a fleet said another one serves the run (the client
  // then attaches there once, at once, and falls back to `server` after).
  int64_t redirects = 0;
  std::string last_error;        // why the last connection ended
};

// Streams a run's steps to lossguardd and receives its advice.
//
// Report() only appends to an in-memory buffer; a background thread batches
// and sends, reconnects with exponential backoff when the daemon is down or
// restarts, and resends whatever the daemon does not hold yet (it says so
// when the stream is accepted). Training never blocks on the daemon and no
// error of the daemon's reaches the training loop.
//
// Thread-safety: all methods may be called from any thread.
class Client {
 public:
  // Starts the background thread at once; the first connection is made in
  // the background (a daemon that is down is not an error).
  explicit Client(ClientOptions options);
  // Flush(options.close_timeout), then stops.
  ~Client();

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Records one optimizer step. Never blocks on I/O (a short mutex). Steps
  // must increase and lr must be finite and >= 0 (NaN: not logged); a step
  // that breaks this is refused (false, counted in rejected_steps), since
  // the daemon would refuse the batch holding it. Losses may be anything:
  // NaN and inf are data.
  bool Report(int64_t step, double lr, double loss,
              std::optional<double> val_loss = std::nullopt,
              std::optional<double> grad_norm = std::nullopt);

  // The oldest advice not yet taken, if any.
  std::optional<v1::Advice> PollAdvice();

  // Tells the daemon an advice was applied or rejected (queued, sent by the
  // background thread).
  // `effective_step`: the first step whose loss reflects an applied action
  // (its outcome is judged from there).
  void Ack(uint64_t advice_id, bool applied, const std::string& reason = "",
           std::optional<int64_t> effective_step = std::nullopt);

  // Waits until the daemon holds every step reported so far, at most
  // `timeout`. True when it does.
  bool Flush(absl::Duration timeout);

  // Marks the run finished (FINISHED on the daemon), flushes for at most
  // `timeout`, and closes the stream. Later Reports are refused.
  bool Finish(const std::string& reason, absl::Duration timeout);

  ClientStats stats() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lossguard

#endif  // LOSSGUARD_CLIENT_CLIENT_H_
