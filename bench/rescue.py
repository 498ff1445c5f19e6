#!/usr/bin/python3
"""Rescue benchmark: how many runs started with a bad learning rate end
near the well-tuned reference, unattended, with torch's ReduceLROnPlateau,
and attached to lossguard in AUTO mode.

    bench/rescue.py [--steps 400] [--seeds 1 2] [--out rescue.json]
    bench/rescue.py --optimizers sgd --factors 30 100 --methods lossguard   # a slice

Grid: LRs 10x, 30x, 100x and 300x too high and 100x, 300x and 1000x too low
(relative to the reference LR) x SGD with momentum and Adam x seeds, on
lossguard-train's plain CNN with a fixed budget of steps. A run is rescued
when its final validation accuracy is within 2 points of the reference run
(same optimizer and seed, reference LR, unattended, constant). The
reference LR with a cosine decay to the end is trained too, and each
method's tally against that stricter bar is printed beside it: lossguard's
cuts in a run of known length decay the LR to the end, which a constant
reference does not. ReduceLROnPlateau is
torch's (factor 0.1, patience 2 validations, validations every 50 steps),
run in-process by the guard; lossguard runs against one lossguardd.
Binaries are copied first, so rebuilding during a run changes nothing.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REFERENCE_LR = {"sgd": 0.05, "adam": 1e-3}
FACTORS = [10, 30, 100, 300, 1 / 100, 1 / 300, 1 / 1000]
METHODS = ["unattended", "plateau", "lossguard"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adam"])
    ap.add_argument("--factors", type=float, nargs="+", default=FACTORS,
                    help="LR factors against the reference (default: the whole grid)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--out", default="rescue.json")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="lossguard-rescue-")
    for b in ("lossguardd", "lossguard-train"):
        shutil.copy2(os.path.join(args.bin, b), os.path.join(work, b))
    daemon = subprocess.Popen([os.path.join(work, "lossguardd"), "--listen=127.0.0.1:0", "--http=",
                               f"--db={os.path.join(work, 'lossguard.db')}",
                               "--log_level=warning"], stdout=subprocess.PIPE, text=True)
    port = int(daemon.stdout.readline().rsplit(" ", 1)[1])
    results = []

    def train(opt, lr, seed, method):
        out = os.path.join(work, f"{opt}-{lr:g}-{seed}-{method}.json")
        cmd = [os.path.join(work, "lossguard-train"), "--optimizer", opt, "--lr", repr(lr),
               "--seed", str(seed), "--steps", str(args.steps), "--eval_every", "50",
               "--quiet", "--metrics_out", out]
        if method == "plateau":
            cmd += ["--schedule", "plateau"]
        elif method == "cosine":
            cmd += ["--schedule", "cosine"]
        elif method == "lossguard":
            cmd += ["--server", f"127.0.0.1:{port}", "--mode", "auto",
                    "--run_id", f"rescue-{opt}-{lr:g}-s{seed}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.load(open(out))

    start = time.time()
    try:
        reference, decayed = {}, {}
        for opt in args.optimizers:
            for seed in args.seeds:
                m = train(opt, REFERENCE_LR[opt], seed, "unattended")
                reference[(opt, seed)] = m["val_accuracy"]
                # The stricter bar: the reference LR with a cosine decay to
                # the end, as lossguard's cuts in a run of known length get.
                c = train(opt, REFERENCE_LR[opt], seed, "cosine")
                decayed[(opt, seed)] = c["val_accuracy"]
                print(f"reference {opt} lr {REFERENCE_LR[opt]:g} seed {seed}: "
                      f"{m['val_accuracy']:.4f} (cosine decay: {c['val_accuracy']:.4f})",
                      flush=True)
        for opt in args.optimizers:
            for factor in args.factors:
                lr = REFERENCE_LR[opt] * factor
                for seed in args.seeds:
                    row = {"optimizer": opt, "factor": factor, "lr": lr, "seed": seed,
                           "reference": reference[(opt, seed)],
                           "reference_cosine": decayed[(opt, seed)]}
                    for method in args.methods:
                        m = train(opt, lr, seed, method)
                        row[method] = m["val_accuracy"]
                        row[method + "_rescued"] = (
                            m["val_accuracy"] >= reference[(opt, seed)] - 0.02)
                        row[method + "_vs_cosine"] = (
                            m["val_accuracy"] >= decayed[(opt, seed)] - 0.02)
                        if method == "lossguard":
                            row["advice"] = [f"{a['step']}:{a['diagnosis']}->{a['action']}"
                                             f"{'' if a['applied'] else ' (not applied)'}"
                                             for a in m["advice"]]
                    results.append(row)
                    print(f"{opt} lr {lr:.3g} ({factor:g}x) seed {seed}: " +
                          "  ".join(f"{k} {row[k]:.3f}{'*' if row[k + '_rescued'] else ''}"
                                    for k in args.methods) +
                          f"  [{', '.join(row.get('advice', []))}]", flush=True)
    finally:
        daemon.terminate()
        daemon.wait()
    summary = {k: sum(r[k + "_rescued"] for r in results) for k in args.methods}
    n = len(results)
    print(f"\nrescued within 2 points of the reference ({n} runs, {args.steps} steps, "
          f"{time.time() - start:.0f} s):")
    strict = {k: sum(r[k + "_vs_cosine"] for r in results) for k in args.methods}
    for k in args.methods:
        print(f"  {k:12s} {summary[k]:3d}/{n} = {summary[k] / n:.0%}   "
              f"(within 2 points of the cosine-decayed reference: {strict[k]}/{n})")
    for side, pick in (("too high", lambda f: f > 1), ("too low", lambda f: f < 1)):
        rows = [r for r in results if pick(r["factor"])]
        print(f"  LR {side}: " + ", ".join(
            f"{k} {sum(r[k + '_rescued'] for r in rows)}/{len(rows)}" for k in args.methods))
    json.dump({"steps": args.steps, "seeds": args.seeds,
               "reference": {f"{o}/{s}": v for (o, s), v in reference.items()},
               "reference_cosine": {f"{o}/{s}": v for (o, s), v in decayed.items()},
               "runs": results, "summary": summary, "summary_vs_cosine": strict},
              open(args.out, "w"), indent=1)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
