#!/usr/bin/python3
"""Builds an LR-finder corpus from lossguard-train on Fashion-MNIST, in the
format of ../shared/curves/dev/lrfind.jsonl, so that score_lrfind.py scores
any suggestion rule on models and test speeds the dev corpus lacks.

    bench/lrfind_corpus.py --out /tmp/fmnist-lrfind            # cnn, sgd + adam
    ../shared/tools/score_lrfind.py /tmp/fmnist-lrfind \\
        --cmd 'build/bin/lossguard lr-find {csv} --json'

For every model x optimizer:
  - range tests (lossguard-train --lr_range_test: LR from 1e-7 towards 10,
    stopped at 4x the best smoothed loss) with --range-steps steps each; the
    same test run at several speeds (100 steps is fastai's num_it, 300 is
    the dev corpus' x1.06 per step, 600 a slow test), since where the loss
    falls steepest depends on how long the model trains on the way;
  - a sweep of constant LRs on a 1-3 grid x --seeds, --sweep-steps steps,
    validation every 50 steps (unattached: the guard only writes the
    curve); the best LR is the one with the lowest mean (over seeds) of the
    mean of its last 5 validation losses, non-finite runs excluded: the dev
    corpus' rule.
Binaries are copied first, so rebuilding meanwhile changes nothing.
"""
import argparse
import concurrent.futures
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

SWEEPS = {
    "sgd": [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3],
    "adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
}
SWEEPS["adamw"] = SWEEPS["adam"]


def write_curve(path, lrs, losses):
    with open(path, "w") as f:
        f.write("step,lr,loss,val_loss,grad_norm\n")
        for i, (lr, loss) in enumerate(zip(lrs, losses)):
            f.write(f"{i},{lr!r},{loss!r},,\n")


def last_val_mean(curve_csv, k=5):
    vals = []
    with open(curve_csv) as f:
        for row in csv.DictReader(f):
            v = row.get("val_loss", "")
            if v not in ("", None):
                vals.append(float(v))
    tail = vals[-k:]
    if not tail or not all(math.isfinite(v) for v in tail):
        return math.nan
    return sum(tail) / len(tail)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=["cnn"])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], choices=sorted(SWEEPS))
    ap.add_argument("--range-steps", type=int, nargs="+", default=[100, 300, 600])
    ap.add_argument("--sweep-steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    os.makedirs(os.path.join(args.out, "lrfind"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="lossguard-lrfind-")
    train = os.path.join(work, "lossguard-train")
    shutil.copy2(os.path.join(args.bin, "lossguard-train"), train)
    start = time.time()

    def run(cmd):
        subprocess.run([train, "--quiet", "--train_subset", "10000"] + cmd, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    entries = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for model in args.models:
            for opt in args.optimizers:
                task = f"fmnist-{model}-{opt}"
                jobs = []
                for n in args.range_steps:
                    name = f"{task}-lrrange-{n}"
                    out = os.path.join(work, name + ".json")
                    jobs.append(pool.submit(run, ["--model", model, "--optimizer", opt,
                                                  "--lr_range_test", "--steps", str(n),
                                                  "--seed", "1", "--metrics_out", out]))
                sweep = []
                for lr in SWEEPS[opt]:
                    for seed in args.seeds:
                        curve = os.path.join(work, f"{task}-lr{lr:g}-s{seed}.csv")
                        sweep.append((lr, seed, curve))
                        jobs.append(pool.submit(run, [
                            "--model", model, "--optimizer", opt, "--lr", repr(lr),
                            "--seed", str(seed), "--steps", str(args.sweep_steps),
                            "--eval_every", "50", "--curve_out", curve]))
                for j in jobs:
                    j.result()
                results = []
                for lr in SWEEPS[opt]:
                    losses = [last_val_mean(c) if os.path.exists(c) else math.nan
                              for l, _, c in sweep if l == lr]
                    finite = [v for v in losses if math.isfinite(v)]
                    mean = sum(finite) / len(finite) if len(finite) == len(losses) else math.nan
                    results.append({"lr": lr, "final_val_loss": mean})
                ok = [r for r in results if math.isfinite(r["final_val_loss"])]
                if not ok:
                    print(f"{task}: every sweep run failed", file=sys.stderr)
                    continue
                best = min(ok, key=lambda r: r["final_val_loss"])["lr"]
                print(f"{task}: best LR {best:g} "
                      + " ".join(f"{r['lr']:g}:{r['final_val_loss']:.4f}" for r in results),
                      flush=True)
                for n in args.range_steps:
                    name = f"{task}-lrrange-{n}"
                    metrics = os.path.join(work, name + ".json")
                    if not os.path.exists(metrics):
                        print(f"{name}: the range test wrote nothing", file=sys.stderr)
                        continue
                    m = json.load(open(metrics))
                    rel = f"lrfind/{name}.csv"
                    write_curve(os.path.join(args.out, rel), m["lr"], m["loss"])
                    entries.append({
                        "task": f"{task}-{n}", "range_test_run": name, "range_test_file": rel,
                        "sweep_optimizer": opt, "sweep_steps": args.sweep_steps,
                        "best_lr_rule": "lowest mean over seeds of the mean of the last 5 "
                                        "validation losses (non-finite runs excluded)",
                        "sweep": results, "best_lr": best,
                        "range_test": {"lr0": 1e-7, "steps": n, "points": len(m["lr"])}})
    with open(os.path.join(args.out, "lrfind.jsonl"), "w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"{len(entries)} range tests in {args.out} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
