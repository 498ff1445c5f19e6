#!/usr/bin/python3
"""The rescue benchmark for PyTorch: bench/rescue.py's grid, trained by a
plain PyTorch loop with lossguard.TorchGuard (the Python package) instead
of lossguard-train's C++ guard.

    bench/py_rescue.py [--steps 400] [--seeds 1 2] [--out py_rescue.json]
    bench/py_rescue.py --optimizers sgd --factors 10 0.01 --methods lossguard

The same task as bench/rescue.py: the plain CNN (py_guard_overhead.Cnn,
lossguard-train's architecture) on 10,000 Fashion-MNIST training images
from Debian's dataset-fashion-mnist, batch 64, reshuffled every epoch,
validation on the first 2,000 test images every 50 steps; LRs 10x to 300x
too high and 100x to 1000x too low against the reference (SGD with momentum
0.9 at 0.05, Adam at 1e-3), x optimizers x seeds. A run is rescued when it
ends within 2 points of validation accuracy of the reference run (same
optimizer and seed, reference LR, unattended). Methods: unattended; torch's
ReduceLROnPlateau on the validation loss (factor 0.1, patience 2
validations); lossguard AUTO: a Client attached to one lossguardd and
TorchGuard(optimizer, client, model=model) with weight rollback, the loop
of the README. Needs the package with its stubs (build/python).
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
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from py_guard_overhead import Cnn, load_images  # noqa: E402

REFERENCE_LR = {"sgd": 0.05, "adam": 1e-3}
FACTORS = [10, 30, 100, 300, 1 / 100, 1 / 300, 1 / 1000]
METHODS = ["unattended", "plateau", "lossguard"]


def evaluate(model, x, y):
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], 500):
            out = model(x[i:i + 500])
            loss += F.cross_entropy(out, y[i:i + 500], reduction="sum").item()
            correct += (out.argmax(1) == y[i:i + 500]).sum().item()
    model.train()
    return loss / x.shape[0], correct / x.shape[0]


def train(args, data, opt_name, lr, seed, method, server, run_id):
    """One run; returns (final val accuracy, advice in words)."""
    import lossguard
    (x, y), (vx, vy) = data
    torch.manual_seed(seed)
    model = Cnn()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=2)
               if method == "plateau" else None)
    client = guard = None
    if method == "lossguard":
        client = lossguard.Client(server, run_id=run_id, project="py-rescue", mode="auto",
                                  config={"optimizer": opt_name, "base_lr": lr,
                                          "batch_size": args.batch_size,
                                          "total_steps": args.steps})
        guard = lossguard.TorchGuard(opt, client, model=model)
    curve = [] if args.curves and method == "lossguard" else None
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=gen)
    pos = 0
    for step in range(args.steps):
        if pos + args.batch_size > x.shape[0]:
            order = torch.randperm(x.shape[0], generator=gen)
            pos = 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        if guard is not None:
            guard.before_step(step)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if guard is not None:
            guard.after_backward(step, loss)
        if curve is not None:
            curve.append([step, opt.param_groups[0]["lr"], loss.item(), ""])
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_loss, _ = evaluate(model, vx, vy)
            if curve is not None:
                curve[-1][3] = val_loss
            if guard is not None:
                guard.report_validation(step, val_loss)
            if plateau is not None:
                plateau.step(val_loss if np.isfinite(val_loss) else float("inf"))
        if guard is not None and guard.should_stop:
            break
    _, acc = evaluate(model, vx, vy)
    if curve is not None:
        # The LR each step trained with (after any action applied before
        # its optimizer.step()), as lossguard saw it.
        os.makedirs(args.curves, exist_ok=True)
        with open(os.path.join(args.curves, f"{run_id}.csv"), "w") as f:
            f.write("step,lr,loss,val_loss\n")
            for row in curve:
                f.write(",".join(str(v) for v in row) + "\n")
    advice = []
    measured = None
    if guard is not None:
        guard.flush()
        client.finish(timeout=10.0)
        advice = [f"{step}:{pb_name(a.diagnosis.kind)}->{note or 'no action'}"
                  f"{'' if applied else ' (not applied)'}"
                  for step, a, applied, note in guard.events]
        # Steps measured within the guard's overhead budget (max_overhead).
        measured = [guard.measured_steps, guard.measured_steps + guard.skipped_steps]
    return acc, advice, measured


def pb_name(kind):
    from lossguard.v1 import lossguard_pb2 as pb
    return pb.DiagnosisKind.Name(kind)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adam"])
    ap.add_argument("--factors", type=float, nargs="+", default=FACTORS)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--eval_every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--daemon", default="build/bin/lossguardd")
    ap.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--pythonpath", default="build/python")
    ap.add_argument("--out", default="py_rescue.json")
    ap.add_argument("--curves", default="",
                    help="write each lossguard run's curve here as CSV (for lossguard analyze)")
    args = ap.parse_args()
    sys.path.insert(0, args.pythonpath)
    torch.set_num_threads(args.threads)
    data = (load_images(args.data_dir, 10000), load_images(args.data_dir, 2000, "t10k"))

    work = tempfile.mkdtemp(prefix="lossguard-pyrescue-")
    daemon_bin = shlex.split(args.daemon)
    shutil.copy2(daemon_bin[0], os.path.join(work, "lossguardd"))
    daemon = subprocess.Popen([os.path.join(work, "lossguardd")] + daemon_bin[1:] + [
        "--listen=127.0.0.1:0", "--http=", f"--db={os.path.join(work, 'lossguard.db')}",
        "--log_level=warning"], stdout=subprocess.PIPE, text=True)
    server = "127.0.0.1:" + daemon.stdout.readline().rsplit(" ", 1)[1].strip()
    results = []
    start = time.time()
    try:
        reference = {}
        for opt in args.optimizers:
            for seed in args.seeds:
                acc, _, _ = train(args, data, opt, REFERENCE_LR[opt], seed, "unattended",
                                  server, "")
                reference[(opt, seed)] = acc
                print(f"reference {opt} lr {REFERENCE_LR[opt]:g} seed {seed}: {acc:.4f}",
                      flush=True)
        for opt in args.optimizers:
            for factor in args.factors:
                lr = REFERENCE_LR[opt] * factor
                for seed in args.seeds:
                    row = {"optimizer": opt, "factor": factor, "lr": lr, "seed": seed,
                           "reference": reference[(opt, seed)]}
                    for method in args.methods:
                        acc, advice, measured = train(args, data, opt, lr, seed, method,
                                                      server, f"py-rescue-{opt}-{lr:g}-s{seed}")
                        row[method] = acc
                        row[method + "_rescued"] = acc >= reference[(opt, seed)] - 0.02
                        if method == "lossguard":
                            row["advice"] = advice
                            row["measured_steps"] = measured
                    results.append(row)
                    print(f"{opt} lr {lr:.3g} ({factor:g}x) seed {seed}: " +
                          "  ".join(f"{k} {row[k]:.3f}{'*' if row[k + '_rescued'] else ''}"
                                    for k in args.methods) +
                          f"  [{', '.join(row.get('advice', []))}]", flush=True)
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    summary = {k: sum(r[k + "_rescued"] for r in results) for k in args.methods}
    n = len(results)
    print(f"\nrescued within 2 points of the reference ({n} runs, {args.steps} steps, "
          f"PyTorch {torch.__version__}, {time.time() - start:.0f} s):")
    for k in args.methods:
        mean = statistics.mean(r[k] for r in results) if results else float("nan")
        print(f"  {k:12s} {summary[k]:3d}/{n} = {summary[k] / max(n, 1):.0%}   "
              f"mean val acc {mean:.3f}")
    for side, pick in (("too high", lambda f: f > 1), ("too low", lambda f: f < 1)):
        rows = [r for r in results if pick(r["factor"])]
        print(f"  LR {side}: " + ", ".join(
            f"{k} {sum(r[k + '_rescued'] for r in rows)}/{len(rows)}" for k in args.methods))
    json.dump({"steps": args.steps, "seeds": args.seeds, "torch": torch.__version__,
               "reference": {f"{o}/{s}": v for (o, s), v in reference.items()},
               "runs": results, "summary": summary}, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
