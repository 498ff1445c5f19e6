#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz) with clang in build-fuzz/ and runs
# each for a bounded time on a copy of its seed corpus (tests/fuzz/corpus/,
# never written to). Fails when any target finds a crash, a sanitizer report
# or a broken invariant; the input is left in build-fuzz/fuzz-artifacts/.
#
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_TARGETS   which targets (default: fuzz_csv fuzz_tfevents fuzz_attach)
#   FUZZ_RSS_MB    libFuzzer's -rss_limit_mb (default 3072)
#   FUZZ_TIMEOUT   libFuzzer's -timeout, seconds per input (default 30)
#
# Reproduce a finding: build-fuzz/bin/<target> <artifact>. Add it to the
# corpus (tests/fuzz/corpus/<target>/repro-<name>) once it is fixed.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"fuzz_csv fuzz_tfevents fuzz_attach"}
rss_mb=${FUZZ_RSS_MB:-3072}
timeout_s=${FUZZ_TIMEOUT:-30}
build=build-fuzz

# clang and libFuzzer's runtime (Debian 12: clang-14, libclang-rt-14-dev).
links_fuzzer() {
  local dir
  dir=$(mktemp -d)
  printf '%s\n' '#include <cstddef>' '#include <cstdint>' \
    'extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }' \
    > "$dir/t.cc"
  clang++ -fsanitize=fuzzer,address,undefined "$dir/t.cc" -o "$dir/t" \
    >/dev/null 2>&1
  local rc=$?
  rm -rf "$dir"
  return $rc
}
if ! command -v clang++ >/dev/null 2>&1 || ! links_fuzzer; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "fuzz.sh: installing clang and libclang-rt-14-dev"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    --no-install-recommends clang libclang-rt-14-dev
  links_fuzzer || { echo "fuzz.sh: clang cannot link -fsanitize=fuzzer" >&2; exit 1; }
fi

# Every library with coverage and the sanitizers; -fsanitize=fuzzer only on
# the fuzz executables (tests/fuzz/CMakeLists.txt). Warnings are errors, as
# in the GCC build (clang adds -Wthread-safety).
start=$(date +%s)
CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja \
  -DCMAKE_CXX_COMPILER=clang++ \
  -DLOSSGUARD_FUZZ=ON -DLOSSGUARD_BUILD_TESTS=ON -DLOSSGUARD_BUILD_BENCH=OFF \
  -DLOSSGUARD_SANITIZE=fuzzer-no-link,address,undefined >/dev/null
# shellcheck disable=SC2086
cmake --build "$build" -j2 --target $targets
built=$(date +%s)
echo "fuzz.sh: build took $((built - start)) s"

# A smaller quarantine than ASan's 256 MB: fuzz_attach's RSS otherwise
# creeps up (allocator fragmentation, not a leak: flat with no quarantine)
# towards -rss_limit_mb on long runs.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1:quarantine_size_mb=64}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
summary=()
for t in $targets; do
  work=$build/fuzz-work/$t
  artifacts=$build/fuzz-artifacts/$t
  rm -rf "$work"
  mkdir -p "$work/corpus" "$artifacts"
  cp tests/fuzz/corpus/"$t"/* "$work/corpus/"
  args=(-max_total_time="$seconds" -rss_limit_mb="$rss_mb" -timeout="$timeout_s"
        -print_final_stats=1 -artifact_prefix="$artifacts/")
  [ -f tests/fuzz/"$t".dict ] && args+=(-dict=tests/fuzz/"$t".dict)
  # The daemon logs a JSON line per event: silence stderr (libFuzzer and the
  # sanitizers still report on their own copy of it).
  [ "$t" = fuzz_attach ] && args+=(-close_fd_mask=2)
  echo "fuzz.sh: $t for ${seconds} s"
  t0=$(date +%s)
  rc=0
  timeout $((seconds * 2 + 300)) "$build/bin/$t" "${args[@]}" "$work/corpus" \
    >"$work.log" 2>&1 || rc=$?
  t1=$(date +%s)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work.log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work.log")
  added=$(sed -n 's/^stat::new_units_added: *//p' "$work.log")
  cov=$(grep -o 'cov: [0-9]*' "$work.log" | tail -1 || true)
  summary+=("$t: ${execs:-?} runs, ${rate:-?} exec/s, ${added:-?} new units, ${cov:-cov: ?}, $((t1 - t0)) s, exit $rc")
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    echo "fuzz.sh: $t FAILED (exit $rc); the log's end:" >&2
    grep -v '^#[0-9]' "$work.log" | tail -40 >&2
  fi
done

echo "fuzz.sh: summary (build $((built - start)) s, fuzzing $(( $(date +%s) - built )) s)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzz.sh: failed: ${failed[*]}; inputs in $build/fuzz-artifacts/" >&2
  ls -l "$build"/fuzz-artifacts/*/ >&2 || true
  exit 1
fi
echo "fuzz.sh: no crash"
