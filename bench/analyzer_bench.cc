// Cost of CurveAnalyzer::Feed per step, with every detector exercised: a
// noisy power-law training curve with the LR, validation every 50 steps
// and a gradient norm on every step.
//
//   BM_FeedRun/N        a whole run of N steps from a fresh analyzer.
//   BM_FeedAfter/N      1000 steps after N steps were fed (untimed): the
//                       cost per step must not grow with the run's length,
//                       so /1000 (steps [1k, 2k)) and /1000000 (steps
//                       [1M, 1M + 1000)) should match.
//
// Both report items_per_second (steps) and per_step (seconds per step).

#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "lossguard/analyzers/curve_analyzer.h"
#include "tests/analyzers/synthetic.h"

namespace lossguard::analyzers {
namespace {

constexpr int64_t kTimedSteps = 1000;

void SetPerStepCounters(benchmark::State& state, int64_t steps_per_iter) {
  const double steps = static_cast<double>(state.iterations()) *
                       static_cast<double>(steps_per_iter);
  state.SetItemsProcessed(static_cast<int64_t>(steps));
  state.counters["per_step"] = benchmark::Counter(
      steps, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

void BM_FeedRun(benchmark::State& state) {
  const int64_t n = state.range(0);
  const std::vector<StepRecord> recs =
      synthetic::Generate(synthetic::LongRunSpec(n));
  std::vector<Diagnosis> out;
  for (auto _ : state) {
    CurveAnalyzer a;
    out.clear();
    for (const StepRecord& r : recs) {
      absl::Status s = a.Feed(r, &out);
      benchmark::DoNotOptimize(s);
    }
    benchmark::DoNotOptimize(out.data());
  }
  SetPerStepCounters(state, n);
}
BENCHMARK(BM_FeedRun)->Arg(10'000)->Arg(100'000)->Unit(benchmark::kMillisecond);

void BM_FeedAfter(benchmark::State& state) {
  const int64_t prefed = state.range(0);
  std::vector<StepRecord> timed;
  timed.reserve(kTimedSteps);
  std::vector<Diagnosis> out;
  for (auto _ : state) {
    state.PauseTiming();
    // A fresh analyzer and stream per iteration, so every iteration times
    // exactly steps [prefed, prefed + kTimedSteps).
    auto a = std::make_unique<CurveAnalyzer>();
    synthetic::CurveStream stream(synthetic::LongRunSpec(prefed + kTimedSteps));
    for (int64_t i = 0; i < prefed; ++i) {
      absl::Status s = a->Feed(stream.Next(), nullptr);
      benchmark::DoNotOptimize(s);
    }
    timed.clear();
    while (!stream.Done()) timed.push_back(stream.Next());
    out.clear();
    state.ResumeTiming();
    for (const StepRecord& r : timed) {
      absl::Status s = a->Feed(r, &out);
      benchmark::DoNotOptimize(s);
    }
    benchmark::DoNotOptimize(out.data());
  }
  SetPerStepCounters(state, kTimedSteps);
}
// Pre-feeding a million steps takes ~0.1-0.2 s per iteration, so the long
// case runs a fixed number of iterations.
BENCHMARK(BM_FeedAfter)->Arg(1'000)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_FeedAfter)
    ->Arg(100'000)
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_FeedAfter)
    ->Arg(1'000'000)
    ->Iterations(10)
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace lossguard::analyzers

BENCHMARK_MAIN();
