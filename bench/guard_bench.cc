// The guard's fixed cost per training step, on the CPU with a model so small
// (two 32x32 linear layers, batch 16) that the step itself costs tens of
// microseconds: what the guard adds shows instead of hiding in the noise of a
// real step (bench/guard_overhead.py measures real steps, bench/gpu_overhead.sh
// on CUDA).
//
//   BM_Step/no_guard         the LR set directly, as lossguard-train --guard=false
//   BM_Step/embedded         Guard in embedded mode (analyzers and policy in-process)
//   BM_Step/attached         Guard with a Client streaming to an in-process
//                            lossguardd (memory store), OBSERVE mode
//   BM_GuardOnly/...         the guard's calls alone (BeforeStep and
//                            AfterBackward on a fixed backward), no forward,
//                            backward or optimizer step

#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "bench/bench_daemon.h"
#include "lossguard/client/client.h"
#include "lossguard/torch/guard.h"

namespace {

using lossguard::Client;
using lossguard::ClientOptions;
namespace v1 = lossguard::v1;

using lossguard::bench::BenchDaemon;

enum Variant { kNoGuard = 0, kEmbedded = 1, kAttached = 2 };

struct Setup {
  explicit Setup(int variant, const std::string& run_id) {
    torch::manual_seed(1);
    model = torch::nn::Sequential(torch::nn::Linear(32, 32), torch::nn::ReLU(),
                                  torch::nn::Linear(32, 10));
    optimizer = std::make_unique<torch::optim::SGD>(
        model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
    x = torch::randn({16, 32});
    y = torch::randint(0, 10, {16});
    lossguard::torch::GuardOptions options;
    options.mode = v1::OBSERVE;
    if (variant == kAttached) {
      ClientOptions co;
      co.server = BenchDaemon::Get().address();
      co.run_id = run_id;
      co.mode = v1::OBSERVE;
      client = std::make_unique<Client>(co);
      guard = std::make_unique<lossguard::torch::Guard>(client.get(), *optimizer, options);
    } else if (variant == kEmbedded) {
      guard = std::make_unique<lossguard::torch::Guard>(*optimizer, options);
    }
  }
  torch::nn::Sequential model{nullptr};
  std::unique_ptr<torch::optim::SGD> optimizer;
  torch::Tensor x, y;
  std::unique_ptr<Client> client;
  std::unique_ptr<lossguard::torch::Guard> guard;
};

const char* Name(int v) {
  return v == kNoGuard ? "no_guard" : v == kEmbedded ? "embedded" : "attached";
}

void BM_Step(benchmark::State& state) {
  const int variant = static_cast<int>(state.range(0));
  Setup s(variant, absl::StrCat("bench-step-", Name(variant), "-", state.iterations()));
  int64_t step = 0;
  for (auto _ : state) {
    if (s.guard) {
      s.guard->BeforeStep(step);
    } else {
      for (auto& g : s.optimizer->param_groups()) g.options().set_lr(0.01);
    }
    s.optimizer->zero_grad();
    torch::Tensor loss = torch::nn::functional::cross_entropy(s.model->forward(s.x), s.y);
    loss.backward();
    if (s.guard) s.guard->AfterBackward(step, loss);
    s.optimizer->step();
    ++step;
  }
  state.SetLabel(Name(variant));
}
BENCHMARK(BM_Step)->Arg(kNoGuard)->Arg(kEmbedded)->Arg(kAttached)->ArgName("variant");

void BM_GuardOnly(benchmark::State& state) {
  const int variant = static_cast<int>(state.range(0));
  Setup s(variant, absl::StrCat("bench-guard-", Name(variant), "-", state.iterations()));
  s.optimizer->zero_grad();
  torch::Tensor loss = torch::nn::functional::cross_entropy(s.model->forward(s.x), s.y);
  loss.backward();
  int64_t step = 0;
  for (auto _ : state) {
    s.guard->BeforeStep(step);
    s.guard->AfterBackward(step, loss);
    ++step;
  }
  state.SetLabel(Name(variant));
}
BENCHMARK(BM_GuardOnly)->Arg(kEmbedded)->Arg(kAttached)->ArgName("variant");

}  // namespace

BENCHMARK_MAIN();
