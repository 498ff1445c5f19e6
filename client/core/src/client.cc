#include "lossguard/client/client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "lossguard/v1/lossguard.grpc.pb.h"

namespace lossguard {

using Stream = grpc::ClientReaderWriter<v1::AttachRequest, v1::AttachResponse>;

namespace {

int Millis(absl::Duration d) {
  return static_cast<int>(absl::ToInt64Milliseconds(d));
}

grpc::ChannelArguments ChannelArgs(const ClientOptions& o) {
  grpc::ChannelArguments args;
  // The channel's own reconnect backoff follows ours (gRPC's default starts
  // at 1 s), so a daemon that is back is found promptly.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, Millis(o.initial_backoff));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, Millis(o.initial_backoff));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, Millis(o.max_backoff));
  // Keepalive pings find a daemon that vanished without closing the
  // connection (host down, network cut) while the trainer only writes.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  return args;
}

// One reported step as the buffer keeps it until the daemon confirms it:
// plain data, so Report() builds no message and the sender copies a batch
// out quickly, building the messages after it lets go of the lock.
struct BufferedStep {
  int64_t step = 0;
  double lr = 0;
  double loss = 0;
  double val_loss = 0;
  double grad_norm = 0;
  double wall_time = 0;
  bool has_val_loss = false;
  bool has_grad_norm = false;

  void ToProto(v1::Step* s) const {
    s->set_step(step);
    s->set_lr(lr);
    s->set_loss(loss);
    if (has_val_loss) s->set_val_loss(val_loss);
    if (has_grad_norm) s->set_grad_norm(grad_norm);
    s->set_wall_time(wall_time);
  }
};

// `s` as valid UTF-8: each byte that does not belong to a well-formed
// sequence becomes U+FFFD. Proto3 strings must be UTF-8; the daemon cannot
// parse a message holding anything else, and gRPC reports that to it only as
// a failed read, indistinguishable from the end of the stream (a finish or
// an ack would be lost without an error).
std::string ValidUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    uint32_t min = 0;
    if (c < 0x80) {
      n = 1;
    } else if ((c & 0xE0) == 0xC0) {
      n = 2;
      min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      n = 3;
      min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      n = 4;
      min = 0x10000;
    }
    bool ok = n > 0 && i + n <= s.size();
    uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t k = 1; ok && k < n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      ok = (cc & 0xC0) == 0x80;
      cp = (cp << 6) | (cc & 0x3F);
    }
    // Overlong forms, surrogates and code points past U+10FFFF are invalid.
    ok = ok && (n == 1 || cp >= min) && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
    if (ok) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      out.append("\xEF\xBF\xBD");
      ++i;
    }
  }
  return out;
}

constexpr char kRunIdHeader[] = "lossguard-run-id";

// `s` as a gRPC header value (printable ASCII): other bytes and '%' are
// percent-encoded, so every run id maps to one value.
std::string HeaderValue(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f && c != '%') {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppendFormat(&out, "%%%02X", c);
    }
  }
  return out;
}

}  // namespace

class Client::Impl {
 public:
  explicit Impl(ClientOptions options) : options_(std::move(options)) {
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
        CreateChannel(options_.server, options_.credentials, ChannelArgs(options_));
    if (channel.ok()) {
      channel_ = std::move(*channel);
      stub_ = v1::LossGuard::NewStub(channel_);
    } else {
      // Never connects; Report() still buffers, and stats say why.
      absl::MutexLock lock(&mu_);
      stats_.last_error = std::string(channel.status().message());
    }
    sender_ = std::thread([this] { SenderLoop(); });
  }

  ~Impl() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
      if (context_ != nullptr) context_->TryCancel();
    }
    sender_.join();
  }

  bool Report(int64_t step, double lr, double loss,
              std::optional<double> val_loss,
              std::optional<double> grad_norm) {
    absl::MutexLock lock(&mu_);
    const bool lr_ok = std::isnan(lr) || (std::isfinite(lr) && lr >= 0.0);
    if (finish_requested_ || !lr_ok ||
        (last_reported_.has_value() && step <= *last_reported_)) {
      ++stats_.rejected_steps;
      return false;
    }
    last_reported_ = step;
    const absl::Time now = absl::Now();
    if (sent_ == buffer_.size()) oldest_unsent_ = now;
    buffer_.push_back({.step = step,
                       .lr = lr,
                       .loss = loss,
                       .val_loss = val_loss.value_or(0.0),
                       .grad_norm = grad_norm.value_or(0.0),
                       .wall_time = absl::ToDoubleSeconds(now - absl::UnixEpoch()),
                       .has_val_loss = val_loss.has_value(),
                       .has_grad_norm = grad_norm.has_value()});
    ++stats_.reported_steps;
    while (static_cast<int64_t>(buffer_.size()) > options_.max_buffered_steps) {
      buffer_.pop_front();
      if (sent_ > 0) --sent_;
      ++stats_.dropped_steps;
    }
    return true;
  }

  absl::Duration close_timeout() const { return options_.close_timeout; }

  std::optional<v1::Advice> PollAdvice() {
    absl::MutexLock lock(&mu_);
    if (advice_.empty()) return std::nullopt;
    v1::Advice a = std::move(advice_.front());
    advice_.pop_front();
    return a;
  }

  void Ack(uint64_t advice_id, bool applied, const std::string& reason,
           std::optional<int64_t> effective_step) {
    absl::MutexLock lock(&mu_);
    v1::AdviceAck ack;
    ack.set_advice_id(advice_id);
    ack.set_applied(applied);
    ack.set_reason(ValidUtf8(reason));
    if (effective_step.has_value()) ack.set_effective_step(*effective_step);
    acks_.push_back(std::move(ack));
  }

  bool Flush(absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto flushed = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return buffer_.empty() && acks_.empty();
    };
    return mu_.AwaitWithTimeout(absl::Condition(&flushed), timeout);
  }

  bool Finish(const std::string& reason, absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    finish_requested_ = true;
    finish_reason_ = reason;
    auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return finish_done_;
    };
    mu_.AwaitWithTimeout(absl::Condition(&done), timeout);
    return finish_done_ && buffer_.empty();
  }

  ClientStats stats() const {
    absl::MutexLock lock(&mu_);
    ClientStats s = stats_;
    s.buffered_steps = static_cast<int64_t>(buffer_.size());
    s.confirmed_step = confirmed_;
    s.connected = connected_;
    return s;
  }

 private:
  // One connection: attach, then send until it breaks, the run finishes or
  // the client stops. Returns true when the run finished (no reconnect).
  bool Session() {
    auto context = std::make_unique<grpc::ClientContext>();
    // A redirect (the daemon that serves the run, in a fleet) is used for
    // one session; after it, the configured server again.
    std::unique_ptr<v1::LossGuard::Stub> redirect = std::move(redirect_stub_);
    {
      absl::MutexLock lock(&mu_);
      if (stop_) return true;
      if (stub_ == nullptr) return false;  // bad credentials: see the constructor
      context_ = context.get();
      accepted_ = false;
      broken_ = false;
      reader_ended_ = false;
    }
    // The run id as a header, so a load balancer in front of a fleet can
    // keep each run on one daemon (deploy/k8s: Envoy's ring hash on it).
    context->AddMetadata(kRunIdHeader, HeaderValue(options_.run_id));
    v1::LossGuard::Stub* stub = redirect != nullptr ? redirect.get() : stub_.get();
    std::unique_ptr<Stream> stream = stub->Attach(context.get());
    std::thread reader([this, s = stream.get()] { ReaderLoop(s); });

    bool finished = false;
    v1::AttachRequest start;
    v1::RunStart* rs = start.mutable_start();
    rs->set_run_id(ValidUtf8(options_.run_id));
    rs->set_name(ValidUtf8(options_.name));
    rs->set_project(ValidUtf8(options_.project));
    for (const auto& [k, v] : options_.tags) (*rs->mutable_tags())[ValidUtf8(k)] = ValidUtf8(v);
    *rs->mutable_config() = options_.config;
    rs->mutable_config()->set_optimizer(ValidUtf8(options_.config.optimizer()));
    rs->set_mode(options_.mode);
    if (stream->Write(start)) {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return accepted_ || broken_ || stop_;
      };
      mu_.AwaitWithTimeout(absl::Condition(&ready), options_.attach_timeout);
      if (accepted_ && !broken_ && !stop_) {
        connected_ = true;
        ++stats_.connects;
      } else if (!broken_ && !stop_) {
        stats_.last_error = "no answer to attach in time";
      }
    }
    bool up = false;
    {
      absl::MutexLock lock(&mu_);
      up = connected_;
    }
    bool finish_sent = false;
    if (up) finish_sent = SendLoop(stream.get());

    {
      absl::MutexLock lock(&mu_);
      connected_ = false;
      // A stream the daemon ended (the reader saw its end) is not
      // cancelled: Finish then returns the daemon's status and trailers.
      if (!finish_sent && !reader_ended_) context_->TryCancel();
    }
    reader.join();
    const grpc::Status status = stream->Finish();
    // Finished only when the daemon ended the stream cleanly after our
    // finish: it has taken everything before it.
    finished = finish_sent && status.ok();
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE &&
        redirect == nullptr) {
      // Another daemon of the fleet serves the run: go there next (once:
      // a redirect from a redirect waits for the usual backoff).
      const auto& trailers = context->GetServerTrailingMetadata();
      auto owner = trailers.find("lossguard-owner");
      if (owner != trailers.end() && !owner->second.empty()) {
        const std::string address(owner->second.data(), owner->second.size());
        absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
            CreateChannel(address, options_.credentials, ChannelArgs(options_));
        if (channel.ok()) redirect_stub_ = v1::LossGuard::NewStub(*channel);
      }
    }
    absl::MutexLock lock(&mu_);
    context_ = nullptr;
    if (redirect_stub_ != nullptr) ++stats_.redirects;
    if (!status.ok()) {
      stats_.last_error = absl::StrCat(status.error_code(), ": ",
                                       status.error_message());
      if (status.error_code() == grpc::StatusCode::INVALID_ARGUMENT ||
          status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        // The daemon refused what was in flight: resending it would be
        // refused again, forever. Drop it.
        stats_.rejected_steps += static_cast<int64_t>(sent_);
        buffer_.erase(buffer_.begin(), buffer_.begin() + sent_);
      }
    }
    sent_ = 0;
    if (finished) finish_done_ = true;
    return finished;
  }

  // Sends acks and batches until the stream breaks or, once the run is
  // finished and everything is sent, sends `finish`, half-closes and waits
  // for the daemon to end the stream. Returns whether `finish` was sent.
  bool SendLoop(Stream* stream) {
    std::vector<BufferedStep> batch_steps;
    for (;;) {
      v1::AttachRequest req;
      bool finish = false;
      batch_steps.clear();
      {
        absl::MutexLock lock(&mu_);
        // Work that cannot wait: the sender is woken for it.
        auto urgent = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stop_ || broken_ || !acks_.empty() || finish_requested_ ||
                 buffer_.size() - sent_ >=
                     static_cast<size_t>(options_.max_batch_steps);
        };
        auto work = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          if (urgent()) return true;
          return buffer_.size() > sent_ &&
                 absl::Now() - oldest_unsent_ >= options_.max_batch_delay;
        };
        // Sleep until there is urgent work, until the oldest unsent step is
        // due, or until the first step arrives in an empty buffer (then the
        // due time is computed). Not woken by every Report: the training
        // thread's unlock evaluates the condition and wakes no one.
        while (!work()) {
          const size_t unsent = buffer_.size() - sent_;
          absl::Duration wait = absl::Seconds(1);
          if (unsent > 0) {
            wait = std::max(absl::ZeroDuration(),
                            oldest_unsent_ + options_.max_batch_delay -
                                absl::Now());
          }
          auto changed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
            return urgent() || (unsent == 0 && buffer_.size() > sent_);
          };
          mu_.AwaitWithTimeout(absl::Condition(&changed), wait);
        }
        if (stop_ || broken_) return false;
        if (!acks_.empty()) {
          *req.mutable_ack() = std::move(acks_.front());
          acks_.pop_front();
        } else if (buffer_.size() > sent_) {
          const size_t n = std::min(buffer_.size() - sent_,
                                    static_cast<size_t>(options_.max_batch_steps));
          const auto first = buffer_.begin() + static_cast<ptrdiff_t>(sent_);
          batch_steps.assign(first, first + static_cast<ptrdiff_t>(n));
          sent_ += n;
          oldest_unsent_ = absl::Now();
        } else if (finish_requested_) {
          req.mutable_finish()->set_reason(ValidUtf8(finish_reason_));
          finish = true;
        } else {
          continue;  // woken with nothing to send
        }
      }
      if (!batch_steps.empty()) {
        v1::StepBatch* batch = req.mutable_steps();
        batch->mutable_steps()->Reserve(static_cast<int>(batch_steps.size()));
        for (const BufferedStep& b : batch_steps) b.ToProto(batch->add_steps());
      }
      if (!stream->Write(req)) {
        absl::MutexLock lock(&mu_);
        broken_ = true;
        return false;
      }
      if (finish) {
        // Half-close; the daemon ends the stream once it has answered
        // everything, and the reader sees the last confirmation.
        stream->WritesDone();
        absl::MutexLock lock(&mu_);
        auto ended = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return broken_ || stop_;
        };
        mu_.Await(absl::Condition(&ended));
        return true;
      }
    }
  }

  void ReaderLoop(Stream* stream) {
    v1::AttachResponse resp;
    while (stream->Read(&resp)) {
      std::optional<v1::Advice> advice;
      {
        absl::MutexLock lock(&mu_);
        switch (resp.kind_case()) {
          case v1::AttachResponse::kAccepted:
            accepted_ = true;
            if (resp.accepted().has_steps()) {
              ConfirmLocked(resp.accepted().last_step());
            }
            break;
          case v1::AttachResponse::kReceived:
            if (resp.received().has_steps()) {
              ConfirmLocked(resp.received().last_step());
            }
            break;
          case v1::AttachResponse::kAdvice:
            ++stats_.advice_received;
            advice_.push_back(resp.advice());
            advice = resp.advice();
            break;
          case v1::AttachResponse::KIND_NOT_SET:
            break;
        }
      }
      if (advice && options_.on_advice) options_.on_advice(*advice);
    }
    absl::MutexLock lock(&mu_);
    reader_ended_ = true;
    broken_ = true;
  }

  // The daemon holds every step up to `last`: they leave the buffer.
  void ConfirmLocked(int64_t last) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    confirmed_ = last;
    size_t popped = 0;
    while (!buffer_.empty() && buffer_.front().step <= last) {
      buffer_.pop_front();
      ++popped;
    }
    sent_ = sent_ > popped ? sent_ - popped : 0;
  }

  void SenderLoop() {
    absl::Duration backoff = options_.initial_backoff;
    std::mt19937_64 rng(std::random_device{}());
    for (;;) {
      if (Session()) return;
      if (redirect_stub_ != nullptr) continue;  // to the run's daemon, at once
      absl::MutexLock lock(&mu_);
      if (stop_) return;
      if (stats_.connects > 0 && backoff > options_.initial_backoff &&
          last_connects_ != stats_.connects) {
        backoff = options_.initial_backoff;  // it worked for a while
      }
      last_connects_ = stats_.connects;
      // Full jitter: a fleet of trainers does not reconnect in lockstep.
      std::uniform_real_distribution<double> jitter(0.5, 1.0);
      const absl::Duration wait = backoff * jitter(rng);
      auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_;
      };
      mu_.AwaitWithTimeout(absl::Condition(&stopping), wait);
      if (stop_) return;
      backoff = std::min(backoff * 2, options_.max_backoff);
    }
  }

  const ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::LossGuard::Stub> stub_;
  // Where the last session was told to go (sender thread only).
  std::unique_ptr<v1::LossGuard::Stub> redirect_stub_;
  std::thread sender_;

  mutable absl::Mutex mu_;
  std::deque<BufferedStep> buffer_ ABSL_GUARDED_BY(mu_);  // unconfirmed
  size_t sent_ ABSL_GUARDED_BY(mu_) = 0;  // of buffer_, sent on this stream
  absl::Time oldest_unsent_ ABSL_GUARDED_BY(mu_);
  std::optional<int64_t> last_reported_ ABSL_GUARDED_BY(mu_);
  std::optional<int64_t> confirmed_ ABSL_GUARDED_BY(mu_);
  std::deque<v1::AdviceAck> acks_ ABSL_GUARDED_BY(mu_);
  std::deque<v1::Advice> advice_ ABSL_GUARDED_BY(mu_);
  bool finish_requested_ ABSL_GUARDED_BY(mu_) = false;
  std::string finish_reason_ ABSL_GUARDED_BY(mu_);
  bool finish_done_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* context_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool accepted_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool reader_ended_ ABSL_GUARDED_BY(mu_) = false;  // the stream's reads ended
  bool connected_ ABSL_GUARDED_BY(mu_) = false;
  int64_t last_connects_ ABSL_GUARDED_BY(mu_) = 0;
  ClientStats stats_ ABSL_GUARDED_BY(mu_);
};

Client::Client(ClientOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}

Client::~Client() { impl_->Flush(impl_->close_timeout()); }

bool Client::Report(int64_t step, double lr, double loss,
                    std::optional<double> val_loss,
                    std::optional<double> grad_norm) {
  return impl_->Report(step, lr, loss, val_loss, grad_norm);
}

std::optional<v1::Advice> Client::PollAdvice() { return impl_->PollAdvice(); }

void Client::Ack(uint64_t advice_id, bool applied, const std::string& reason,
                 std::optional<int64_t> effective_step) {
  impl_->Ack(advice_id, applied, reason, effective_step);
}

bool Client::Flush(absl::Duration timeout) { return impl_->Flush(timeout); }

bool Client::Finish(const std::string& reason, absl::Duration timeout) {
  return impl_->Finish(reason, timeout);
}

ClientStats Client::stats() const { return impl_->stats(); }

}  // namespace lossguard
