// The fleet commands (runs, health, watch, plot, import) against an
// in-process lossguardd on loopback (port 0), fed the shipped example
// curves through `import`.

#include "client/cli/fleet.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lossguard/service/service.h"
#include "lossguard/curvefile/curve_csv.h"
#include "lossguard/storage/run_store.h"
#include "tensorboard_event.pb.h"

namespace lossguard::cli {
namespace {

using ::testing::ContainsRegex;
using ::testing::HasSubstr;
using ::testing::Not;

const std::string kExamples = LOSSGUARD_EXAMPLES_DIR;
constexpr char kDiverging[] = "digits-mlp-sgdm-lr0.3-b32-s9";  // divergence @179
constexpr char kHealthy[] = "digits-mlp-sgdm-lr0.01-b32-s6";

class FleetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = storage::NewMemoryStore();
    service::ServerOptions o;
    o.listen = "127.0.0.1:0";
    daemon_ = std::make_unique<service::Daemon>(o, store_.get());
    ASSERT_TRUE(daemon_->Start().ok());
    server_ = absl::StrCat("127.0.0.1:", daemon_->port());
    stub_ = *ConnectTo(server_, Credentials{});
  }
  void TearDown() override {
    stub_.reset();
    if (daemon_) {
      EXPECT_TRUE(daemon_->Shutdown().ok());
    }
  }

  ImportReport MustImport(const std::string& name, const std::string& project = "") {
    ImportOptions io;
    io.server = server_;
    io.project = project;
    absl::StatusOr<ImportReport> r = ImportCurve(kExamples + "/" + name + ".csv", io);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : ImportReport{};
  }

  std::unique_ptr<storage::RunStore> store_;
  std::unique_ptr<service::Daemon> daemon_;
  std::string server_;
  std::unique_ptr<v1::LossGuard::StubInterface> stub_;
};

TEST_F(FleetTest, ImportStoresTheWholeCurveAsAFinishedObservedRun) {
  const ImportReport r = MustImport(kDiverging);
  EXPECT_EQ(r.run_id, kDiverging);
  EXPECT_EQ(r.rows, 1500);
  EXPECT_EQ(r.last_step, 1499);
  EXPECT_GE(r.advice, 1);  // the divergence, informational
  absl::StatusOr<std::string> j = Health(*stub_, server_, kDiverging, true);
  ASSERT_TRUE(j.ok()) << j.status();
  const auto h = nlohmann::json::parse(*j);
  EXPECT_EQ(h["summary"]["state"], "FINISHED");
  EXPECT_EQ(h["summary"]["mode"], "OBSERVE");
  EXPECT_EQ(h["summary"]["steps_stored"], "1500");  // int64 as a JSON string
  EXPECT_EQ(h["summary"]["project"], "imported");
  EXPECT_EQ(h["advice"][0]["status"], "INFORMATIONAL");
  EXPECT_EQ(h["advice"][0]["advice"]["diagnosis"]["kind"], "DIVERGENCE");

  // Again: nothing new, nothing duplicated.
  const ImportReport again = MustImport(kDiverging);
  EXPECT_EQ(again.last_step, 1499);
  absl::StatusOr<std::string> t = Health(*stub_, server_, kDiverging, false);
  ASSERT_TRUE(t.ok());
  EXPECT_THAT(*t, HasSubstr("(1500 steps stored)"));
}

// A TensorBoard event file (scalars as SummaryWriter.add_scalar writes
// them) is imported like a CSV: same steps, same diagnosis; the run is
// named after the file's directory.
TEST_F(FleetTest, ImportOfATensorBoardEventFile) {
  auto rows = curvefile::ReadCurveCsv(kExamples + "/" + kDiverging + ".csv");
  ASSERT_TRUE(rows.ok());
  std::string bytes;
  auto record = [&](const tb::Event& e) {
    const std::string data = e.SerializeAsString();
    std::string len(8, '\0');
    for (int i = 0; i < 8; ++i) len[i] = static_cast<char>(uint64_t{data.size()} >> (8 * i));
    auto le32 = [](uint32_t v) {
      std::string s(4, '\0');
      for (int i = 0; i < 4; ++i) s[i] = static_cast<char>(v >> (8 * i));
      return s;
    };
    bytes += len + le32(curvefile::MaskedCrc32c(len)) + data +
             le32(curvefile::MaskedCrc32c(data));
  };
  for (const analyzers::StepRecord& r : *rows) {
    tb::Event e;
    e.set_step(r.step);
    auto add = [&](const char* tag, double v) {
      auto* val = e.mutable_summary()->add_value();
      val->set_tag(tag);
      val->set_simple_value(static_cast<float>(v));
    };
    add("Loss/train", r.loss);
    add("lr", r.lr);
    if (r.val_loss) add("Loss/val", *r.val_loss);
    record(e);
  }
  const std::string dir = ::testing::TempDir() + "/tb-diverging";
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/events.out.tfevents.1700000000.host.1.0";
  std::ofstream(path, std::ios::binary) << bytes;

  ImportOptions io;
  io.server = server_;
  absl::StatusOr<ImportReport> r = ImportCurve(path, io);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->run_id, "tb-diverging");
  EXPECT_EQ(r->format, "tfevents");
  EXPECT_EQ(r->tags.loss, "Loss/train");
  EXPECT_EQ(r->tags.val_loss, "Loss/val");
  EXPECT_EQ(r->rows, 1500);
  EXPECT_THAT(ImportReportText(*r, false), HasSubstr("tags: loss Loss/train, val_loss Loss/val, lr lr"));
  absl::StatusOr<std::string> h = Health(*stub_, server_, "tb-diverging", false);
  ASSERT_TRUE(h.ok());
  EXPECT_THAT(*h, HasSubstr("(1500 steps stored)"));
  EXPECT_THAT(*h, ContainsRegex("divergence at step"));

  // A corrupted copy is refused whole.
  bytes[bytes.size() / 2] ^= 0x40;
  const std::string bad = dir + "/events.out.tfevents.bad";
  std::ofstream(bad, std::ios::binary) << bytes;
  io.run_id = "tb-bad";
  absl::StatusOr<ImportReport> b = ImportCurve(bad, io);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(b.status().message()), HasSubstr("checksum mismatch"));
  EXPECT_EQ(Health(*stub_, server_, "tb-bad", false).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(FleetTest, ImportOfABadFileSendsNothingAndNamesTheLine) {
  const std::string path = ::testing::TempDir() + "/fleet_bad.csv";
  {
    std::ofstream f(path);
    f << "step,lr,loss\n0,0.1,2.3\n1,0.1,2.2\n1,0.1,2.1\n";
  }
  ImportOptions io;
  io.server = server_;
  absl::StatusOr<ImportReport> r = ImportCurve(path, io);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("fleet_bad.csv:4"));
  absl::StatusOr<std::string> runs = Runs(*stub_, server_, {}, true);
  ASSERT_TRUE(runs.ok());
  EXPECT_TRUE(nlohmann::json::parse(*runs)["runs"].empty()) << *runs;
}

TEST_F(FleetTest, ProbeSaysServingOrWhyNot) {
  absl::StatusOr<std::string> up =
      Probe(server_, Credentials(), "lossguard.v1.LossGuard", false);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(*up, "SERVING\n");
  up = Probe(server_, Credentials(), "", true);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_THAT(*up, HasSubstr("\"status\":\"SERVING\""));
  absl::StatusOr<std::string> unknown =
      Probe(server_, Credentials(), "no.such.Service", false);
  EXPECT_FALSE(unknown.ok());
  // Nothing listens on port 1.
  absl::StatusOr<std::string> down =
      Probe("127.0.0.1:1", Credentials(), "lossguard.v1.LossGuard", false);
  EXPECT_FALSE(down.ok());
  EXPECT_THAT(down.status().message(), HasSubstr("127.0.0.1:1"));
}

TEST_F(FleetTest, ImportWithNoDaemonFailsNamingTheServer) {
  ImportOptions io;
  io.server = "127.0.0.1:1";  // nothing listens on port 1
  io.timeout = absl::Seconds(2);
  absl::StatusOr<ImportReport> r = ImportCurve(kExamples + "/" + kHealthy + ".csv", io);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("127.0.0.1:1"));
}

TEST_F(FleetTest, RunsTableAndJsonShowStateLossAndActiveDiagnoses) {
  MustImport(kDiverging, "p1");
  MustImport(kHealthy, "p2");
  absl::StatusOr<std::string> t = Runs(*stub_, server_, {}, false);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(*t, ContainsRegex("RUN +PROJECT +STATE +STEP +LOSS +VAL_LOSS +LR +ACTIVE"));
  EXPECT_THAT(*t, ContainsRegex(absl::StrCat(kDiverging, " +p1 +finished +1499 .* divergence")));
  EXPECT_THAT(*t, ContainsRegex(absl::StrCat(kHealthy, " +p2 +finished +1499 .* -\n")));
  EXPECT_THAT(*t, HasSubstr("2 runs: 2 finished"));

  absl::StatusOr<std::string> j = Runs(*stub_, server_, {.project = "p1"}, true);
  ASSERT_TRUE(j.ok());
  const auto runs = nlohmann::json::parse(*j)["runs"];
  ASSERT_EQ(runs.size(), 1u) << *j;
  EXPECT_EQ(runs[0]["run_id"], kDiverging);
  EXPECT_EQ(runs[0]["active"][0], "DIVERGENCE");

  absl::StatusOr<std::string> none =
      Runs(*stub_, server_, {.states = {v1::UNHEALTHY}}, false);
  ASSERT_TRUE(none.ok());
  EXPECT_THAT(*none, HasSubstr("0 runs"));
}

TEST_F(FleetTest, HealthShowsEvidenceAndAdviceAndUnknownRunIsNotFound) {
  MustImport(kDiverging);
  absl::StatusOr<std::string> t = Health(*stub_, server_, kDiverging, false);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(*t, HasSubstr("state     finished (mode observe)"));
  EXPECT_THAT(*t, ContainsRegex("divergence at step [0-9]+ \\(onset [0-9]+\\)"));
  EXPECT_THAT(*t, HasSubstr("smoothed loss"));  // the evidence
  EXPECT_THAT(*t, ContainsRegex("#1 step [0-9]+ divergence -> no action \\[informational\\]"));
  EXPECT_THAT(*t, HasSubstr("Would advise scale_lr"));

  absl::StatusOr<std::string> missing = Health(*stub_, server_, "no-such-run", false);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr(server_));
}

TEST_F(FleetTest, WatchReplaysEventsAndEndsWhenTheRunIsFinished) {
  MustImport(kDiverging);
  std::ostringstream text;
  ASSERT_TRUE(Watch(*stub_, server_, kDiverging, false, text).ok());
  EXPECT_THAT(text.str(), ContainsRegex("step [0-9]+ +divergence \\(onset"));
  EXPECT_THAT(text.str(), ContainsRegex("advice #1: no action\\. OBSERVE mode"));
  EXPECT_THAT(text.str(), ContainsRegex("step 1499 +state finished\n$"));

  std::ostringstream json;
  ASSERT_TRUE(Watch(*stub_, server_, kDiverging, true, json).ok());
  std::istringstream lines(json.str());
  std::string line;
  int n = 0;
  bool diagnosis = false;
  while (std::getline(lines, line)) {
    const auto e = nlohmann::json::parse(line);  // one object per line
    EXPECT_EQ(e["run_id"], kDiverging);
    diagnosis |= e.contains("diagnosis");
    ++n;
  }
  EXPECT_GE(n, 3);
  EXPECT_TRUE(diagnosis);
}

TEST_F(FleetTest, WatchOfAnUnknownRunFails) {
  std::ostringstream out;
  absl::Status s = Watch(*stub_, server_, "no-such-run", false, out);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
}

TEST_F(FleetTest, PlotDrawsTheSeriesAndTheDiagnosisOnset) {
  MustImport(kDiverging);
  absl::StatusOr<std::string> svg = PlotSvg(*stub_, server_, kDiverging, {});
  ASSERT_TRUE(svg.ok()) << svg.status();
  EXPECT_THAT(*svg, HasSubstr("<svg xmlns=\"http://www.w3.org/2000/svg\""));
  EXPECT_THAT(*svg, ContainsRegex("<path class=\"series loss\" d=\"M[0-9.]+,[0-9.]+ L"));
  EXPECT_THAT(*svg, ContainsRegex("<path class=\"series lr\" d=\"M"));
  EXPECT_THAT(*svg, ContainsRegex("<path class=\"series val_loss\" d=\"M"));
  EXPECT_THAT(*svg, HasSubstr("<g class=\"marker diagnosis divergence\">"));
  EXPECT_THAT(*svg, HasSubstr("digits-mlp-sgdm-lr0.3-b32-s9 (finished, step 1499)"));
  EXPECT_THAT(*svg, HasSubstr("</svg>\n"));
  // OBSERVE: nothing was applied, so no action marker.
  EXPECT_THAT(*svg, Not(HasSubstr("class=\"marker action\"")));

  absl::StatusOr<std::string> missing = PlotSvg(*stub_, server_, "nope", {});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

// An applied action is drawn where it was advised, labelled with what it
// did; a non-finite loss breaks the loss line and is marked.
TEST(RenderSvgTest, MarksAppliedActionsAndNonFiniteLosses) {
  v1::Curve c;
  for (int i = 0; i < 100; ++i) {
    v1::CurvePoint* p = c.add_points();
    p->set_step(i);
    p->set_lr(i < 50 ? 1.0 : 0.1);
    p->set_loss(i == 40 ? std::numeric_limits<double>::quiet_NaN() : 2.0 / (1 + i));
  }
  c.set_total_points(100);
  v1::Diagnosis* d = c.add_diagnoses();
  d->set_kind(v1::DIVERGENCE);
  d->set_step(41);
  d->set_onset(40);
  d->set_evidence("loss is nan at step 40 <non-finite>");
  v1::AdviceRecord applied;
  applied.set_status(v1::APPLIED);
  applied.mutable_advice()->set_at_step(50);
  applied.mutable_advice()->mutable_action()->mutable_scale_lr()->set_factor(0.1);
  applied.mutable_advice()->mutable_action()->set_restore_checkpoint(true);
  v1::AdviceRecord rejected = applied;
  rejected.set_status(v1::REJECTED);
  rejected.mutable_advice()->set_at_step(70);
  const std::string svg = RenderSvg(c, {applied, rejected}, "t", {});
  EXPECT_THAT(svg, HasSubstr("LR x0.1 + restore checkpoint</text>"));
  EXPECT_EQ(svg.find("step 70:"), std::string::npos);  // rejected: not drawn
  EXPECT_THAT(svg, HasSubstr("class=\"nonfinite\""));
  // The loss path restarts after the NaN (a second "M").
  const size_t at = svg.find("class=\"series loss\"");
  const std::string path = svg.substr(at, svg.find("/>", at) - at);
  EXPECT_EQ(std::count(path.begin(), path.end(), 'M'), 2) << path;
  // Evidence is escaped.
  EXPECT_THAT(svg, HasSubstr("&lt;non-finite&gt;"));
}

}  // namespace
}  // namespace lossguard::cli
