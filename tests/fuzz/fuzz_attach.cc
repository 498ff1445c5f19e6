// libFuzzer target: the daemon's Attach stream (server/service), driven over
// real gRPC (loopback, port 0) against a fresh Daemon on a fresh store for
// every input, so that an input's outcome depends on it alone.
//
// The input is a config byte (bit 0: a SQLite store in /dev/shm or the temp
// directory rather than the memory store; bit 1: a store backlog limit of 16
// steps, so that streams park their reads), then a little program, read from
// the front a byte at a time (an exhausted input reads as zeros): each op's
// first byte % 12 picks
//   0 start     a RunStart: run id one of four, or raw bytes; mode (also an
//               invalid one), project, tags, config
//   1 steps     a batch of 0..255 steps (over max_batch_steps = 64 is
//               RESOURCE_EXHAUSTED): step deltas that rise, repeat, fall or
//               jump to int64 extremes; losses/lrs from a table of edge
//               values (NaN, inf, -0, denormal, 1e308, negative, raw bits)
//   2 curve     a batch of 0..64 steps continuing the run on a shaped curve
//               (healthy, diverging, oscillating, flat, overfitting) so that
//               diagnoses and advice come
//   3 ack       an advice id with an action seen on the run (or raw),
//               applied or not, with or without effective_step
//   4 finish
//   5 raw       an AttachRequest parsed from the next 0..255 bytes
//   6 empty     an AttachRequest with no kind
//   7 close     half-close and wait for the stream's status
//   8 cancel    cancel the stream
//   9 query     GetRunHealth, ListRuns (paged) and GetCurve, checked
//               against the model
//  10 restart   shut the daemon down (an open stream must end UNAVAILABLE)
//               and start another on the same store: runs recovered
//  11 takeover  a second stream attaches the run of the open one; the old
//               stream then sends steps or an ack (ABORTED), half-closes or
//               is cancelled, and the run stays attached to the new one
// Ops on no stream open one. A model of the daemon predicts every reply:
// which message ends the stream and with which code (INVALID_ARGUMENT,
// RESOURCE_EXHAUSTED), AttachAccepted (run id, resumed, the last step held),
// BatchReceived (accepted, duplicates, last step) after the batch's advice,
// advice ids rising within a run, diagnoses with a kind and severity and
// confidence in [0, 1], no action in OBSERVE mode, LR actions with finite
// values. After the input the stream is closed and every run's health, the
// fleet (every page), each curve and the standard health service are
// checked; then the daemon shuts down cleanly.

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "fuzz_common.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "lossguard/runs/run_registry.h"
#include "lossguard/service/service.h"
#include "lossguard/storage/run_store.h"
#include "lossguard/v1/lossguard.grpc.pb.h"

namespace lossguard::fuzz {
namespace {

namespace v1 = ::lossguard::v1;
using grpc::StatusCode;

constexpr int kMaxBatch = 64;
constexpr int kMaxOps = 256;
// Every call's deadline: a reply that never comes fails the input.
constexpr auto kDeadline = std::chrono::seconds(20);

// Reads the input from the front; past its end, zeros.
class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : p_(data), end_(data + size) {}
  bool empty() const { return p_ == end_; }
  uint8_t U8() { return p_ == end_ ? 0 : *p_++; }
  uint64_t U64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(U8()) << (8 * i);
    return v;
  }
  int64_t I64() { return static_cast<int64_t>(U64()); }
  double F64() {
    const uint64_t bits = U64();
    double d;
    std::memcpy(&d, &bits, sizeof d);
    return d;
  }
  std::string Str(size_t n) {
    std::string s;
    while (n-- > 0 && p_ != end_) s.push_back(static_cast<char>(*p_++));
    return s;
  }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
};

class FakeClock final : public runs::Clock {
 public:
  double Now() const override { return now_.fetch_add(1.0); }

 private:
  mutable std::atomic<double> now_{1.8e9};
};

double Edge(uint8_t i, Bytes& in) {
  static constexpr double kTable[] = {2.3,
                                      2.0,
                                      1.5,
                                      1.0,
                                      0.5,
                                      0.1,
                                      3.0,
                                      10.0,
                                      1e3,
                                      1e308,
                                      0.0,
                                      -1.0,
                                      -0.0,
                                      std::numeric_limits<double>::quiet_NaN(),
                                      std::numeric_limits<double>::infinity()};
  i %= 16;
  return i < 15 ? kTable[i] : in.F64();
}

bool LrOk(double lr) {
  return std::isnan(lr) || (std::isfinite(lr) && lr >= 0);
}

// What the daemon should hold of one run.
struct RunModel {
  bool has_steps = false;
  int64_t last_step = 0;
  int64_t stored = 0;
  bool finished = false;
  // False while a cancelled stream may still be ending on the server (its
  // detach, or a finish it had not processed yet, may come later).
  bool state_known = true;
  v1::Mode mode = v1::OBSERVE;
  uint64_t last_advice_id = 0;
  std::vector<uint64_t> actions;  // advice ids with an action
};

struct Stream {
  grpc::ClientContext ctx;
  std::unique_ptr<
      grpc::ClientReaderWriter<v1::AttachRequest, v1::AttachResponse>>
      rw;
  std::string run_id;  // set once start was accepted
  bool started = false;
  bool finish_unanswered = false;  // a finish sent after the last reply
};

class Harness {
 public:
  // `config`: bit 0, a SQLite store (a file in /dev/shm or the temp
  // directory; commits on its writer thread) instead of the memory store
  // (commits at once);
  // bit 1, a store backlog limit of 16 steps, so that Attach streams park
  // their reads until the writer catches up.
  explicit Harness(uint8_t config) : sqlite_(config & 1) {
    options_.listen = "127.0.0.1:0";
    options_.max_batch_steps = kMaxBatch;
    options_.shutdown_grace_s = 2.0;
    options_.worker_threads = 1;
    if (config & 2) options_.max_store_backlog_steps = 16;
    if (sqlite_) {
      // tmpfs when there is one: SQLite's syncs cost nothing there.
      std::error_code ec;
      const std::filesystem::path dir =
          std::filesystem::is_directory("/dev/shm", ec)
              ? std::filesystem::path("/dev/shm")
              : std::filesystem::temp_directory_path();
      db_ = (dir / absl::StrCat("lossguard-fuzz-", ::getpid(), ".db")).string();
      RemoveDb();
    }
    OpenStore();
    StartDaemon();
  }

  ~Harness() {
    stream_.reset();
    StopDaemon();
    store_.reset();
    if (sqlite_) RemoveDb();
  }

  void Run(Bytes& in) {
    for (int ops = 0; ops < kMaxOps && !in.empty(); ++ops) {
      switch (in.U8() % 12) {
        case 0:
          Send(MakeStart(in));
          break;
        case 1:
          Send(MakeSteps(in));
          break;
        case 2:
          Send(MakeCurve(in));
          break;
        case 3:
          Send(MakeAck(in));
          break;
        case 4: {
          v1::AttachRequest req;
          req.mutable_finish()->set_reason(in.Str(in.U8() % 16));
          Send(req);
          break;
        }
        case 5: {
          const std::string raw = in.Str(in.U8());
          v1::AttachRequest req;
          if (!req.ParseFromString(raw)) req.Clear();
          Send(req);
          break;
        }
        case 6:
          Send(v1::AttachRequest());
          break;
        case 7:
          Close();
          break;
        case 8:
          Cancel();
          break;
        case 9:
          Query(in);
          break;
        case 10:
          Restart();
          break;
        case 11:
          Takeover(in);
          break;
      }
    }
    Close();
    for (const auto& [id, run] : runs_) CheckRun(id, run, /*attached=*/false);
    CheckFleet(0);
    CheckFleet(3);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    grpc::health::v1::HealthCheckRequest hreq;
    hreq.set_service("lossguard.v1.LossGuard");
    grpc::health::v1::HealthCheckResponse hresp;
    const grpc::Status hs =
        grpc::health::v1::Health::NewStub(channel_)->Check(&ctx, hreq, &hresp);
    FUZZ_CHECK(hs.ok() && hresp.status() ==
                              grpc::health::v1::HealthCheckResponse::SERVING,
               "health check: %s", hs.error_message());
  }

 private:
  // -------------------------------------------------------------- daemon

  void RemoveDb() {
    for (const char* suffix : {"", "-wal", "-shm"}) {
      std::filesystem::remove(db_ + suffix);
    }
  }

  void OpenStore() {
    if (!sqlite_) {
      if (store_ == nullptr) store_ = storage::NewMemoryStore();
      return;
    }
    absl::StatusOr<std::unique_ptr<storage::RunStore>> store =
        storage::OpenSqliteStore(db_);
    FUZZ_CHECK(store.ok(), "open %s: %s", db_, store.status().ToString());
    store_ = std::move(*store);
  }

  void StartDaemon() {
    daemon_ =
        std::make_unique<service::Daemon>(options_, store_.get(), &clock_);
    const absl::Status s = daemon_->Start();
    FUZZ_CHECK(s.ok(), "daemon start: %s", s.ToString());
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", daemon_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::LossGuard::NewStub(channel_);
  }

  void StopDaemon() {
    stub_.reset();
    channel_.reset();
    const absl::Status s = daemon_->Shutdown();
    FUZZ_CHECK(s.ok(), "shutdown: %s", s.ToString());
    daemon_.reset();
  }

  // Shuts the daemon down with the stream (if any) open, which must end
  // UNAVAILABLE, and starts a new one on the same store (the SQLite one
  // reopened): every run recovered as it was, none attached.
  void Restart() {
    std::unique_ptr<Stream> open = std::move(stream_);
    StopDaemon();
    if (open != nullptr) {
      v1::AttachResponse extra;
      FUZZ_CHECK(!open->rw->Read(&extra), "a reply at shutdown: %s",
                 extra.ShortDebugString());
      const grpc::Status st = open->rw->Finish();
      FUZZ_CHECK(st.error_code() == StatusCode::UNAVAILABLE,
                 "shutdown ended the stream with %d (%s), not UNAVAILABLE",
                 static_cast<int>(st.error_code()), st.error_message());
      // A finish not answered yet may not have been processed.
      if (open->started && open->finish_unanswered) {
        runs_[open->run_id].state_known = false;
      }
    }
    if (sqlite_) {
      store_.reset();
      OpenStore();
    }
    StartDaemon();
  }

  // ------------------------------------------------------------- requests

  v1::AttachRequest MakeStart(Bytes& in) {
    v1::AttachRequest req;
    v1::RunStart* s = req.mutable_start();
    const uint8_t sel = in.U8();
    s->set_run_id(sel < 0xE0 ? absl::StrCat("run-", sel % 4)
                             : in.Str(in.U8() % 64));
    const uint8_t mode = in.U8() % 5;
    s->set_mode(mode < 4 ? static_cast<v1::Mode>(mode)
                         : static_cast<v1::Mode>(99));
    const uint8_t project = in.U8() % 3;
    if (project == 1) s->set_project("p");
    if (project == 2) s->set_project(in.Str(in.U8() % 16));
    s->set_name(in.Str(in.U8() % 8));
    for (int n = in.U8() % 3; n > 0; --n) {
      std::string k = in.Str(in.U8() % 8);
      (*s->mutable_tags())[k] = in.Str(in.U8() % 8);
    }
    if (in.U8() & 1) {
      v1::RunConfig* c = s->mutable_config();
      c->set_optimizer("sgd");
      c->set_base_lr(Edge(in.U8(), in));
      c->set_total_steps(in.I64());
      c->set_schedule(static_cast<v1::Schedule>(in.U8() % 8));
    }
    return req;
  }

  v1::AttachRequest MakeSteps(Bytes& in) {
    v1::AttachRequest req;
    v1::StepBatch* batch = req.mutable_steps();
    const RunModel* run = CurrentRun();
    uint64_t prev = run != nullptr && run->has_steps
                        ? static_cast<uint64_t>(run->last_step)
                        : 0;
    for (int n = in.U8(); n > 0; --n) {
      const uint8_t d = in.U8();
      uint64_t step;
      if (d < 0x80) {
        step = prev + d + 1;
      } else if (d < 0xFC) {
        step = prev - (d - 0x80);
      } else if (d == 0xFC) {
        step = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
      } else if (d == 0xFD) {
        step = static_cast<uint64_t>(std::numeric_limits<int64_t>::min());
      } else if (d == 0xFE) {
        step = 0;
      } else {
        step = in.U64();
      }
      prev = step;
      const uint8_t v = in.U8();
      v1::Step* s = batch->add_steps();
      s->set_step(static_cast<int64_t>(step));
      s->set_loss(Edge(v, in));
      switch (v >> 6) {
        case 0:
          s->set_lr(0.1);
          break;
        case 1:
          s->set_lr(0.01);
          break;
        case 2:
          s->set_lr(Edge(in.U8(), in));
          break;
        case 3:
          s->set_lr(std::numeric_limits<double>::quiet_NaN());
          break;
      }
      if (v & 0x10) s->set_val_loss(s->loss() * 1.1);
      if (v & 0x20) s->set_grad_norm(1.0);
    }
    return req;
  }

  // A stretch of a plausible curve, continuing the run's steps.
  v1::AttachRequest MakeCurve(Bytes& in) {
    v1::AttachRequest req;
    req.mutable_steps();
    const int n = in.U8() % (kMaxBatch + 1);
    const int kind = in.U8() % 5;
    const double lr = (in.U8() & 1) ? 0.1 : 1.0;
    uint32_t seed = in.U8() * 2654435761u + 1;
    const RunModel* run = CurrentRun();
    int64_t t = 0;
    if (run != nullptr && run->has_steps) {
      // Far steps are the steps op's business: an empty batch here.
      if (run->last_step > (int64_t{1} << 40)) return req;
      t = std::max<int64_t>(run->last_step + 1, 0);
    }
    for (int i = 0; i < n; ++i, ++t) {
      seed = seed * 1664525u + 1013904223u;
      const double noise = (static_cast<double>(seed >> 8) / (1 << 24)) - 0.5;
      const double x = static_cast<double>(t);
      double loss = 0.0, grad = 1.0 + 0.1 * noise;
      std::optional<double> val;
      switch (kind) {
        case 0:
          loss = 2.3 * std::exp(-x / 200) + 0.05 * noise;
          break;
        case 1:
          loss = 0.5 * std::exp(x / 60) + 0.05 * noise;
          grad *= std::exp(x / 60);
          if (loss > 1e6) loss = std::numeric_limits<double>::quiet_NaN();
          break;
        case 2:
          loss = 1.5 + ((t % 2) ? 0.9 : -0.9) + 0.1 * noise;
          break;
        case 3:
          loss = 2.3 + 0.01 * noise;
          break;
        case 4:
          loss = 2.0 * std::exp(-x / 100) + 0.01 * noise;
          if (t % 10 == 0) {
            val =
                1.0 + 0.5 * std::exp(-x / 80) + (x > 200 ? (x - 200) / 200 : 0);
          }
          break;
      }
      v1::Step* s = req.mutable_steps()->add_steps();
      s->set_step(t);
      s->set_lr(lr);
      s->set_loss(loss);
      s->set_grad_norm(grad);
      if (val) s->set_val_loss(*val);
    }
    return req;
  }

  v1::AttachRequest MakeAck(Bytes& in) {
    v1::AttachRequest req;
    v1::AdviceAck* ack = req.mutable_ack();
    // An advice id with an action seen on this run (the sel-th, or sel
    // itself before any), or 8 raw bytes: the bytes read do not depend on
    // what the daemon said.
    const uint8_t sel = in.U8();
    const RunModel* run = CurrentRun();
    if (sel >= 0xF0) {
      ack->set_advice_id(in.U64());
    } else if (run != nullptr && !run->actions.empty()) {
      ack->set_advice_id(run->actions[sel % run->actions.size()]);
    } else {
      ack->set_advice_id(sel);
    }
    const uint8_t flags = in.U8();
    ack->set_applied(flags & 1);
    ack->set_reason(in.Str(flags >> 4));
    if (flags & 2) {
      const uint64_t last =
          run != nullptr ? static_cast<uint64_t>(run->last_step) : 0;
      ack->set_effective_step(
          (flags & 4) ? in.I64() : static_cast<int64_t>(last + in.U8() % 8));
    }
    return req;
  }

  // --------------------------------------------------------------- stream

  RunModel* CurrentRun() {
    if (stream_ == nullptr || !stream_->started) return nullptr;
    return &runs_[stream_->run_id];
  }

  void EnsureStream() {
    if (stream_ != nullptr) return;
    stream_ = std::make_unique<Stream>();
    stream_->ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    stream_->rw = stub_->Attach(&stream_->ctx);
  }

  // The stream ended on the server: its status must be `code`.
  void ExpectEnd(StatusCode code, const std::string& why) {
    v1::AttachResponse extra;
    FUZZ_CHECK(!stream_->rw->Read(&extra), "a reply after %s: %s", why,
               extra.ShortDebugString());
    const grpc::Status st = stream_->rw->Finish();
    FUZZ_CHECK(st.error_code() == code, "%s: expected code %d, got %d (%s)",
               why, static_cast<int>(code), static_cast<int>(st.error_code()),
               st.error_message());
    if (stream_->started) {
      // Detached before the client hears the status.
      runs_[stream_->run_id].state_known = true;
    }
    stream_.reset();
  }

  void Send(const v1::AttachRequest& req) {
    EnsureStream();
    Stream& s = *stream_;
    // What the daemon must answer.
    std::optional<StatusCode> error;
    std::string why;
    auto fails = [&](StatusCode code, std::string reason) {
      error = code;
      why = std::move(reason);
    };
    // A message the server cannot decode (proto3 strings must be UTF-8)
    // reads, in gRPC's callback API, like the client's half-close: before
    // start the stream ends INVALID_ARGUMENT; after it, OK, and nothing of
    // the message, or after it, is taken (see tests/fuzz/README.md).
    v1::AttachRequest decoded;
    const bool decodable = decoded.ParseFromString(req.SerializeAsString());
    switch (decodable ? req.kind_case() : v1::AttachRequest::KIND_NOT_SET) {
      case v1::AttachRequest::kStart: {
        const absl::Status valid =
            runs::ValidateRunStart(req.start(), options_.limits);
        if (s.started) {
          fails(StatusCode::INVALID_ARGUMENT, "a second start");
        } else if (!valid.ok()) {
          fails(StatusCode::INVALID_ARGUMENT,
                absl::StrCat("a bad start (", valid.message(), ")"));
        }
        break;
      }
      case v1::AttachRequest::kSteps:
        if (!s.started) {
          fails(StatusCode::INVALID_ARGUMENT, "steps before start");
        } else if (req.steps().steps_size() > kMaxBatch) {
          fails(StatusCode::RESOURCE_EXHAUSTED, "an oversized batch");
        } else {
          const RunModel& run = runs_[s.run_id];
          const auto& steps = req.steps().steps();
          for (int i = 0; i < steps.size() && !error; ++i) {
            if (i > 0 && steps[i].step() <= steps[i - 1].step()) {
              fails(StatusCode::INVALID_ARGUMENT, "steps not rising");
            } else if (!(run.has_steps && steps[i].step() <= run.last_step) &&
                       !LrOk(steps[i].lr())) {
              fails(StatusCode::INVALID_ARGUMENT, "a bad lr");
            }
          }
        }
        break;
      case v1::AttachRequest::kAck:
      case v1::AttachRequest::kFinish:
        if (!s.started) {
          fails(StatusCode::INVALID_ARGUMENT, "ack/finish before start");
        }
        break;
      case v1::AttachRequest::KIND_NOT_SET:
        if (decodable) {
          fails(StatusCode::INVALID_ARGUMENT, "a request with no kind");
        } else if (!s.started) {
          fails(StatusCode::INVALID_ARGUMENT, "an undecodable first message");
        } else {
          fails(StatusCode::OK, "an undecodable message after start");
        }
        break;
    }

    if (!s.rw->Write(req)) {
      // The server ended the stream before this message: it must have been
      // told to (it was not) — report what it said.
      const grpc::Status st = s.rw->Finish();
      FUZZ_CHECK(false, "write failed before %s: code %d (%s)",
                 error ? why : std::string("a valid message"),
                 static_cast<int>(st.error_code()), st.error_message());
    }
    if (error) {
      ExpectEnd(*error, why);
      return;
    }
    switch (req.kind_case()) {
      case v1::AttachRequest::kStart:
        OnStartReply(req.start());
        break;
      case v1::AttachRequest::kSteps:
        OnStepsReply(req.steps());
        break;
      case v1::AttachRequest::kAck:
        break;  // no reply
      case v1::AttachRequest::kFinish:
        // FINISHED once processed; until a reply shows it was, a query may
        // still see the run attached.
        runs_[s.run_id].finished = true;
        s.finish_unanswered = true;
        break;
      case v1::AttachRequest::KIND_NOT_SET:
        break;
    }
  }

  v1::AttachResponse MustRead(const char* what) {
    v1::AttachResponse resp;
    if (!stream_->rw->Read(&resp)) {
      const grpc::Status st = stream_->rw->Finish();
      FUZZ_CHECK(false, "the stream ended while waiting for %s: code %d (%s)",
                 what, static_cast<int>(st.error_code()), st.error_message());
    }
    return resp;
  }

  void OnStartReply(const v1::RunStart& start) {
    const v1::AttachResponse resp = MustRead("AttachAccepted");
    FUZZ_CHECK(resp.has_accepted(), "start answered with %s",
               resp.ShortDebugString());
    const v1::AttachAccepted& a = resp.accepted();
    const bool known = runs_.count(start.run_id()) > 0;
    RunModel& run = runs_[start.run_id()];
    FUZZ_CHECK(a.run_id() == start.run_id(), "accepted another run id");
    FUZZ_CHECK(a.resumed() == known, "resumed=%d for a run %s", a.resumed(),
               known ? "it holds" : "it did not hold");
    FUZZ_CHECK(a.has_steps() == run.has_steps &&
                   (!run.has_steps || a.last_step() == run.last_step),
               "accepted says last step %d (has %d); it holds %d (has %d)",
               a.last_step(), a.has_steps(), run.last_step, run.has_steps);
    run.mode =
        start.mode() == v1::MODE_UNSPECIFIED ? v1::OBSERVE : start.mode();
    run.finished = false;
    run.state_known = true;
    stream_->started = true;
    stream_->run_id = start.run_id();
    stream_->finish_unanswered = false;
  }

  void OnStepsReply(const v1::StepBatch& batch) {
    RunModel& run = runs_[stream_->run_id];
    int64_t dups = 0;
    for (const v1::Step& s : batch.steps()) {
      if (run.has_steps && s.step() <= run.last_step) {
        ++dups;
      } else {
        run.has_steps = true;
        run.last_step = s.step();
        ++run.stored;
      }
    }
    while (true) {
      const v1::AttachResponse resp = MustRead("BatchReceived");
      if (resp.has_advice()) {
        CheckAdvice(run, resp.advice());
        continue;
      }
      FUZZ_CHECK(resp.has_received(), "a batch answered with %s",
                 resp.ShortDebugString());
      const v1::BatchReceived& r = resp.received();
      FUZZ_CHECK(
          r.accepted() == batch.steps_size() - dups && r.duplicates() == dups,
          "received %d new and %d duplicates; expected %d and %d", r.accepted(),
          r.duplicates(), batch.steps_size() - dups, dups);
      FUZZ_CHECK(r.has_steps() == run.has_steps &&
                     (!run.has_steps || r.last_step() == run.last_step),
                 "received says last step %d (has %d); expected %d (has %d)",
                 r.last_step(), r.has_steps(), run.last_step, run.has_steps);
      break;
    }
    stream_->finish_unanswered = false;
  }

  void CheckAdvice(RunModel& run, const v1::Advice& a) {
    FUZZ_CHECK(a.advice_id() > run.last_advice_id, "advice id %d after %d",
               a.advice_id(), run.last_advice_id);
    run.last_advice_id = a.advice_id();
    FUZZ_CHECK(run.has_steps && a.at_step() <= run.last_step,
               "advice at step %d; last step %d", a.at_step(), run.last_step);
    const v1::Diagnosis& d = a.diagnosis();
    FUZZ_CHECK(d.kind() != v1::DIAGNOSIS_KIND_UNSPECIFIED &&
                   d.kind() != v1::LOSS_SPIKE,
               "advice for diagnosis kind %d", static_cast<int>(d.kind()));
    FUZZ_CHECK(d.severity() >= 0 && d.severity() <= 1 && d.confidence() >= 0 &&
                   d.confidence() <= 1,
               "severity %g, confidence %g", d.severity(), d.confidence());
    if (!a.has_action()) return;
    FUZZ_CHECK(run.mode != v1::OBSERVE, "an action in OBSERVE mode: %s",
               a.ShortDebugString());
    const v1::Action& act = a.action();
    FUZZ_CHECK(!act.has_scale_lr() || (std::isfinite(act.scale_lr().factor()) &&
                                       act.scale_lr().factor() > 0),
               "scale_lr %s", act.ShortDebugString());
    FUZZ_CHECK(!act.has_set_lr() ||
                   (std::isfinite(act.set_lr().lr()) && act.set_lr().lr() >= 0),
               "set_lr %s", act.ShortDebugString());
    FUZZ_CHECK(std::isfinite(act.grad_clip_max_norm()) &&
                   act.grad_clip_max_norm() >= 0,
               "grad clip %s", act.ShortDebugString());
    run.actions.push_back(a.advice_id());
  }

  void Close() {
    if (stream_ == nullptr) return;
    stream_->rw->WritesDone();
    ExpectEnd(StatusCode::OK, "half-close");
  }

  // Another trainer attaches the open stream's run (a reconnect while the
  // old connection lingers): the newer session wins.
  void Takeover(Bytes& in) {
    const uint8_t how = in.U8() % 4;
    const uint8_t mode = in.U8() % 4;
    if (stream_ == nullptr || !stream_->started) return;
    const std::string id = stream_->run_id;
    std::unique_ptr<Stream> old = std::move(stream_);
    v1::AttachRequest start;
    start.mutable_start()->set_run_id(id);
    start.mutable_start()->set_mode(static_cast<v1::Mode>(mode));
    Send(start);  // the new stream, now stream_
    FUZZ_CHECK(stream_ != nullptr && stream_->started, "takeover not accepted");
    std::swap(old, stream_);  // the old one, for a moment
    switch (how) {
      case 0:
      case 1: {
        v1::AttachRequest req;
        if (how == 0) {
          v1::Step* step = req.mutable_steps()->add_steps();
          const RunModel& run = runs_[id];
          step->set_step(
              run.has_steps ? run.last_step + (run.last_step < INT64_MAX) : 0);
          step->set_lr(0.1);
          step->set_loss(1.0);
        } else {
          req.mutable_ack()->set_advice_id(1);
          req.mutable_ack()->set_applied(true);
        }
        // The daemon may end the superseded stream before this write
        // arrives (the write then fails) or on it: ABORTED either way.
        (void)stream_->rw->Write(req);
        ExpectEnd(StatusCode::ABORTED, "a message on a superseded stream");
        break;
      }
      case 2:
        Close();
        break;
      case 3:
        Cancel();
        break;
    }
    stream_ = std::move(old);
    // The old stream's end did not detach the run from the new one.
    runs_[id].state_known = true;
    CheckRun(id, runs_[id], /*attached=*/true);
  }

  void Cancel() {
    if (stream_ == nullptr) return;
    stream_->ctx.TryCancel();
    v1::AttachResponse resp;
    while (stream_->rw->Read(&resp)) {
    }
    const grpc::Status st = stream_->rw->Finish();
    FUZZ_CHECK(st.error_code() == StatusCode::CANCELLED,
               "cancelled stream ended with %d (%s)",
               static_cast<int>(st.error_code()), st.error_message());
    if (stream_->started) {
      // The server may detach (and process a finish, or not) after we hear
      // of the cancel.
      runs_[stream_->run_id].state_known = false;
    }
    stream_.reset();
  }

  // ---------------------------------------------------------------- queries

  void Query(Bytes& in) {
    const uint8_t sel = in.U8();
    if (!runs_.empty()) {
      auto it = runs_.begin();
      std::advance(it, sel % runs_.size());
      const bool attached = stream_ != nullptr && stream_->started &&
                            stream_->run_id == it->first;
      CheckRun(it->first, it->second, attached);
    }
    CheckFleet(in.U8() % 6);
    v1::GetRunHealthRequest req;
    req.set_run_id(in.Str(in.U8() % 8));
    if (runs_.count(req.run_id()) == 0) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
      v1::RunHealth h;
      const grpc::Status st = stub_->GetRunHealth(&ctx, req, &h);
      // An id that is not UTF-8 does not decode: gRPC refuses the call.
      v1::GetRunHealthRequest decoded;
      const bool decodable = decoded.ParseFromString(req.SerializeAsString());
      FUZZ_CHECK(
          decodable ? st.error_code() == StatusCode::NOT_FOUND : !st.ok(),
          "health of an unknown run: %d %s", static_cast<int>(st.error_code()),
          st.error_message());
    }
  }

  void CheckRun(const std::string& id, const RunModel& run, bool attached) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    v1::GetRunHealthRequest req;
    req.set_run_id(id);
    v1::RunHealth h;
    const grpc::Status st = stub_->GetRunHealth(&ctx, req, &h);
    FUZZ_CHECK(st.ok(), "health: %s", st.error_message());
    const v1::RunSummary& s = h.summary();
    FUZZ_CHECK(s.run_id() == id, "health of another run");
    FUZZ_CHECK(s.has_steps() == run.has_steps &&
                   (!run.has_steps || s.last_step() == run.last_step) &&
                   s.steps_stored() == run.stored,
               "health: last step %d (has %d), %d stored; expected %d (has "
               "%d), %d",
               s.last_step(), s.has_steps(), s.steps_stored(), run.last_step,
               run.has_steps, run.stored);
    const bool unanswered = attached && stream_->finish_unanswered;
    if (run.state_known && !unanswered) {
      if (run.finished) {
        FUZZ_CHECK(s.state() == v1::FINISHED, "state %s, not FINISHED",
                   v1::RunState_Name(s.state()));
      } else if (attached) {
        FUZZ_CHECK(s.state() == v1::HEALTHY || s.state() == v1::AT_RISK ||
                       s.state() == v1::UNHEALTHY,
                   "attached, state %s", v1::RunState_Name(s.state()));
      } else {
        FUZZ_CHECK(s.state() == v1::DETACHED, "detached, state %s",
                   v1::RunState_Name(s.state()));
      }
    }

    // Its curve: every stored step counted, at most max_points, in order.
    grpc::ClientContext cctx;
    cctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
    v1::GetCurveRequest creq;
    creq.set_run_id(id);
    creq.set_max_points(4);
    v1::Curve curve;
    const grpc::Status cs = stub_->GetCurve(&cctx, creq, &curve);
    FUZZ_CHECK(cs.ok(), "curve: %s", cs.error_message());
    FUZZ_CHECK(curve.total_points() == run.stored && curve.points_size() <= 4,
               "curve: %d points of %d; %d stored", curve.points_size(),
               curve.total_points(), run.stored);
    for (int i = 1; i < curve.points_size(); ++i) {
      FUZZ_CHECK(curve.points(i).step() > curve.points(i - 1).step(),
                 "curve points out of order");
    }
  }

  // ListRuns, page by page: every run once.
  void CheckFleet(int page_size) {
    std::set<std::string> seen;
    std::string token;
    for (int page = 0; page < 1000; ++page) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + kDeadline);
      v1::ListRunsRequest req;
      req.set_page_size(page_size);
      req.set_page_token(token);
      v1::ListRunsResponse resp;
      const grpc::Status st = stub_->ListRuns(&ctx, req, &resp);
      FUZZ_CHECK(st.ok(), "ListRuns: %s", st.error_message());
      FUZZ_CHECK(page_size == 0 || resp.runs_size() <= page_size,
                 "a page of %d runs for page_size %d", resp.runs_size(),
                 page_size);
      for (const v1::RunSummary& r : resp.runs()) {
        FUZZ_CHECK(seen.insert(r.run_id()).second, "run listed twice");
        FUZZ_CHECK(runs_.count(r.run_id()) == 1, "ListRuns: an unknown run");
      }
      token = resp.next_page_token();
      if (token.empty()) break;
    }
    FUZZ_CHECK(seen.size() == runs_.size(), "ListRuns: %d runs of %d",
               seen.size(), runs_.size());
  }

  const bool sqlite_;
  std::string db_;
  service::ServerOptions options_;
  FakeClock clock_;
  std::unique_ptr<storage::RunStore> store_;
  std::unique_ptr<service::Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::LossGuard::Stub> stub_;
  std::unique_ptr<Stream> stream_;
  std::map<std::string, RunModel> runs_;
};

const bool quiet = QuietProtobuf();
}  // namespace
}  // namespace lossguard::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lossguard::fuzz::Bytes in(data, size);
  lossguard::fuzz::Harness harness(in.U8());
  harness.Run(in);
  return 0;
}
