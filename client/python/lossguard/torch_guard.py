"""lossguard.TorchGuard: report a plain PyTorch loop and apply the advice."""

import collections
import logging
import math
import time

import torch
import torch.distributed as dist

from lossguard.v1 import lossguard_pb2 as pb


@torch.no_grad()
def _total_norm(grads, device):
    """The global L2 norm of `grads` as a float64 tensor on the device: one
    fused kernel for all the norms on CUDA (as clip_grad_norm_ with
    foreach), then one reduction."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)), 2,
                                    dtype=torch.float64)


class TorchGuard:
    """Wraps a torch.optim optimizer for lossguard.

    Call after_backward(step, loss) after loss.backward() and before
    optimizer.step(): it measures the global gradient norm (before
    clipping), clips when clipping is on, reports the step and applies the
    advice that has arrived (in the client's AUTO mode; in ADVISE mode
    `accept(advice)` decides; in OBSERVE mode nothing is applied).

    Values are reported at least one step late, so reading the loss and the
    norm happens after the next step has been queued, not in the middle of
    it. On CUDA they are copied to pinned memory behind their step's work
    and read once the copy is done, without waiting: after_backward waits
    for the oldest only when `max_steps_in_flight` steps are in flight (the
    host that far ahead of the device); 1 waits at every step for the
    previous step's copy. report_validation and flush read every step in
    flight. `grad_norm=False` reports the loss only: the gradient norm is
    most of the guard's cost on small steps (a few kernel launches), and
    without it gradient explosions are not diagnosed; clipping, when on,
    measures it anyway.

    Overhead budget: `max_overhead` (default 0.01) is the most the guard may
    add to a training step, as a fraction of the step's time without it.
    Where measuring a step (the norm's launches, the copies, the report)
    costs more than that, as on a small model whose step is bound by the
    host launching kernels, the guard measures only some steps: it times
    its own work and the step, earns max_overhead x the step's time at
    every step, and measures the next step once what it spent is earned
    back. On a GPU-bound or CPU step that is every step. The steps measured
    carry their own numbers (the analyzers read them like a coarser log);
    a step is always measured when rollback needs its loss, when a
    validation loss is reported with it, and at flush (the last step).
    Clipping, when on, still clips every step. Waits for the device are not
    counted. 0 measures every step. The first `dense_steps` steps (100), and
    as many after each action applied, are all measured, outside the
    budget: a bad start and a correction's outcome are judged at full
    resolution (the analyzers' windows are 50-64 points).
    `measured_steps` and `skipped_steps` count them.

    Actions: scale_lr / set_lr change every param group's LR keeping their
    ratios (and scale a torch LR scheduler's base_lrs, when one is given, so
    the schedule goes on from the corrected LR); restart_cosine takes the LR
    over with a cosine from eta_max to eta_min over t_0 steps, restarting;
    enable_grad_clip clips from then on; early_stop sets should_stop.

    Rollback (with `model`): in-memory snapshots of the model's state_dict
    every `snapshot_every` steps (and of the initial weights); a snapshot
    counts once the loss computed from it (that of the step after) is
    finite and at most twice the loss before it. An action with
    restore_checkpoint (an LR cut for a run that blew up) first restores
    the newest snapshot from before the trouble (the divergence's onset,
    else the step of the highest loss), clears the optimizer's state and
    the current gradients, so the optimizer.step() that follows changes
    nothing. Costs snapshots_kept + 1 copies of the model.

    Distributed data parallel (torch.distributed initialized, more than one
    process): every rank wraps its optimizer, and rank 0 alone has a client
    (pass client=None on the others). Rank 0 reports its own minibatch loss
    and the gradient norm (the same on every rank once DDP has averaged the
    gradients). Every `sync_every` steps, in after_backward, rank 0
    broadcasts the advice it received since the last time, with its
    decision (applied or not) and, for a rollback, the snapshot to restore;
    every rank then applies the same actions at the same step, so their
    LRs, clipping and weights stay identical. Only rank 0 acks. The
    broadcast goes over a gloo group made at construction (no GPU sync);
    pass `process_group` (one that holds rank 0) to use another. on_advice
    is called on every rank. Make the guard after init_process_group, or it
    runs each rank on its own. Between two broadcasts the other
    ranks keep each snapshot until rank 0 says whether it was good: up to
    (sync_every + max_steps_in_flight) / snapshot_every + 1 more copies of
    the model.
    """

    def __init__(self, optimizer, client, *, scheduler=None, accept=None,
                 clip_max_norm=None, on_advice=None, model=None,
                 snapshot_every=50, snapshots_kept=3, sync_every=10,
                 process_group=None, max_steps_in_flight=2, grad_norm=True,
                 max_overhead=0.01, dense_steps=100):
        self.optimizer = optimizer
        self.client = client
        self.scheduler = scheduler
        self.accept = accept
        self.clip_max_norm = clip_max_norm
        self.on_advice = on_advice
        self.should_stop = False
        self.events = []          # (step, advice, applied, note)
        if max_steps_in_flight < 1:
            raise ValueError(f"max_steps_in_flight must be at least 1, not {max_steps_in_flight}")
        self.max_steps_in_flight = max_steps_in_flight
        self.grad_norm = grad_norm
        if not max_overhead >= 0:
            raise ValueError(f"max_overhead must be at least 0, not {max_overhead}")
        self.max_overhead = float(max_overhead)
        self.measured_steps = 0
        self.skipped_steps = 0
        # The overhead budget: seconds earned and not yet spent (at most 0:
        # spending waits until it is earned back), the guard's time charged
        # since the last step began, and when that was.
        self._credit = 0.0
        self._charged = 0.0
        self._last_entry = None
        self._unmeasured = None   # (step, lr, loss tensor): the last step not measured
        self._said_skipping = False
        self.dense_steps = max(0, int(dense_steps))
        self._dense_until = None  # steps before it are all measured
        self._step = None         # the step being taken
        # Staged steps, oldest first: [step, lr, loss, norm (or None),
        # staging slot (CUDA) or None, val_loss].
        self._pending = collections.deque()
        self._slots = None        # CUDA: [pinned loss, pinned norm, event, device] each
        self._last = (None, math.nan)  # the last step reported and its loss
        self._restart = None      # (at_step, t_0, eta_max, eta_min)
        self._ramp = None         # [factor per step, steps left, decay steps, decay eta_min] (ramp_lr)
        self.model = model
        self.snapshot_every = snapshot_every
        self.snapshots_kept = snapshots_kept
        self._snapshots = []        # (step, state_dict copy), good ones
        self._candidates = []       # (step, state) until the loss after them judges them
        self._peak = (-math.inf, 0)  # (loss, step)
        if model is not None:
            self._snapshots.append((-1, self._copy_state()))
        lr0 = optimizer.param_groups[0]["lr"]
        self._ratios = [g["lr"] / lr0 if lr0 else 1.0 for g in optimizer.param_groups]
        self._dist = None  # (group, rank) under torch.distributed
        if (dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            rank = dist.get_rank()
            if process_group is None:
                process_group = (dist.group.WORLD if dist.get_backend() == "gloo"
                                 else dist.new_group(backend="gloo"))
            # Every rank learns which ranks have a client (and sync_every),
            # so a wrong setup fails on every rank alike instead of leaving
            # the right ones waiting in a collective.
            seen = [None] * dist.get_world_size(process_group)
            dist.all_gather_object(seen, (client is not None, sync_every),
                                   group=process_group)
            with_client = [r for r, (has, _) in enumerate(seen) if has]
            if with_client != [0]:
                raise ValueError("under torch.distributed rank 0, and only rank 0, "
                                 f"has a client (ranks with one: {with_client})")
            if len({every for _, every in seen}) != 1 or sync_every < 1:
                raise ValueError("sync_every must be the same on every rank and at "
                                 f"least 1 (ranks have {[every for _, every in seen]})")
            self._dist = (process_group, rank)
        self.sync_every = sync_every
        self._outbox = []      # rank 0: [advice, applied, restore step], unsent
        self._accepted = []    # rank 0: snapshot steps found good since the last sync
        self._unjudged = []    # other ranks: (step, state) not yet judged by rank 0

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def _params(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p

    def _set_lr(self, lr0):
        for group, ratio in zip(self.optimizer.param_groups, self._ratios):
            group["lr"] = lr0 * ratio

    def before_step(self, step):
        """Sets the LR when a restart_cosine action owns it, and grows it
        during an LR ramp (else a no-op)."""
        if self._ramp is not None:
            self._scale(self._ramp[0])
            self._ramp[1] -= 1
            if self._ramp[1] <= 0:
                decay_steps, eta_min = self._ramp[2], self._ramp[3]
                self._ramp = None
                if decay_steps > 0 and self.lr > 0:
                    # The ramp's last step: from the next one the LR decays
                    # from its top to the end of the planned run.
                    top = self.lr
                    self._ratios = [g["lr"] / top for g in self.optimizer.param_groups]
                    self._restart = (step + 1, decay_steps, top, min(eta_min, top))
        if self._restart is not None and step >= self._restart[0]:
            at, t0, eta_max, eta_min = self._restart
            t = (step - at) % t0
            self._set_lr(eta_min + (eta_max - eta_min) * (1 + math.cos(math.pi * t / t0)) / 2)

    def after_backward(self, step, loss):
        self._step = step
        entry = self._begin_step(step)
        measure = self._should_measure(step)
        waited = self._report_pending() if self._pending else 0.0
        mark = self._charge(entry, waited)
        total = None
        if self.clip_max_norm is not None or (measure and self.grad_norm
                                              and self.client is not None):
            total = self._measure(self._params(), loss.device)
        if self.clip_max_norm is None:
            mark = self._charge(mark)
        else:  # clipping asked for measures the norm anyway: not the guard's cost
            mark = time.perf_counter()
        if measure:
            self._stage(step, loss, total)
            self._charge(mark)
        else:
            self._skip(step, loss)
        # The weights now are those after optimizer step `step` - 1 (a copy
        # of the model: rollback's cost, not counted).
        if self.model is not None:
            self._take_candidate(step - 1)
        self._advise(step)

    def _begin_step(self, step):
        """Step `step` begins (after its backward): the step since the last
        one earns its share of the overhead budget, less the guard's own
        time in it. Returns the time now."""
        now = time.perf_counter()
        if self._dense_until is None:  # the run's first steps, wherever it starts
            self._dense_until = step + self.dense_steps
        if self._budgeted(step):
            if self._last_entry is not None:
                earned = self.max_overhead * max(0.0, now - self._last_entry - self._charged)
                self._credit = min(0.0, self._credit + earned)
            self._last_entry = now
            self._charged = 0.0
        return now

    def _budgeted(self, step):
        """Whether step `step` is under the overhead budget (dense steps are
        not: nothing is charged for them, so the budget resumes after them
        without a debt)."""
        return (self.max_overhead > 0 and step is not None and self._dense_until is not None
                and step >= self._dense_until)

    def _should_measure(self, step):
        """Whether step `step` is measured: within the overhead budget, or
        needed by rollback (the snapshot of the weights after step s - 1, s
        - 1 a multiple of snapshot_every, is judged by the loss of step s
        against that of step s - 1)."""
        if not self._budgeted(step) or self._credit >= 0:
            return True
        if self.model is not None and self.snapshot_every > 0:
            return step % self.snapshot_every in (0, 1 % self.snapshot_every)
        return False

    def _charge(self, since, waited=0.0):
        """Charges the guard's time since `since` (less `waited`, spent
        waiting for the device) to the overhead budget, at a budgeted step;
        returns the time now."""
        now = time.perf_counter()
        if self._budgeted(self._step):
            spent = now - since - waited
            self._charged += spent
            self._credit -= spent
        return now

    def _skip(self, step, loss):
        """Step `step` is not measured: its loss tensor (or a function that
        makes it) is kept, with no device work, in case a validation loss is
        reported with it."""
        if not self._said_skipping:
            self._said_skipping = True
            logging.getLogger("lossguard").info(
                "lossguard: from step %d on, measuring only the steps that keep the "
                "guard within max_overhead=%g of the step time (max_overhead=0 "
                "measures every step)", step, self.max_overhead)
        self.skipped_steps += 1
        self._unmeasured = (step, self.lr, loss)

    def _stage_unmeasured(self, step=None):
        """Stages the last step not measured (that of `step`, if given)."""
        if self._unmeasured is None or (step is not None and self._unmeasured[0] != step):
            return
        u_step, u_lr, u_loss = self._unmeasured
        self.skipped_steps -= 1  # measured after all
        self._report_pending()  # (frees a staging slot)
        self._stage(u_step, u_loss() if callable(u_loss) else u_loss, None, lr=u_lr)

    @property
    def _measuring(self):
        """Whether the gradient norm is measured (asked for, or clipping)."""
        return self.grad_norm or self.clip_max_norm is not None

    def _measure(self, params, device):
        """The global norm of the gradients of `params` (those that have
        one), before clipping, as a float64 tensor on `device`; clips them
        when clipping is on."""
        grads = [p.grad for p in params]
        total = _total_norm(grads, device)
        if grads and self.clip_max_norm is not None:
            coef = (self.clip_max_norm / (total + 1e-6)).clamp(max=1.0)
            with torch.no_grad():
                for g in grads:
                    g.mul_(coef.to(g.dtype))
        return total

    def _advise(self, step):
        """Handles the advice that has arrived, after step `step` was staged
        (and under torch.distributed, every sync_every steps, applies it
        on every rank)."""
        self._handle_advice(step)
        if self._dist is not None and step % self.sync_every == 0:
            self._sync(step)

    def _take_candidate(self, weights_step):
        """With rollback, the model's weights now (those after optimizer
        step `weights_step`) are a candidate snapshot when that step is due
        for one; the loss of the step after judges it. Called on every
        rank at every optimizer step, loss or not, so that the ranks hold
        the same snapshots."""
        if (self.model is None or self.snapshot_every <= 0 or weights_step < 0
                or weights_step % self.snapshot_every != 0):
            return
        if self.client is not None:
            self._candidates.append((weights_step, self._copy_state()))
        elif self._dist is not None:
            # Another rank than 0: rank 0 judges it (this rank's loss is not
            # the one rank 0 sees) and says so at a sync.
            self._unjudged.append((weights_step, self._copy_state()))

    def _stage(self, step, loss, total, lr=None):
        """Keeps step `step`'s loss and gradient norm (device tensors, the
        norm may be None) to be reported later, without waiting for the
        device now."""
        self._unmeasured = None
        self.measured_steps += 1
        if self.client is None:  # nothing is reported from this rank
            return
        loss = loss.detach().reshape(())
        if total is not None and total.device != loss.device:
            total = total.to(loss.device)
        slot = None
        if loss.is_cuda:
            # Copied to pinned memory behind this step's work and read once
            # the copy is done. A plain .item() then would wait for
            # everything queued by then, the next step's forward and
            # backward included. The slots (pinned buffers and an event per
            # step in flight) are made once.
            if self._slots is None:
                self._slots = [None] * self.max_steps_in_flight
            # The slot after the newest pending step's is free: at most
            # max_steps_in_flight - 1 steps are pending now.
            newest = next((e[4] for e in reversed(self._pending) if e[4] is not None), None)
            slot = 0 if newest is None else (newest + 1) % len(self._slots)
            buf = self._slots[slot]
            if buf is None or buf[0].dtype != loss.dtype or buf[3] != loss.device:
                # (an event belongs to the device it was first recorded on)
                buf = [torch.empty((), dtype=loss.dtype, pin_memory=True),
                       torch.empty((), dtype=torch.float64, pin_memory=True),
                       torch.cuda.Event(), loss.device]
                self._slots[slot] = buf
            buf[0].copy_(loss, non_blocking=True)
            if total is not None:
                buf[1].copy_(total, non_blocking=True)
            # On the stream the copies went to: the loss's device's.
            buf[2].record(torch.cuda.current_stream(loss.device))
        self._pending.append([step, self.lr if lr is None else lr, loss, total, slot, None])

    def report_validation(self, step, val_loss):
        """The validation loss after optimizer step `step`."""
        self._stage_unmeasured(step)  # measured after all, with its validation loss
        if self._pending and self._pending[-1][0] == step:
            self._pending[-1][5] = float(val_loss)
        self._report_pending(wait_all=True)
        self._handle_advice(step)

    def flush(self):
        """Reports what is pending (call at the end of training). Under
        torch.distributed, rank 0 answers the advice it has not synced yet:
        not applied, as the other ranks will not apply it. The last step is
        reported even if it was not measured: the curve's end."""
        self._stage_unmeasured()
        self._report_pending(wait_all=True)
        if self._dist is not None and self.client is not None:
            for advice in self._outbox:
                if self._asks(advice):
                    self.client.ack(advice.advice_id, False,
                                    "not applied: training ended before the ranks synced")
            self._outbox = []

    def _copy_state(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _judge_snapshots(self, step, loss):
        """Step `step`'s loss judges the candidate snapshot of the weights
        it was computed from (those after step `step` - 1): good if finite
        and at most twice the loss before it."""
        before_step, before = self._last
        self._last = (step, loss)
        if not self._candidates:
            return
        kept = []
        for c_step, c_state in self._candidates:
            if c_step + 1 > step:
                kept.append((c_step, c_state))  # its loss is not reported yet
            elif (c_step + 1 == step and before_step == c_step and math.isfinite(before)
                  and math.isfinite(loss) and loss <= 2.0 * before):
                self._snapshots.append((c_step, c_state))
                del self._snapshots[:-max(1, self.snapshots_kept)]
                if self._dist is not None:
                    self._accepted.append(c_step)
        self._candidates = kept

    def _newest_snapshot_before(self, before_step):
        good = [s for s, _ in self._snapshots if s < before_step]
        return good[-1] if good else None

    def _restore(self, step):
        """Restores the snapshot of `step`; False if there is none."""
        state = next((st for s, st in reversed(self._snapshots) if s == step), None)
        if state is None:
            return False
        with torch.no_grad():
            self.model.load_state_dict(state)
        self.optimizer.state.clear()
        for p in self._params():
            p.grad = None
        self._snapshots = [s for s in self._snapshots if s[0] <= step]
        self._candidates = []
        self._unjudged = []
        return True

    def _report_pending(self, wait_all=False):
        """Reports the staged steps that are ready, oldest first, waiting
        for the oldest while too many are in flight (with `wait_all`, for
        every one). Returns the seconds spent waiting for the device."""
        waited = 0.0
        keep = 0 if wait_all else self.max_steps_in_flight - 1
        while self._pending:
            step, lr, loss, norm, slot, val = self._pending[0]
            if slot is not None:
                host_loss, host_norm, event, _ = self._slots[slot]
                if not event.query():
                    if len(self._pending) <= keep:
                        return waited  # not copied yet: reported later
                    start = time.perf_counter()
                    event.synchronize()
                    waited += time.perf_counter() - start
                loss, norm = host_loss, (host_norm if norm is not None else None)
            self._pending.popleft()
            loss = loss.item()
            norm = norm.item() if norm is not None else None
            if math.isfinite(loss) and loss > self._peak[0]:
                self._peak = (loss, step)
            self._judge_snapshots(step, loss)
            self.client.report(step, lr, loss, val_loss=val, grad_norm=norm)
        return waited

    def _handle_advice(self, step):
        if self.client is None:
            return
        for advice in self.client.poll_advice():
            if self._dist is None:
                self._apply(step, advice)
            else:  # applied by every rank at the next sync
                self._outbox.append(advice)

    def _sync(self, step):
        """Called by every rank at the same step: rank 0 applies the advice
        received since the last sync and sends what it decided (and which
        snapshots it found good); the other ranks do the same."""
        group, rank = self._dist
        payload = [None]
        failure = None
        if rank == 0:
            sent = {"accepted": self._accepted,
                    "candidates": [c for c, _ in self._candidates],
                    "advice": []}
            try:
                for advice in self._outbox:
                    applied, restored = self._apply(step, advice)
                    sent["advice"].append((advice.SerializeToString(), applied, restored))
            except BaseException as e:  # noqa: B036 (re-raised below)
                # The user's accept callback, or the ack, raised: the other
                # ranks are told, so that they raise too instead of waiting
                # in the next collective for a rank 0 that has left.
                failure = e
                sent = {"error": f"{type(e).__name__}: {e}"}
            self._accepted, self._outbox = [], []
            payload[0] = sent
        dist.broadcast_object_list(payload, src=0, group=group)
        if rank == 0:
            if failure is not None:
                raise failure
            return
        sent = payload[0]
        if "error" in sent:
            raise RuntimeError(
                f"lossguard: rank 0 failed while applying advice at step {step} "
                f"({sent['error']}); this rank stops with it")
        # Rank 0's verdicts first, as it reached them, then its actions.
        for c_step, c_state in self._unjudged:
            if c_step in sent["accepted"]:
                self._snapshots.append((c_step, c_state))
        del self._snapshots[:-max(1, self.snapshots_kept)]
        self._unjudged = [u for u in self._unjudged if u[0] in sent["candidates"]]
        for raw, applied, restored in sent["advice"]:
            advice = pb.Advice()
            advice.ParseFromString(raw)
            self._apply(step, advice, decided=applied, restore_step=restored)

    def _asks(self, advice):
        """Whether `advice` wants an answer: an action the trainer may apply
        (AUTO mode, or ADVISE with an accept callback)."""
        mode = self.client.mode
        return advice.HasField("action") and (
            mode == "auto" or (mode == "advise" and self.accept is not None))

    def _decide(self, advice):
        """Whether to apply `advice`, and whether it asks for an answer."""
        if not self._asks(advice):
            return False, False
        return (self.client.mode == "auto" or bool(self.accept(advice))), True

    def _apply(self, step, advice, decided=None, restore_step=None):
        """Applies `advice` at `step`: as decided here (rank 0, a single
        process), or as rank 0 decided (`decided`, and the snapshot it
        restored, `restore_step`). Returns (applied, the step of the
        snapshot restored or None)."""
        note = ""
        restored = None
        if decided is None:
            applied, asked = self._decide(advice)
        else:
            applied, asked = decided, False
        refusal = "rejected by the trainer"
        if applied and advice.action.WhichOneof("kind") == "set_lr" and not self.lr > 0:
            # Every group's LR is a multiple of what it is now; from 0 (a
            # warmup from 0, the end of a cosine cycle) none gets there.
            applied = False
            refusal = note = (f"not applied: the LR is 0 now, so no scale of it "
                              f"gives {advice.action.set_lr.lr:.4g}")
        if applied:
            act = advice.action
            kind = act.WhichOneof("kind")
            before = self.lr
            if kind in ("scale_lr", "set_lr", "restart_cosine") or act.restore_checkpoint:
                self._ramp = None  # another LR action, or a rollback, ends a ramp
            if kind == "ramp_lr":
                f, n = act.ramp_lr.factor_per_step, min(act.ramp_lr.steps, 10000)
                if 1.0 < f <= 10.0 and n > 0:
                    decay = max(act.ramp_lr.decay_steps, 0)
                    eta_min = max(act.ramp_lr.decay_eta_min, 0.0)
                    self._ramp = [f, n, decay, eta_min]
                    top = before * f ** n
                    note = f"LR ramp x{f:g} per step for {n} steps, from {before:.4g} to {top:.4g}"
                    if decay > 0:
                        note += f", then a cosine decay to {min(eta_min, top):.4g} over {decay} steps"
                else:
                    note = f"LR ramp x{f:g} for {n} steps ignored"
            elif kind == "scale_lr":
                self._scale(act.scale_lr.factor)
                note = f"LR x{act.scale_lr.factor:g} ({before:.4g} -> {self.lr:.4g})"
            elif kind == "set_lr":
                self._scale(act.set_lr.lr / before)
                note = f"LR set to {self.lr:.4g}"
            elif kind == "restart_cosine":
                r = act.restart_cosine
                if before > 0:  # the groups' ratios as they are now
                    self._ratios = [g["lr"] / before for g in self.optimizer.param_groups]
                self._restart = (step + 1, max(1, r.t_0), r.eta_max, r.eta_min)
                if r.eta_max < before:  # a cut's decay to the end of the run
                    note = (f"LR {before:.4g} -> {r.eta_max:.4g}, then a cosine decay to "
                            f"{r.eta_min:.4g} over {r.t_0} steps")
                else:
                    note = f"cosine restarted: {r.eta_max:.4g} -> {r.eta_min:.4g} over {r.t_0} steps"
            elif kind == "enable_grad_clip":
                self.clip_max_norm = act.enable_grad_clip.max_norm
                note = f"gradient clipping at norm {self.clip_max_norm:.4g}"
            elif kind == "early_stop":
                self.should_stop = True
                note = "early stop"
            if act.grad_clip_max_norm > 0:
                self.clip_max_norm = act.grad_clip_max_norm
                note += f"; gradient clipping at norm {self.clip_max_norm:.4g}"
            if self.model is not None and act.restore_checkpoint:
                if decided is None:
                    restored = self._newest_snapshot_before(
                        advice.diagnosis.onset
                        if advice.diagnosis.kind == pb.DIVERGENCE
                        else self._peak[1])
                else:
                    restored = restore_step
                if restored is not None and self._restore(restored):
                    note += f"; weights rolled back to step {restored}"
                elif decided is not None and restored is not None:
                    # Rank 0 restored a snapshot this rank lacks: going on
                    # would part the ranks' weights.
                    raise RuntimeError(
                        f"lossguard: rank 0 rolled back to the weights of step {restored}, "
                        "which this rank has no snapshot of")
                else:
                    restored = None
        if applied and self._dense_until is not None:
            # The correction's outcome is judged at full resolution.
            self._dense_until = max(self._dense_until, step + 1 + self.dense_steps)
        if asked:
            # Applied before this step's optimizer.step(): the next step's
            # loss is the first computed after it.
            self.client.ack(advice.advice_id, applied,
                            note if applied else refusal,
                            effective_step=step + 1 if applied else None)
        if self.on_advice is not None:
            self.on_advice(advice, applied)
        self.events.append((step, advice, applied, note))
        return applied, restored

    # The LRs torch's schedulers compute from, kept in each param group:
    # OneCycleLR's (its warmup start, peak and end), and the LR every
    # scheduler records when it is created.
    _GROUP_LR_KEYS = ("initial_lr", "max_lr", "min_lr")

    def _scale(self, factor):
        # Each group's own LR: the ratios between groups are kept as they are
        # now, whatever a per-group schedule made of them (and from a start
        # at LR 0, as under a warmup, where no ratio could be taken). The
        # schedule goes on from the corrected LR: what the scheduler computes
        # its LR from is scaled too, or its next step() undoes the action
        # (OneCycleLR sets the LR from its groups' max_lr etc., CyclicLR from
        # base_lrs and max_lrs, most others from base_lrs or the group's lr).
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
            for key in self._GROUP_LR_KEYS:
                if isinstance(group.get(key), (int, float)):
                    group[key] = group[key] * factor
        if self.scheduler is not None:
            for attr in ("base_lrs", "max_lrs"):
                values = getattr(self.scheduler, attr, None)
                if isinstance(values, list):
                    setattr(self.scheduler, attr, [v * factor for v in values])
        if self._restart is not None:
            at, t0, eta_max, eta_min = self._restart
            self._restart = (at, t0, eta_max * factor, eta_min * factor)
