#!/usr/bin/env bash
# The whole test suite again, built with AddressSanitizer (leaks included)
# and UndefinedBehaviorSanitizer, in build-asan/. Any report fails the test
# that hit it. Part of the README's test command (and so of .ci/run).
# ThreadSanitizer runs separately (tests/tsan.sh, in build-tsan/).
set -euo pipefail
cd "$(dirname "$0")/.."
# -O1 -g1 (line tables), as the sanitizers' docs advise: the reports keep
# their file:line stacks, and the build is a third shorter than at -O2 -g
# (847 s against 1239 s on 2 cores; daemon_test.cc 92 s against 168 s).
cmake -S . -B build-asan -G Ninja -DLOSSGUARD_SANITIZE=address,undefined \
  -DLOSSGUARD_BUILD_BENCH=OFF "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG"
cmake --build build-asan
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build-asan --output-on-failure -LE Benchmark -j2
