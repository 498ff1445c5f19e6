#!/usr/bin/python3
"""What the lossguard guard adds to a training step.

    bench/guard_overhead.py [--device cpu|cuda] [--steps 300] [--reps 5]

Runs lossguard-train (plain CNN, batch 64, one validation at the end, which
is not counted) with the same seed in three variants, interleaved, `reps`
times each: no guard at all (the schedule set directly), the guard attached
to a lossguardd in OBSERVE mode (gradient norm, reporting, the client's
background thread; the LR is sound, so no action), and the guard in
embedded mode (the analyzers in the training process). Prints the median
training time per step of each and the overhead against no guard.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="cnn")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="lossguard-overhead-")
    daemon = subprocess.Popen([os.path.join(args.bin, "lossguardd"), "--listen=127.0.0.1:0", "--http=",
                               f"--db={os.path.join(work, 'lossguard.db')}",
                               "--log_level=warning"], stdout=subprocess.PIPE, text=True)
    port = int(daemon.stdout.readline().rsplit(" ", 1)[1])
    variants = {
        "no guard": ["--guard=false"],
        "guard, attached": ["--server", f"127.0.0.1:{port}", "--mode", "observe"],
        "guard, embedded": ["--embedded", "--mode", "observe"],
    }
    times = {k: [] for k in variants}
    device = None
    try:
        for rep in range(args.reps):
            for name, extra in variants.items():
                out = os.path.join(work, "m.json")
                cmd = [os.path.join(args.bin, "lossguard-train"), "--device", args.device,
                       "--model", args.model, "--lr", "0.05", "--steps", str(args.steps),
                       "--eval_every", str(args.steps), "--seed", "1", "--quiet",
                       "--run_id", f"overhead-{rep}-{name.replace(' ', '').replace(',', '-')}",
                       "--metrics_out", out] + extra
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                m = json.load(open(out))
                times[name].append(m["ms_per_step"])
                device = m["device"]
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["no guard"])
    print(f"device {device}, model {args.model}, {args.steps} steps x {args.reps} runs each "
          f"(median ms per training step; overhead vs no guard):")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:18s} {med:8.3f} ms   {100.0 * (med / base - 1.0):+6.2f}%   "
              f"(runs: {', '.join(f'{t:.2f}' for t in ts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
