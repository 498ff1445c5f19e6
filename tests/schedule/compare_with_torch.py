#!/usr/bin/python3
"""Checks lossguard's LR schedules against torch.optim.lr_scheduler.

    compare_with_torch.py SCHEDULE_DUMP_BINARY

For each configuration below, the LR of param group 0 that torch's
scheduler sets for optimizer steps 0..N-1 (after 0..N-1 calls to
scheduler.step()) is compared with what lossguard's LrSchedule gives.
Exit 0 when every value agrees to 1e-9 relative (1e-15 absolute).
"""
import json
import math
import subprocess
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def torch_lrs(cfg, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    kind = cfg["kind"]
    base = cfg.get("base_lr", 0.1)
    opt = torch.optim.SGD([p], lr=base)
    S = torch.optim.lr_scheduler
    if kind == "constant":
        main = S.LambdaLR(opt, lambda _: 1.0)
    elif kind == "step":
        main = S.StepLR(opt, step_size=cfg["step_size"], gamma=cfg.get("gamma", 0.1))
    elif kind == "cosine":
        main = S.CosineAnnealingLR(opt, T_max=cfg["t_max"], eta_min=cfg.get("eta_min", 0.0))
    elif kind == "cosine_restarts":
        main = S.CosineAnnealingWarmRestarts(opt, T_0=cfg["t_0"], T_mult=cfg.get("t_mult", 1),
                                             eta_min=cfg.get("eta_min", 0.0))
    elif kind == "onecycle":
        main = S.OneCycleLR(opt, max_lr=cfg["max_lr"], total_steps=cfg["total_steps"],
                            pct_start=cfg.get("pct_start", 0.3),
                            div_factor=cfg.get("div_factor", 25.0),
                            final_div_factor=cfg.get("final_div_factor", 1e4),
                            cycle_momentum=False)
    else:
        raise ValueError(kind)
    sched = main
    w = cfg.get("warmup_steps", 0)
    if w > 0:
        warm = S.LinearLR(opt, start_factor=cfg.get("warmup_start_factor", 1.0 / 3.0),
                          end_factor=1.0, total_iters=w)
        sched = S.SequentialLR(opt, schedulers=[warm, main], milestones=[w])
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def torch_plateau(cfg, metrics):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.get("base_lr", 0.1))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.get("factor", 0.1), patience=cfg.get("patience", 10),
        threshold=cfg.get("threshold", 1e-4), threshold_mode="rel",
        cooldown=cfg.get("cooldown", 0), min_lr=cfg.get("min_lr", 0.0))
    out = []
    for m in metrics:
        sched.step(m)
        out.append(opt.param_groups[0]["lr"])
    return out


CONFIGS = [
    ({"kind": "constant", "base_lr": 0.05}, 20),
    ({"kind": "step", "base_lr": 0.1, "step_size": 7, "gamma": 0.5}, 60),
    ({"kind": "step", "base_lr": 0.3, "step_size": 10, "warmup_steps": 5}, 60),
    ({"kind": "cosine", "base_lr": 0.1, "t_max": 50}, 160),
    ({"kind": "cosine", "base_lr": 0.1, "t_max": 40, "eta_min": 0.001, "warmup_steps": 10,
      "warmup_start_factor": 0.1}, 120),
    ({"kind": "cosine_restarts", "base_lr": 0.2, "t_0": 10}, 75),
    ({"kind": "cosine_restarts", "base_lr": 0.2, "t_0": 5, "t_mult": 2, "eta_min": 0.01}, 160),
    ({"kind": "onecycle", "max_lr": 0.5, "total_steps": 100}, 100),
    ({"kind": "onecycle", "max_lr": 1.0, "total_steps": 37, "pct_start": 0.25,
      "div_factor": 10.0, "final_div_factor": 100.0}, 37),
]

PLATEAU = [
    ({"kind": "plateau", "base_lr": 0.1, "patience": 2},
     [1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.85, 0.86, 0.87, 0.87, 0.7, 0.7, 0.7, 0.7]),
    ({"kind": "plateau", "base_lr": 0.1, "patience": 1, "factor": 0.5, "cooldown": 2,
      "min_lr": 0.01, "threshold": 0.05},
     [1.0, 0.99, 0.98, 0.97, 0.96, 0.5, 0.49, 0.48, 0.47, 0.46, 0.45, 0.44, 0.43, 0.42,
      float("nan"), 0.41, 0.40]),
]


def close(a, b):
    return abs(a - b) <= 1e-15 + 1e-9 * max(abs(a), abs(b))


def main():
    binary = sys.argv[1]
    failures = 0
    for cfg, steps in CONFIGS:
        want = torch_lrs(cfg, steps)
        got = json.loads(subprocess.check_output([binary, json.dumps(cfg), str(steps)]))
        bad = [i for i, (a, b) in enumerate(zip(want, got)) if not close(a, b)]
        if len(got) != len(want) or bad:
            failures += 1
            i = bad[0] if bad else 0
            print(f"MISMATCH {cfg}: step {i}: torch {want[i]!r} lossguard {got[i]!r}")
        else:
            print(f"ok {cfg['kind']}: {steps} steps")
    for cfg, metrics in PLATEAU:
        want = torch_plateau(cfg, metrics)
        got = json.loads(subprocess.check_output(
            [binary, json.dumps(cfg), "0"] + [repr(m) for m in metrics]))
        bad = [i for i, (a, b) in enumerate(zip(want, got)) if not close(a, b)]
        if len(got) != len(want) or bad:
            failures += 1
            i = bad[0] if bad else 0
            print(f"MISMATCH {cfg}: metric {i}: torch {want[i]!r} lossguard {got[i]!r}")
        else:
            print(f"ok plateau: {len(metrics)} metrics, lr {want[-1]:g} at the end")
    print(f"torch {torch.__version__}: {failures} mismatching schedules")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
