#include "lossguard/runs/run_registry.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lossguard::runs {
namespace {

absl::Status CheckText(const std::string& field, const std::string& value,
                       size_t max_bytes, bool allow_empty) {
  if (value.empty() && !allow_empty) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is empty"));
  }
  if (value.size() > max_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s is %d bytes long; at most %d", field, value.size(), max_bytes));
  }
  for (size_t i = 0; i < value.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(value[i]);
    if (c < 0x20 || c == 0x7f) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s holds control character 0x%02x at byte %d", field, c, i));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateRunStart(const v1::RunStart& start,
                              const RunLimits& limits) {
  absl::Status s = CheckText("run_id", start.run_id(), limits.max_run_id_bytes,
                             /*allow_empty=*/false);
  if (!s.ok()) return s;
  s = CheckText("name", start.name(), limits.max_name_bytes, true);
  if (!s.ok()) return s;
  s = CheckText("project", start.project(), limits.max_name_bytes, true);
  if (!s.ok()) return s;
  if (static_cast<size_t>(start.tags_size()) > limits.max_tags) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%d tags; at most %d", start.tags_size(), limits.max_tags));
  }
  for (const auto& [k, v] : start.tags()) {
    s = CheckText("tag key", k, limits.max_tag_bytes, false);
    if (!s.ok()) return s;
    s = CheckText(absl::StrCat("tag ", k), v, limits.max_tag_bytes, true);
    if (!s.ok()) return s;
  }
  if (!v1::Mode_IsValid(start.mode())) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown mode ", static_cast<int>(start.mode())));
  }
  return absl::OkStatus();
}

RunRegistry::RunRegistry(const RunOptions* options, const RunLimits& limits,
                         storage::RunStore* store, Clock* clock)
    : options_(options), limits_(limits), store_(store), clock_(clock) {}

absl::StatusOr<std::shared_ptr<Run>> RunRegistry::Rebuild(
    const storage::RunRow& row) {
  v1::RunConfig config;
  if (!config.ParseFromString(row.config)) {
    return absl::DataLossError(
        absl::StrCat("run ", row.run_id, ": stored config does not parse"));
  }
  auto run = std::make_shared<Run>(row, config, options_, store_, clock_);
  absl::Status s = run->Recover();
  if (!s.ok()) return s;
  return run;
}

absl::Status RunRegistry::Recover() {
  absl::StatusOr<std::vector<storage::RunRow>> rows = store_->LoadRuns();
  if (!rows.ok()) return rows.status();
  for (const storage::RunRow& row : *rows) {
    absl::StatusOr<std::shared_ptr<Run>> run = Rebuild(row);
    if (!run.ok()) return run.status();
    Put(row, *std::move(run));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Run>> RunRegistry::FindOrCreate(
    const v1::RunStart& start, bool* created) {
  absl::Status s = ValidateRunStart(start, limits_);
  if (!s.ok()) return s;
  absl::MutexLock lock(&mu_);
  *created = false;
  auto it = runs_.find(start.run_id());
  if (it != runs_.end()) return it->second;
  if (runs_.size() >= limits_.max_runs) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the daemon holds %d runs, its limit", runs_.size()));
  }
  if (limits_.max_runs_per_project > 0) {
    auto p = project_runs_.find(start.project());
    if (p != project_runs_.end() && p->second >= limits_.max_runs_per_project) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "project \"%s\" holds %d runs, its limit", start.project(), p->second));
    }
  }
  storage::RunRow row;
  row.run_id = start.run_id();
  row.name = start.name();
  row.project = start.project();
  row.mode = start.mode();
  row.state = v1::DETACHED;
  row.created_time = clock_->Now();
  row.updated_time = row.created_time;
  auto run = std::make_shared<Run>(row, start.config(), options_, store_,
                                   clock_);
  order_[Key{row.created_time, row.run_id}] = run;
  ++project_runs_[row.project];
  runs_[row.run_id] = run;
  *created = true;
  return run;
}

void RunRegistry::Put(const storage::RunRow& row, std::shared_ptr<Run> run) {
  absl::MutexLock lock(&mu_);
  auto it = runs_.find(row.run_id);
  if (it != runs_.end()) {
    // The key sorts by the creation time this copy was made with.
    order_.erase(Key{it->second->created_time(), row.run_id});
    it->second = run;
  } else {
    ++project_runs_[row.project];
    runs_[row.run_id] = run;
  }
  order_[Key{row.created_time, row.run_id}] = std::move(run);
}

absl::Status RunRegistry::Reload(const std::string& run_id) {
  absl::StatusOr<std::optional<storage::RunRow>> row = store_->LoadRun(run_id);
  if (!row.ok()) return row.status();
  if (!row->has_value()) return absl::OkStatus();
  absl::StatusOr<std::shared_ptr<Run>> run = Rebuild(**row);
  if (!run.ok()) return run.status();
  Put(**row, *std::move(run));
  return absl::OkStatus();
}

absl::Status RunRegistry::Follow(const storage::RunRow& row) {
  std::shared_ptr<Run> run = Find(row.run_id);
  if (run != nullptr) return run->Follow(row);
  v1::RunConfig config;
  config.ParseFromString(row.config);  // Follow reads it again
  // A copy with no steps yet, so that Follow replays them all.
  storage::RunRow empty = row;
  empty.has_steps = false;
  empty.last_step = 0;
  empty.steps_stored = 0;
  run = std::make_shared<Run>(empty, config, options_, store_, clock_);
  absl::Status s = run->Follow(row);
  if (!s.ok()) return s;
  Put(row, std::move(run));
  return absl::OkStatus();
}

std::shared_ptr<Run> RunRegistry::Find(const std::string& run_id) const {
  absl::MutexLock lock(&mu_);
  auto it = runs_.find(run_id);
  return it == runs_.end() ? nullptr : it->second;
}

absl::StatusOr<RunRegistry::ListResult> RunRegistry::List(
    const std::string& project, const std::vector<v1::RunState>& states,
    int page_size, const std::string& page_token) const {
  std::optional<Key> after;
  if (!page_token.empty()) {
    const size_t bar = page_token.find('|');
    double created = 0.0;
    if (bar == std::string::npos ||
        !absl::SimpleAtod(page_token.substr(0, bar), &created)) {
      return absl::InvalidArgumentError(
          absl::StrCat("malformed page_token \"", page_token, "\""));
    }
    after = Key{created, page_token.substr(bar + 1)};
  }
  // Under the registry's lock only the candidates are taken; each run's
  // summary (its own lock) is read outside it, so a fleet query never
  // stalls attaches.
  std::vector<std::shared_ptr<Run>> candidates;
  {
    absl::MutexLock lock(&mu_);
    auto it = after ? order_.upper_bound(*after) : order_.begin();
    for (; it != order_.end(); ++it) {
      if (!project.empty() && it->second->project() != project) continue;
      candidates.push_back(it->second);
    }
  }
  ListResult out;
  size_t i = 0;
  for (; i < candidates.size(); ++i) {
    v1::RunSummary summary = candidates[i]->Summary();
    if (!states.empty() && std::find(states.begin(), states.end(),
                                     summary.state()) == states.end()) {
      continue;
    }
    if (static_cast<int>(out.runs.size()) == page_size) break;
    out.runs.push_back(std::move(summary));
  }
  if (i < candidates.size() && !out.runs.empty()) {
    const v1::RunSummary& last = out.runs.back();
    out.next_page_token =
        absl::StrFormat("%.17g|%s", last.created_time(), last.run_id());
  }
  return out;
}

size_t RunRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return runs_.size();
}

std::vector<std::shared_ptr<Run>> RunRegistry::All() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Run>> all;
  all.reserve(runs_.size());
  for (const auto& [id, run] : order_) all.push_back(run);
  return all;
}

}  // namespace lossguard::runs
