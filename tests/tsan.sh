#!/usr/bin/env bash
# The whole test suite again, built with ThreadSanitizer, in build-tsan/.
# Any report fails the test that hit it (halt_on_error).
#
# Debian's abseil, gRPC, protobuf, OpenSSL and LibTorch are not built with
# TSan, so it cannot see the synchronization inside them:
#  - tests/tsan_absl_sync.cc annotates what lossguard relies on (absl::Mutex
#    and friends, a gRPC operation and its completion, the end of a server's
#    calls); it is linked into every executable of build-tsan;
#  - tests/tsan.supp silences what remains inside those libraries, never a
#    race whose access is lossguard's own code.
# The build is GCC's, as the normal one; it needs no extra warning flag.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
root=$PWD
build=build-tsan
shim=$root/$build/tsan_absl_sync.o

# The annotations, compiled before CMake sees them: CMake's own link checks
# use CMAKE_EXE_LINKER_FLAGS too, hence -fsanitize=thread there as well.
mkdir -p "$build"
if [[ ! -f $shim || tests/tsan_absl_sync.cc -nt $shim ]]; then
  c++ -std=c++20 -O2 -g -DNDEBUG -fPIC -fsanitize=thread -fno-omit-frame-pointer \
    -Wall -Wextra -Wpedantic -Werror -c tests/tsan_absl_sync.cc -o "$shim"
  # Ninja does not know the executables depend on it: relink them.
  find "$build/bin" -maxdepth 1 -type f -perm -u+x -delete 2>/dev/null || true
fi

# -O2 -g, not the -O1 -g1 of tests/sanitizers.sh: at -O1 TSan reports a race
# inside gRPC itself in 7-8 of 30 runs of
# DaemonTest.HttpPortServesMetricsApiAndDashboard (libgrpc's memcpy, from
# absl::StrAppend in the client's grpc_call_start_batch on the in-process
# channel, of the status message the server thread wrote; gRPC orders them
# with synchronization TSan cannot see), and in 0 of 30 at -O2. Given
# explicitly, so a build-tsan/ configured with other flags is rebuilt.
cmake -S . -B "$build" -G Ninja -DLOSSGUARD_SANITIZE=thread \
  -DLOSSGUARD_BUILD_BENCH=OFF "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g -DNDEBUG" "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread $shim"
cmake --build "$build" -j2
built=$(date +%s)

export TSAN_OPTIONS="suppressions=$root/tests/tsan.supp:halt_on_error=1:second_deadlock_stack=1:history_size=4"
ctest --test-dir "$build" --output-on-failure -LE Benchmark -j2
end=$(date +%s)
echo "tsan.sh: build $((built - start)) s, tests $((end - built)) s, total $((end - start)) s"
