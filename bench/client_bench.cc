// Cost of lossguard::Client::Report() as the training loop sees it: the
// time of each call, p50/p99/p99.9/max, while the client streams to a live
// in-process lossguardd (memory store) and its background thread batches,
// sends and takes confirmations.
//
//   BM_Report/paced_us:P   one Report every P microseconds (spin-waited, so
//                          the training thread stays on its core): 20 us is
//                          50,000 steps/s, far faster than any GPU trainer
//                          reports.
//   BM_Report/paced_us:0   back to back: the worst case, where the sender
//                          copies full batches out of the buffer while
//                          Report appends.
//   BM_ReportDaemonDown    back to back with no daemon: the client buffers
//                          and retries in the background.
//
// Counters: p50_ns, p99_ns, p999_ns, max_ns per call (the clock reads cost
// about 20 ns and are included).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "bench/bench_daemon.h"
#include "lossguard/client/client.h"

namespace lossguard {
namespace {

using Clock = std::chrono::steady_clock;

using bench::BenchDaemon;

void SetLatencyCounters(benchmark::State& state, std::vector<double>& ns) {
  if (ns.empty()) return;
  std::sort(ns.begin(), ns.end());
  auto at = [&](double q) {
    return ns[std::min(ns.size() - 1,
                       static_cast<size_t>(q * static_cast<double>(ns.size())))];
  };
  state.counters["p50_ns"] = at(0.5);
  state.counters["p99_ns"] = at(0.99);
  state.counters["p999_ns"] = at(0.999);
  state.counters["max_ns"] = ns.back();
}

void RunReports(benchmark::State& state, const std::string& server,
                int64_t paced_us) {
  static int run = 0;
  ClientOptions options;
  options.server = server;
  options.run_id = absl::StrCat("client-bench-", ::getpid(), "-", run++);
  options.mode = v1::OBSERVE;
  options.close_timeout = absl::ZeroDuration();
  options.initial_backoff = absl::Milliseconds(10);
  Client client(options);
  std::vector<double> ns;
  ns.reserve(1 << 20);
  int64_t step = 0;
  Clock::time_point next = Clock::now();
  for (auto _ : state) {
    if (paced_us > 0) {
      next += std::chrono::microseconds(paced_us);
      while (Clock::now() < next) {
      }
    }
    const double loss = 2.0 / std::sqrt(1.0 + static_cast<double>(step));
    const Clock::time_point t0 = Clock::now();
    const bool ok = client.Report(step, 0.01, loss, std::nullopt, 1.5);
    const Clock::time_point t1 = Clock::now();
    benchmark::DoNotOptimize(ok);
    ++step;
    if (ns.size() < ns.capacity()) {
      ns.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count());
    }
  }
  state.SetItemsProcessed(state.iterations());
  SetLatencyCounters(state, ns);
  const ClientStats stats = client.stats();
  state.counters["dropped"] = static_cast<double>(stats.dropped_steps);
}

void BM_Report(benchmark::State& state) {
  RunReports(state, BenchDaemon::Get().address(), state.range(0));
}
BENCHMARK(BM_Report)
    ->ArgName("paced_us")
    ->Arg(20)
    ->Arg(0)
    ->Iterations(200000)
    ->UseRealTime();

void BM_ReportDaemonDown(benchmark::State& state) {
  // A port nothing listens on (the daemon's, plus one, is not guaranteed
  // free; port 1 needs root to listen on).
  RunReports(state, "127.0.0.1:1", 0);
}
BENCHMARK(BM_ReportDaemonDown)->Iterations(200000)->UseRealTime();

}  // namespace
}  // namespace lossguard

BENCHMARK_MAIN();
