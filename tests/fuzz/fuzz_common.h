// Helpers shared by the fuzz targets: a memfd that a reader can open by
// path, bit-exact double comparison, and a failed check that tells what it
// saw before it aborts (libFuzzer then saves the input as a crash).

#ifndef LOSSGUARD_TESTS_FUZZ_FUZZ_COMMON_H_
#define LOSSGUARD_TESTS_FUZZ_FUZZ_COMMON_H_

#include <sanitizer/common_interface_defs.h>
#include <sys/mman.h>
#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/stubs/logging.h"

namespace lossguard::fuzz {

// Aborts with a message when `cond` is false: a broken invariant is a crash
// for libFuzzer, whatever the sanitizers say. The message goes where the
// sanitizers report (stderr, or libFuzzer's copy of it under
// -close_fd_mask=2, which silences the daemon's logs).
#define FUZZ_CHECK(cond, ...)                                  \
  do {                                                         \
    if (!(cond)) {                                             \
      ::lossguard::fuzz::Fail(__FILE__, __LINE__, #cond,       \
                              ::absl::StrFormat(__VA_ARGS__)); \
    }                                                          \
  } while (0)

[[noreturn]] inline void Fail(const char* file, int line, const char* cond,
                              const std::string& what) {
  const std::string m = ::absl::StrFormat("%s:%d: FUZZ_CHECK(%s) failed: %s",
                                          file, line, cond, what);
  __sanitizer_report_error_summary(m.c_str());
  std::abort();
}

// The same value: NaN equals NaN (of any payload); otherwise bit for bit,
// so -0.0 differs from 0.0.
inline bool SameDouble(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

inline bool SameOptional(const std::optional<double>& a,
                         const std::optional<double>& b) {
  if (a.has_value() != b.has_value()) return false;
  return !a.has_value() || SameDouble(*a, *b);
}

// Debian's Abseil has its own string_view, not std's: these take std's.
inline bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}
inline bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.substr(s.size() - suffix.size()) == suffix;
}
// The whole of `s` as a decimal int64.
inline bool ParseInt(std::string_view s, int64_t* out) {
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return !s.empty() && ec == std::errc() && ptr == s.data() + s.size();
}
// A status's message as a std::string.
inline std::string Message(const absl::Status& s) {
  return std::string(s.message());
}

// Drops protobuf's log lines (a string field that is not UTF-8 is logged
// on every parse; the code under test reports the failure itself).
inline bool QuietProtobuf() {
  google::protobuf::SetLogHandler(
      [](google::protobuf::LogLevel, const char*, int, const std::string&) {});
  return true;
}

// An anonymous in-memory file that readers open by its /proc path. One per
// process, rewritten for each input.
class MemFile {
 public:
  MemFile() {
    fd_ = ::memfd_create("lossguard-fuzz", MFD_CLOEXEC);
    FUZZ_CHECK(fd_ >= 0, "memfd_create failed");
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;

  const std::string& path() const { return path_; }

  void Write(std::string_view data) {
    FUZZ_CHECK(::ftruncate(fd_, 0) == 0, "ftruncate failed");
    size_t done = 0;
    while (done < data.size()) {
      const ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done,
                                 static_cast<off_t>(done));
      FUZZ_CHECK(n > 0, "pwrite failed");
      done += static_cast<size_t>(n);
    }
  }

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace lossguard::fuzz

#endif  // LOSSGUARD_TESTS_FUZZ_FUZZ_COMMON_H_
