#!/usr/bin/python3
"""What the lossguard guard adds to a training step.

    bench/guard_overhead.py [--device cpu|cuda] [--steps 300] [--reps 5]
                            [--models "cnn resnet"] [--batch_size 64]

Runs lossguard-train (each model in --models, one validation at the end,
which is not counted; the first --timing_warmup steps are not counted
either) with the same seed in three variants, interleaved, `reps` times
each: no guard at all (the schedule set directly), the guard attached
to a lossguardd in OBSERVE mode (gradient norm, reporting, the client's
background thread; the LR is sound, so no action), and the guard in
embedded mode (the analyzers in the training process). Prints the median
training time per step of each and the overhead against no guard, and the
host time spent in the guard's calls per step (waits for the device
included) and the share of steps it measured. The guard keeps within its
overhead budget (--max_overhead, 1% by default) by measuring only some
steps where measuring all would cost more; "attached, every step"
(--max_overhead=0) measures all of them, as the guard did before the
budget. --more adds two attached variants, every step, that tell where the
cost is: waiting at every step for the previous step's values
(--steps_in_flight=1) and no gradient norm (--grad_norm=false).
"""
import argparse
import json
import os
import shlex
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
    ap.add_argument("--models", default="cnn", help="space-separated: cnn resnet")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--timing_warmup", type=int, default=20)
    ap.add_argument("--daemon", default="",
                    help="command that runs lossguardd (default: BIN/lossguardd)")
    ap.add_argument("--data_dir", default="", help="Fashion-MNIST directory")
    ap.add_argument("--more", action="store_true",
                    help="also attached with 1 step in flight, and without the gradient norm")
    args = ap.parse_args()
    for model in args.models.split():
        measure(args, model)
    return 0


def measure(args, model):
    work = tempfile.mkdtemp(prefix="lossguard-overhead-")
    daemon_cmd = shlex.split(args.daemon) or [os.path.join(args.bin, "lossguardd")]
    daemon = subprocess.Popen(daemon_cmd + ["--listen=127.0.0.1:0", "--http=",
                               f"--db={os.path.join(work, 'lossguard.db')}",
                               "--log_level=warning"], stdout=subprocess.PIPE, text=True)
    port = int(daemon.stdout.readline().rsplit(" ", 1)[1])
    variants = {
        "no guard": ["--guard=false"],
        "guard, attached": ["--server", f"127.0.0.1:{port}", "--mode", "observe"],
        "guard, embedded": ["--embedded", "--mode", "observe"],
    }
    attached = variants["guard, attached"]
    variants["attached, every step"] = attached + ["--max_overhead=0"]
    if args.more:
        variants["attached, 1 in flight"] = attached + ["--steps_in_flight=1",
                                                        "--max_overhead=0"]
        variants["attached, no norm"] = attached + ["--grad_norm=false", "--max_overhead=0"]
    times = {k: [] for k in variants}
    guard_us = {k: [] for k in variants}
    measured = {k: [] for k in variants}  # share of steps measured
    device = None
    try:
        for rep in range(args.reps):
            for name, extra in variants.items():
                out = os.path.join(work, "m.json")
                cmd = [os.path.join(args.bin, "lossguard-train"), "--device", args.device,
                       "--model", model, "--lr", "0.05", "--steps", str(args.steps),
                       "--batch_size", str(args.batch_size),
                       "--timing_warmup", str(args.timing_warmup),
                       "--eval_every", str(args.steps), "--seed", "1", "--quiet",
                       "--run_id", f"overhead-{rep}-{name.replace(' ', '').replace(',', '-')}",
                       "--metrics_out", out] + extra
                if args.data_dir:
                    cmd += ["--data", args.data_dir]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                m = json.load(open(out))
                times[name].append(m["ms_per_step"])
                if "guard_us_per_step" in m:
                    guard_us[name].append(m["guard_us_per_step"])
                if "guard_measured_steps" in m:
                    measured[name].append(m["guard_measured_steps"] / max(
                        1, m["guard_measured_steps"] + m["guard_skipped_steps"]))
                device = m["device"]
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["no guard"])
    print(f"device {device}, model {model}, batch {args.batch_size}, {args.steps} steps "
          f"({args.steps - args.timing_warmup} timed) x {args.reps} runs each "
          f"(median ms per training step; overhead vs no guard; host time in the "
          f"guard's calls per step; steps measured):", flush=True)
    for name, ts in times.items():
        med = statistics.median(ts)
        g = (f"guard {statistics.median(guard_us[name]):7.1f} us"
             if guard_us[name] else " " * 16)
        g += (f"  measured {100.0 * statistics.median(measured[name]):5.1f}%"
              if measured[name] else " " * 16)
        print(f"  {name:22s} {med:8.3f} ms   {100.0 * (med / base - 1.0):+6.2f}%   {g}   "
              f"(runs: {', '.join(f'{t:.3f}' for t in ts)})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
