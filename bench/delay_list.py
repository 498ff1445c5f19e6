#!/usr/bin/python3
"""Lists, for every label of a curve corpus, lossguard's first report of
that kind and its detection delay as a fraction of the run's length (as
../shared/tools/score.py counts it), sorted by delay: what holds the
median up.

    bench/delay_list.py ../shared/curves/dev [--bin build/bin/lossguard]

Columns: delay/len, kind, run, points, label onset, reported step, the
report's own onset estimate ('-' where nothing of that kind was reported).
"""

import argparse
import json
import os
import subprocess


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--bin", default="build/bin/lossguard")
    args = ap.parse_args()
    rows = []
    with open(os.path.join(args.corpus, "labels.jsonl")) as f:
        for line in f:
            run = json.loads(line)
            if not run["labels"]:
                continue
            path = os.path.join(args.corpus, run["run"] + ".csv")
            with open(path) as c:
                points = sum(1 for _ in c) - 1
            out = subprocess.run([args.bin, "analyze", path, "--json"], check=True,
                                 capture_output=True, text=True).stdout
            first = {}
            for d in json.loads(out)["diagnoses"]:
                first.setdefault(d["kind"], d)
            for label in run["labels"]:
                d = first.get(label["kind"])
                delay = (d["step"] - label["onset"]) / points if d else None
                rows.append((delay, label["kind"], run["run"], points, label["onset"],
                             d["step"] if d else "-", d["onset"] if d else "-"))
    rows.sort(key=lambda r: (r[0] is None, r[0] if r[0] is not None else 0))
    for r in rows:
        delay = f"{r[0]:.3f}" if r[0] is not None else "  -  "
        print(delay, *r[1:])


if __name__ == "__main__":
    main()
