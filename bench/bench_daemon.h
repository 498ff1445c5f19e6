#ifndef LOSSGUARD_BENCH_BENCH_DAEMON_H_
#define LOSSGUARD_BENCH_BENCH_DAEMON_H_

// One in-process lossguardd (memory store, loopback, port 0) for a whole
// benchmark program.

#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "lossguard/service/service.h"
#include "lossguard/storage/run_store.h"

namespace lossguard::bench {

class BenchDaemon {
 public:
  static BenchDaemon& Get() {
    static BenchDaemon* daemon = new BenchDaemon();
    return *daemon;
  }
  std::string address() const { return absl::StrCat("127.0.0.1:", daemon_->port()); }

 private:
  BenchDaemon() : store_(storage::NewMemoryStore()) {
    service::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.http_listen = "";
    daemon_ = std::make_unique<service::Daemon>(options, store_.get());
    if (!daemon_->Start().ok()) std::abort();
  }
  std::unique_ptr<storage::RunStore> store_;
  std::unique_ptr<service::Daemon> daemon_;
};

}  // namespace lossguard::bench

#endif  // LOSSGUARD_BENCH_BENCH_DAEMON_H_
