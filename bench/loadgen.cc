// lossguard-loadgen: N concurrent simulated trainers replaying real curves
// over Attach streams, against an in-process lossguardd (analysis and
// SQLite persistence on), an in-process bare gRPC streaming sink (reads the
// same batches and answers each with BatchReceived, nothing else: the
// transport's limit), or an external daemon. Prints steps/s accepted and
// the advice latency (from sending the batch holding the step a diagnosis
// is decided at to receiving the advice), p50 and p99.
//
//   lossguard-loadgen --target=both --streams=100 --seconds=10
//   lossguard-loadgen --server=127.0.0.1:7077 --streams=1000 --rate=100
//
// Each stream replays one curve of --curves (cycling through the files),
// its steps shifted past the curve's end every time it wraps, in batches
// of --batch steps, with up to --window batches unacknowledged.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "lossguard/curvefile/curve_csv.h"
#include "lossguard/wire/convert.h"
#include "lossguard/service/log.h"
#include "lossguard/service/service.h"
#include "lossguard/storage/run_store.h"
#include "lossguard/v1/lossguard.grpc.pb.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, target, "both",
          "daemon (in-process lossguardd, SQLite), sink (bare gRPC sink), "
          "both (sink first, then daemon, same load), or ignored with --server");
ABSL_FLAG(std::string, server, "", "an external lossguardd to load instead");
ABSL_FLAG(std::string, db, "",
          "SQLite file of the in-process daemon (default: a temp file); "
          ":memory: for the memory store (no persistence: isolates its cost)");
ABSL_FLAG(int, streams, 10, "concurrent Attach streams (simulated trainers)");
ABSL_FLAG(int, batch, 1000, "steps per batch");
ABSL_FLAG(int, window, 4, "batches in flight per stream");
ABSL_FLAG(double, rate, 0, "steps/s per stream (0: as fast as the server takes them)");
ABSL_FLAG(double, seconds, 10, "measured seconds");
ABSL_FLAG(double, warmup, 2, "seconds before measuring");
ABSL_FLAG(std::string, curves, "../shared/curves/dev",
          "folder of curve CSVs to replay (falls back to examples/curves)");
ABSL_FLAG(std::string, curve_filter, "",
          "replay only the curve files whose name contains this");
ABSL_FLAG(bool, json, false, "print one JSON object per target");
ABSL_FLAG(int, rss_pid, 0,
          "a process (an external lossguardd) whose resident memory is read "
          "before the streams attach and at the end: memory per stream");
ABSL_FLAG(bool, verify, false,
          "at the end, stop sending, wait for every batch's confirmation, end "
          "each stream cleanly, and check that the daemon stores exactly the "
          "steps each stream sent (a soak: no step dropped)");
ABSL_FLAG(double, rss_every_s, 0,
          "with --rss_pid: sample the daemon's RSS this often while measuring "
          "(memory flat or growing)");
ABSL_FLAG(bool, mutex_deadlock_detection, false,
          "leave abseil's Mutex deadlock detection on (as the tests run)");

namespace {

namespace v1 = ::lossguard::v1;
using Clock = std::chrono::steady_clock;

// --------------------------------------------------------------------- sink

// Reads every message; answers start with accepted and each batch with
// BatchReceived; keeps nothing. Responses are queued so reads never wait for
// writes (as the daemon's reactor does).
class SinkReactor final
    : public grpc::ServerBidiReactor<v1::AttachRequest, v1::AttachResponse> {
 public:
  SinkReactor() { StartRead(&req_); }
  void OnReadDone(bool ok) override {
    if (!ok) {
      absl::MutexLock l(&mu_);
      done_reading_ = true;
      MaybeFinishLocked();
      return;
    }
    v1::AttachResponse resp;
    if (req_.has_start()) {
      resp.mutable_accepted()->set_run_id(req_.start().run_id());
    } else if (req_.has_steps()) {
      const auto& s = req_.steps().steps();
      resp.mutable_received()->set_has_steps(!s.empty());
      if (!s.empty()) resp.mutable_received()->set_last_step(s.rbegin()->step());
      resp.mutable_received()->set_accepted(s.size());
    } else {
      StartRead(&req_);
      return;
    }
    {
      absl::MutexLock l(&mu_);
      out_.push_back(std::move(resp));
      PumpLocked();
    }
    StartRead(&req_);
  }
  void OnWriteDone(bool ok) override {
    absl::MutexLock l(&mu_);
    writing_ = false;
    out_.pop_front();
    if (!ok) out_.clear();
    PumpLocked();
    MaybeFinishLocked();
  }
  void OnDone() override { delete this; }

 private:
  void PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || out_.empty()) return;
    writing_ = true;
    StartWrite(&out_.front());
  }
  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (done_reading_ && !writing_ && out_.empty() && !finished_) {
      finished_ = true;
      Finish(grpc::Status::OK);
    }
  }
  v1::AttachRequest req_;
  absl::Mutex mu_;
  std::deque<v1::AttachResponse> out_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool done_reading_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

class SinkService final : public v1::LossGuard::CallbackService {
  grpc::ServerBidiReactor<v1::AttachRequest, v1::AttachResponse>* Attach(
      grpc::CallbackServerContext*) override {
    return new SinkReactor();
  }
};

// ------------------------------------------------------------------ trainer

struct Shared {
  std::atomic<bool> measuring{false};
  std::atomic<bool> stop{false};
  std::atomic<int64_t> steps{0};  // accepted while measuring
  std::atomic<int64_t> batches{0};
  absl::Mutex mu;
  std::vector<double> advice_latency_ms ABSL_GUARDED_BY(mu);
  std::atomic<int64_t> errors{0};
  std::string first_error ABSL_GUARDED_BY(mu);
};

class Trainer final : public grpc::ClientBidiReactor<v1::AttachRequest, v1::AttachResponse> {
 public:
  Trainer(v1::LossGuard::Stub* stub, std::string run_id,
          const std::vector<lossguard::analyzers::StepRecord>* curve, Shared* shared)
      : run_id_(std::move(run_id)), curve_(curve), shared_(shared) {
    stub->async()->Attach(&ctx_, this);
    v1::AttachRequest start;
    start.mutable_start()->set_run_id(run_id_);
    start.mutable_start()->set_project("loadgen");
    start.mutable_start()->set_mode(v1::ADVISE);
    Queue(std::move(start));
    StartRead(&resp_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    if (resp_.has_received()) {
      confirmed_last_.store(resp_.received().last_step());
    }
    if (resp_.has_accepted()) {
      credits_.fetch_add(absl::GetFlag(FLAGS_window));
      if (!paced_) {
        for (int i = 0; i < absl::GetFlag(FLAGS_window); ++i) TrySend();
      }
    } else if (resp_.has_received()) {
      if (shared_->measuring.load()) {
        shared_->steps.fetch_add(resp_.received().accepted());
        shared_->batches.fetch_add(1);
      }
      credits_.fetch_add(1);
      if (!paced_) TrySend();
    } else if (resp_.has_advice()) {
      const int64_t at = resp_.advice().at_step();
      const auto now = Clock::now();
      std::lock_guard<std::mutex> l(mu_);
      for (const auto& [last, sent] : sent_) {
        if (last >= at) {
          if (shared_->measuring.load()) {
            absl::MutexLock sl(&shared_->mu);
            shared_->advice_latency_ms.push_back(
                std::chrono::duration<double, std::milli>(now - sent).count());
          }
          break;
        }
      }
    }
    StartRead(&resp_);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> l(mu_);
    writing_ = false;
    out_.pop_front();
    if (!ok) return;
    PumpLocked();
  }

  void OnDone(const grpc::Status& s) override {
    if (!s.ok() && !shared_->stop.load()) {
      shared_->errors.fetch_add(1);
      absl::MutexLock l(&shared_->mu);
      if (shared_->first_error.empty()) shared_->first_error = s.error_message();
    }
    done_.Notify();
  }

  void Cancel() { ctx_.TryCancel(); }
  void Wait() { done_.WaitForNotification(); }
  bool WaitFor(absl::Duration d) { return done_.WaitForNotificationWithTimeout(d); }

  // --verify: the last step sent, whether every batch is confirmed, and a
  // clean end (half-close; the daemon drains and ends the stream with OK).
  int64_t last_sent_step() {
    std::lock_guard<std::mutex> l(send_mu_);
    return last_sent_step_;
  }
  int64_t steps_sent() {
    std::lock_guard<std::mutex> l(send_mu_);
    return static_cast<int64_t>(sent_steps_);
  }
  bool AllConfirmed() {
    const int64_t last = last_sent_step();
    return last < 0 || confirmed_last_.load() >= last;
  }
  void EndCleanly() { StartWritesDone(); }
  const std::string& run_id() const { return run_id_; }

  // Sends the next batch when a window slot is free and, paced, when it is
  // due. Called on the stream's callbacks, or by the pacer thread.
  void TrySend() {
    std::lock_guard<std::mutex> l(send_mu_);
    if (shared_->stop.load() || credits_.load() <= 0) return;
    if (paced_) {
      const double rate = absl::GetFlag(FLAGS_rate);
      const auto due = start_ + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(sent_steps_ / rate));
      if (Clock::now() < due) return;
    }
    credits_.fetch_sub(1);
    SendBatchLocked();
  }

 private:
  void Queue(v1::AttachRequest req) {
    std::lock_guard<std::mutex> l(mu_);
    out_.push_back(std::move(req));
    PumpLocked();
  }
  void PumpLocked() {
    if (writing_ || out_.empty()) return;
    writing_ = true;
    StartWrite(&out_.front());
  }

  void SendBatchLocked() {
    const int batch = absl::GetFlag(FLAGS_batch);
    v1::AttachRequest req;
    v1::StepBatch* b = req.mutable_steps();
    const int64_t n = static_cast<int64_t>(curve_->size());
    for (int i = 0; i < batch; ++i, ++pos_) {
      const auto& r = (*curve_)[pos_ % n];
      v1::Step* s = b->add_steps();
      *s = lossguard::wire::ToProto(r);
      s->set_step(r.step + (pos_ / n) * (curve_->back().step + 1));
    }
    sent_steps_ += batch;
    last_sent_step_ = b->steps(b->steps_size() - 1).step();
    {
      std::lock_guard<std::mutex> l(mu_);
      sent_.emplace_back(b->steps(b->steps_size() - 1).step(), Clock::now());
      while (sent_.size() > 64) sent_.pop_front();
    }
    Queue(std::move(req));
  }

  grpc::ClientContext ctx_;
  std::string run_id_;
  const std::vector<lossguard::analyzers::StepRecord>* curve_;
  Shared* shared_;
  v1::AttachResponse resp_;
  std::mutex mu_;
  std::deque<v1::AttachRequest> out_;
  bool writing_ = false;
  std::deque<std::pair<int64_t, Clock::time_point>> sent_;
  std::mutex send_mu_;  // the batch cursor
  const bool paced_ = absl::GetFlag(FLAGS_rate) > 0;
  std::atomic<int> credits_{0};
  int64_t pos_ = 0;
  double sent_steps_ = 0;
  int64_t last_sent_step_ = -1;
  std::atomic<int64_t> confirmed_last_{-1};
  Clock::time_point start_ = Clock::now();
  absl::Notification done_;
};

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

std::vector<std::vector<lossguard::analyzers::StepRecord>> LoadCurves() {
  std::string dir = absl::GetFlag(FLAGS_curves);
  if (!std::filesystem::is_directory(dir)) dir = "examples/curves";
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() == ".csv" &&
        e.path().filename().string().find(absl::GetFlag(FLAGS_curve_filter)) != std::string::npos) {
      files.push_back(e.path().string());
    }
  }
  std::sort(files.begin(), files.end());
  std::vector<std::vector<lossguard::analyzers::StepRecord>> curves;
  for (const std::string& f : files) {
    auto rows = lossguard::curvefile::ReadCurveCsv(f);
    if (rows.ok() && rows->size() >= 10) curves.push_back(std::move(*rows));
  }
  return curves;
}

// VmRSS of process `pid` in KiB (-1 if unreadable).
int64_t RssKib(int pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atoll(line.c_str() + 6);
  }
  return -1;
}

// Loads `address` with the configured streams; returns the JSON result.
// `store`, when given (the in-process daemon's), is sampled every 100 ms
// while measuring: the largest write lag and backlog.
nlohmann::ordered_json Load(const std::string& name, const std::string& address,
                            const std::vector<std::vector<lossguard::analyzers::StepRecord>>& curves,
                            lossguard::storage::RunStore* store = nullptr) {
  const int rss_pid = absl::GetFlag(FLAGS_rss_pid);
  const int64_t rss_before = rss_pid > 0 ? RssKib(rss_pid) : -1;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  // A few channels spread the streams over more than one connection.
  std::vector<std::unique_ptr<v1::LossGuard::Stub>> stubs;
  for (int i = 0; i < 4; ++i) {
    args.SetInt("loadgen.channel", i);  // distinct channels
    stubs.push_back(v1::LossGuard::NewStub(grpc::CreateCustomChannel(
        address, grpc::InsecureChannelCredentials(), args)));
  }
  Shared shared;
  std::vector<std::unique_ptr<Trainer>> trainers;
  const int streams = absl::GetFlag(FLAGS_streams);
  const std::string stamp = absl::StrCat(std::chrono::system_clock::now().time_since_epoch().count());
  for (int i = 0; i < streams; ++i) {
    trainers.push_back(std::make_unique<Trainer>(
        stubs[i % stubs.size()].get(), absl::StrCat("loadgen-", name, "-", stamp, "-", i),
        &curves[i % curves.size()], &shared));
  }
  // Paced streams are fed by this thread, every millisecond.
  std::thread pacer;
  if (absl::GetFlag(FLAGS_rate) > 0) {
    pacer = std::thread([&] {
      while (!shared.stop.load()) {
        for (auto& t : trainers) t->TrySend();
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(absl::GetFlag(FLAGS_warmup)));
  shared.measuring = true;
  const auto t0 = Clock::now();
  const auto t_end = t0 + std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds)));
  double max_lag_s = 0;
  int64_t max_queued_steps = 0;
  const double rss_every = rss_pid > 0 ? absl::GetFlag(FLAGS_rss_every_s) : 0.0;
  std::vector<std::pair<double, int64_t>> rss_series;  // (seconds, KiB)
  auto next_rss = t0;
  const int64_t committed_before = store != nullptr ? store->Stats().committed_steps : 0;
  while (Clock::now() < t_end) {
    std::this_thread::sleep_until(std::min(t_end, Clock::now() + std::chrono::milliseconds(100)));
    if (store != nullptr) {
      const auto st = store->Stats();
      max_lag_s = std::max(max_lag_s, st.oldest_queued_age_s);
      max_queued_steps = std::max(max_queued_steps, st.queued_steps);
    }
    if (rss_every > 0 && Clock::now() >= next_rss) {
      rss_series.emplace_back(std::chrono::duration<double>(Clock::now() - t0).count(),
                              RssKib(rss_pid));
      next_rss += std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(rss_every));
    }
  }
  shared.measuring = false;
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  const int64_t committed_during =
      store != nullptr ? store->Stats().committed_steps - committed_before : 0;
  const int64_t rss_end = rss_pid > 0 ? RssKib(rss_pid) : -1;
  shared.stop = true;
  if (pacer.joinable()) pacer.join();
  int64_t sent_total = 0, stored_total = 0, runs_short = 0, unconfirmed = 0;
  std::string short_example;
  if (absl::GetFlag(FLAGS_verify)) {
    // Every batch sent is confirmed (within a minute), then each stream
    // ends cleanly; what the daemon stores must be exactly what was sent.
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    for (auto& t : trainers) {
      while (!t->AllConfirmed() && Clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      if (!t->AllConfirmed()) ++unconfirmed;
    }
    for (auto& t : trainers) t->EndCleanly();
    for (auto& t : trainers) {
      if (!t->WaitFor(absl::Seconds(30))) t->Cancel();
      t->Wait();
    }
    for (size_t i = 0; i < trainers.size(); ++i) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
      v1::GetRunHealthRequest req;
      req.set_run_id(trainers[i]->run_id());
      v1::RunHealth h;
      grpc::Status s = stubs[i % stubs.size()]->GetRunHealth(&ctx, req, &h);
      const int64_t sent = trainers[i]->steps_sent();
      const int64_t stored = s.ok() ? h.summary().steps_stored() : -1;
      sent_total += sent;
      stored_total += std::max<int64_t>(stored, 0);
      if (stored != sent) {
        ++runs_short;
        if (short_example.empty()) {
          short_example = absl::StrCat(trainers[i]->run_id(), ": sent ", sent, ", stored ",
                                       stored, s.ok() ? "" : " (" + s.error_message() + ")");
        }
      }
    }
  } else {
    for (auto& t : trainers) t->Cancel();
    for (auto& t : trainers) t->Wait();
  }
  nlohmann::ordered_json j;
  j["target"] = name;
  j["streams"] = streams;
  j["batch"] = absl::GetFlag(FLAGS_batch);
  j["rate_per_stream"] = absl::GetFlag(FLAGS_rate);
  j["seconds"] = secs;
  j["steps"] = shared.steps.load();
  j["steps_per_s"] = static_cast<double>(shared.steps.load()) / secs;
  absl::MutexLock l(&shared.mu);
  j["advice"] = shared.advice_latency_ms.size();
  j["advice_latency_ms_p50"] = Percentile(shared.advice_latency_ms, 0.5);
  j["advice_latency_ms_p99"] = Percentile(shared.advice_latency_ms, 0.99);
  j["stream_errors"] = shared.errors.load();
  if (store != nullptr) {
    j["store_committed_steps_per_s"] = static_cast<double>(committed_during) / secs;
    j["store_write_lag_s_max"] = max_lag_s;
    j["store_queued_steps_max"] = max_queued_steps;
  }
  if (rss_pid > 0) {
    j["rss_kib_before"] = rss_before;
    j["rss_kib_end"] = rss_end;
    j["rss_kib_per_stream"] = static_cast<double>(rss_end - rss_before) / streams;
  }
  if (!rss_series.empty()) {
    nlohmann::ordered_json series = nlohmann::ordered_json::array();
    for (const auto& [t, kib] : rss_series) series.push_back({t, kib});
    j["rss_series_s_kib"] = series;
  }
  if (absl::GetFlag(FLAGS_verify)) {
    j["verify_steps_sent"] = sent_total;
    j["verify_steps_stored"] = stored_total;
    j["verify_runs_not_exact"] = runs_short;
    j["verify_streams_unconfirmed"] = unconfirmed;
    if (!short_example.empty()) j["verify_first_mismatch"] = short_example;
  }
  if (!shared.first_error.empty()) j["first_error"] = shared.first_error;
  return j;
}

void Print(const nlohmann::ordered_json& j) {
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::string extra;
    if (j.contains("store_write_lag_s_max")) {
      absl::StrAppendFormat(&extra, "  store %.0f steps/s, lag max %.3f s, backlog max %d",
                            j["store_committed_steps_per_s"].get<double>(),
                            j["store_write_lag_s_max"].get<double>(),
                            j["store_queued_steps_max"].get<int64_t>());
    }
    if (j.contains("rss_kib_per_stream")) {
      absl::StrAppendFormat(&extra, "  rss %d -> %d KiB, %.1f KiB/stream",
                            j["rss_kib_before"].get<int64_t>(), j["rss_kib_end"].get<int64_t>(),
                            j["rss_kib_per_stream"].get<double>());
    }
    if (j.contains("verify_steps_sent")) {
      absl::StrAppendFormat(&extra, "\n  verify: sent %d steps, stored %d, runs not exact %d, "
                                    "streams unconfirmed %d",
                            j["verify_steps_sent"].get<int64_t>(),
                            j["verify_steps_stored"].get<int64_t>(),
                            j["verify_runs_not_exact"].get<int64_t>(),
                            j["verify_streams_unconfirmed"].get<int64_t>());
    }
    if (j.contains("rss_series_s_kib")) {
      absl::StrAppend(&extra, "\n  rss (s, KiB):");
      for (const auto& p : j["rss_series_s_kib"]) {
        absl::StrAppendFormat(&extra, " %.0f:%d", p[0].get<double>(), p[1].get<int64_t>());
      }
    }
    if (j["stream_errors"].get<int64_t>() > 0) {
      absl::StrAppend(&extra, "  errors ", j["stream_errors"].get<int64_t>());
    }
    std::printf("%-7s %5d streams  %10.0f steps/s  advice %5d  latency p50 %7.2f ms  p99 %7.2f ms%s\n",
                j["target"].get<std::string>().c_str(), j["streams"].get<int>(),
                j["steps_per_s"].get<double>(), j["advice"].get<int>(),
                j["advice_latency_ms_p50"].get<double>(), j["advice_latency_ms_p99"].get<double>(),
                extra.c_str());
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "lossguard-loadgen --target=both --streams=100 --seconds=10 (see --helpfull)");
  absl::ParseCommandLine(argc, argv);
  // Debian builds abseil without NDEBUG, which leaves Mutex deadlock
  // detection on: a global graph updated under a global lock on every
  // Lock(). The tests keep it; the binaries turn it off.
  absl::SetMutexDeadlockDetectionMode(
      absl::GetFlag(FLAGS_mutex_deadlock_detection)
          ? absl::OnDeadlockCycle::kAbort
          : absl::OnDeadlockCycle::kIgnore);
  lossguard::service::SetLogLevel(lossguard::service::LogLevel::kWarning);
  const auto curves = LoadCurves();
  if (curves.empty()) {
    std::fprintf(stderr, "lossguard-loadgen: no curves in %s\n",
                 absl::GetFlag(FLAGS_curves).c_str());
    return 1;
  }
  if (!absl::GetFlag(FLAGS_server).empty()) {
    Print(Load("server", absl::GetFlag(FLAGS_server), curves));
    return 0;
  }
  const std::string target = absl::GetFlag(FLAGS_target);
  if (target == "sink" || target == "both") {
    SinkService sink;
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.SetMaxReceiveMessageSize(64 << 20);
    b.RegisterService(&sink);
    auto server = b.BuildAndStart();
    Print(Load("sink", absl::StrCat("127.0.0.1:", port), curves));
    server->Shutdown();
  }
  if (target == "daemon" || target == "both") {
    std::string db = absl::GetFlag(FLAGS_db);
    std::filesystem::path tmp;
    if (db == ":memory:") {
      auto store = lossguard::storage::NewMemoryStore();
      lossguard::service::ServerOptions o;
      o.listen = "127.0.0.1:0";
      lossguard::service::Daemon d(o, store.get());
      if (!d.Start().ok()) return 1;
      auto j = Load("daemon-mem", absl::StrCat("127.0.0.1:", d.port()), curves);
      Print(j);
      (void)d.Shutdown();
      return 0;
    }
    if (db.empty()) {
      tmp = std::filesystem::temp_directory_path() /
            absl::StrCat("lossguard-loadgen-", ::getpid());
      std::filesystem::create_directories(tmp);
      db = (tmp / "lossguard.db").string();
    }
    auto store = lossguard::storage::OpenSqliteStore(db);
    if (!store.ok()) {
      std::fprintf(stderr, "lossguard-loadgen: %s\n", std::string(store.status().message()).c_str());
      return 1;
    }
    lossguard::service::ServerOptions o;
    o.listen = "127.0.0.1:0";
    lossguard::service::Daemon d(o, store->get());
    if (!d.Start().ok()) return 1;
    auto j = Load("daemon", absl::StrCat("127.0.0.1:", d.port()), curves, store->get());
    Print(j);
    (void)d.Shutdown();
    if (!tmp.empty()) std::filesystem::remove_all(tmp);
  }
  return 0;
}
