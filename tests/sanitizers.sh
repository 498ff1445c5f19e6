#!/usr/bin/env bash
# The whole test suite again, built with AddressSanitizer (leaks included)
# and UndefinedBehaviorSanitizer, in build-asan/. Any report fails the test
# that hit it. Part of the README's test command (and so of .ci/run).
# ThreadSanitizer runs separately (tests/tsan.sh, in build-tsan/).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-asan -G Ninja -DLOSSGUARD_SANITIZE=address,undefined \
  -DLOSSGUARD_BUILD_BENCH=OFF
cmake --build build-asan
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build-asan --output-on-failure -LE Benchmark -j2
