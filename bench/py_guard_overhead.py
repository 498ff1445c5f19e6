#!/usr/bin/python3
"""What lossguard.TorchGuard adds to a plain PyTorch training step.

    bench/py_guard_overhead.py [--device cuda] [--steps 500] [--reps 5]
        [--batch_sizes "64 256"] [--daemon CMD] [--data_dir DIR]
        [--variants "no guard,attached,1 step in flight,no gradient norm"]

A plain PyTorch loop (the CNN of lossguard-train: two 3x3 convolutions with
max-pooling, two linear layers; SGD with momentum) on Fashion-MNIST read
from Debian's dataset-fashion-mnist, the whole training subset on the
device. The variants (VARIANTS), interleaved, `reps` times each: no guard,
and TorchGuard with a Client attached to a lossguardd (OBSERVE mode:
gradient norm, reporting once each step's values are copied, the client's
background thread), also waiting at every step for the previous step's
values (max_steps_in_flight=1), without the gradient norm, and with the
client batching 0.2 s instead of 0.02 s. The guard keeps within its
overhead budget (max_overhead, 1% by default) by measuring only some steps
where measuring all would cost more; the "every step" variants
(max_overhead=0) measure all of them, as the guard did before the budget.
The first --timing_warmup steps are not timed. Prints the median time per
step, the overhead, the host time spent in after_backward and the share of
steps measured. Needs the Python package with its generated
stubs (build/python, or --pythonpath).
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


# The variants: (client's max_batch_delay, TorchGuard's options); None: no
# guard at all.
VARIANTS = {
    "no guard": None,
    "attached": (0.02, {}),
    "every step": (0.02, {"max_overhead": 0}),
    "1 step in flight": (0.02, {"max_steps_in_flight": 1, "max_overhead": 0}),
    "no gradient norm": (0.02, {"grad_norm": False, "max_overhead": 0}),
    "0.2 s batches": (0.2, {}),
}


def train(args, x, y, batch, guard_server, run_id, variant=None):
    """One run: (ms per timed step, host us per step in after_backward,
    share of steps measured or None)."""
    import lossguard
    device = torch.device(args.device)
    torch.manual_seed(1)
    model = Cnn().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    client = guard = None
    if variant is not None:
        delay, options = variant
        client = lossguard.Client(guard_server, run_id=run_id, mode="observe",
                                  max_batch_delay=delay)
        guard = lossguard.TorchGuard(opt, client, **options)
    in_guard = 0.0
    n = x.shape[0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = None
    for step in range(args.steps):
        if step == args.timing_warmup:
            sync()
            start = time.perf_counter()
            in_guard = 0.0
        i = (step * batch) % (n - batch)
        xb, yb = x[i:i + batch], y[i:i + batch]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        if guard is not None:
            t = time.perf_counter()
            guard.after_backward(step, loss)
            in_guard += time.perf_counter() - t
        opt.step()
    if guard is not None:
        guard.flush()
    sync()
    timed = args.steps - args.timing_warmup
    ms = 1000.0 * (time.perf_counter() - start) / timed
    share = None
    if guard is not None:
        share = guard.measured_steps / max(1, guard.measured_steps + guard.skipped_steps)
    if client is not None:
        client.finish(timeout=10.0)
        client.close()
    return ms, 1e6 * in_guard / timed, share


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
    ap.add_argument("--variants", default="no guard,attached,every step",
                    help="comma-separated, from: " + ", ".join(VARIANTS))
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
            variants = {k: VARIANTS[k] for k in args.variants.split(",")}
            times = {k: [] for k in variants}
            in_guard = {k: [] for k in variants}
            shares = {k: [] for k in variants}
            for rep in range(args.reps):
                for k, variant in variants.items():
                    ms, us, share = train(args, x, y, batch, server,
                                          f"py-overhead-{batch}-{rep}-{k.replace(' ', '_')}",
                                          variant)
                    times[k].append(ms)
                    in_guard[k].append(us)
                    if share is not None:
                        shares[k].append(share)
            base = statistics.median(times["no guard"])
            print(f"{name}, torch {torch.__version__}, python CNN, batch {batch}, "
                  f"{args.steps - args.timing_warmup} timed steps x {args.reps} runs each "
                  f"(median ms per step, overhead, host us per step in after_backward, "
                  f"steps measured):", flush=True)
            for k, ts in times.items():
                med = statistics.median(ts)
                g = (f"after_backward {statistics.median(in_guard[k]):7.1f} us"
                     f"  measured {100.0 * statistics.median(shares[k]):5.1f}%"
                     if variants[k] is not None else " " * 42)
                print(f"  {k:22s} {med:8.3f} ms   {100.0 * (med / base - 1.0):+6.2f}%   {g}  "
                      f"(runs: {', '.join(f'{t:.3f}' for t in ts)})", flush=True)
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
