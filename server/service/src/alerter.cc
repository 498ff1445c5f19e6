#include "server/service/src/alerter.h"

#include <httplib.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "lossguard/service/log.h"

namespace lossguard::service {
namespace {

// scheme://host[:port], path (default "/").
// The host is a name or an IPv4 address (no user info), the port, when
// given, 1 to 65535.
bool SplitUrl(const std::string& url, std::string* base, std::string* path) {
  static const std::regex kUrl(
      R"(^(https?://[A-Za-z0-9.-]+(:([0-9]{1,5}))?)(/[^\s#]*)?$)");
  std::smatch m;
  if (!std::regex_match(url, m, kUrl)) return false;
  if (m[3].matched) {
    const int port = std::stoi(m[3].str());  // at most 5 digits
    if (port < 1 || port > 65535) return false;
  }
  *base = m[1].str();
  *path = m[4].matched ? m[4].str() : "/";
  return true;
}

std::string Lower(const std::string& s) { return absl::AsciiStrToLower(s); }

std::string ActionText(const v1::Action& a) {
  switch (a.kind_case()) {
    case v1::Action::kScaleLr:
      return absl::StrFormat("scale the LR x%g", a.scale_lr().factor());
    case v1::Action::kSetLr:
      return absl::StrFormat("set the LR to %g", a.set_lr().lr());
    case v1::Action::kRestartCosine:
      return absl::StrFormat("restart the cosine cycle at %g",
                             a.restart_cosine().eta_max());
    case v1::Action::kEnableGradClip:
      return absl::StrFormat("clip gradients at %g", a.enable_grad_clip().max_norm());
    case v1::Action::kEarlyStop:
      return "stop early";
    case v1::Action::kRampLr:
      return absl::StrFormat("ramp the LR x%g per step for %d steps",
                             a.ramp_lr().factor_per_step(), a.ramp_lr().steps());
    case v1::Action::KIND_NOT_SET:
      break;
  }
  return "none";
}

// A number JSON can hold (NaN and inf become null).
nlohmann::json Num(double x) {
  return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr);
}

}  // namespace

absl::Status Alerter::ValidateUrl(const std::string& url) {
  std::string base, path;
  if (!SplitUrl(url, &base, &path)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "alert webhook \"", url, "\": expected http(s)://host[:port][/path]"));
  }
  return absl::OkStatus();
}

Alerter::Alerter(AlerterOptions options) : options_(std::move(options)) {
  if (!SplitUrl(options_.url, &scheme_host_port_, &path_)) {
    scheme_host_port_.clear();  // ValidateUrl first; nothing will be sent
  }
  thread_ = std::thread([this] { Loop(); });
}

Alerter::~Alerter() { Stop(absl::ZeroDuration()); }

std::string Alerter::Body(const runs::Alert& a) {
  const v1::RunSummary& s = a.summary;
  const bool unhealthy = a.kind == runs::Alert::Kind::kRunUnhealthy;
  nlohmann::ordered_json j;
  j["event"] = unhealthy ? "run_unhealthy" : "action_applied";
  j["time"] = a.time;
  const std::string kind = Lower(v1::DiagnosisKind_Name(a.diagnosis.kind()));
  if (unhealthy) {
    j["text"] = absl::StrFormat(
        "lossguard: run %s%s is UNHEALTHY at step %d: %s (%s)", s.run_id(),
        s.project().empty() ? "" : absl::StrCat(" (", s.project(), ")"),
        s.last_step(), kind, a.diagnosis.evidence());
  } else {
    j["text"] = absl::StrFormat(
        "lossguard: run %s%s applied \"%s\" at step %d for %s",
        s.run_id(),
        s.project().empty() ? "" : absl::StrCat(" (", s.project(), ")"),
        ActionText(a.advice.advice().action()), a.advice.advice().at_step(),
        kind);
  }
  j["run"] = {{"run_id", s.run_id()},
              {"name", s.name()},
              {"project", s.project()},
              {"state", Lower(v1::RunState_Name(s.state()))},
              {"step", s.last_step()},
              {"loss", Num(s.last_loss())},
              {"val_loss", s.has_last_val_loss() ? Num(s.last_val_loss())
                                                 : nlohmann::json(nullptr)},
              {"lr", Num(s.last_lr())}};
  j["diagnosis"] = {{"kind", kind},
                    {"step", a.diagnosis.step()},
                    {"onset", a.diagnosis.onset()},
                    {"severity", a.diagnosis.severity()},
                    {"confidence", a.diagnosis.confidence()},
                    {"evidence", a.diagnosis.evidence()}};
  if (!unhealthy) {
    const v1::Advice& adv = a.advice.advice();
    j["advice"] = {{"advice_id", adv.advice_id()},
                   {"at_step", adv.at_step()},
                   {"action", ActionText(adv.action())},
                   {"restore_checkpoint", adv.action().restore_checkpoint()},
                   {"explanation", adv.explanation()},
                   {"ack_reason", a.advice.ack_reason()}};
  }
  return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

void Alerter::Enqueue(const runs::Alert& alert) {
  std::string body = Body(alert);
  absl::MutexLock lock(&mu_);
  if (stopping_) return;
  if (static_cast<int>(queue_.size()) >= options_.max_queued) {
    queue_.pop_front();
    dropped_.fetch_add(1);
  }
  queue_.push_back(std::move(body));
}

void Alerter::Stop(absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    if (!thread_.joinable()) return;
    stopping_ = true;
    drain_deadline_ = absl::Now() + grace;
  }
  thread_.join();
}

bool Alerter::Post(const std::string& body, bool* retry) {
  *retry = false;
  if (scheme_host_port_.empty()) return false;
  try {
    return PostOnce(body, retry);
  } catch (const std::exception& e) {  // a library error must not end the daemon
    Log(LogLevel::kWarning, "alert_failed", {{"url", options_.url}, {"error", e.what()}});
    return false;
  }
}

bool Alerter::PostOnce(const std::string& body, bool* retry) {
  httplib::Client client(scheme_host_port_);
  const int64_t us = absl::ToInt64Microseconds(options_.timeout);
  client.set_connection_timeout(us / 1000000, us % 1000000);
  client.set_read_timeout(us / 1000000, us % 1000000);
  client.set_write_timeout(us / 1000000, us % 1000000);
  httplib::Result r = client.Post(path_, body, "application/json");
  if (!r) {
    *retry = true;
    Log(LogLevel::kWarning, "alert_failed",
        {{"url", options_.url}, {"error", httplib::to_string(r.error())}});
    return false;
  }
  if (r->status >= 200 && r->status < 300) return true;
  *retry = r->status == 429 || r->status >= 500;
  Log(LogLevel::kWarning, "alert_failed",
      {{"url", options_.url}, {"status", r->status}});
  return false;
}

void Alerter::Loop() {
  std::mt19937_64 rng(std::random_device{}());
  for (;;) {
    std::string body;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Alerter* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(a->mu_) {
            return a->stopping_ || !a->queue_.empty();
          },
          this));
      if (queue_.empty()) return;
      if (stopping_ && absl::Now() >= drain_deadline_) {
        // Out of time: what is left is dropped, and counted.
        dropped_.fetch_add(static_cast<int64_t>(queue_.size()));
        queue_.clear();
        return;
      }
      body = std::move(queue_.front());
      queue_.pop_front();
    }
    absl::Duration backoff = options_.initial_backoff;
    for (int attempt = 1;; ++attempt) {
      bool retry = false;
      if (Post(body, &retry)) {
        sent_.fetch_add(1);
        break;
      }
      bool stopping;
      {
        absl::MutexLock lock(&mu_);
        stopping = stopping_;
      }
      if (!retry || attempt >= options_.max_attempts || stopping) {
        failed_.fetch_add(1);
        break;
      }
      retries_.fetch_add(1);
      // Jittered exponential backoff; Stop() cuts the wait short.
      std::uniform_real_distribution<double> jitter(0.5, 1.0);
      const absl::Duration wait = backoff * jitter(rng);
      backoff = std::min(backoff * 2, options_.max_backoff);
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&stopping_), wait);
    }
  }
}

}  // namespace lossguard::service
