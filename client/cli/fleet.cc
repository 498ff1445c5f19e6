#include "client/cli/fleet.h"

#include "grpc/health/v1/health.grpc.pb.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "lossguard/client/client.h"
#include "lossguard/curvefile/curve_csv.h"

namespace lossguard::cli {
namespace {

// The gRPC status as an absl::Status that says which daemon was asked.
absl::Status FromGrpc(const grpc::Status& s, const std::string& server,
                      const std::string& what) {
  const auto code = static_cast<absl::StatusCode>(s.error_code());
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE ||
      s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    return absl::Status(code, absl::StrCat("cannot reach lossguardd at ",
                                           server, " (", what,
                                           "): ", s.error_message()));
  }
  return absl::Status(code, absl::StrCat("lossguardd at ", server, ": ", what,
                                         ": ", s.error_message()));
}

void SetDeadline(grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    absl::ToChronoMilliseconds(kCallTimeout));
}

// "UNHEALTHY" -> "unhealthy", "AT_RISK" -> "at_risk".
std::string Lower(const std::string& name) { return absl::AsciiStrToLower(name); }

std::string StateName(v1::RunState s) { return Lower(v1::RunState_Name(s)); }
std::string KindName(v1::DiagnosisKind k) {
  return Lower(v1::DiagnosisKind_Name(k));
}
std::string ModeName(v1::Mode m) { return Lower(v1::Mode_Name(m)); }

nlohmann::ordered_json ProtoJson(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  std::string text;
  (void)google::protobuf::util::MessageToJsonString(m, &text, o);
  return nlohmann::ordered_json::parse(text);
}

std::string Dump(const nlohmann::ordered_json& j, int indent) {
  return j.dump(indent, ' ', false,
                nlohmann::ordered_json::error_handler_t::replace);
}

// A number for a table cell: 4 significant digits, "-" for none.
std::string Num(double x) { return absl::StrFormat("%.4g", x); }

// Columns padded to their widest cell; the last column is not padded.
std::string Table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& r : rows) {
    if (width.size() < r.size()) width.resize(r.size(), 0);
    for (size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  }
  std::string out;
  for (const auto& r : rows) {
    for (size_t i = 0; i < r.size(); ++i) {
      out += r[i];
      if (i + 1 < r.size()) out += std::string(width[i] - r[i].size() + 2, ' ');
    }
    out += "\n";
  }
  return out;
}

std::string ActionText(const v1::Action& a) {
  std::string s;
  switch (a.kind_case()) {
    case v1::Action::kScaleLr:
      s = absl::StrFormat("LR x%g", a.scale_lr().factor());
      break;
    case v1::Action::kSetLr:
      s = absl::StrFormat("LR = %g", a.set_lr().lr());
      break;
    case v1::Action::kRestartCosine:
      s = absl::StrFormat("cosine restart (eta_max %g, t_0 %d)",
                          a.restart_cosine().eta_max(), a.restart_cosine().t_0());
      break;
    case v1::Action::kEnableGradClip:
      s = absl::StrFormat("clip at %g", a.enable_grad_clip().max_norm());
      break;
    case v1::Action::kEarlyStop:
      s = "early stop";
      break;
    case v1::Action::kRampLr:
      s = absl::StrFormat("LR ramp x%g/step for %d steps", a.ramp_lr().factor_per_step(),
                          a.ramp_lr().steps());
      break;
    case v1::Action::KIND_NOT_SET:
      s = "no action";
      break;
  }
  if (a.grad_clip_max_norm() > 0 && a.kind_case() != v1::Action::kEnableGradClip) {
    absl::StrAppendFormat(&s, " + clip at %g", a.grad_clip_max_norm());
  }
  if (a.restore_checkpoint()) s += " + restore checkpoint";
  return s;
}

std::string AdviceStatusName(v1::AdviceStatus s) {
  return Lower(v1::AdviceStatus_Name(s));
}
std::string OutcomeName(v1::Outcome o) { return Lower(v1::Outcome_Name(o)); }

absl::StatusOr<v1::RunHealth> GetHealth(v1::LossGuard::StubInterface& stub,
                                        const std::string& server,
                                        const std::string& run_id) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  v1::GetRunHealthRequest req;
  req.set_run_id(run_id);
  v1::RunHealth health;
  grpc::Status s = stub.GetRunHealth(&ctx, req, &health);
  if (!s.ok()) return FromGrpc(s, server, absl::StrCat("run ", run_id));
  return health;
}

// One event as a line of text.
std::string EventLine(const v1::RunEvent& e) {
  std::string head = absl::StrFormat("step %-8d ", e.step());
  switch (e.kind_case()) {
    case v1::RunEvent::kDiagnosis: {
      const v1::Diagnosis& d = e.diagnosis();
      return absl::StrFormat(
          "%s%s (onset %d, severity %.2f, confidence %.2f): %s", head,
          KindName(d.kind()), d.onset(), d.severity(), d.confidence(),
          d.evidence());
    }
    case v1::RunEvent::kAdvice: {
      const v1::Advice& a = e.advice();
      return absl::StrFormat("%sadvice #%d: %s. %s", head, a.advice_id(),
                             a.has_action() ? ActionText(a.action())
                                            : std::string("no action"),
                             a.explanation());
    }
    case v1::RunEvent::kAck:
      return absl::StrFormat("%sadvice #%d %s%s", head, e.ack().advice_id(),
                             e.ack().applied() ? "applied" : "rejected",
                             e.ack().reason().empty()
                                 ? ""
                                 : absl::StrCat(": ", e.ack().reason()));
    case v1::RunEvent::kOutcome:
      return absl::StrFormat("%sadvice #%d outcome %s: %s", head,
                             e.outcome().advice_id(),
                             OutcomeName(e.outcome().outcome()),
                             e.outcome().evidence());
    case v1::RunEvent::kState:
      return absl::StrFormat("%sstate %s", head, StateName(e.state().state()));
    case v1::RunEvent::KIND_NOT_SET:
      break;
  }
  return head + "(unknown event)";
}

// --- SVG -------------------------------------------------------------------

std::string Esc(const std::string& s) {
  return absl::StrReplaceAll(s, {{"&", "&amp;"},
                                 {"<", "&lt;"},
                                 {">", "&gt;"},
                                 {"\"", "&quot;"}});
}

// Colours of the diagnosis kinds (also used by the dashboard).
std::string KindColour(v1::DiagnosisKind k) {
  switch (k) {
    case v1::DIVERGENCE:
      return "#d62728";
    case v1::OSCILLATION:
      return "#ff7f0e";
    case v1::STAGNATION:
      return "#9467bd";
    case v1::OVERFITTING:
      return "#8c564b";
    case v1::GRADIENT_EXPLOSION:
      return "#e377c2";
    default:
      return "#7f7f7f";
  }
}

// A value axis: linear or log10, mapping [lo, hi] onto [bottom, top] px.
struct Axis {
  double lo = 0, hi = 1;
  bool log = false;
  double top = 0, bottom = 1;
  double Map(double v) const {
    const double a = log ? std::log10(v) : v;
    const double l = log ? std::log10(lo) : lo;
    const double h = log ? std::log10(hi) : hi;
    const double f = h > l ? (a - l) / (h - l) : 0.5;
    return bottom - f * (bottom - top);
  }
  // Tick values: decades (with 2 and 5 when few) in log scale, 1-2-5 steps
  // in linear scale.
  std::vector<double> Ticks() const {
    std::vector<double> t;
    if (log) {
      const int d0 = static_cast<int>(std::floor(std::log10(lo)));
      const int d1 = static_cast<int>(std::ceil(std::log10(hi)));
      const bool fine = d1 - d0 <= 2;
      for (int d = d0; d <= d1; ++d) {
        for (double m : fine ? std::vector<double>{1, 2, 5} : std::vector<double>{1}) {
          const double v = m * std::pow(10.0, d);
          if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) t.push_back(v);
        }
      }
      return t;
    }
    const double span = hi - lo;
    if (!(span > 0)) return {lo};
    const double raw = span / 6;
    const double p = std::pow(10.0, std::floor(std::log10(raw)));
    const double step = raw / p < 1.5 ? p : raw / p < 3.5 ? 2 * p : raw / p < 7.5 ? 5 * p : 10 * p;
    for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) {
      t.push_back(std::fabs(v) < 1e-12 * span ? 0.0 : v);
    }
    return t;
  }
};

// [lo, hi] of the finite (and, for log axes, positive) values.
std::pair<double, double> Range(const std::vector<double>& v, bool log) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (double x : v) {
    if (!std::isfinite(x) || (log && x <= 0)) continue;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  if (!std::isfinite(lo)) return {log ? 0.1 : 0.0, 1.0};
  if (hi <= lo) {
    if (log) return {lo / 2, hi * 2};
    return {lo - 0.5 * std::max(1.0, std::fabs(lo)), hi + 0.5 * std::max(1.0, std::fabs(hi))};
  }
  if (log) return {lo / 1.15, hi * 1.15};
  const double pad = 0.05 * (hi - lo);
  return {lo - pad, hi + pad};
}

// A polyline path through the finite points; a non-finite value breaks it.
std::string Path(const std::vector<std::pair<double, double>>& xy) {
  std::string d;
  bool pen = false;
  for (const auto& [x, y] : xy) {
    if (!std::isfinite(x) || !std::isfinite(y)) {
      pen = false;
      continue;
    }
    absl::StrAppendFormat(&d, "%s%.1f,%.1f ", pen ? "L" : "M", x, y);
    pen = true;
  }
  return d;
}

}  // namespace

absl::StatusOr<std::unique_ptr<v1::LossGuard::StubInterface>> ConnectTo(
    const std::string& server, const Credentials& credentials) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      CreateChannel(server, credentials, grpc::ChannelArguments());
  if (!channel.ok()) return channel.status();
  return std::unique_ptr<v1::LossGuard::StubInterface>(v1::LossGuard::NewStub(*channel));
}

absl::StatusOr<std::string> Probe(const std::string& server,
                                  const Credentials& credentials,
                                  const std::string& service, bool json) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      CreateChannel(server, credentials, grpc::ChannelArguments());
  if (!channel.ok()) return channel.status();
  std::unique_ptr<grpc::health::v1::Health::Stub> stub =
      grpc::health::v1::Health::NewStub(*channel);
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  grpc::Status s = stub->Check(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s, server, "health check");
  const std::string status =
      grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status());
  if (resp.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    return absl::UnavailableError(
        absl::StrCat(server, ": ", service.empty() ? "the server" : service,
                     " is ", status));
  }
  if (json) {
    return nlohmann::json({{"service", service}, {"status", status}}).dump() +
           "\n";
  }
  return status + "\n";
}

absl::StatusOr<std::string> Runs(v1::LossGuard::StubInterface& stub,
                                 const std::string& server,
                                 const RunsQuery& query, bool json) {
  std::vector<v1::RunSummary> runs;
  std::string token;
  do {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    v1::ListRunsRequest req;
    req.set_project(query.project);
    for (v1::RunState s : query.states) req.add_states(s);
    req.set_page_size(1000);
    req.set_page_token(token);
    v1::ListRunsResponse resp;
    grpc::Status s = stub.ListRuns(&ctx, req, &resp);
    if (!s.ok()) return FromGrpc(s, server, "list runs");
    for (v1::RunSummary& r : *resp.mutable_runs()) runs.push_back(std::move(r));
    token = resp.next_page_token();
  } while (!token.empty());

  if (json) {
    nlohmann::ordered_json j;
    j["server"] = server;
    j["runs"] = nlohmann::ordered_json::array();
    for (const v1::RunSummary& r : runs) j["runs"].push_back(ProtoJson(r));
    return Dump(j, 2) + "\n";
  }
  std::vector<std::vector<std::string>> rows = {
      {"RUN", "PROJECT", "STATE", "STEP", "LOSS", "VAL_LOSS", "LR", "ACTIVE"}};
  for (const v1::RunSummary& r : runs) {
    std::vector<std::string> active;
    for (int k : r.active()) active.push_back(KindName(static_cast<v1::DiagnosisKind>(k)));
    rows.push_back({r.run_id(), r.project().empty() ? "-" : r.project(),
                    StateName(r.state()),
                    r.has_steps() ? absl::StrCat(r.last_step()) : "-",
                    r.has_steps() ? Num(r.last_loss()) : "-",
                    r.has_last_val_loss() ? Num(r.last_val_loss()) : "-",
                    r.has_steps() ? Num(r.last_lr()) : "-",
                    active.empty() ? "-" : absl::StrJoin(active, ",")});
  }
  std::map<std::string, int> by_state;
  for (const v1::RunSummary& r : runs) ++by_state[StateName(r.state())];
  std::vector<std::string> counts;
  for (const auto& [state, n] : by_state) counts.push_back(absl::StrCat(n, " ", state));
  return absl::StrCat(Table(rows), runs.size(), runs.size() == 1 ? " run" : " runs",
                      counts.empty() ? "" : absl::StrCat(": ", absl::StrJoin(counts, ", ")),
                      "\n");
}

absl::StatusOr<std::string> Health(v1::LossGuard::StubInterface& stub,
                                   const std::string& server,
                                   const std::string& run_id, bool json) {
  absl::StatusOr<v1::RunHealth> h = GetHealth(stub, server, run_id);
  if (!h.ok()) return h.status();
  if (json) return Dump(ProtoJson(*h), 2) + "\n";
  const v1::RunSummary& s = h->summary();
  const v1::RunConfig& c = h->config();
  std::string out = absl::StrFormat("run       %s%s\n", s.run_id(),
                                    s.name().empty() || s.name() == s.run_id()
                                        ? ""
                                        : absl::StrCat(" (", s.name(), ")"));
  absl::StrAppendFormat(&out, "project   %s\n", s.project().empty() ? "-" : s.project());
  absl::StrAppendFormat(&out, "state     %s (mode %s)\n", StateName(s.state()),
                        ModeName(s.mode()));
  if (s.has_steps()) {
    absl::StrAppendFormat(&out, "last      step %d, loss %s, %sLR %s (%d steps stored)\n",
                          s.last_step(), Num(s.last_loss()),
                          s.has_last_val_loss()
                              ? absl::StrCat("val_loss ", Num(s.last_val_loss()), ", ")
                              : "",
                          Num(s.last_lr()), s.steps_stored());
  } else {
    out += "last      no steps yet\n";
  }
  std::vector<std::string> cfg;
  if (!c.optimizer().empty()) cfg.push_back(absl::StrCat("optimizer ", c.optimizer()));
  if (c.base_lr() > 0) cfg.push_back(absl::StrCat("base_lr ", Num(c.base_lr())));
  if (c.batch_size() > 0) cfg.push_back(absl::StrCat("batch ", c.batch_size()));
  if (c.total_steps() > 0) cfg.push_back(absl::StrCat("steps ", c.total_steps()));
  if (c.warmup_steps() > 0) cfg.push_back(absl::StrCat("warmup ", c.warmup_steps()));
  if (!cfg.empty()) absl::StrAppendFormat(&out, "config    %s\n", absl::StrJoin(cfg, ", "));
  if (!s.tags().empty()) {
    std::map<std::string, std::string> tags(s.tags().begin(), s.tags().end());
    absl::StrAppendFormat(&out, "tags      %s\n",
                          absl::StrJoin(tags, ", ", absl::PairFormatter("=")));
  }
  if (h->active_diagnoses().empty()) {
    out += "\nno active diagnosis\n";
  } else {
    out += "\nactive diagnoses:\n";
    for (const v1::Diagnosis& d : h->active_diagnoses()) {
      absl::StrAppendFormat(&out,
                            "  %s at step %d (onset %d), severity %.2f, "
                            "confidence %.2f\n    %s\n",
                            KindName(d.kind()), d.step(), d.onset(), d.severity(),
                            d.confidence(), d.evidence());
    }
  }
  if (h->advice().empty()) {
    out += "\nno advice\n";
  } else {
    absl::StrAppendFormat(&out, "\nadvice (%d):\n", h->advice_size());
    for (const v1::AdviceRecord& r : h->advice()) {
      const v1::Advice& a = r.advice();
      std::string status = AdviceStatusName(r.status());
      if (r.outcome() != v1::NOT_JUDGED && r.outcome() != v1::OUTCOME_UNSPECIFIED) {
        absl::StrAppend(&status, ", ", OutcomeName(r.outcome()));
      }
      absl::StrAppendFormat(&out, "  #%d step %d %s -> %s [%s]\n    %s\n",
                            a.advice_id(), a.at_step(), KindName(a.diagnosis().kind()),
                            a.has_action() ? ActionText(a.action()) : "no action",
                            status, a.explanation());
      if (!r.outcome_evidence().empty()) {
        absl::StrAppendFormat(&out, "    outcome: %s\n", r.outcome_evidence());
      }
    }
  }
  return out;
}

absl::Status Watch(v1::LossGuard::StubInterface& stub, const std::string& server,
                   const std::string& run_id, bool json, std::ostream& out) {
  // No deadline: the stream lasts as long as the run.
  grpc::ClientContext ctx;
  v1::WatchRunRequest req;
  req.set_run_id(run_id);
  req.set_replay(true);
  std::unique_ptr<grpc::ClientReaderInterface<v1::RunEvent>> reader =
      stub.WatchRun(&ctx, req);
  v1::RunEvent e;
  while (reader->Read(&e)) {
    if (json) {
      out << Dump(ProtoJson(e), -1) << "\n";
    } else {
      out << EventLine(e) << "\n";
    }
    out.flush();
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) return FromGrpc(s, server, absl::StrCat("watch run ", run_id));
  return absl::OkStatus();
}

std::string RenderSvg(const v1::Curve& curve,
                      const std::vector<v1::AdviceRecord>& advice,
                      const std::string& title, const PlotOptions& o) {
  const double W = o.width, H = o.height;
  const double left = 70, right = W - 70, top = 50, bottom = H - 50;
  std::vector<double> steps, losses, lrs;
  for (const v1::CurvePoint& p : curve.points()) {
    steps.push_back(static_cast<double>(p.step()));
    losses.push_back(p.loss());
    if (p.has_val_loss()) losses.push_back(p.val_loss());
    lrs.push_back(p.lr());
  }
  Axis x;
  x.lo = steps.empty() ? 0 : steps.front();
  x.hi = steps.empty() ? 1 : std::max(steps.back(), x.lo + 1);
  // Map() puts lo at `bottom`: for the x axis, bottom is the left edge.
  x.bottom = left;
  x.top = right;
  Axis y;
  y.log = o.log_loss;
  std::tie(y.lo, y.hi) = Range(losses, y.log);
  y.top = top;
  y.bottom = bottom;
  Axis lr;
  lr.log = true;
  std::tie(lr.lo, lr.hi) = Range(lrs, true);
  lr.top = top;
  lr.bottom = bottom;
  auto clampy = [&](double py) { return std::clamp(py, top, bottom); };

  std::string s = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
      "viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
      "<text x=\"%.0f\" y=\"22\" font-size=\"15\">%s</text>\n",
      o.width, o.height, o.width, o.height, left, Esc(title));
  // Grid, ticks and axis labels.
  s += "<g class=\"axes\" stroke=\"#ddd\">\n";
  for (double v : y.Ticks()) {
    const double py = y.Map(v);
    absl::StrAppendFormat(&s,
                          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>"
                          "<text x=\"%.1f\" y=\"%.1f\" stroke=\"none\" fill=\"#333\" "
                          "text-anchor=\"end\">%.3g</text>\n",
                          left, py, right, py, left - 6, py + 4, v);
  }
  for (double v : x.Ticks()) {
    const double px = x.Map(v);
    absl::StrAppendFormat(&s,
                          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>"
                          "<text x=\"%.1f\" y=\"%.1f\" stroke=\"none\" fill=\"#333\" "
                          "text-anchor=\"middle\">%.6g</text>\n",
                          px, top, px, bottom, px, bottom + 16, v);
  }
  for (double v : lr.Ticks()) {
    absl::StrAppendFormat(&s,
                          "<text x=\"%.1f\" y=\"%.1f\" stroke=\"none\" fill=\"#2ca02c\">"
                          "%.3g</text>\n",
                          right + 6, lr.Map(v) + 4, v);
  }
  absl::StrAppendFormat(
      &s,
      "</g>\n<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
      "fill=\"none\" stroke=\"#888\"/>\n"
      "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">step</text>\n"
      "<text x=\"16\" y=\"%.1f\" transform=\"rotate(-90 16 %.1f)\" "
      "text-anchor=\"middle\">loss%s</text>\n"
      "<text x=\"%.1f\" y=\"%.1f\" transform=\"rotate(90 %.1f %.1f)\" "
      "text-anchor=\"middle\" fill=\"#2ca02c\">learning rate (log)</text>\n",
      left, top, right - left, bottom - top, (left + right) / 2, H - 12,
      (top + bottom) / 2, (top + bottom) / 2, y.log ? " (log)" : "", W - 14,
      (top + bottom) / 2, W - 14, (top + bottom) / 2);

  // Series.
  std::vector<std::pair<double, double>> loss_xy, lr_xy, val_xy;
  std::vector<double> nonfinite_x;
  for (const v1::CurvePoint& p : curve.points()) {
    const double px = x.Map(static_cast<double>(p.step()));
    const bool ok = std::isfinite(p.loss()) && (!y.log || p.loss() > 0);
    if (!std::isfinite(p.loss())) nonfinite_x.push_back(px);
    loss_xy.emplace_back(px, ok ? clampy(y.Map(p.loss())) : NAN);
    lr_xy.emplace_back(px, p.lr() > 0 ? lr.Map(p.lr()) : NAN);
    if (p.has_val_loss() && std::isfinite(p.val_loss()) && (!y.log || p.val_loss() > 0)) {
      val_xy.emplace_back(px, clampy(y.Map(p.val_loss())));
    }
  }
  absl::StrAppendFormat(&s,
                        "<path class=\"series loss\" d=\"%s\" fill=\"none\" "
                        "stroke=\"#1f77b4\" stroke-width=\"1.2\"/>\n",
                        Path(loss_xy));
  absl::StrAppendFormat(&s,
                        "<path class=\"series lr\" d=\"%s\" fill=\"none\" "
                        "stroke=\"#2ca02c\" stroke-width=\"1.5\" "
                        "stroke-dasharray=\"6 3\"/>\n",
                        Path(lr_xy));
  if (!val_xy.empty()) {
    absl::StrAppendFormat(&s,
                          "<path class=\"series val_loss\" d=\"%s\" fill=\"none\" "
                          "stroke=\"#17becf\" stroke-width=\"2\"/>\n",
                          Path(val_xy));
    for (const auto& [px, py] : val_xy) {
      absl::StrAppendFormat(&s, "<circle class=\"val_point\" cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"#17becf\"/>\n", px, py);
    }
  }
  for (double px : nonfinite_x) {
    absl::StrAppendFormat(&s,
                          "<text class=\"nonfinite\" x=\"%.1f\" y=\"%.1f\" fill=\"#d62728\" "
                          "text-anchor=\"middle\">&#215;</text>\n",
                          px, top + 10);
  }

  // Diagnosis onsets: a dashed line at the onset, a triangle where it was
  // decided.
  int label_row = 0;
  for (const v1::Diagnosis& d : curve.diagnoses()) {
    if (d.kind() == v1::LOSS_SPIKE) continue;
    const std::string c = KindColour(d.kind());
    const double px = x.Map(static_cast<double>(std::max(d.onset(), static_cast<int64_t>(x.lo))));
    const double pd = x.Map(static_cast<double>(d.step()));
    const double ly = top + 14 + 14 * (label_row++ % 4);
    absl::StrAppendFormat(
        &s,
        "<g class=\"marker diagnosis %s\"><title>%s at step %d (onset %d): %s</title>"
        "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
        "stroke-dasharray=\"4 3\"/>"
        "<path d=\"M%.1f,%.1f l-5,9 l10,0 z\" fill=\"%s\"/>"
        "<text x=\"%.1f\" y=\"%.1f\" fill=\"%s\">%s</text></g>\n",
        KindName(d.kind()), KindName(d.kind()), d.step(), d.onset(), Esc(d.evidence()),
        px, top, px, bottom, c, pd, bottom - 9, c, px + 3, ly, c, KindName(d.kind()));
  }
  // Applied actions: a solid line at the step it was advised.
  for (const v1::AdviceRecord& r : advice) {
    if (r.status() != v1::APPLIED || !r.advice().has_action()) continue;
    const v1::Advice& a = r.advice();
    if (a.at_step() < x.lo || a.at_step() > x.hi) continue;
    const double px = x.Map(static_cast<double>(a.at_step()));
    absl::StrAppendFormat(
        &s,
        "<g class=\"marker action\"><title>step %d: %s. %s</title>"
        "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#000\" "
        "stroke-width=\"1.5\"/>"
        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-weight=\"bold\">%s</text></g>\n",
        a.at_step(), Esc(ActionText(a.action())), Esc(a.explanation()), px, top, px,
        bottom, px, top - 6, Esc(ActionText(a.action())));
  }
  // Legend.
  absl::StrAppendFormat(
      &s,
      "<g class=\"legend\" transform=\"translate(%.0f,34)\">"
      "<line x1=\"0\" y1=\"0\" x2=\"18\" y2=\"0\" stroke=\"#1f77b4\"/><text x=\"22\" y=\"4\">loss</text>"
      "<line x1=\"70\" y1=\"0\" x2=\"88\" y2=\"0\" stroke=\"#17becf\" stroke-width=\"2\"/><text x=\"92\" y=\"4\">val loss</text>"
      "<line x1=\"160\" y1=\"0\" x2=\"178\" y2=\"0\" stroke=\"#2ca02c\" stroke-dasharray=\"6 3\"/><text x=\"182\" y=\"4\">LR</text>"
      "<line x1=\"215\" y1=\"0\" x2=\"233\" y2=\"0\" stroke=\"#000\" stroke-width=\"1.5\"/><text x=\"237\" y=\"4\">applied action</text>"
      "</g>\n",
      right - 330);
  absl::StrAppendFormat(&s, "<!-- %d of %d points -->\n</svg>\n", curve.points_size(),
                        curve.total_points());
  return s;
}

absl::StatusOr<std::string> PlotSvg(v1::LossGuard::StubInterface& stub,
                                    const std::string& server,
                                    const std::string& run_id,
                                    const PlotOptions& options) {
  absl::StatusOr<v1::RunHealth> h = GetHealth(stub, server, run_id);
  if (!h.ok()) return h.status();
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  v1::GetCurveRequest req;
  req.set_run_id(run_id);
  req.set_max_points(options.max_points);
  v1::Curve curve;
  grpc::Status s = stub.GetCurve(&ctx, req, &curve);
  if (!s.ok()) return FromGrpc(s, server, absl::StrCat("curve of run ", run_id));
  if (curve.points().empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("run ", run_id, " has no steps to plot yet"));
  }
  const std::vector<v1::AdviceRecord> advice(h->advice().begin(), h->advice().end());
  const std::string title = absl::StrFormat(
      "%s (%s, step %d)", run_id, StateName(h->summary().state()),
      h->summary().last_step());
  return RenderSvg(curve, advice, title, options);
}

absl::StatusOr<ImportReport> ImportCurve(const std::string& file,
                                         const ImportOptions& options) {
  // The whole file is checked before anything is sent: a bad row sends
  // nothing.
  ImportReport report;
  const bool tfevents = curvefile::LooksLikeTfEvents(file);
  report.format = tfevents ? "tfevents" : "csv";
  absl::StatusOr<std::vector<analyzers::StepRecord>> rows =
      tfevents ? curvefile::ReadTfEventsCurve(file, options.tags, &report.tags)
               : curvefile::ReadCurveCsv(file);
  if (!rows.ok()) return rows.status();
  if (rows->empty()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": no rows to import"));
  }
  report.file = file;
  report.rows = static_cast<int64_t>(rows->size());
  report.run_id = options.run_id;
  if (report.run_id.empty()) {
    std::string base = file.substr(file.find_last_of('/') + 1);
    const size_t slash = file.find_last_of('/');
    if (tfevents && slash != std::string::npos && slash > 0) {
      // events.out.tfevents.<time>.<host>: the run is its directory.
      const std::string dir = file.substr(0, slash);
      base = dir.substr(dir.find_last_of('/') + 1);
      report.run_id = base;
    } else {
      const size_t dot = base.find_last_of('.');
      report.run_id = dot == std::string::npos || dot == 0 ? base : base.substr(0, dot);
    }
  }
  ClientOptions co;
  co.server = options.server;
  co.credentials = options.credentials;
  co.run_id = report.run_id;
  co.name = report.run_id;
  co.project = options.project.empty() ? "imported" : options.project;
  co.mode = v1::OBSERVE;
  co.tags = {{"source", "import"}, {"file", file}, {"format", report.format}};
  co.max_batch_delay = absl::Milliseconds(5);
  co.attach_timeout = absl::Seconds(5);
  co.close_timeout = absl::ZeroDuration();
  Client client(co);
  const absl::Time deadline = absl::Now() + options.timeout;
  for (const analyzers::StepRecord& r : *rows) {
    if (!client.Report(r.step, r.lr, r.loss, r.val_loss, r.grad_norm)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: step %d was refused (the LR must be finite and >= 0)", file, r.step));
    }
    // Keep the client's buffer far from its limit: wait for the daemon
    // every 100k steps.
    if (client.stats().buffered_steps >= 100000 &&
        !client.Flush(deadline - absl::Now())) {
      break;
    }
  }
  const bool done = client.Finish("imported", std::max(deadline - absl::Now(),
                                                       absl::ZeroDuration()));
  const ClientStats st = client.stats();
  if (!done || !st.confirmed_step.has_value() ||
      *st.confirmed_step < rows->back().step) {
    return absl::UnavailableError(absl::StrCat(
        "cannot import ", file, ": lossguardd at ", options.server,
        " did not take every step within ", absl::FormatDuration(options.timeout),
        st.last_error.empty() ? "" : absl::StrCat(" (", st.last_error, ")")));
  }
  report.last_step = *st.confirmed_step;
  report.advice = st.advice_received;
  return report;
}

std::string ImportReportText(const ImportReport& r, bool json) {
  if (json) {
    nlohmann::ordered_json j;
    j["file"] = r.file;
    j["run_id"] = r.run_id;
    j["rows"] = r.rows;
    j["last_step"] = r.last_step;
    j["advice"] = r.advice;
    j["format"] = r.format;
    if (r.format == "tfevents") {
      j["tags"] = {{"loss", r.tags.loss},
                   {"val_loss", r.tags.val_loss},
                   {"lr", r.tags.lr},
                   {"grad_norm", r.tags.grad_norm}};
    }
    return Dump(j, 2) + "\n";
  }
  std::string tags;
  if (r.format == "tfevents") {
    auto tag = [](const std::string& t) { return t.empty() ? std::string("-") : t; };
    tags = absl::StrFormat("tags: loss %s, val_loss %s, lr %s, grad_norm %s\n",
                           tag(r.tags.loss), tag(r.tags.val_loss), tag(r.tags.lr),
                           tag(r.tags.grad_norm));
  }
  return absl::StrFormat(
      "imported %d rows of %s as run %s (the daemon holds it up to step %d; "
      "%d diagnoses with advice, see `lossguard health %s`)\n%s",
      r.rows, r.file, r.run_id, r.last_step, r.advice, r.run_id, tags);
}

}  // namespace lossguard::cli
