#ifndef LOSSGUARD_SERVICE_LOG_H_
#define LOSSGUARD_SERVICE_LOG_H_

#include <string_view>

#include "nlohmann/json.hpp"

namespace lossguard::service {

enum class LogLevel { kDebug, kInfo, kWarning, kError };

// Structured logs: one JSON object per line on stderr,
// {"ts":"2026-11-27T04:30:00.123Z","level":"info","event":"attach",...}.
// `fields` must be a JSON object (or null). Lines from concurrent threads
// never interleave.
void Log(LogLevel level, std::string_view event,
         const nlohmann::json& fields = nullptr);

// Messages below this level are dropped (default kInfo). Set once in main.
void SetLogLevel(LogLevel level);

}  // namespace lossguard::service

#endif  // LOSSGUARD_SERVICE_LOG_H_
