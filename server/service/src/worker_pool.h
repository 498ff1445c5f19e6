#ifndef LOSSGUARD_SERVICE_WORKER_POOL_H_
#define LOSSGUARD_SERVICE_WORKER_POOL_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace lossguard::service {

// A fixed set of threads running submitted tasks in order of submission:
// where the requests that block (store reads) or compute (AnalyzeCurve) run,
// instead of gRPC's callback threads.
//
// Thread-safety: Submit may be called from any thread. The destructor runs
// every task already submitted, then joins.
class WorkerPool {
 public:
  explicit WorkerPool(int threads);
  ~WorkerPool();

  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  void Submit(std::function<void()> task);

 private:
  void Loop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace lossguard::service

#endif  // LOSSGUARD_SERVICE_WORKER_POOL_H_
