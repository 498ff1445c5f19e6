#include "lossguard/service/service.h"

#include <chrono>

#include "server/service/src/alerter.h"
#include "server/service/src/http_frontend.h"
#include "server/service/src/metrics.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <fstream>
#include <sstream>
#include <limits>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "lossguard/analyzers/lr_range_test.h"
#include "lossguard/policy/advice_policy.h"
#include "lossguard/policy/advisor.h"
#include "lossguard/runs/curve_sampler.h"
#include "lossguard/service/log.h"
#include "lossguard/wire/convert.h"
#include "lossguard/v1/lossguard.grpc.pb.h"
#include "worker_pool.h"

namespace lossguard::service {

namespace v1 = ::lossguard::v1;

namespace {

constexpr char kServiceName[] = "lossguard.v1.LossGuard";

// The one place where our errors become gRPC statuses (the codes are the
// same numbers in absl and gRPC).
grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()),
                      std::string(s.message()));
}

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::OK:
      return "OK";
    case grpc::CANCELLED:
      return "CANCELLED";
    case grpc::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::ABORTED:
      return "ABORTED";
    case grpc::UNAVAILABLE:
      return "UNAVAILABLE";
    default:
      return "ERROR";
  }
}

// Trailing metadata of an Attach refused because another daemon of the
// fleet serves the run: that daemon's host:port.
constexpr char kOwnerMetadata[] = "lossguard-owner";

grpc::Status ShuttingDown() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      "lossguardd is shutting down; reconnect and attach "
                      "again with the same run_id to resume");
}

}  // namespace

class AttachReactor;
class WatchReactor;

class LossGuardServiceImpl final : public v1::LossGuard::CallbackService {
 public:
  LossGuardServiceImpl(const ServerOptions* options,
                       runs::RunRegistry* registry, storage::RunStore* store,
                       runs::Clock* clock)
      : options_(options),
        registry_(registry),
        store_(store),
        clock_(clock),
        pool_(std::make_unique<WorkerPool>(options->worker_threads)) {
    if (options->auth.has_value()) {
      auth_ = std::make_unique<auth::Authenticator>(*options->auth);
    }
  }

  // The caller: nullptr when auth is off (everything is allowed), else the
  // token's principal. UNAUTHENTICATED without a valid token.
  absl::StatusOr<const auth::Principal*> Caller(
      const grpc::CallbackServerContext* context) const {
    if (auth_ == nullptr) return nullptr;
    const auto& md = context->client_metadata();
    auto it = md.find("authorization");
    return auth_->Authenticate(it == md.end()
                                   ? std::string_view()
                                   : std::string_view(it->second.data(),
                                                      it->second.size()));
  }
  // /metrics covers the whole fleet: a token that may read every project.
  absl::Status AuthorizeFleetRead(std::string_view authorization) const {
    if (auth_ == nullptr) return absl::OkStatus();
    absl::StatusOr<const auth::Principal*> p = auth_->Authenticate(authorization);
    if (!p.ok()) return p.status();
    if ((*p)->project != "*") {
      return absl::PermissionDeniedError(absl::StrCat(
          "token \"", (*p)->name, "\" may read project \"", (*p)->project,
          "\" only; /metrics needs a token for every project (\"*\")"));
    }
    return absl::OkStatus();
  }
  // OK when `caller` (nullptr: auth off) may read (or write) `project`.
  static grpc::Status Check(const auth::Principal* caller,
                            const std::string& project, bool write) {
    if (caller == nullptr) return grpc::Status::OK;
    if (write ? caller->CanWrite(project) : caller->CanRead(project)) {
      return grpc::Status::OK;
    }
    return grpc::Status(
        grpc::StatusCode::PERMISSION_DENIED,
        absl::StrCat("token \"", caller->name, "\" may ",
                     caller->access == auth::Access::kWrite ? "write" : "read",
                     " project \"", caller->project, "\", not ",
                     write ? "write" : "read", " project \"", project, "\""));
  }

  // OK when `run` exists and `caller` may read it; NOT_FOUND naming
  // `run_id`, or PERMISSION_DENIED.
  static grpc::Status Readable(const runs::Run* run,
                               const auth::Principal* caller,
                               const std::string& run_id) {
    if (run == nullptr) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND,
                          absl::StrCat("no run \"", run_id, "\""));
    }
    return Check(caller, run->project(), false);
  }

  // Counts an Attach stream against its client's limit (the token with
  // auth, else the peer's host). False when the client is at the limit.
  bool AcquireStream(const std::string& client) {
    const int limit = options_->max_streams_per_client;
    absl::MutexLock lock(&mu_);
    int& n = streams_[client];
    if (limit > 0 && n >= limit) return false;  // n >= 1: the entry stays
    ++n;
    return true;
  }
  void ReleaseStream(const std::string& client) {
    absl::MutexLock lock(&mu_);
    auto it = streams_.find(client);
    if (it != streams_.end() && --it->second <= 0) streams_.erase(it);
  }

  grpc::ServerBidiReactor<v1::AttachRequest, v1::AttachResponse>* Attach(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* GetRunHealth(
      grpc::CallbackServerContext* context,
      const v1::GetRunHealthRequest* request, v1::RunHealth* reply) override;
  grpc::ServerUnaryReactor* ListRuns(grpc::CallbackServerContext* context,
                                     const v1::ListRunsRequest* request,
                                     v1::ListRunsResponse* reply) override;
  grpc::ServerWriteReactor<v1::RunEvent>* WatchRun(
      grpc::CallbackServerContext* context,
      const v1::WatchRunRequest* request) override;
  grpc::ServerUnaryReactor* GetCurve(grpc::CallbackServerContext* context,
                                     const v1::GetCurveRequest* request,
                                     v1::Curve* reply) override;
  grpc::ServerUnaryReactor* AnalyzeCurve(
      grpc::CallbackServerContext* context,
      const v1::AnalyzeCurveRequest* request,
      v1::AnalyzeCurveResponse* reply) override;
  grpc::ServerUnaryReactor* SuggestLearningRate(
      grpc::CallbackServerContext* context,
      const v1::SuggestLearningRateRequest* request,
      v1::LrSuggestion* reply) override;

  // Ends every open stream with UNAVAILABLE; later streams end at once.
  void BeginShutdown();
  // Ends the Attach streams of `run_id` with UNAVAILABLE: this daemon lost
  // the run's lease (fleet).
  void EndRunStreams(const std::string& run_id);
  // Runs the queued work and joins the worker threads.
  void StopWorkers() { pool_.reset(); }

  // Streams register while alive, so shutdown can end them. False when the
  // service is shutting down (the stream must finish at once).
  bool Register(AttachReactor* r);
  void Unregister(AttachReactor* r);
  bool Register(WatchReactor* r);
  void Unregister(WatchReactor* r);

  const ServerOptions& options() const { return *options_; }
  // The fleet this daemon is part of; nullptr when it serves alone.
  runs::Fleet* fleet() { return fleet_; }
  void set_fleet(runs::Fleet* fleet) { fleet_ = fleet; }
  WorkerPool* pool() { return pool_.get(); }
  // The run `run_id`; in a fleet, one this daemon has not synced yet is
  // looked up in the store (it may have started at another daemon since
  // the last sync): a round trip, for a worker thread. nullptr: unknown.
  std::shared_ptr<runs::Run> FindOrSync(const std::string& run_id) {
    std::shared_ptr<runs::Run> run = registry_->Find(run_id);
    if (run == nullptr && fleet_ != nullptr) {
      fleet_->SyncRun(run_id).IgnoreError();
      run = registry_->Find(run_id);
    }
    return run;
  }
  runs::RunRegistry* registry() { return registry_; }
  storage::RunStore* store() { return store_; }
  runs::Clock* clock() { return clock_; }
  Metrics& metrics() { return metrics_; }
  // /metrics: the counters, the fleet, the open streams and the store.
  std::string RenderMetrics() {
    int64_t attaches, watches;
    {
      absl::MutexLock lock(&mu_);
      attaches = static_cast<int64_t>(attaches_.size());
      watches = static_cast<int64_t>(watches_.size());
    }
    return metrics_.Render(*registry_, *store_, attaches, watches);
  }

 private:
  const ServerOptions* const options_;
  runs::RunRegistry* const registry_;
  storage::RunStore* const store_;
  runs::Clock* const clock_;
  std::unique_ptr<WorkerPool> pool_;
  runs::Fleet* fleet_ = nullptr;  // set before serving
  Metrics metrics_;

  absl::Mutex mu_;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<AttachReactor*> attaches_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<WatchReactor*> watches_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int> streams_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<auth::Authenticator> auth_;
};

namespace {

// "ipv4:10.1.2.3:5678" -> "ipv4:10.1.2.3" (the client without its port).
std::string PeerHost(const std::string& peer) {
  const size_t colon = peer.rfind(':');
  const size_t first = peer.find(':');
  if (colon == std::string::npos || colon == first) return peer;
  return peer.substr(0, colon);
}

}  // namespace

// ------------------------------------------------------------------ Attach

// One trainer's stream. Reads are serialized (one outstanding at a time) and
// own run_/session_; the response queue and the finishing state are shared
// with writes and with shutdown, under mu_.
class AttachReactor final
    : public grpc::ServerBidiReactor<v1::AttachRequest, v1::AttachResponse> {
 public:
  AttachReactor(LossGuardServiceImpl* service,
                grpc::CallbackServerContext* context)
      : service_(service), context_(context), peer_(context->peer()) {
    {
      absl::MutexLock lock(&mailbox_->mu);
      mailbox_->reactor = this;
    }
    if (!service_->Register(this)) {
      Abort(ShuttingDown());
      return;
    }
    absl::StatusOr<const auth::Principal*> caller = service_->Caller(context);
    if (!caller.ok()) {
      Log(LogLevel::kWarning, "unauthenticated",
          {{"peer", peer_}, {"reason", std::string(caller.status().message())}});
      Abort(ToGrpc(caller.status()));
      return;
    }
    caller_ = *caller;
    client_ = caller_ != nullptr ? absl::StrCat("token:", caller_->name)
                                 : PeerHost(peer_);
    if (!service_->AcquireStream(client_)) {
      client_.clear();
      Abort(grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          absl::StrFormat("this client has %d Attach streams open, its limit",
                          service_->options().max_streams_per_client)));
      return;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      if (run_ == nullptr) {
        // gRPC says only that the read failed: a half-close, a broken call
        // or a message that does not parse. Before start, each is an error.
        End(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                         "the Attach stream ended before start (or its first "
                         "message does not parse)"),
            /*drain=*/false);
        return;
      }
      // The client half-closed (or the call broke, or sent a message that
      // does not parse, which gRPC does not tell apart): send what is
      // queued, then end with OK. Every step before stays stored.
      End(grpc::Status::OK, /*drain=*/true);
      return;
    }
    {
      // A message that was already in flight when the stream began to end
      // (shutdown, cancel) is not processed.
      absl::MutexLock lock(&mu_);
      if (end_status_) return;
    }
    grpc::Status status = Process();
    if (!status.ok()) {
      End(status, /*drain=*/false);
      return;
    }
    if (defer_read_) {
      defer_read_ = false;  // OnClaimed reads on, maybe already has
      return;
    }
    ReadNext();
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        pending_.clear();
        if (!end_status_) {
          end_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                     "writing to the client failed");
        }
      }
    }
    Pump();
  }

  void OnCancel() override {
    End(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"), false);
  }

  void OnDone() override {
    {
      // Commit callbacks that come later find no reactor.
      absl::MutexLock lock(&mailbox_->mu);
      mailbox_->reactor = nullptr;
    }
    service_->Unregister(this);
    if (!client_.empty()) service_->ReleaseStream(client_);
    if (!claimed_run_.empty()) {
      // The lease goes back (a database round trip) on a worker.
      service_->pool()->Submit(
          [fleet = service_->fleet(), run_id = claimed_run_] {
            fleet->Release(run_id);
          });
    }
    grpc::StatusCode code;
    {
      absl::MutexLock lock(&mu_);
      code = final_code_;
    }
    Log(LogLevel::kInfo, "detach",
        {{"run_id", run_ ? run_->run_id() : ""},
         {"peer", peer_},
         {"steps", steps_},
         {"duplicates", duplicates_},
         {"status", CodeName(code)}});
    delete this;
  }

  // Ends the stream from any thread (shutdown).
  void Abort(const grpc::Status& status) { End(status, /*drain=*/false); }
  // Ends the stream if it serves `run_id` (from any thread).
  void AbortIfRun(const std::string& run_id, const grpc::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      if (attached_run_ == nullptr || attached_run_->run_id() != run_id) return;
    }
    End(status, /*drain=*/false);
  }

 private:
  grpc::Status Process() {
    const v1::AttachRequest& req = request_;
    switch (req.kind_case()) {
      case v1::AttachRequest::kStart:
        return OnStart(req.start());
      case v1::AttachRequest::kSteps:
        return OnSteps(req.steps());
      case v1::AttachRequest::kAck:
        return OnAck(req.ack());
      case v1::AttachRequest::kFinish:
        if (run_ == nullptr) return NotStarted("finish");
        run_->Finish(session_, req.finish().reason());
        Log(LogLevel::kInfo, "finish", {{"run_id", run_->run_id()}});
        return grpc::Status::OK;
      case v1::AttachRequest::KIND_NOT_SET:
        break;
    }
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "an AttachRequest must hold start, steps, ack or "
                        "finish");
  }

  grpc::Status NotStarted(const char* what) {
    return grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("the first message of an Attach stream must be start; "
                     "got ",
                     what));
  }

  grpc::Status OnStart(const v1::RunStart& start) {
    if (run_ != nullptr) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "start sent twice on one Attach stream");
    }
    // A write token of the run's project: the one it is started with (so
    // no run is created for another project), and for a run that exists,
    // the one it was created with (checked on what FindOrCreate returns).
    grpc::Status allowed = LossGuardServiceImpl::Check(caller_, start.project(), true);
    if (!allowed.ok()) return allowed;
    if (runs::Fleet* fleet = service_->fleet(); fleet != nullptr) {
      // The run's lease first (a database round trip, on a worker); reads
      // wait until OnClaimed.
      absl::Status valid =
          runs::ValidateRunStart(start, service_->options().limits);
      if (!valid.ok()) return ToGrpc(valid);
      defer_read_ = true;
      service_->pool()->Submit(
          [fleet, mailbox = mailbox_, run_id = start.run_id()] {
            absl::StatusOr<runs::Fleet::Claim> claim = fleet->Acquire(run_id);
            bool delivered = false;
            {
              absl::MutexLock lock(&mailbox->mu);
              if (mailbox->reactor != nullptr) {
                mailbox->reactor->OnClaimed(claim);
                delivered = true;
              }
            }
            // The stream ended meanwhile: nobody will release it.
            if (!delivered && claim.ok() && claim->ours) fleet->Release(run_id);
          });
      return grpc::Status::OK;
    }
    return Start(request_.start());
  }

  // The fleet's answer to this stream's start (on a worker thread, under
  // the mailbox's lock).
  void OnClaimed(const absl::StatusOr<runs::Fleet::Claim>& claim) {
    const v1::RunStart& start = request_.start();
    if (!claim.ok()) {
      End(ToGrpc(claim.status()), /*drain=*/false);
      return;
    }
    if (!claim->ours) {
      // Served by another live daemon: say where (the C++ and Python
      // clients reconnect there at once; others retry, and a load
      // balancer hashing the run id sends them to the owner).
      {
        // Under mu_: Pump decides to Finish under it, so the trailer is
        // added before any Finish (a cancel may be ending the call).
        absl::MutexLock lock(&mu_);
        if (end_status_) return;
        context_->AddTrailingMetadata(kOwnerMetadata, claim->holder.address);
      }
      Log(LogLevel::kInfo, "redirect",
          {{"run_id", start.run_id()},
           {"peer", peer_},
           {"owner", claim->holder.owner},
           {"address", claim->holder.address}});
      End(grpc::Status(
              grpc::StatusCode::UNAVAILABLE,
              absl::StrFormat("run \"%s\" is served by daemon %s at %s (its "
                              "lease runs %.1f s more); attach there",
                              start.run_id(), claim->holder.owner,
                              claim->holder.address,
                              std::max(0.0, claim->holder.expires_in_s))),
          /*drain=*/false);
      return;
    }
    claimed_run_ = start.run_id();
    grpc::Status s = Start(start);
    if (!s.ok()) {
      End(s, /*drain=*/false);
      return;
    }
    ReadNext();
  }

  // Finds or creates the run and attaches this stream to it.
  grpc::Status Start(const v1::RunStart& start) {
    grpc::Status allowed;
    bool created = false;
    absl::StatusOr<std::shared_ptr<runs::Run>> run =
        service_->registry()->FindOrCreate(start, &created);
    if (!run.ok()) return ToGrpc(run.status());
    allowed = LossGuardServiceImpl::Check(caller_, (*run)->project(), true);
    if (!allowed.ok()) return allowed;
    run_ = std::move(*run);
    v1::AttachResponse resp;
    session_ = run_->Attach(start, resp.mutable_accepted());
    {
      absl::MutexLock lock(&mu_);
      if (end_status_) {
        // The stream began to end (shutdown, cancel) while the run was
        // being found: nobody else will detach it.
        run_->Detach(session_);
        return grpc::Status::OK;
      }
      attached_run_ = run_;
      attached_session_ = session_;
    }
    resp.mutable_accepted()->set_resumed(!created);
    Log(LogLevel::kInfo, "attach",
        {{"run_id", run_->run_id()},
         {"project", start.project()},
         {"mode", v1::Mode_Name(start.mode())},
         {"peer", peer_},
         {"resumed", !created},
         {"last_step", resp.accepted().has_steps()
                           ? nlohmann::json(resp.accepted().last_step())
                           : nlohmann::json(nullptr)}});
    return Enqueue(std::move(resp));
  }

  grpc::Status OnSteps(const v1::StepBatch& batch) {
    if (run_ == nullptr) {
      service_->metrics().BatchRejected();
      return NotStarted("steps");
    }
    const int limit = service_->options().max_batch_steps;
    if (batch.steps_size() > limit) {
      service_->metrics().BatchRejected();
      return grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          absl::StrFormat("a batch of %d steps; at most %d per batch",
                          batch.steps_size(), limit));
    }
    advice_.clear();
    // Written by Ingest before the store can call back.
    auto dups_out = std::make_shared<int64_t>(0);
    const int batch_steps = batch.steps_size();
    {
      absl::MutexLock lock(&mu_);
      ++undurable_batches_;
      in_ingest_ = true;
    }
    const auto started = std::chrono::steady_clock::now();
    // The batch is confirmed (BatchReceived) once the store has made it
    // durable, so the trainer keeps its steps until then; advice goes out
    // at once.
    absl::Status s = run_->Ingest(
        session_, batch, &advice_, dups_out.get(),
        [mailbox = mailbox_, dups_out, batch_steps](
            const absl::Status& status, std::optional<int64_t> last) {
          absl::MutexLock lock(&mailbox->mu);
          if (mailbox->reactor != nullptr) {
            mailbox->reactor->OnDurable(status, last,
                                        batch_steps - *dups_out, *dups_out);
          }
        });
    const int64_t dups = *dups_out;
    if (!s.ok()) {
      {
        absl::MutexLock lock(&mu_);
        --undurable_batches_;  // nothing was queued: no callback comes
        in_ingest_ = false;
      }
      service_->metrics().BatchRejected();
      Log(LogLevel::kWarning, "bad_batch",
          {{"run_id", run_->run_id()}, {"error", std::string(s.message())}});
      return ToGrpc(s);
    }
    service_->metrics().BatchIngested(
        batch.steps_size() - dups, dups,
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started)
            .count());
    steps_ += batch.steps_size() - dups;
    duplicates_ += dups;
    grpc::Status st = grpc::Status::OK;
    for (v1::Advice& a : advice_) {
      Log(LogLevel::kInfo, "advice",
          {{"run_id", run_->run_id()},
           {"advice_id", a.advice_id()},
           {"at_step", a.at_step()},
           {"kind", v1::DiagnosisKind_Name(a.diagnosis().kind())},
           {"action", a.has_action()
                          ? a.action().GetDescriptor()
                                ->FindFieldByNumber(
                                    a.action().kind_case())
                                ->name()
                          : "none"}});
      service_->metrics().AdviceSent(a);
      v1::AttachResponse resp;
      *resp.mutable_advice() = std::move(a);
      if (st.ok()) st = Enqueue(std::move(resp));
    }
    // A confirmation the store gave while Ingest ran (a store that applies
    // at once) goes out after the batch's advice.
    std::deque<v1::AttachResponse> early;
    std::optional<grpc::Status> early_error;
    {
      absl::MutexLock lock(&mu_);
      in_ingest_ = false;
      early.swap(deferred_);
      early_error.swap(deferred_error_);
    }
    if (early_error) return *early_error;
    for (v1::AttachResponse& resp : early) {
      if (st.ok()) st = Enqueue(std::move(resp));
    }
    Pump();
    return st;
  }

  // The store made a batch durable (or gave up on it): confirm it, so the
  // trainer may drop its steps; or end the stream, so it resends them.
  void OnDurable(const absl::Status& status, std::optional<int64_t> last,
                 int64_t accepted, int64_t duplicates) {
    std::optional<grpc::Status> error;
    v1::AttachResponse received;
    if (status.ok()) {
      v1::BatchReceived* r = received.mutable_received();
      r->set_has_steps(last.has_value());
      r->set_last_step(last.value_or(0));
      r->set_accepted(static_cast<int32_t>(accepted));
      r->set_duplicates(static_cast<int32_t>(duplicates));
    } else {
      error = grpc::Status(
          grpc::StatusCode::UNAVAILABLE,
          absl::StrCat("the store could not make the steps durable (",
                       status.message(), "); reconnect and resend them"));
    }
    {
      absl::MutexLock lock(&mu_);
      --undurable_batches_;
      if (in_ingest_) {
        // Inside Ingest, under the run's lock: Pump (which may detach the
        // run) must wait for OnSteps.
        if (error) {
          deferred_error_ = error;
        } else {
          deferred_.push_back(std::move(received));
        }
        return;
      }
      // While the stream drains (the trainer half-closed) confirmations
      // still go out: they are what it waits for. (Enqueue drops anything
      // once the stream is ending.)
      if (!error && (!end_status_ || end_status_->ok())) {
        pending_.push_back(std::move(received));
      }
    }
    if (error) {
      End(*error, /*drain=*/false);
      return;
    }
    Pump();  // sends it, or finishes a drained stream once nothing is owed
  }

  grpc::Status OnAck(const v1::AdviceAck& ack) {
    if (run_ == nullptr) return NotStarted("ack");
    absl::Status s = run_->Ack(session_, ack);
    if (s.ok()) service_->metrics().AckReceived(ack.applied());
    if (absl::IsAborted(s)) return ToGrpc(s);
    if (!s.ok()) {
      // A wrong ack is the client's bug but not worth its run's stream.
      Log(LogLevel::kWarning, "bad_ack",
          {{"run_id", run_->run_id()}, {"error", std::string(s.message())}});
    }
    return grpc::Status::OK;
  }

  // Starts the next read, unless the store is too far behind: then reading
  // resumes when it has caught up (backpressure reaches the trainer through
  // gRPC's flow control; its client buffers). While parked, no operation
  // holds the call, so the stream does not finish until the store's
  // callback has run: the reactor outlives it.
  void ReadNext() {
    const int64_t high = service_->options().max_store_backlog_steps;
    const bool park = service_->store()->Stats().queued_steps > high;
    {
      absl::MutexLock lock(&mu_);
      if (end_status_) return;  // Pump finishes the stream
      read_parked_ = park;
    }
    if (!park) {
      StartRead(&request_);
      return;
    }
    service_->store()->NotifyWhenBacklogBelow(high / 2, [this] {
      bool ending = false;
      {
        absl::MutexLock lock(&mu_);
        read_parked_ = false;
        ending = end_status_.has_value();
      }
      if (ending) {
        Pump();
      } else {
        StartRead(&request_);
      }
    });
  }

  grpc::Status Enqueue(v1::AttachResponse resp) {
    {
      absl::MutexLock lock(&mu_);
      if (end_status_) return grpc::Status::OK;  // ending; dropped
      if (static_cast<int>(pending_.size()) >=
          service_->options().max_queued_responses) {
        return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                            "the client does not read its responses");
      }
      pending_.push_back(std::move(resp));
    }
    Pump();
    return grpc::Status::OK;
  }

  void End(const grpc::Status& status, bool drain) {
    {
      absl::MutexLock lock(&mu_);
      // A stream already ending cleanly may still wait for the store's
      // confirmations; an error (cancel, shutdown) ends that wait, so a
      // failing store cannot hold a call open forever.
      if (end_status_ && !(end_status_->ok() && !status.ok())) return;
      end_status_ = status;
      if (!drain) pending_.clear();
    }
    Pump();
  }

  // Starts the next write, or finishes once nothing is in flight and the
  // stream is ending. Finish is called without mu_ held: once it is called
  // OnDone may delete the reactor on another thread.
  void Pump() {
    std::optional<grpc::Status> finish;
    std::shared_ptr<runs::Run> run;
    uint64_t session = 0;
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || finished_) return;
      if (!pending_.empty()) {
        // The message lives in current_ until OnWriteDone.
        current_ = std::move(pending_.front());
        pending_.pop_front();
        writing_ = true;
        StartWrite(&current_);
        return;
      }
      if (!end_status_ || read_parked_) return;
      // Ending cleanly (the trainer half-closed): its last confirmations
      // come when the store has made the last batches durable.
      if (end_status_->ok() && undurable_batches_ > 0) return;
      finished_ = true;
      final_code_ = end_status_->error_code();
      finish = *end_status_;
      run = attached_run_;
      session = attached_session_;
    }
    // Detached before the client hears the end: a query right after it sees
    // the run DETACHED.
    if (run != nullptr) run->Detach(session);
    Finish(*finish);
  }

  LossGuardServiceImpl* const service_;
  grpc::CallbackServerContext* const context_;
  const std::string peer_;
  const auth::Principal* caller_ = nullptr;  // nullptr: auth is off
  std::string client_;  // what max_streams_per_client counts; empty: none held
  v1::AttachRequest request_;
  // Owned by the read path (one read at a time), set by start.
  std::shared_ptr<runs::Run> run_;
  uint64_t session_ = 0;
  std::vector<v1::Advice> advice_;
  // Fleet: OnStart handed the read on to OnClaimed (read path only); the
  // run whose lease this stream holds, released when it ends (set by
  // OnClaimed under the mailbox's lock, read in OnDone after taking it).
  bool defer_read_ = false;
  std::string claimed_run_;
  int64_t steps_ = 0;
  int64_t duplicates_ = 0;

  absl::Mutex mu_;
  std::deque<v1::AttachResponse> pending_ ABSL_GUARDED_BY(mu_);
  v1::AttachResponse current_ ABSL_GUARDED_BY(mu_);  // being written
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool read_parked_ ABSL_GUARDED_BY(mu_) = false;  // waiting for the store
  std::optional<grpc::Status> end_status_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // The same run and session, for the end of the stream, which may come
  // from another thread (shutdown).
  std::shared_ptr<runs::Run> attached_run_ ABSL_GUARDED_BY(mu_);
  uint64_t attached_session_ ABSL_GUARDED_BY(mu_) = 0;
  grpc::StatusCode final_code_ ABSL_GUARDED_BY(mu_) = grpc::StatusCode::OK;
  // Batches ingested whose durability the store has not reported yet.
  int64_t undurable_batches_ ABSL_GUARDED_BY(mu_) = 0;
  // OnSteps is inside Run::Ingest: a store callback that comes now leaves
  // its confirmation (or error) here for OnSteps.
  bool in_ingest_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<v1::AttachResponse> deferred_ ABSL_GUARDED_BY(mu_);
  std::optional<grpc::Status> deferred_error_ ABSL_GUARDED_BY(mu_);

  // Where the store's commit callbacks find the reactor; cleared in OnDone,
  // so one that comes after the stream ended does nothing. Lock order:
  // mailbox mu, then mu_.
  struct Mailbox {
    absl::Mutex mu;
    AttachReactor* reactor ABSL_GUARDED_BY(mu) = nullptr;
  };
  const std::shared_ptr<Mailbox> mailbox_ = std::make_shared<Mailbox>();
};

grpc::ServerBidiReactor<v1::AttachRequest, v1::AttachResponse>*
LossGuardServiceImpl::Attach(grpc::CallbackServerContext* context) {
  return new AttachReactor(this, context);
}

// ---------------------------------------------------------------- WatchRun

class WatchReactor final : public grpc::ServerWriteReactor<v1::RunEvent> {
 public:
  WatchReactor(LossGuardServiceImpl* service, grpc::CallbackServerContext* context,
               const v1::WatchRunRequest* request)
      : service_(service) {
    if (!service_->Register(this)) {
      Abort(ShuttingDown());
      return;
    }
    absl::StatusOr<const auth::Principal*> caller = service_->Caller(context);
    if (!caller.ok()) {
      Abort(ToGrpc(caller.status()));
      return;
    }
    std::shared_ptr<runs::Run> run = service_->registry()->Find(request->run_id());
    if (grpc::Status s = LossGuardServiceImpl::Readable(run.get(), *caller,
                                                        request->run_id());
        !s.ok()) {
      Abort(s);
      return;
    }
    run_ = std::move(run);
    sink_ = std::make_shared<Sink>(this);
    run_->Subscribe(sink_, request->replay());
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      queue_.clear();
      if (!end_status_) {
        end_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                   "writing to the watcher failed");
      }
    }
    PumpLocked();
  }

  void OnCancel() override {
    Abort(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }

  void OnDone() override {
    if (sink_ != nullptr) {
      sink_->Detach();
      run_->Unsubscribe(sink_.get());
    }
    service_->Unregister(this);
    delete this;
  }

  void Abort(const grpc::Status& status) {
    absl::MutexLock lock(&mu_);
    if (end_status_) return;
    end_status_ = status;
    queue_.clear();
    PumpLocked();
  }

 private:
  // What the run holds: forwards to the reactor while it lives.
  class Sink final : public runs::EventSink {
   public:
    explicit Sink(WatchReactor* r) : reactor_(r) {}
    void OnEvent(const v1::RunEvent& event) override {
      absl::MutexLock lock(&mu_);
      if (reactor_ != nullptr) reactor_->Push(event);
    }
    void OnRunClosed() override {
      absl::MutexLock lock(&mu_);
      if (reactor_ != nullptr) reactor_->Close();
    }
    void Detach() {
      absl::MutexLock lock(&mu_);
      reactor_ = nullptr;
    }

   private:
    absl::Mutex mu_;
    WatchReactor* reactor_ ABSL_GUARDED_BY(mu_);
  };

  void Push(const v1::RunEvent& event) {
    absl::MutexLock lock(&mu_);
    if (end_status_) return;
    if (static_cast<int>(queue_.size()) >=
        service_->options().max_queued_events) {
      end_status_ = grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          "the watcher fell too far behind the run's events; watch again");
      queue_.clear();
    } else {
      queue_.push_back(event);
    }
    PumpLocked();
  }

  void Close() {
    absl::MutexLock lock(&mu_);
    if (!end_status_) end_status_ = grpc::Status::OK;
    PumpLocked();
  }

  void PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_) return;
    if (!queue_.empty()) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      StartWrite(&current_);
      return;
    }
    if (end_status_) {
      finished_ = true;
      Finish(*end_status_);
    }
  }

  LossGuardServiceImpl* const service_;
  std::shared_ptr<runs::Run> run_;
  std::shared_ptr<Sink> sink_;

  absl::Mutex mu_;
  std::deque<v1::RunEvent> queue_ ABSL_GUARDED_BY(mu_);
  v1::RunEvent current_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> end_status_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

grpc::ServerWriteReactor<v1::RunEvent>* LossGuardServiceImpl::WatchRun(
    grpc::CallbackServerContext* context, const v1::WatchRunRequest* request) {
  return new WatchReactor(this, context, request);
}

// ------------------------------------------------------------- the rest

bool LossGuardServiceImpl::Register(AttachReactor* r) {
  absl::MutexLock lock(&mu_);
  if (shutting_down_) return false;
  attaches_.insert(r);
  return true;
}
void LossGuardServiceImpl::Unregister(AttachReactor* r) {
  absl::MutexLock lock(&mu_);
  attaches_.erase(r);
}
bool LossGuardServiceImpl::Register(WatchReactor* r) {
  absl::MutexLock lock(&mu_);
  if (shutting_down_) return false;
  watches_.insert(r);
  return true;
}
void LossGuardServiceImpl::Unregister(WatchReactor* r) {
  absl::MutexLock lock(&mu_);
  watches_.erase(r);
}

void LossGuardServiceImpl::EndRunStreams(const std::string& run_id) {
  absl::MutexLock lock(&mu_);
  for (AttachReactor* r : attaches_) {
    r->AbortIfRun(run_id,
                  grpc::Status(grpc::StatusCode::UNAVAILABLE,
                               absl::StrCat("run \"", run_id,
                                            "\" moved to another daemon of the "
                                            "fleet; reconnect")));
  }
}

void LossGuardServiceImpl::BeginShutdown() {
  absl::MutexLock lock(&mu_);
  shutting_down_ = true;
  // Reactors unregister in OnDone, which needs mu_: they are alive here.
  for (AttachReactor* r : attaches_) r->Abort(ShuttingDown());
  for (WatchReactor* r : watches_) r->Abort(ShuttingDown());
}

grpc::ServerUnaryReactor* LossGuardServiceImpl::GetRunHealth(
    grpc::CallbackServerContext* context,
    const v1::GetRunHealthRequest* request, v1::RunHealth* reply) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<const auth::Principal*> caller = Caller(context);
  if (!caller.ok()) {
    reactor->Finish(ToGrpc(caller.status()));
    return reactor;
  }
  auto answer = [reactor, request, reply,
                 caller = *caller](std::shared_ptr<runs::Run> run) {
    if (grpc::Status s = Readable(run.get(), caller, request->run_id());
        !s.ok()) {
      reactor->Finish(s);
      return;
    }
    *reply = run->Health();
    reactor->Finish(grpc::Status::OK);
  };
  std::shared_ptr<runs::Run> run = registry_->Find(request->run_id());
  if (run == nullptr && fleet_ != nullptr) {
    // A round trip to the store: on a worker.
    pool_->Submit([this, request, answer] {
      answer(FindOrSync(request->run_id()));
    });
    return reactor;
  }
  answer(std::move(run));
  return reactor;
}

grpc::ServerUnaryReactor* LossGuardServiceImpl::ListRuns(
    grpc::CallbackServerContext* context, const v1::ListRunsRequest* request,
    v1::ListRunsResponse* reply) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  int page_size = request->page_size();
  if (page_size < 0 || page_size > 1000) {
    reactor->Finish(grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrFormat("page_size %d; 0 (default 100) to 1000", page_size)));
    return reactor;
  }
  if (page_size == 0) page_size = 100;
  absl::StatusOr<const auth::Principal*> caller = Caller(context);
  if (!caller.ok()) {
    reactor->Finish(ToGrpc(caller.status()));
    return reactor;
  }
  // A token of one project lists that project's runs.
  std::string project = request->project();
  if (*caller != nullptr && (*caller)->project != "*") {
    if (project.empty()) project = (*caller)->project;
    if (grpc::Status s = Check(*caller, project, false); !s.ok()) {
      reactor->Finish(s);
      return reactor;
    }
  }
  std::vector<v1::RunState> states;
  for (int s : request->states()) states.push_back(static_cast<v1::RunState>(s));
  absl::StatusOr<runs::RunRegistry::ListResult> result = registry_->List(
      project, states, page_size, request->page_token());
  if (!result.ok()) {
    reactor->Finish(ToGrpc(result.status()));
    return reactor;
  }
  for (v1::RunSummary& s : result->runs) *reply->add_runs() = std::move(s);
  reply->set_next_page_token(result->next_page_token);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* LossGuardServiceImpl::GetCurve(
    grpc::CallbackServerContext* context, const v1::GetCurveRequest* request,
    v1::Curve* reply) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  int max_points = request->max_points();
  if (max_points == 0) max_points = 2000;
  if (max_points < 4 || max_points > 100000) {
    reactor->Finish(grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrFormat("max_points %d; 0 (default 2000) or 4 to 100000",
                        request->max_points())));
    return reactor;
  }
  absl::StatusOr<const auth::Principal*> caller = Caller(context);
  if (!caller.ok()) {
    reactor->Finish(ToGrpc(caller.status()));
    return reactor;
  }
  const bool whole = request->from_step() == 0 && request->to_step() == 0;
  const int64_t from =
      whole ? std::numeric_limits<int64_t>::min() : request->from_step();
  const int64_t to = request->to_step() == 0
                         ? std::numeric_limits<int64_t>::max()
                         : request->to_step();
  if (from > to) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 "from_step is after to_step"));
    return reactor;
  }
  // Store reads block: they run on the workers.
  pool_->Submit([this, reactor, request, reply, caller = *caller, from, to,
                 max_points] {
    std::shared_ptr<runs::Run> run = FindOrSync(request->run_id());
    if (grpc::Status s = Readable(run.get(), caller, request->run_id());
        !s.ok()) {
      reactor->Finish(s);
      return;
    }
    const v1::RunSummary summary = run->Summary();
    reply->set_run_id(run->run_id());
    if (!summary.has_steps()) {
      reactor->Finish(grpc::Status::OK);
      return;
    }
    // Steps the run has taken may still be queued for the store: wait for
    // them (bounded by the backlog cap), so the curve reaches last_step. A
    // failed write is the store's to report (Stats, logs); the curve shows
    // what was stored.
    store_->Flush().IgnoreError();
    // The sampler's buckets span the steps the range really holds.
    int64_t first = from;
    absl::Status s = store_->ReadSteps(run->run_id(), from, to,
                                       [&](const storage::StepRow& row) {
                                         first = row.step;
                                         return false;
                                       });
    const int64_t last = std::min(to, summary.last_step());
    if (s.ok() && first <= last) {
      runs::CurveSampler sampler(first, last, max_points);
      s = store_->ReadSteps(run->run_id(), first, last,
                            [&](const storage::StepRow& row) {
                              sampler.Add(row);
                              return true;
                            });
      reply->set_total_points(sampler.points_seen());
      for (const storage::StepRow& row : sampler.Finish()) {
        v1::CurvePoint* p = reply->add_points();
        p->set_step(row.step);
        p->set_lr(row.lr);
        p->set_loss(row.loss);
        if (row.val_loss) p->set_val_loss(*row.val_loss);
        if (row.grad_norm) p->set_grad_norm(*row.grad_norm);
      }
    }
    if (!s.ok()) {
      reactor->Finish(ToGrpc(s));
      return;
    }
    std::vector<v1::Diagnosis> diagnoses;
    std::vector<v1::Advice> advice;
    run->Markers(from, to, &diagnoses, &advice);
    for (v1::Diagnosis& d : diagnoses) *reply->add_diagnoses() = std::move(d);
    for (v1::Advice& a : advice) *reply->add_advice() = std::move(a);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* LossGuardServiceImpl::AnalyzeCurve(
    grpc::CallbackServerContext* context,
    const v1::AnalyzeCurveRequest* request, v1::AnalyzeCurveResponse* reply) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // Stateless, but it costs CPU: any valid token.
  if (absl::StatusOr<const auth::Principal*> caller = Caller(context); !caller.ok()) {
    reactor->Finish(ToGrpc(caller.status()));
    return reactor;
  }
  pool_->Submit([this, reactor, request, reply] {
    policy::Advisor advisor(options_->run.analyzer, options_->run.policy);
    std::vector<analyzers::Diagnosis> decided;
    uint64_t next_id = 1;
    for (const v1::Step& step : request->steps()) {
      decided.clear();
      absl::Status s = advisor.Feed(wire::FromProto(step), &decided);
      if (!s.ok()) {
        reactor->Finish(ToGrpc(s));
        return;
      }
      advisor.TakeDue(&decided);
      for (const analyzers::Diagnosis& d : decided) {
        if (d.kind == analyzers::DiagnosisKind::kLossSpike) {
          *reply->add_events() = wire::ToProto(d);
          continue;
        }
        *reply->add_diagnoses() = wire::ToProto(d);
        policy::Advice a = advisor.Decide(d);
        if (request->mode() == v1::OBSERVE) a.action = policy::ActionKind::kNone;
        advisor.Record(d, a);
        *reply->add_advice() = wire::ToProto(a, d, next_id++);
      }
    }
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* LossGuardServiceImpl::SuggestLearningRate(
    grpc::CallbackServerContext* context,
    const v1::SuggestLearningRateRequest* request, v1::LrSuggestion* reply) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // Stateless, but it costs CPU: any valid token.
  if (absl::StatusOr<const auth::Principal*> caller = Caller(context); !caller.ok()) {
    reactor->Finish(ToGrpc(caller.status()));
    return reactor;
  }
  pool_->Submit([reactor, request, reply] {
    std::vector<double> lrs;
    std::vector<double> losses;
    lrs.reserve(request->steps_size());
    losses.reserve(request->steps_size());
    for (const v1::Step& step : request->steps()) {
      lrs.push_back(step.lr());
      losses.push_back(step.loss());
    }
    // (Errors name a point by its index in `steps`.)
    absl::StatusOr<analyzers::LrSuggestion> s =
        analyzers::SuggestLearningRate(lrs, losses);
    if (!s.ok()) {
      reactor->Finish(ToGrpc(s.status()));
      return;
    }
    *reply = wire::ToProto(*s);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

// ------------------------------------------------------------------ Daemon

namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  if (in) ss << in.rdbuf();
  if (!in || ss.str().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, ": cannot read it"));
  }
  if (ss.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, ": not a PEM file"));
  }
  return ss.str();
}

// Plaintext, TLS, or TLS with client certificates, from the options.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const ServerOptions& o) {
  if (o.tls_cert_file.empty() && o.tls_key_file.empty()) {
    if (!o.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca needs --tls_cert and --tls_key (mTLS is TLS with client "
          "certificates)");
    }
    return grpc::InsecureServerCredentials();
  }
  if (o.tls_cert_file.empty() || o.tls_key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs both --tls_cert and --tls_key");
  }
  absl::StatusOr<std::string> cert = ReadPem(o.tls_cert_file, "--tls_cert");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPem(o.tls_key_file, "--tls_key");
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  if (!o.tls_client_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadPem(o.tls_client_ca_file, "--tls_client_ca");
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    ssl.client_certificate_request =
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  ssl.pem_key_cert_pairs.push_back({*key, *cert});
  return grpc::SslServerCredentials(ssl);
}

bool IsLoopback(const std::string& listen) {
  return absl::StartsWith(listen, "127.") || absl::StartsWith(listen, "localhost:") ||
         absl::StartsWith(listen, "[::1]:");
}

// `options` with the runs' alert hook pointing at the daemon's alerter.
ServerOptions WithAlertHook(ServerOptions options, Alerter* const* alerter) {
  if (!options.alert_webhook.empty()) {
    options.run.on_alert = [alerter](const runs::Alert& a) {
      if (*alerter != nullptr) (*alerter)->Enqueue(a);
    };
  }
  return options;
}

// Where trainers reach a daemon listening on `listen` at `port`: the
// listen host, or this machine's name when it listens on every address.
std::string AdvertisedAddress(const std::string& listen, int port) {
  std::string host = listen.substr(0, listen.rfind(':'));
  if (host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::") {
    char name[256] = {};
    host = gethostname(name, sizeof(name) - 1) == 0 ? name : "localhost";
  }
  return absl::StrCat(host, ":", port);
}

}  // namespace

Daemon::Daemon(const ServerOptions& options, storage::RunStore* store,
               runs::Clock* clock)
    : options_(WithAlertHook(options, &alerter_raw_)),
      store_(store),
      clock_(clock) {
  registry_ = std::make_unique<runs::RunRegistry>(&options_.run,
                                                  options_.limits, store_,
                                                  clock_);
}

int Daemon::http_port() const { return http_ ? http_->port() : 0; }

Daemon::~Daemon() {
  if (running_) Shutdown().IgnoreError();
}

absl::Status Daemon::Start() {
  absl::Status s = analyzers::ValidateOptions(options_.run.analyzer);
  if (!s.ok()) return s;
  if (!options_.alert_webhook.empty()) {
    s = Alerter::ValidateUrl(options_.alert_webhook);
    if (!s.ok()) return s;
    AlerterOptions ao;
    ao.url = options_.alert_webhook;
    ao.max_attempts = std::max(1, options_.alert_max_attempts);
    ao.initial_backoff = absl::Seconds(options_.alert_initial_backoff_s);
    alerter_ = std::make_unique<Alerter>(ao);
    alerter_raw_ = alerter_.get();
  }
  if (store_->leases() != nullptr) {
    // One of a fleet sharing the store: every run starts as a read-only
    // copy; a trainer attaching here takes its run over (Fleet::Acquire).
    runs::FleetOptions fo;
    fo.replica_id = options_.replica_id;
    fo.lease_s = options_.lease_s;
    fo.renew_every_s = options_.lease_s / 3;
    fo.sync_every_s = options_.fleet_sync_s;
    if (!(fo.lease_s > 0) || !(fo.sync_every_s > 0)) {
      return absl::InvalidArgumentError("lease_s and fleet_sync_s must be > 0");
    }
    fleet_ = std::make_unique<runs::Fleet>(
        fo, registry_.get(), store_, [this](const std::string& run_id) {
          Log(LogLevel::kWarning, "lease_lost", {{"run_id", run_id}});
          if (service_ != nullptr) service_->EndRunStreams(run_id);
        });
    s = fleet_->Load();
    if (!s.ok()) return s;
    Log(LogLevel::kInfo, "fleet_loaded", {{"runs", registry_->size()}});
  } else {
    s = registry_->Recover();
    if (!s.ok()) return s;
    Log(LogLevel::kInfo, "recovered", {{"runs", registry_->size()}});
  }

  static std::once_flag reflection_once;
  std::call_once(reflection_once, [] {
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  });
  grpc::EnableDefaultHealthCheckService(true);

  service_ = std::make_unique<LossGuardServiceImpl>(&options_, registry_.get(),
                                                    store_, clock_);
  service_->set_fleet(fleet_.get());
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds =
      ServerCredentials(options_);
  if (!creds.ok()) {
    service_.reset();
    return creds.status();
  }
  if (options_.auth.has_value() && options_.tls_cert_file.empty() &&
      !IsLoopback(options_.listen)) {
    Log(LogLevel::kWarning, "tokens_in_plaintext",
        {{"listen", options_.listen},
         {"hint", "tokens cross the network unencrypted: add --tls_cert and --tls_key"}});
  }
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.listen, *creds, &port_);
  // Clients ping every 30 s to find a vanished daemon; allow it.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.SetMaxReceiveMessageSize(options_.max_message_bytes);
  builder.SetMaxSendMessageSize(options_.max_message_bytes);
  builder.RegisterService(service_.get());
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    service_.reset();
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options_.listen));
  }
  if (!options_.http_listen.empty()) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(options_.max_message_bytes);
    http_ = std::make_unique<HttpFrontend>(
        server_->InProcessChannel(args),
        [service = service_.get()](std::string_view authorization) {
          return service->AuthorizeFleetRead(authorization);
        },
        [service = service_.get(), alerter = alerter_.get()] {
          std::string m = service->RenderMetrics();
          if (alerter != nullptr) {
            absl::StrAppend(
                &m,
                "# HELP lossguard_alerts_total Webhook alerts: sent, failed "
                "(gave up after retries) or dropped (queue full).\n"
                "# TYPE lossguard_alerts_total counter\n",
                "lossguard_alerts_total{result=\"sent\"} ", alerter->sent(), "\n",
                "lossguard_alerts_total{result=\"failed\"} ", alerter->failed(), "\n",
                "lossguard_alerts_total{result=\"dropped\"} ", alerter->dropped(), "\n");
          }
          return m;
        });
    // The HTTP port speaks TLS (and asks for client certificates) exactly
    // when the gRPC port does.
    s = http_->Start(options_.http_listen, {.cert_file = options_.tls_cert_file,
                                            .key_file = options_.tls_key_file,
                                            .client_ca_file = options_.tls_client_ca_file});
    if (!s.ok()) {
      http_.reset();
      // Trainers may have attached already: end their streams, then stop.
      service_->BeginShutdown();
      server_->Shutdown(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(
                            options_.shutdown_grace_s * 1000)));
      server_->Wait();
      service_->StopWorkers();
      server_.reset();
      service_.reset();
      return s;
    }
    Log(LogLevel::kInfo, "http_listening",
        {{"http", options_.http_listen}, {"port", http_->port()}});
  }
  if (fleet_ != nullptr) {
    const std::string address = options_.advertise.empty()
                                    ? AdvertisedAddress(options_.listen, port_)
                                    : options_.advertise;
    fleet_->Start(address);
    Log(LogLevel::kInfo, "fleet_member",
        {{"replica_id", fleet_->replica_id()}, {"address", address}});
  }
  server_->GetHealthCheckService()->SetServingStatus(kServiceName, true);
  running_ = true;
  Log(LogLevel::kInfo, "listening",
      {{"listen", options_.listen}, {"port", port_}});
  return absl::OkStatus();
}

absl::Status Daemon::Shutdown() {
  if (!running_) return store_->Flush();
  running_ = false;
  Log(LogLevel::kInfo, "shutting_down", nullptr);
  server_->GetHealthCheckService()->SetServingStatus(kServiceName, false);
  if (http_ != nullptr) http_->Stop();
  service_->BeginShutdown();
  const auto deadline =
      std::chrono::system_clock::now() +
      std::chrono::milliseconds(
          static_cast<int64_t>(options_.shutdown_grace_s * 1000));
  server_->Shutdown(deadline);
  Log(LogLevel::kDebug, "server_shutdown_returned", nullptr);
  server_->Wait();
  Log(LogLevel::kDebug, "server_wait_returned", nullptr);
  service_->StopWorkers();
  if (alerter_ != nullptr) alerter_->Stop();  // sends what is queued
  absl::Status s = store_->Flush();
  // Every run's steps are stored: other daemons may take them over now.
  if (fleet_ != nullptr) fleet_->Stop();
  Log(LogLevel::kInfo, "stopped",
      {{"store", s.ok() ? "ok" : std::string(s.message())}});
  return s;
}

}  // namespace lossguard::service
