#!/usr/bin/env bash
# Soak (issue 7.5): N simulated trainers at R steps/s each against a real
# lossguardd (its own process, SQLite on disk) for S seconds; then every
# stream stops, waits for its confirmations and ends cleanly, and the
# daemon must store exactly the steps each stream sent. Prints throughput,
# advice latency p50/p99, stream errors, the daemon's RSS every 15 s, and
# the check.
#
#   bash bench/soak.sh [STREAMS=1000] [RATE=100] [SECONDS=180]
#   SOAK_DB=postgresql://user@host:port/db bash bench/soak.sh ...  (PostgreSQL)
#
# Needs the build (build/bin). A benchmark, not a test: CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
streams=${1:-1000}
rate=${2:-100}
seconds=${3:-180}
work=$(mktemp -d)
trap 'kill "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
build/bin/lossguardd --listen=127.0.0.1:0 --http= --db="${SOAK_DB:-$work/soak.db}" \
  --log_level=warning >"$work/d.out" 2>"$work/d.err" &
daemon_pid=$!
for _ in $(seq 100); do
  grep -q "listening on port" "$work/d.out" 2>/dev/null && break
  sleep 0.1
done
port=$(awk '/listening on port/ {print $NF}' "$work/d.out")
[ -n "$port" ] || { echo "lossguardd did not start:"; cat "$work/d.err"; exit 1; }
# Batches of rate/10 steps: ten a second per trainer.
batch=$(( rate / 10 > 0 ? rate / 10 : 1 ))
build/bin/lossguard-loadgen --server="127.0.0.1:$port" --streams="$streams" --rate="$rate" \
  --batch="$batch" --seconds="$seconds" --warmup=5 --verify \
  --rss_pid="$daemon_pid" --rss_every_s=15
