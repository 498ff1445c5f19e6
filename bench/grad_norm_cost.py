#!/usr/bin/python3
"""Host time of the pieces of the guard's per-step work, one by one.

    bench/grad_norm_cost.py [--device cuda] [--iters 300]

On a GPU a small training step is bound by the host launching kernels, so
what the guard costs there is the host time of its calls, not GPU time.
This times each piece alone (host time per call, the device synchronised
outside the timed region, medians of --iters calls) on the gradients of two
models: the CNN of lossguard-train (8 parameter tensors) and a deeper
convolutional net with BatchNorm (62 tensors):

  grads list        collecting the .grad of every parameter
  _foreach_norm     the per-tensor L2 norms (one fused kernel on CUDA)
  stack             the per-tensor norms into one tensor
  vector_norm f64   their L2 norm, accumulated in double (the guard's)
  vector_norm f32   the same in the gradients' dtype
  total, guard's    the three together, as the guard computes it
  total, no stack   the same, the norms' own buffer instead of a stack
                    (where _foreach_norm returns views of one tensor)
  loss copy+event   the loss copied to pinned memory, an event recorded
  query+item        the event queried and the pinned value read
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from py_guard_overhead import Cnn  # lossguard-train's plain CNN


def deep_net():
    layers = [torch.nn.Conv2d(1, 32, 3, padding=1)]
    for _ in range(20):
        layers += [torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1)]
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(32, 10))


def total_no_stack(grads):
    norms = torch._foreach_norm(grads, 2)
    base = norms[0]._base
    if base is None or base.numel() != len(norms):
        base = torch.stack(norms)
    return torch.linalg.vector_norm(base, 2, dtype=torch.float64)


def host_us(fn, iters, sync):
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    sync()
    return 1e6 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name, model in (("cnn", Cnn()), ("deep", deep_net())):
        model = model.to(device)
        x = torch.randn(64, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (64,), device=device)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        params = list(model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        norms = torch._foreach_norm(grads, 2)
        stacked = torch.stack(norms)
        host = torch.empty((), dtype=loss.dtype, pin_memory=cuda)
        event = torch.cuda.Event() if cuda else None

        def copy_and_record():
            host.copy_(loss.detach(), non_blocking=True)
            if event is not None:
                event.record()

        def query_and_item():
            if event is not None:
                event.query()
            host.item()

        pieces = {
            "grads list": lambda: [p.grad for p in params if p.grad is not None],
            "_foreach_norm": lambda: torch._foreach_norm(grads, 2),
            "stack": lambda: torch.stack(norms),
            "vector_norm f64": lambda: torch.linalg.vector_norm(stacked, 2, dtype=torch.float64),
            "vector_norm f32": lambda: torch.linalg.vector_norm(stacked, 2),
            "total, guard's": lambda: torch.linalg.vector_norm(
                torch.stack(torch._foreach_norm(grads, 2)), 2, dtype=torch.float64),
            "total, no stack": lambda: total_no_stack(grads),
            "loss copy+event": copy_and_record,
            "query+item": query_and_item,
        }
        print(f"{device}, torch {torch.__version__}, {name}: {len(grads)} gradient tensors, "
              f"host us per call (median of {args.iters}):", flush=True)
        for piece, fn in pieces.items():
            print(f"  {piece:18s} {host_us(fn, args.iters, sync):8.1f}", flush=True)


if __name__ == "__main__":
    main()
