"""A Lightning callback (Lightning itself is optional).

    trainer = pl.Trainer(callbacks=[LossGuardCallback(client)])

It subclasses Lightning's Callback when `lightning` or `pytorch_lightning`
is installed (a Trainer calls every hook of that base class), else it is a
plain class with the same hooks. on_train_batch_start sets the LR while a
restart_cosine or ramp_lr action owns it (TorchGuard.before_step);
on_before_optimizer_step measures the gradient norm, where Lightning has
accumulated the gradients and, under mixed precision, unscaled them, before
its own clipping, and clips when lossguard's clipping is on;
on_train_batch_end reads the step's loss from `outputs` (a tensor or a dict
with "loss"; under automatic optimization Lightning has divided it by
accumulate_grad_batches, which is undone; a step without a loss is not
reported); on_validation_end reads
`trainer.callback_metrics["val_loss"]` (not during the sanity check before
training); and on_train_end finishes the run. Under torch.distributed
every rank has the callback and only rank 0 a client (pass client=None on
the others, e.g. from the launcher's RANK); see TorchGuard.
Actions are applied to `trainer.optimizers[0]` as TorchGuard applies them;
early_stop sets `trainer.should_stop`. With gradient accumulation
(accumulate_grad_batches) one optimizer step spans several batches: it is
reported once, when `trainer.global_step` has moved, with the mean loss of
its batches and the norm of the accumulated gradient, and an LR ramp grows
once per optimizer step. With `rollback=True` the
LightningModule's weights are snapshotted as TorchGuard(model=...) does
(snapshots_kept + 1 copies of the model) and restored with an action that
says restore_checkpoint.
"""

import importlib
import sys
import time

import torch

from lossguard.torch_guard import TorchGuard


def _lightning_callback_base():
    """Lightning's Callback: from the flavour already imported (a
    pytorch_lightning Trainer wants a pytorch_lightning Callback), else the
    first that imports; a plain class without Lightning, or with one that
    fails to import."""
    flavours = ("lightning.pytorch.callbacks", "pytorch_lightning.callbacks")
    loaded = [f for f in flavours if f.rsplit(".", 1)[0] in sys.modules]
    for name in loaded + [f for f in flavours if f not in loaded]:
        try:
            return importlib.import_module(name).Callback
        except Exception:  # not installed, or broken: try the next
            continue
    return object


_Base = _lightning_callback_base()


class LossGuardCallback(_Base):
    def __init__(self, client, *, accept=None, clip_max_norm=None, on_advice=None,
                 finish_on_train_end=True, rollback=False, snapshot_every=50,
                 snapshots_kept=3, sync_every=10, process_group=None,
                 max_steps_in_flight=2, grad_norm=True, max_overhead=0.01,
                 dense_steps=100):
        self.client = client
        self._options = dict(accept=accept, clip_max_norm=clip_max_norm,
                             on_advice=on_advice, snapshot_every=snapshot_every,
                             snapshots_kept=snapshots_kept, sync_every=sync_every,
                             process_group=process_group,
                             max_steps_in_flight=max_steps_in_flight, grad_norm=grad_norm,
                             max_overhead=max_overhead, dense_steps=dense_steps)
        self._rollback = rollback
        self._finish = finish_on_train_end
        self.guard = None
        self._grad_norm = None
        self._measuring = True     # whether the step being taken is measured
        self._started_step = None  # global_step at the last before_step
        self._ended_step = None    # global_step at the last reported step
        self._losses = []          # the losses of the step's batches so far

    def _ensure_guard(self, trainer, pl_module):
        if self.guard is None:
            sched = None
            configs = getattr(trainer, "lr_scheduler_configs", None) or []
            if configs:
                sched = getattr(configs[0], "scheduler", None)
            self.guard = TorchGuard(trainer.optimizers[0], self.client,
                                    scheduler=sched,
                                    model=pl_module if self._rollback else None,
                                    **self._options)
        return self.guard

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        guard = self._ensure_guard(trainer, pl_module)
        step = int(trainer.global_step)  # the optimizer step about to be taken
        if self._ended_step is None:
            self._ended_step = step  # (a resumed run starts past 0)
        if step != self._started_step:  # its first batch
            self._started_step = step
            guard.before_step(step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer, *args):
        # Not on_after_backward: there, under mixed precision, the gradients
        # are still multiplied by the loss scale (2**16 at first).
        guard = self._ensure_guard(trainer, pl_module)
        # The overhead budget (TorchGuard max_overhead): is this optimizer
        # step measured?
        step = int(trainer.global_step)  # the optimizer step about to be taken
        guard._step = step
        entry = guard._begin_step(step)
        self._measuring = guard._should_measure(step)
        clipping = guard.clip_max_norm is not None
        if clipping or (self._measuring and guard.grad_norm and guard.client is not None):
            params = [p for p in pl_module.parameters() if p.grad is not None]
            if params:
                self._grad_norm = guard._measure(params, params[0].device)
        if not clipping:  # (clipping asked for measures the norm anyway)
            guard._charge(entry)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        guard = self._ensure_guard(trainer, pl_module)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # (none: the batch gave no loss)
            self._losses.append(loss.detach())  # no device work yet
        global_step = int(trainer.global_step)
        if self._ended_step is not None and global_step == self._ended_step:
            return  # accumulating: no optimizer step was taken yet
        self._ended_step = global_step
        step = global_step - 1  # the optimizer step just taken
        norm, self._grad_norm = self._grad_norm, None
        if self._losses:
            losses, self._losses = self._losses, []
            scale = 1
            if getattr(pl_module, "automatic_optimization", True):
                # Lightning divides the loss by accumulate_grad_batches
                # before backward and hands that on as outputs["loss"].
                scale = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)

            def step_loss():
                # The mean loss of the step's batches, in float64.
                total = losses[0].reshape(()).to(torch.float64)
                for other in losses[1:]:
                    total = total + other.reshape(()).to(torch.float64)
                return total * (scale / len(losses)) if scale != len(losses) else total

            if self._measuring:
                mark = time.perf_counter()
                waited = guard._report_pending()
                guard._stage(step, step_loss(), norm)
                guard._charge(mark, waited)
            else:
                guard._skip(step, step_loss)
        # The weights now are those after optimizer step `step` (on every
        # rank, loss or not).
        guard._take_candidate(step)
        # Every rank, every optimizer step, loss or not: under
        # torch.distributed this is where the ranks sync.
        guard._advise(step)
        if guard.should_stop:
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module):
        if getattr(trainer, "sanity_checking", False):
            return  # the check before training: no step has been taken
        if self.guard is None and not getattr(trainer, "optimizers", None):
            return  # trainer.validate() outside fit: nothing is trained
        guard = self._ensure_guard(trainer, pl_module)
        val = trainer.callback_metrics.get("val_loss")
        if val is not None:
            guard.report_validation(int(trainer.global_step) - 1, float(val))
            if guard.should_stop:
                trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        if self.guard is not None:
            self.guard.flush()
        if self._finish and self.client is not None:
            self.client.finish("training ended")
