#!/usr/bin/env bash
# The live demo: lossguardd on its embedded SQLite store, and the same
# Fashion-MNIST CNN trained twice with a learning rate that diverges when
# nobody watches: once unattended, once attached in AUTO mode, where
# lossguard diagnoses the divergence, cuts the LR and rolls the weights
# back while the run goes on. Ends with both runs side by side.
#
#   bash examples/demo.sh [LR] [STEPS]      (defaults: 0.5, 400)
#
# Needs the build (build/bin); takes about a minute on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."

LR="${1:-0.5}"
STEPS="${2:-400}"
BIN=build/bin
for b in lossguardd lossguard-train; do
  if [ ! -x "$BIN/$b" ]; then
    echo "demo: $BIN/$b is missing (build with LibTorch installed first)" >&2
    exit 1
  fi
done

WORK="$(mktemp -d)"
FIFO="$WORK/port"
mkfifo "$FIFO"
"$BIN/lossguardd" --listen 127.0.0.1:0 --http 127.0.0.1:0 --db "$WORK/lossguard.db" \
  >"$FIFO" 2>"$WORK/lossguardd.log" &
DAEMON=$!
cleanup() {
  kill -TERM "$DAEMON" 2>/dev/null || true
  wait "$DAEMON" 2>/dev/null || true
}
trap cleanup EXIT
# lossguardd prints "lossguardd listening on port N" once it serves.
exec 3<"$FIFO"
read -r -u 3 LINE
PORT="${LINE##* }"
read -r -u 3 LINE
HTTP_PORT="${LINE##* }"
echo "lossguardd is up on 127.0.0.1:$PORT (store $WORK/lossguard.db, log $WORK/lossguardd.log)"
echo "dashboard while the demo runs: http://127.0.0.1:$HTTP_PORT/"

COMMON=(--lr "$LR" --steps "$STEPS" --optimizer sgd --momentum 0.9 --seed 1 --eval-every 50)

echo
echo "=== 1/2: unattended, lr $LR ==="
"$BIN/lossguard-train" "${COMMON[@]}" --metrics-out "$WORK/unattended.json"

echo
echo "=== 2/2: attached to lossguardd in AUTO mode, lr $LR ==="
"$BIN/lossguard-train" "${COMMON[@]}" --server "127.0.0.1:$PORT" --mode auto \
  --run-id "demo-lr$LR" --metrics-out "$WORK/attached.json"

echo
/usr/bin/python3 - "$WORK/unattended.json" "$WORK/attached.json" <<'PY'
import json, sys
u, a = (json.load(open(p)) for p in sys.argv[1:3])
def f(x, fmt="{:.4f}"):
    return "nan" if x is None else fmt.format(x)
print("=== the same run, side by side ===")
print(f"{'':24}{'unattended':>14}{'lossguard AUTO':>16}")
print(f"{'final val accuracy':24}{f(u['val_accuracy']):>14}{f(a['val_accuracy']):>16}")
print(f"{'final val loss':24}{f(u['val_loss']):>14}{f(a['val_loss']):>16}")
print(f"{'final train loss':24}{f(u['train_loss']):>14}{f(a['train_loss']):>16}")
print(f"{'final LR':24}{f(u['final_lr'], '{:.3g}'):>14}{f(a['final_lr'], '{:.3g}'):>16}")
print(f"{'steps':24}{u['steps']:>14}{a['steps']:>16}")
print(f"{'wall time (s)':24}{u['wall_time_s']:>14.1f}{a['wall_time_s']:>16.1f}")
print("lossguard's corrections:")
for x in a["advice"]:
    print(f"  step {x['step']}: {x['diagnosis']} -> {x['action']}"
          f"{' (applied: ' + x['note'] + ')' if x['applied'] else ' (not applied)'}")
    print(f"      {x['evidence']}")
PY
