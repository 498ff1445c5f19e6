#!/usr/bin/python3
"""Runs lossguard-train briefly and checks its --metrics-out JSON.

    check_metrics.py LOSSGUARD_TRAIN
"""
import json
import os
import subprocess
import sys
import tempfile


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "m.json")
        curve = os.path.join(d, "curve.csv")
        subprocess.run([binary, "--steps", "40", "--train-subset", "1000",
                        "--val-size", "300", "--eval-every", "20", "--lr", "0.05",
                        "--schedule", "cosine", "--warmup", "5", "--quiet",
                        "--max_overhead=0",  # every step, whatever the machine's speed
                        "--metrics-out", out, "--curve-out", curve], check=True)
        m = json.load(open(out))
        assert m["steps"] == 40, m
        assert m["attached"] is False and m["mode"] == "unattended", m
        assert 0.0 <= m["val_accuracy"] <= 1.0, m
        assert m["val_accuracy"] > 0.3, f"40 steps of a sane LR learn something: {m}"
        assert m["val_loss"] is not None and m["val_loss"] > 0, m
        assert m["advice"] == [], m
        assert (m["guard_measured_steps"], m["guard_skipped_steps"]) == (40, 0), m
        # Cosine to step 40 (T_max = 35 after 5 warmup steps): ends near 0.
        assert m["final_lr"] < 0.01, m
        # --curve-out: every step in the corpus format, validation where run.
        lines = open(curve).read().splitlines()
        assert lines[0] == "step,lr,loss,val_loss,grad_norm", lines[0]
        rows = [line.split(",") for line in lines[1:]]
        assert [int(r[0]) for r in rows] == list(range(40)), rows
        assert [i for i, r in enumerate(rows) if r[3]] == [19, 39], rows
        assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows), rows
        assert abs(float(rows[-1][1]) - m["final_lr"]) < 1e-6 + 0.1 * m["final_lr"], (rows[-1], m)
        # Training time per step, and the host time of the guard's calls in it.
        assert m["ms_per_step"] > 0 and 0 < m["guard_us_per_step"] < 1000 * m["ms_per_step"], m
        # A budget so small that only what must be reported is (no dense
        # start): the first step, and the steps with a validation loss (the
        # last among them).
        subprocess.run([binary, "--steps", "40", "--train-subset", "1000",
                        "--val-size", "300", "--eval-every", "20", "--quiet",
                        "--max_overhead=1e-9", "--dense_steps=0", "--metrics-out", out,
                        "--curve-out", curve],
                       check=True)
        m = json.load(open(out))
        rows = [line.split(",") for line in open(curve).read().splitlines()[1:]]
        assert [int(r[0]) for r in rows] == [0, 19, 39], rows
        assert [r[3] != "" for r in rows] == [False, True, True], rows
        assert (m["guard_measured_steps"], m["guard_skipped_steps"]) == (3, 37), m
        # --grad_norm=false: the curve has the loss and no gradient norm.
        subprocess.run([binary, "--steps", "10", "--train-subset", "500", "--val-size", "100",
                        "--quiet", "--grad_norm=false", "--max_overhead=0", "--metrics-out", out,
                        "--curve-out", curve], check=True)
        rows = [line.split(",") for line in open(curve).read().splitlines()[1:]]
        assert len(rows) == 10 and all(float(r[2]) > 0 and r[4] == "" for r in rows), rows
        # Bad flags are errors, not crashes.
        r = subprocess.run([binary, "--steps_in_flight", "0"], capture_output=True, text=True)
        assert r.returncode == 1 and "--steps_in_flight" in r.stderr, r
        r = subprocess.run([binary, "--max_overhead=-0.5"], capture_output=True, text=True)
        assert r.returncode == 1 and "--max_overhead" in r.stderr, r
        r = subprocess.run([binary, "--optimizer", "lion"], capture_output=True, text=True)
        assert r.returncode == 1 and "--optimizer" in r.stderr, r
        r = subprocess.run([binary, "--data", d], capture_output=True, text=True)
        assert r.returncode == 1 and "cannot open" in r.stderr, r
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
