#!/usr/bin/python3
"""What lossguard.TorchGuard adds to a plain PyTorch training step.

    bench/py_guard_overhead.py [--device cuda] [--steps 500] [--reps 5]
        [--batch_sizes "64 256"] [--daemon CMD] [--data_dir DIR]

A plain PyTorch loop (the CNN of lossguard-train: two 3x3 convolutions with
max-pooling, two linear layers; SGD with momentum) on Fashion-MNIST read
from Debian's dataset-fashion-mnist, the whole training subset on the
device. Two variants, interleaved, `reps` times each: no guard, and
TorchGuard with a Client attached to a lossguardd (OBSERVE mode: gradient
norm, reporting one step late, the client's background thread). The first
--timing_warmup steps are not timed. Prints the median time per step and
the overhead. Needs the Python package with its generated stubs
(build/python, or --pythonpath).
"""
import argparse
import gzip
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


def load_images(data_dir, n, split="train"):
    """The first `n` images of Fashion-MNIST's `split` ("train" or "t10k"),
    normalised, and their labels."""
    with gzip.open(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    with gzip.open(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)[:n]
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


def train(args, x, y, batch, guard_server, run_id, delay=0.02):
    import lossguard
    device = torch.device(args.device)
    torch.manual_seed(1)
    model = Cnn().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    client = guard = None
    if guard_server:
        client = lossguard.Client(guard_server, run_id=run_id, mode="observe",
                                  max_batch_delay=delay)
        guard = lossguard.TorchGuard(opt, client)
    n = x.shape[0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = None
    for step in range(args.steps):
        if step == args.timing_warmup:
            sync()
            start = time.perf_counter()
        i = (step * batch) % (n - batch)
        xb, yb = x[i:i + batch], y[i:i + batch]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        if guard is not None:
            guard.after_backward(step, loss)
        opt.step()
    if guard is not None:
        guard.flush()
    sync()
    ms = 1000.0 * (time.perf_counter() - start) / (args.steps - args.timing_warmup)
    if client is not None:
        client.finish(timeout=10.0)
        client.close()
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--timing_warmup", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch_sizes", default="64 256")
    ap.add_argument("--daemon", default="build/bin/lossguardd")
    ap.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--pythonpath", default="build/python")
    args = ap.parse_args()
    sys.path.insert(0, args.pythonpath)
    x, y = load_images(args.data_dir, 10000)
    x, y = x.to(args.device), y.to(args.device)
    work = tempfile.mkdtemp(prefix="lossguard-pyoverhead-")
    daemon = subprocess.Popen(shlex.split(args.daemon) + [
        "--listen=127.0.0.1:0", "--http=", f"--db={os.path.join(work, 'lossguard.db')}",
        "--log_level=warning"], stdout=subprocess.PIPE, text=True)
    server = "127.0.0.1:" + daemon.stdout.readline().rsplit(" ", 1)[1].strip()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    try:
        for batch in [int(b) for b in args.batch_sizes.split()]:
            train(args, x, y, batch, None, "warm")  # CUDA context, cuDNN
            times = {"no guard": [], "TorchGuard, attached": [],
                     "TorchGuard, 0.2 s batches": []}
            for rep in range(args.reps):
                times["no guard"].append(train(args, x, y, batch, None, ""))
                times["TorchGuard, attached"].append(
                    train(args, x, y, batch, server, f"py-overhead-{batch}-{rep}"))
                times["TorchGuard, 0.2 s batches"].append(
                    train(args, x, y, batch, server, f"py-overhead-{batch}-{rep}-slow", 0.2))
            base = statistics.median(times["no guard"])
            print(f"{name}, torch {torch.__version__}, python CNN, batch {batch}, "
                  f"{args.steps - args.timing_warmup} timed steps x {args.reps} runs each:",
                  flush=True)
            for k, ts in times.items():
                med = statistics.median(ts)
                print(f"  {k:26s} {med:8.3f} ms   {100.0 * (med / base - 1.0):+6.2f}%   "
                      f"(runs: {', '.join(f'{t:.3f}' for t in ts)})", flush=True)
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
