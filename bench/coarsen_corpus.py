#!/usr/bin/python3
"""Writes a copy of a labelled curve corpus logged every K steps, to check
that the analyzers' defaults carry over to coarser logs (a trainer that
logs every K steps, or the mean of the last K).

    bench/coarsen_corpus.py ../shared/curves/dev /tmp/dev-mean5 5 mean
    ../shared/tools/score.py /tmp/dev-mean5 --cmd 'build/bin/lossguard analyze {csv} --json'

Each output point is the last step of a block of K: its step and LR, the
mean of the block's losses ("mean") or the last one ("last"), the last
validation loss measured in the block, and the block's largest gradient
norm (the first non-finite one, if any). Labels (onsets in steps) are copied unchanged; the scorer measures
delays in steps, as a fraction of the run's length in points x K.
"""

import csv
import json
import math
import os
import sys


def fmt(x):
    return repr(x) if math.isfinite(x) else ("nan" if x != x else ("inf" if x > 0 else "-inf"))


def coarsen(src_csv, dst_csv, k, mode):
    with open(src_csv, newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    with open(dst_csv, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "lr", "loss", "val_loss", "grad_norm"])
        for i in range(0, len(data) - k + 1, k):
            block = data[i:i + k]
            last = block[-1]
            losses = [float(r[col["loss"]]) for r in block]
            loss = sum(losses) / len(losses) if mode == "mean" else losses[-1]
            vals = [r[col["val_loss"]] for r in block if r[col["val_loss"]] != ""]
            norms = [float(r[col["grad_norm"]]) for r in block
                     if len(r) > col["grad_norm"] and r[col["grad_norm"]] != ""]
            bad = [v for v in norms if not math.isfinite(v)]
            norm = bad[0] if bad else max(norms) if norms else None
            out.writerow([last[col["step"]], last[col["lr"]], fmt(loss),
                          vals[-1] if vals else "", "" if norm is None else fmt(norm)])


def main():
    if len(sys.argv) != 5 or sys.argv[4] not in ("mean", "last"):
        sys.exit("usage: coarsen_corpus.py SRC_DIR DST_DIR K mean|last")
    src, dst, k, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "labels.jsonl")) as f, \
            open(os.path.join(dst, "labels.jsonl"), "w") as labels:
        for line in f:
            run = json.loads(line)["run"]
            coarsen(os.path.join(src, run + ".csv"), os.path.join(dst, run + ".csv"), k, mode)
            labels.write(line)


if __name__ == "__main__":
    main()
