#!/usr/bin/python3
"""Builds a held-out detection corpus: PyTorch models on Fashion-MNIST trained
with good and bad learning rates, in the format of ../shared/curves/FORMAT.md,
labelled after the fact from the whole curve by FORMAT.md's labelling rules
(implemented in `label_run` below, with the thresholds stated there).

It checks the analyzers on models, optimizers and batch sizes that the dev
corpus lacks (linear models, deep MLPs, BatchNorm, dropout, RMSprop, batches
of 16-256), the way the hidden corpus of "other models" will. It is not a
corpus to tune on: the labels are this script's reading of FORMAT.md, made
without looking at what lossguard reports.

    /usr/bin/python3 bench/detect_torch_corpus.py --out /tmp/detect-torch
    /usr/bin/python3 ../shared/tools/score.py /tmp/detect-torch --all-baselines \\
        --cmd 'build/bin/lossguard analyze {csv} --json' --name lossguard
    # relabel the stored curves (after changing label_run), no training:
    /usr/bin/python3 bench/detect_torch_corpus.py --out /tmp/detect-torch --label-only

How the labels agree with those of the dev corpus, labelled by label_run
against each dev task's best-LR sweep run (no training):

    /usr/bin/python3 bench/detect_torch_corpus.py --agreement ../shared/curves/dev

(Debian's Python: torch 1.13 on the CPU and numpy.)

Runs, for each of the 18 tasks of bench/lrfind_torch_corpus.py (its main and
held-out tables: model x optimizer x batch), with the task's best LR from its
sweep (bench/lrfind-torch*/lrfind.jsonl), the same data and minibatch protocol,
seed 3 (a seed the sweeps did not use), per-step rows (step from 0, LR used,
minibatch loss, global gradient norm before the update) and the validation
loss (2000 images) at step 0 and every `--eval-every` steps:
  good      the best LR, constant (the reference the labels compare with);
  cosine    2x the best LR, cosine decay to 0 over the run;
  high10    10x the best LR, constant;
  high30    30x the best LR after a linear warmup over the first 10% of steps;
  high100   100x the best LR, constant;
  low300    the best LR / 300, constant;
  overfit   the best LR on only the first 512 training images, 1.5x the steps;
  b4        the best LR with minibatches of 4 ("batch too small");
  b4x3      3x the best LR with minibatches of 4.
A run whose loss turns non-finite stops there (its non-finite row is kept).

Labels (`label_run`): see its docstring. A run is left out of labels.jsonl
(listed in excluded.jsonl with the reason) when one of its statistics lies
within 25% of a labelling threshold, as FORMAT.md's authors left out the runs
that did not clearly fit a rule.
"""
import argparse
import concurrent.futures
import csv
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lrfind_torch_corpus as lt  # noqa: E402  (re-executes under /usr/bin/python3)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

SEED = 3
SUBSET = 512
VARIANTS = {
    # name: (LR factor, schedule, train subset, step factor, batch (None: the task's))
    "good": (1.0, "constant", None, 1.0, None),
    "cosine": (2.0, "cosine", None, 1.0, None),
    "high10": (10.0, "constant", None, 1.0, None),
    "high30": (30.0, "warmup", None, 1.0, None),
    "high100": (100.0, "constant", None, 1.0, None),
    "low300": (1 / 300, "constant", None, 1.0, None),
    "overfit": (1.0, "constant", SUBSET, 1.5, None),
    "b4": (1.0, "constant", None, 1.0, 4),
    "b4x3": (3.0, "constant", None, 1.0, 4),
}
BEST_LR_FILES = ["lrfind-torch/lrfind.jsonl", "lrfind-torch-holdout/lrfind.jsonl"]

# ---------------------------------------------------------------- labelling
# Thresholds of the labelling rules (FORMAT.md's words in quotes).
SMOOTH = 25             # centred running median of the training loss, points
DIV_FACTOR = 1.5        # "rises above its best value so far by a clear margin":
DIV_OF_INITIAL = 0.1    #   x1.5 and by 10% of the initial loss
DIV_LASTING = 0.1       # "never comes back": for the last >= 10% of the run
STAG_FAR = 0.5          # "far above what the task reaches with a good LR": not
                        #   even half way (in log-loss) from the initial loss down
                        #   to the good run's final loss
STAG_PROGRESS = 0.05    # "almost no downward slope": at the stretch's rate a run
                        #   length covers < 5% of the way to the good run's loss
                        #   (dev's labelled stagnations: 0-3.2%)...
STAG_SLOW = 0.25        # ...and up to 25% is slow, not flat: unclear (dev leaves
                        #   its sweep runs at 7.5-22.5% out of its labels)
STAG_LR_DROP = 4.0      # a plateau that starts with an LR cut >= 4x (in the
                        #   stretch's first 10% of the run) starts at the cut
STAG_LONG = 0.3         # "for a long stretch": >= 30% of the run, to its end
OVER_RISE = 0.10        # validation loss rises >= 10% above its (3-point) minimum
OVER_TRAIN_FALL = 0.10  # "while training loss keeps falling": >= 10% lower at the
                        #   end than at the validation minimum
OSC_WINDOW = 50         # "the first 50-step window from which the swings are
OSC_RATIO = 2.5         #   sustained": the EMA(5) loss' relative robust std about
OSC_SHARE = 2 / 3       #   its trend in a window >= 2.5x the good run's at that loss, in
OSC_MIN_WINDOWS = 3     #   >= 2/3 of the windows from there on (>= 3 of them)
MARGIN = 0.25           # a statistic within 25% of its threshold: left out


def running_median(x, w):
    h = w // 2
    return np.array([np.median(x[max(0, i - h):i + h + 1]) for i in range(len(x))])


def ema(x, span):
    a = 2.0 / (span + 1.0)
    out = np.empty_like(x)
    m = x[0]
    for i, v in enumerate(x):
        m = m + a * (v - m)
        out[i] = m
    return out


def window_swings(loss, window):
    """(level, swing) per whole window: the median loss, and the robust std
    (1.4826 MAD) of the EMA(5) loss about its linear trend over that level
    (sustained swings count, a few isolated spikes do not)."""
    e = ema(loss, 5.0)
    out = []
    t = np.arange(window, dtype=float)
    for i in range(0, len(e) - window + 1, window):
        y = e[i:i + window]
        slope, icpt = np.polyfit(t, y, 1)
        resid = y - (slope * t + icpt)
        level = float(np.median(loss[i:i + window]))
        spread = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
        out.append((level, spread / level if level > 0 else math.inf))
    return out


def noise_at(ref, level):
    """The good run's swing at about `level`: the median over its windows
    whose level is within 2x of it, or else over the 3 nearest in level
    (minibatch noise, relative to the loss, depends on the loss)."""
    dist = [abs(math.log(lv / level)) if lv > 0 and level > 0 else math.inf for lv, _ in ref]
    close = [sw for (lv, sw), d in zip(ref, dist) if d <= math.log(2.0)]
    if not close:
        close = [ref[i][1] for i in sorted(range(len(ref)), key=dist.__getitem__)[:3]]
    return float(np.median(close))


def near(value, threshold):
    """Whether `value` is within MARGIN of `threshold` (relative)."""
    return threshold != 0 and abs(value - threshold) <= MARGIN * abs(threshold)


def label_run(rows, ref_rows):
    """FORMAT.md's labelling rules on one whole run. Returns (labels, notes,
    ambiguous): labels as [{"kind", "onset"}], notes in words with the
    numbers, and the reasons the run does not clearly fit a rule (empty when
    it does). `ref_rows` is the task's good run (best LR, same seed).

    - divergence: the first step from which the running median (over 5% of
      the run, at least 25 points) of the loss stays above both 1.5x its
      best value so far and that best plus 10% of the initial loss to the
      end of the run (for at least 10% of it; a rise in the last 10% only is
      unclear), or the first non-finite loss, whichever is earlier. The initial
      loss is the median of the good run's first 5 losses (the same weights
      and first minibatches; this run's may already have blown up).
    - stagnation (not after a divergence: a loss stuck after blowing up is
      the divergence's aftermath): the longest stretch to the end of the run,
      at least 30% of it, whose smoothed loss stays "far above" the good
      run's final loss (less than half way down from the initial loss, in
      log-loss) and which makes almost no progress: at its rate, one run
      length would cover less than 5% of the way (in log-loss) from its
      starting level to the good run's final loss (levels: the median losses
      of its first and last fifths, so that spikes are not levels); onset is
      its start (to 5 steps), or an LR cut by 4x or more in its first 10%
      of the run (a plateau after an LR decayed too early starts there).
      A run far above the good one that covers 5-25% of the way per run
      length is slow rather than flat: unclear, left out (dev's labelled
      stagnations cover 0-3.2%, and its sweep runs at 7.5-22.5% are not
      among its labelled runs).
    - overfitting: the validation loss smoothed over 3 evaluations (a
      centred mean) has its minimum before the last 2 evaluations, rises at
      least 10% above it by the end, and the smoothed training loss at the
      end is at least 10% below its value at that minimum; onset is the
      minimum's step.
    - oscillation: 50-step windows from step 0, the first (the initial
      descent, which no linear trend follows) left out; a window's swing is the
      robust std (1.4826 MAD) of the EMA(5) loss about its linear trend over
      the window's median loss; it swings when that is >= 2.5x the good run's
      at about the same loss (its windows within 2x of that level, else the
      3 nearest: minibatch noise relative to the loss depends on the loss); onset is the start of the first window from which >= 2/3
      of the windows (at least 3) swing, up to a divergence's onset; not
      labelled when the smoothed loss ends more than 1.5x above its level
      at that onset (a lasting rise: divergence's to label).
    """
    steps = np.array([r[0] for r in rows])
    loss = np.array([r[2] for r in rows], dtype=float)
    n = len(rows)
    labels, notes, unclear = [], [], []
    nonfinite = np.where(~np.isfinite(loss))[0]
    finite_n = int(nonfinite[0]) if len(nonfinite) else n
    fl = loss[:finite_n]
    s = running_median(fl, SMOOTH) if len(fl) else fl
    ref_loss = np.array([r[2] for r in ref_rows], dtype=float)
    ref_loss = ref_loss[np.isfinite(ref_loss)]
    # The initial loss: the good run's first 5 (same weights and first
    # minibatches; this run's own may already have blown up).
    l0 = float(np.median(ref_loss[:5]))
    good_final = float(np.median(ref_loss[-100:]))

    # divergence
    div_onset = None
    if len(s):
        # Smoothed over 5% of the run (at least 25 points): the best level
        # of a noisy curve is otherwise a low draw that the loss "rises" from.
        ds = running_median(fl, max(SMOOTH, n // 20))
        best = np.minimum.accumulate(ds)
        # best before each point (the best so far excludes the point itself)
        best_before = np.concatenate([[ds[0]], best[:-1]])
        ratio = ds / best_before
        excess = (ds - best_before) / l0
        above = (ratio > DIV_FACTOR) & (excess > DIV_OF_INITIAL)
        # the first index from which `above` holds to the end
        if not above[-1]:
            tail = len(s)
        elif above.all():
            tail = 0
        else:
            tail = int(np.where(~above)[0][-1]) + 1
        if tail < len(s) and len(s) - tail < DIV_LASTING * n:
            unclear.append(f"divergence: a rise in the last {100 * (len(s) - tail) / n:.0f}% "
                           f"of the run only")
        elif tail < len(s):
            div_onset = int(steps[tail])
            end_ratio = float(ds[-1] / best_before[tail])
            notes.append(f"smoothed loss from {ds[tail]:.3g} at step {div_onset} stays above "
                         f"{DIV_FACTOR}x its best {best_before[tail]:.3g}; ends "
                         f"{end_ratio:.2f}x it")
            if near(end_ratio - 1.0, DIV_FACTOR - 1.0):
                unclear.append(f"divergence: ends {end_ratio:.2f}x its best")
        elif near(float(ratio[-1]) - 1.0, DIV_FACTOR - 1.0) and excess[-1] > DIV_OF_INITIAL:
            unclear.append(f"divergence: ends {ratio[-1]:.2f}x its best")
    if len(nonfinite) and (div_onset is None or steps[nonfinite[0]] < div_onset):
        div_onset = int(steps[nonfinite[0]])
        notes.append(f"non-finite loss from step {div_onset}")
    absurd = float(np.mean(fl[n // 20:] > 100.0 * l0)) if len(fl) > n // 20 else 0.0
    if div_onset is None and absurd >= 0.01:
        # Losses 100x the initial one, again and again past the run's first
        # 5%, that the running median does not show (a blown-up model
        # between them): a mean would call it divergence, the median not.
        unclear.append(f"divergence: {100 * absurd:.0f}% of the losses are over 100x the "
                       f"initial {l0:.3g} (up to {np.max(fl):.3g}), under a level the "
                       f"median keeps")
    if div_onset is not None:
        labels.append({"kind": "divergence", "onset": div_onset})

    # stagnation
    if div_onset is None and len(s):
        far = math.exp(math.log(good_final) + STAG_FAR * (math.log(l0) - math.log(good_final)))

        def progress(a):
            """The share of the (log) way from the stretch [a, end)'s starting
            level down to the good run's final loss that the stretch covers,
            per run length: the levels are the medians of the raw losses of
            its first and last fifths (spikes are not levels)."""
            w = max(SMOOTH, (len(fl) - a) // 5)
            head, tail = float(np.median(fl[a:a + w])), float(np.median(fl[-w:]))
            gap = math.log(head) - math.log(good_final)
            return (math.log(head) - math.log(tail)) / gap / ((len(fl) - a) / n)

        floor = np.minimum.accumulate(s[::-1])[::-1]  # lowest smoothed loss from i on
        start = None
        for a in range(0, len(s), 5):
            if floor[a] > far and progress(a) < STAG_PROGRESS:
                start = a
                break
        longest = 0.0 if start is None else (len(s) - start) / n
        if start is not None and longest >= STAG_LONG:
            onset = int(steps[start])
            # A plateau after an LR decayed too early starts at the drop.
            lrs = [r[1] for r in rows[start:start + n // 10]]
            for i in range(1, len(lrs)):
                if lrs[i] is not None and lrs[i - 1] and lrs[i] * STAG_LR_DROP <= lrs[i - 1]:
                    onset = int(steps[start + i])
                    notes.append(f"the LR fell {lrs[i - 1] / lrs[i]:.3g}x at step {onset}")
                    break
            labels.append({"kind": "stagnation", "onset": onset})
            notes.append(f"from step {onset} ({100 * longest:.0f}% of the run) the loss stays "
                         f"above {floor[start]:.3g}, far from the good run's {good_final:.3g} "
                         f"(initial {l0:.3g}), and covers {100 * progress(start):.0f}% of the "
                         f"way there per run length")
            if near(longest, STAG_LONG) or near(progress(start), STAG_PROGRESS):
                unclear.append(f"stagnation: stretch {100 * longest:.0f}% of the run, "
                               f"progress {100 * progress(start):.0f}%")
        elif floor[0] > far and (near(progress(0), STAG_PROGRESS)
                                 or STAG_PROGRESS <= progress(0) < STAG_SLOW):
            unclear.append(f"stagnation: progress {100 * progress(0):.0f}% per run length "
                           f"(slow, not flat)")

    # overfitting
    vals = [(r[0], r[3]) for r in rows if r[3] is not None and math.isfinite(r[3])]
    if len(vals) >= 6:
        vs = np.array([v for _, v in vals])
        vsteps = [st for st, _ in vals]
        sm = np.array([vs[max(0, k - 1):k + 2].mean() for k in range(len(vs))])
        k = int(np.argmin(sm))
        if k < len(vs) - 2:
            rise = float(sm[-1] / sm[k] - 1.0)
            at = int(np.searchsorted(steps, vsteps[k]))
            train_fall = 1.0 - float(s[-1] / s[min(at, len(s) - 1)]) if len(s) else 0.0
            if rise >= OVER_RISE and train_fall >= OVER_TRAIN_FALL:
                labels.append({"kind": "overfitting", "onset": int(vsteps[k])})
                notes.append(f"validation loss min {sm[k]:.3g} at step {vsteps[k]}, ends "
                             f"{100 * rise:.0f}% above it; training loss falls "
                             f"{100 * train_fall:.0f}% after it")
            lo = 1 - MARGIN  # each criterion met, or nearly, and one of them near
            if ((near(rise, OVER_RISE) and train_fall >= OVER_TRAIN_FALL * lo)
                    or (near(train_fall, OVER_TRAIN_FALL) and rise >= OVER_RISE * lo)):
                unclear.append(f"overfitting: validation rise {100 * rise:.0f}%, training "
                               f"fall {100 * train_fall:.0f}%")

    # oscillation
    ref_sw = window_swings(ref_loss, OSC_WINDOW)[1:]
    limit = len(fl) if div_onset is None else int(np.searchsorted(steps, div_onset))
    w = np.array([sw / noise_at(ref_sw, lv)
                  for lv, sw in window_swings(fl[:limit], OSC_WINDOW)])
    swing = w >= OSC_RATIO
    onset_w = None
    for i in range(1, len(w)):  # the first window holds the initial descent
        rest = swing[i:]
        if len(rest) >= OSC_MIN_WINDOWS and rest.mean() >= OSC_SHARE and swing[i]:
            onset_w = i
            break
    if onset_w is not None:
        at = onset_w * OSC_WINDOW
        lasting = float(s[min(limit, len(s)) - 1] / s[at]) if len(s) else 1.0
        med = float(np.median(w[onset_w:]))
        if lasting <= DIV_FACTOR:
            onset = int(steps[at])
            labels.append({"kind": "oscillation", "onset": onset})
            notes.append(f"{int(swing[onset_w:].sum())} of {len(swing) - onset_w} windows from "
                         f"step {onset} swing >= {OSC_RATIO}x the good run's at their loss "
                         f"(median ratio {med:.1f})")
        if near(med, OSC_RATIO):
            unclear.append(f"oscillation: median swing ratio {med:.2f}")
    elif len(w) > OSC_MIN_WINDOWS:
        med = float(np.median(w[1:]))
        if near(med, OSC_RATIO):
            unclear.append(f"oscillation: median swing ratio {med:.2f}")
    return labels, "; ".join(notes) or "healthy", unclear


# ---------------------------------------------------------------- training
def lr_at(base, schedule, step, steps):
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    if schedule == "warmup":
        warm = max(1, steps // 10)
        return base * min(1.0, (step + 1) / warm)
    return base


def grad_norm(model):
    sq = [p.grad.detach().pow(2).sum() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else math.nan


def train_run(job):
    """Rows (step, lr, loss, val_loss or None, grad_norm) of one run."""
    name, variant, best_lr, steps, eval_every = job
    factor, schedule, subset, step_factor, batch = VARIANTS[variant]
    task = dict(lt.TASK_BY_NAME[name])
    task["batch"] = batch or task["batch"]
    xtr, ytr, xv, yv = lt.data()
    n_train = subset or lt.N_TRAIN
    total = int(round(steps * step_factor))
    base = best_lr * factor
    model, opt = lt.setup(task, SEED, lr_at(base, schedule, 0, total))
    rows = []
    it = lt.batches(SEED, n_train, task["batch"])
    t0 = time.time()
    for step in range(total):
        lr = lr_at(base, schedule, step, total)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = next(it)
        model.train()
        opt.zero_grad(set_to_none=True)
        out = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        loss = float(out.item())
        if not math.isfinite(loss):
            rows.append((step, lr, loss, None, None))
            break
        out.backward()
        norm = grad_norm(model)
        opt.step()
        val = None
        if step == 0 or (step + 1) % eval_every == 0 or step == total - 1:
            val = lt.val_loss(model, xv, yv)
        rows.append((step, lr, loss, val, norm))
    return rows, time.time() - t0


def fmt(v):
    """A value as written: enough digits to round-trip a float32."""
    if v is None:
        return ""
    return f"{float(v):.9g}"


def write_run(path, rows):
    with open(path, "w") as f:
        f.write("step,lr,loss,val_loss,grad_norm\n")
        for step, lr, loss, val, norm in rows:
            f.write(f"{step},{fmt(lr)},{fmt(loss)},{fmt(val)},{fmt(norm)}\n")


def read_run(path):
    """(step, lr, loss, val_loss, grad_norm) rows of a FORMAT.md file (columns
    by name; empty cells None)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            def num(key):
                v = r.get(key)
                return float(v) if v not in (None, "") else None
            rows.append((int(r["step"]), num("lr"), num("loss"), num("val_loss"),
                         num("grad_norm")))
    return rows


def best_lrs():
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for rel in BEST_LR_FILES:
        with open(os.path.join(here, rel)) as f:
            for line in f:
                if line.strip():
                    e = json.loads(line)
                    out[e["task"]] = e["best_lr"]
    return out


def label_corpus(out_dir, runs):
    """Labels every run in `runs` ({run: meta}) against its task's good run."""
    kept, left_out = [], []
    for run, meta in runs.items():
        rows = read_run(os.path.join(out_dir, run + ".csv"))
        ref = read_run(os.path.join(out_dir, meta["ref"] + ".csv"))
        labels, notes, unclear = label_run(rows, ref)
        entry = {"run": run, "labels": labels, "task": meta["task"], "config": meta["config"],
                 "notes": notes}
        (left_out if unclear else kept).append((entry, unclear))
    with open(os.path.join(out_dir, "labels.jsonl"), "w") as f:
        for entry, _ in kept:
            f.write(json.dumps(entry) + "\n")
    with open(os.path.join(out_dir, "excluded.jsonl"), "w") as f:
        for entry, unclear in left_out:
            f.write(json.dumps(dict(entry, unclear=unclear)) + "\n")
    # The scorer reads every labelled run's CSV from the folder: the left-out
    # runs' CSVs move aside.
    aside = os.path.join(out_dir, "excluded")
    os.makedirs(aside, exist_ok=True)
    for entry, _ in left_out:
        src = os.path.join(out_dir, entry["run"] + ".csv")
        if os.path.exists(src):
            os.replace(src, os.path.join(aside, entry["run"] + ".csv"))
    counts = {}
    for entry, _ in kept:
        for lab in entry["labels"]:
            counts[lab["kind"]] = counts.get(lab["kind"], 0) + 1
    healthy = sum(1 for e, _ in kept if not e["labels"])
    print(f"labelled {len(kept)} runs ({healthy} healthy; "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + f"), left out {len(left_out)} as unclear", flush=True)


def agreement(corpus):
    """How `label_run` agrees with a labelled corpus' own labels: each run
    labelled against its task's best-LR sweep run (`lrfind.jsonl`)."""
    refs = {}
    with open(os.path.join(corpus, "lrfind.jsonl")) as f:
        for e in map(json.loads, filter(str.strip, f)):
            best = [r for r in e["sweep"] if r["lr"] == e["best_lr"]][0]
            refs[e["task"]] = os.path.join(corpus, best["file"])
    kinds = ["divergence", "oscillation", "stagnation", "overfitting"]
    count = {k: {"both": 0, "only_here": 0, "only_theirs": 0, "onset_diffs": []}
             for k in kinds}
    runs = unclear_runs = 0
    with open(os.path.join(corpus, "labels.jsonl")) as f:
        for e in map(json.loads, filter(str.strip, f)):
            if e["task"] not in refs:
                continue
            runs += 1
            rows = read_run(os.path.join(corpus, e["run"] + ".csv"))
            with np.errstate(divide="ignore", invalid="ignore"):
                labels, _, unclear = label_run(rows, read_run(refs[e["task"]]))
            unclear_runs += bool(unclear)
            theirs = {x["kind"]: x["onset"] for x in e["labels"]}
            mine = {x["kind"]: x["onset"] for x in labels}
            for k in kinds:
                c = count[k]
                if k in theirs and k in mine:
                    c["both"] += 1
                    c["onset_diffs"].append(mine[k] - theirs[k])
                elif k in mine:
                    c["only_here"] += 1
                elif k in theirs:
                    c["only_theirs"] += 1
    print(f"{corpus}: {runs} runs labelled by label_run against their own labels "
          f"({unclear_runs} would be left out as unclear)")
    print(f"{'kind':12s} {'both':>5s} {'only here':>10s} {'only theirs':>12s} "
          f"{'median onset diff':>18s}")
    for k in kinds:
        c = count[k]
        diff = f"{np.median(c['onset_diffs']):+.0f}" if c["onset_diffs"] else "-"
        print(f"{k:12s} {c['both']:5d} {c['only_here']:10d} {c['only_theirs']:12d} {diff:>18s}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="corpus directory")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--tasks", nargs="+", choices=list(lt.TASK_BY_NAME), metavar="TASK")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--label-only", action="store_true",
                    help="relabel the runs in OUT (runs.jsonl) without training")
    ap.add_argument("--agreement", metavar="CORPUS",
                    help="only compare label_run's labels with those of a labelled corpus "
                         "that has lrfind.jsonl (e.g. ../shared/curves/dev)")
    args = ap.parse_args()
    if args.agreement:
        agreement(args.agreement)
        return 0
    if not args.out:
        ap.error("--out is required")
    os.makedirs(args.out, exist_ok=True)
    meta_path = os.path.join(args.out, "runs.jsonl")
    # Put back the runs a previous labelling left out: all are relabelled.
    aside = os.path.join(args.out, "excluded")
    if os.path.isdir(aside):
        for name in os.listdir(aside):
            os.replace(os.path.join(aside, name), os.path.join(args.out, name))
    runs = {}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            runs = {m["run"]: m for m in map(json.loads, filter(str.strip, f))}
    if args.label_only:
        label_corpus(args.out, runs)
        return 0

    best = best_lrs()
    names = args.tasks or [t["task"] for t in lt.TASKS + lt.HOLDOUT_TASKS]
    if "good" not in args.variants and any(f"{n}-good" not in runs for n in names):
        ap.error("the good run is every task's reference: keep it in --variants "
                 "(or add variants to an OUT that has it)")
    jobs = [(name, v, best[name], args.steps, args.eval_every)
            for name in names for v in args.variants]
    jobs.sort(key=lambda j: -lt.TASK_BY_NAME[j[0]]["cost"] * VARIANTS[j[1]][3]
              * (VARIANTS[j[1]][4] or lt.TASK_BY_NAME[j[0]]["batch"])
              / lt.TASK_BY_NAME[j[0]]["batch"])
    torch.set_num_threads(1)
    start = time.time()
    print(f"{len(jobs)} runs on {args.jobs} workers", flush=True)
    with concurrent.futures.ProcessPoolExecutor(args.jobs, initializer=lt.init_worker) as pool:
        futs = {pool.submit(train_run, j): j for j in jobs}
        for n, fut in enumerate(concurrent.futures.as_completed(futs), 1):
            name, variant, lr, steps, _ = futs[fut]
            rows, secs = fut.result()
            run = f"{name}-{variant}"
            write_run(os.path.join(args.out, run + ".csv"), rows)
            factor, schedule, subset, _, batch = VARIANTS[variant]
            runs[run] = {"run": run, "task": name, "ref": f"{name}-good",
                         "config": {"model": lt.TASK_BY_NAME[name]["model"],
                                    "optimizer": lt.TASK_BY_NAME[name]["opt"],
                                    "batch": batch or lt.TASK_BY_NAME[name]["batch"],
                                    "lr": lr * factor, "best_lr": lr, "schedule": schedule,
                                    "train_subset": subset or lt.N_TRAIN,
                                    "steps": len(rows), "seed": SEED}}
            print(f"[{n}/{len(jobs)} {time.time() - start:5.0f}s] {run}: {len(rows)} steps, "
                  f"final loss {rows[-1][2]:.4g} ({secs:.1f}s)", flush=True)
    # Every run in OUT, the ones trained before included, in task and
    # variant order.
    all_names = [t["task"] for t in lt.TASKS + lt.HOLDOUT_TASKS]
    order = [f"{n}-{v}" for n in all_names for v in VARIANTS if f"{n}-{v}" in runs]
    with open(meta_path, "w") as f:
        for run in order:
            f.write(json.dumps(runs[run]) + "\n")
    label_corpus(args.out, {r: runs[r] for r in order})
    print(f"{len(jobs)} runs trained, {len(order)} in {args.out} "
          f"({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
