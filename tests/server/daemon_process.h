// A lossguardd child process for tests of the built binary: started on a
// port the OS picks (or a given address, to restart on the same port), its
// stdout read for the port line, stopped by SIGTERM or killed by SIGKILL,
// and killed with the test process if that dies first.

#ifndef LOSSGUARD_TESTS_SERVER_DAEMON_PROCESS_H_
#define LOSSGUARD_TESTS_SERVER_DAEMON_PROCESS_H_

#include <signal.h>
#include <sys/prctl.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

extern char** environ;

namespace lossguard::testing {

class DaemonProcess {
 public:
  // `listen`: --listen's value; `extra`: more flags.
  explicit DaemonProcess(const std::string& db,
                         const std::string& listen = "127.0.0.1:0",
                         std::vector<std::string> extra = {
                             "--http=127.0.0.1:0"}) {
    int out[2];
    if (pipe(out) != 0) return;
    std::vector<std::string> args = {LOSSGUARDD_BIN,
                                     absl::StrCat("--listen=", listen),
                                     absl::StrCat("--db=", db),
                                     "--log_level=warning"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = getpid();
    pid_ = fork();
    if (pid_ == 0) {
      // The child: only async-signal-safe calls until exec. It dies with
      // the test (a test that crashes leaves no daemon holding ctest's
      // output pipe open).
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      dup2(out[1], STDOUT_FILENO);
      close(out[0]);
      close(out[1]);
      execve(argv[0], argv.data(), environ);
      _exit(127);
    }
    close(out[1]);
    stdout_ = fdopen(out[0], "r");
    char line[256];
    // "lossguardd listening on port N"
    if (stdout_ != nullptr && fgets(line, sizeof line, stdout_) != nullptr) {
      std::string s(line);
      const size_t at = s.rfind(' ');
      int port = 0;
      if (at != std::string::npos &&
          absl::SimpleAtoi(s.substr(at + 1, s.size() - at - 2), &port)) {
        port_ = port;
      }
    }
  }
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;
  ~DaemonProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (stdout_ != nullptr) fclose(stdout_);
  }

  int port() const { return port_; }

  void SendSigterm() { kill(pid_, SIGTERM); }

  // SIGTERM, then the exit status.
  int Terminate() {
    SendSigterm();
    return Wait();
  }

  // SIGKILL (a crash: nothing is flushed), then the exit status.
  int Kill() {
    kill(pid_, SIGKILL);
    return Wait();
  }

  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
  FILE* stdout_ = nullptr;
  int port_ = 0;
};

}  // namespace lossguard::testing

#endif  // LOSSGUARD_TESTS_SERVER_DAEMON_PROCESS_H_
