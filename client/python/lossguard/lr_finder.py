"""lossguard.lr_range_test: an LR range test in PyTorch, read by lossguardd."""

import copy
import math

import torch

from lossguard.client import suggest_lr


class RangeTestError(ValueError):
    """The range test gave no suggestion; the curve it recorded is kept."""

    def __init__(self, message, lrs, losses):
        super().__init__(message)
        self.lrs = lrs
        self.losses = losses


class RangeTest:
    """A finished range test: the curve and lossguardd's reading of it."""

    def __init__(self, lrs, losses, suggestion, stop_reason):
        self.lrs = lrs                # the first param group's LR per step
        self.losses = losses          # the raw minibatch loss per step
        self.suggestion = suggestion  # lossguard.LrSuggestion
        self.stop_reason = stop_reason

    @property
    def suggested_lr(self):
        return self.suggestion.suggested_lr

    def __repr__(self):
        return (f"RangeTest(suggested_lr={self.suggested_lr:.3g}, "
                f"points={len(self.lrs)}, stopped: {self.stop_reason})")


def _batches(data):
    """`data`'s batches, again from its start whenever it runs out; ends when
    a pass yields nothing (a one-shot iterator)."""
    total = 0
    while True:
        before = total
        for batch in data:
            total += 1
            yield batch
        if total == before:
            if total == 0:
                raise ValueError("the data yielded no batch")
            return


def lr_range_test(model, optimizer, data, loss_fn=None, *, step_fn=None,
                  start_lr=1e-7, end_lr=10.0, factor=1.06, stop_factor=4.0,
                  max_steps=1000, restore=True, server="127.0.0.1:7077",
                  timeout=60.0, **credentials):
    """Runs an LR range test and returns lossguardd's suggested initial LR.

        test = lossguard.lr_range_test(model, optimizer, loader,
                                       torch.nn.functional.cross_entropy)
        print(test.suggested_lr, test.suggestion.evidence)

    From `start_lr` the LR grows by `factor` at every step (x1.06: ~40 steps
    a decade, as the LR finders of fastai and the literature run it), one
    minibatch each from `data` (an iterable of (inputs, targets), started
    again when it runs out), until the loss is non-finite, its debiased EMA
    (beta 0.98) exceeds `stop_factor` x its best, the LR passes `end_lr`,
    or `max_steps` steps. Every param group moves with the first one and
    keeps its ratio to it (layer-wise LRs). Each step is
    `loss_fn(model(inputs), targets)`, or `step_fn(model, batch)` returning
    the loss tensor; backward and optimizer.step() follow.

    With `restore` (default) the model's and the optimizer's state (LRs
    included) and the model's train/eval mode are put back afterwards, so
    training starts from the same weights at the suggested LR.

    The curve goes to lossguardd (`server`, credentials as for Client),
    which reads it as `lossguard lr-find` does. Raises RangeTestError (a
    ValueError, with the recorded curve in .lrs and .losses) when it shows
    no usable descent, and ConnectionError / PermissionError when the
    daemon cannot be reached / refuses the token.
    """
    if (loss_fn is None) == (step_fn is None):
        raise ValueError("give exactly one of loss_fn and step_fn")
    if not (0 < start_lr < end_lr) or not factor > 1 or not stop_factor > 1:
        raise ValueError("need 0 < start_lr < end_lr, factor > 1, stop_factor > 1")
    base = optimizer.param_groups[0]["lr"]
    ratios = [g["lr"] / base if base > 0 else 1.0 for g in optimizer.param_groups]
    saved_model = copy.deepcopy(model.state_dict()) if restore else None
    saved_optimizer = copy.deepcopy(optimizer.state_dict()) if restore else None
    was_training = model.training
    lrs, losses = [], []
    ema, best, stop_reason = 0.0, math.inf, f"max_steps {max_steps}"
    beta = 0.98
    try:
        model.train()
        lr = start_lr
        for i, batch in enumerate(_batches(data)):
            if i >= max_steps:
                break
            if lr > end_lr:
                stop_reason = f"the LR passed end_lr {end_lr:g}"
                break
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = lr * ratio
            optimizer.zero_grad(set_to_none=True)
            if step_fn is not None:
                loss = step_fn(model, batch)
            else:
                inputs, targets = batch
                loss = loss_fn(model(inputs), targets)
            value = float(loss.detach())
            lrs.append(lr)
            losses.append(value)
            if not math.isfinite(value):
                stop_reason = f"the loss was {value} at lr {lr:.3g}"
                break
            loss.backward()
            optimizer.step()
            ema = beta * ema + (1 - beta) * value
            smooth = ema / (1 - beta ** (i + 1))
            best = min(best, smooth)
            if smooth > stop_factor * best:
                stop_reason = (f"the smoothed loss {smooth:.4g} passed {stop_factor:g} x "
                               f"its best {best:.4g} at lr {lr:.3g}")
                break
            lr *= factor
        else:
            stop_reason = f"the data ran out after {len(lrs)} batches"
    finally:
        if restore:
            model.load_state_dict(saved_model)
            optimizer.load_state_dict(saved_optimizer)
        model.train(was_training)
    try:
        suggestion = suggest_lr(lrs, losses, server, timeout=timeout, **credentials)
    except ValueError as e:
        raise RangeTestError(f"{e} (stopped: {stop_reason})", lrs, losses) from None
    return RangeTest(lrs, losses, suggestion, stop_reason)
