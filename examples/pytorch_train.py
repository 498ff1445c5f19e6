#!/usr/bin/env python3
"""A plain PyTorch training loop attached to lossguardd: the Python side of
examples/demo.sh. A small CNN on Fashion-MNIST (Debian's
dataset-fashion-mnist) with a learning rate that blows the run up when
nobody watches; lossguard.TorchGuard reports every step and, in AUTO mode,
applies the daemon's corrections (here: cut the LR and roll the weights
back) while the run goes on.

    build/bin/lossguardd --db=/tmp/lossguard.db &        # listens on 127.0.0.1:7077
    PYTHONPATH=build/python python3 examples/pytorch_train.py --lr 0.5

or, with the wheel installed in your own environment
(pip install 'build/dist/lossguard-0.1.0-py3-none-any.whl[torch]'),
python3 examples/pytorch_train.py --server HOST:7077. Runs on CUDA when
there is one (--device auto).
"""
import argparse
import gzip
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import lossguard
from lossguard.v1 import lossguard_pb2 as pb


def load(data_dir, split, n):
    """The first `n` images of Fashion-MNIST's `split` ("train" or "t10k"),
    normalised, and their labels."""
    with gzip.open(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    with gzip.open(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return (x - 0.2860) / 0.3530, torch.from_numpy(labels.astype(np.int64))


class Cnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = torch.nn.Linear(32 * 7 * 7, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="127.0.0.1:7077", help="lossguardd address")
    ap.add_argument("--run-id", default="", help="default: derived from the flags")
    ap.add_argument("--mode", default="auto", choices=["observe", "advise", "auto"])
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    ap.add_argument("--lr", type=float, default=0.5,
                    help="0.5 with SGD (10x the good 0.05) blows the run up")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    x, y = (t.to(device) for t in load(args.data, "train", args.train_subset))
    vx, vy = (t.to(device) for t in load(args.data, "t10k", 2000))
    model = Cnn().to(device)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    run_id = args.run_id or f"pytorch-{args.optimizer}-lr{args.lr:g}-s{args.seed}"
    client = lossguard.Client(args.server, run_id=run_id, project="examples",
                              mode=args.mode,
                              config={"optimizer": args.optimizer, "base_lr": args.lr,
                                      "batch_size": args.batch_size,
                                      # Planned length at a constant LR: a cut
                                      # then decays to the end of the run.
                                      "total_steps": args.steps})
    # model=: keep weight snapshots, so a correction can roll a blow-up back.
    guard = lossguard.TorchGuard(opt, client, model=model)
    print(f"training a CNN ({args.optimizer}, lr {args.lr:g}) on {x.shape[0]} images, "
          f"{args.steps} steps, {device}; lossguard at {args.server}, run {run_id}, "
          f"{args.mode} mode", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    order, pos, shown = torch.randperm(x.shape[0], generator=gen), 0, 0
    for step in range(args.steps):
        if pos + args.batch_size > x.shape[0]:
            order, pos = torch.randperm(x.shape[0], generator=gen), 0
        idx = order[pos:pos + args.batch_size].to(device)
        pos += args.batch_size
        guard.before_step(step)            # an LR ramp or cosine restart, if one is on
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.after_backward(step, loss)   # grad norm, clip, report, apply advice
        opt.step()
        for at, advice, applied, note in guard.events[shown:]:
            print(f"lossguard @ step {at}: {pb.DiagnosisKind.Name(advice.diagnosis.kind)} -> "
                  f"{note or 'no action'} ({'applied' if applied else 'not applied'})\n"
                  f"    {advice.diagnosis.evidence}", flush=True)
        shown = len(guard.events)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_loss, val_acc = evaluate(model, vx, vy)
            guard.report_validation(step, val_loss)
            print(f"step {step + 1:5d}  lr {opt.param_groups[0]['lr']:<9.4g} "
                  f"loss {loss.item():<9.4g} val_loss {val_loss:<9.4g} val_acc {val_acc:.3f}",
                  flush=True)
        if guard.should_stop:
            print(f"lossguard stopped the run early at step {step}", flush=True)
            break
    guard.flush()
    client.finish(timeout=10.0)
    val_loss, val_acc = evaluate(model, vx, vy)
    print(f"final: val_acc {val_acc:.4f} val_loss {val_loss:.4g}, "
          f"{len(guard.events)} advice received", flush=True)
    # Steps too short for the guard's 1% budget (max_overhead) are measured
    # only in part.
    print(f"lossguard measured {guard.measured_steps} of "
          f"{guard.measured_steps + guard.skipped_steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
