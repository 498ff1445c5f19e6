#!/usr/bin/env bash
# Starts or stops a throwaway PostgreSQL server on loopback for the tests
# (ctest runs `start` as a fixture before the tests that need it and `stop`
# after them). Debian's postgresql package provides the binaries; no
# cluster of the system's is touched.
#
#   pg_server.sh start STATE_DIR   initdb in a fresh temporary directory,
#                                  start on 127.0.0.1 at a free port, write
#                                  STATE_DIR/conninfo (libpq key=value)
#   pg_server.sh stop STATE_DIR    stop it and remove its data
#
# The cluster trades durability for speed (fsync off): it lives for one
# test run. As root, the server runs as the `postgres` user (PostgreSQL
# refuses to run as root).
set -euo pipefail

cmd=${1:?usage: pg_server.sh start|stop STATE_DIR}
state=${2:?usage: pg_server.sh start|stop STATE_DIR}
mkdir -p "$state"
state=$(cd "$state" && pwd)

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/pg_ctl" ]; then
  echo "pg_server.sh: PostgreSQL server binaries not found under" \
       "/usr/lib/postgresql (deploy/install-deps.sh installs postgresql)" >&2
  exit 1
fi

as_server() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

stop() {
  if [ -f "$state/datadir" ]; then
    local data
    data=$(cat "$state/datadir")
    if [ -d "$data" ]; then
      as_server "$bindir/pg_ctl" -D "$data" -m immediate -w stop \
        >/dev/null 2>&1 || true
      rm -rf "$data"
    fi
    rm -f "$state/datadir" "$state/conninfo"
  fi
}

free_port() {
  /usr/bin/python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$cmd" in
  stop)
    stop
    ;;
  start)
    stop  # a server left behind by an interrupted run
    data=$(mktemp -d /tmp/lossguard-pg.XXXXXX)
    echo "$data" >"$state/datadir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$data"; fi
    as_server "$bindir/initdb" -D "$data/db" -U lossguard -A trust -E UTF8 \
      --no-sync >"$state/initdb.log" 2>&1 ||
      { cat "$state/initdb.log" >&2; exit 1; }
    # The port comes from the OS; another process may take it before the
    # server binds, so try a few.
    for attempt in 1 2 3 4 5; do
      port=$(free_port)
      if as_server "$bindir/pg_ctl" -D "$data/db" -l "$data/server.log" -w \
          -t 60 start -o "-c listen_addresses=127.0.0.1 -p $port \
          -c unix_socket_directories=$data -c fsync=off \
          -c synchronous_commit=off -c full_page_writes=off \
          -c max_connections=300" >/dev/null 2>&1; then
        echo "host=127.0.0.1 port=$port user=lossguard dbname=postgres" \
          >"$state/conninfo"
        echo "pg_server.sh: PostgreSQL on 127.0.0.1:$port ($data)"
        exit 0
      fi
    done
    cat "$data/server.log" >&2 || true
    echo "pg_server.sh: could not start PostgreSQL" >&2
    exit 1
    ;;
  *)
    echo "usage: pg_server.sh start|stop STATE_DIR" >&2
    exit 2
    ;;
esac
