#!/usr/bin/python3
"""The Python package against a real lossguardd (a child process on port 0).

    LOSSGUARDD=build/bin/lossguardd PYTHONPATH=build/python \
        /usr/bin/python3 tests/python/test_client.py
"""
import copy
import csv
import datetime
import math
import os
import re
import signal
import socket
import subprocess
import tempfile
import unittest

import grpc
import torch

import lossguard
from lossguard.v1 import lossguard_pb2 as pb
from lossguard.v1 import lossguard_pb2_grpc as pb_grpc

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "..", "..", "examples", "curves")
WAIT = 60.0  # only a bug waits this long


class Daemon:
    """lossguardd as a child process; `port` once it serves."""

    def __init__(self, db, port=0, extra=()):
        self.proc = subprocess.Popen(
            [os.environ["LOSSGUARDD"], f"--listen=127.0.0.1:{port}", f"--db={db}",
             "--http=", "--log_level=warning", "--shutdown_grace_s=1", *extra],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # "lossguardd listening on port N"
        self.port = int(line.rsplit(" ", 1)[1])
        self.address = f"127.0.0.1:{self.port}"

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        return self.proc.returncode

    def health(self, run_id):
        with grpc.insecure_channel(self.address) as ch:
            return pb_grpc.LossGuardStub(ch).GetRunHealth(
                pb.GetRunHealthRequest(run_id=run_id), timeout=WAIT)


def read_curve(name):
    with open(os.path.join(EXAMPLES, name)) as f:
        for row in csv.DictReader(f):
            yield (int(row["step"]), float(row["lr"]), float(row["loss"]),
                   float(row["val_loss"]) if row.get("val_loss") else None,
                   float(row["grad_norm"]) if row.get("grad_norm") else None)


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class AuthTlsTest(unittest.TestCase):
    """A daemon with a token per project and TLS: the client's token=, tls_ca=."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        d = self.dir.name
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        openssl("req", "-x509", *key, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem",
                "-days", "2", "-subj", "/CN=test-ca")
        openssl("req", *key, "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr",
                "-subj", "/CN=localhost")
        with open(f"{d}/san.ext", "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem", "-CAkey",
                f"{d}/ca.key", "-CAcreateserial", "-days", "2", "-out", f"{d}/server.pem",
                "-extfile", f"{d}/san.ext")
        self.token = "lg_python-test-token-0123456789abcdefghijklmnopq"
        import hashlib
        import json
        with open(f"{d}/auth.json", "w") as f:
            json.dump({"tokens": [{"name": "py", "project": "py", "access": "write",
                                   "sha256": hashlib.sha256(self.token.encode()).hexdigest()}]},
                      f)
        self.ca = f"{d}/ca.pem"
        self.daemon = Daemon(os.path.join(d, "lossguard.db"), extra=(
            f"--auth_config={d}/auth.json", f"--tls_cert={d}/server.pem",
            f"--tls_key={d}/server.key"))

    def tearDown(self):
        self.assertEqual(self.daemon.stop(), 0)
        self.dir.cleanup()

    def test_token_and_tls_carry_a_run_and_a_wrong_token_is_refused(self):
        client = lossguard.Client(self.daemon.address, "py-tls", project="py",
                                  token=self.token, tls_ca=self.ca)
        for step in range(100):
            self.assertTrue(client.report(step, 0.1, 1.0 / (1 + step)))
        self.assertTrue(client.finish(timeout=WAIT))
        client.close()
        creds = grpc.ssl_channel_credentials(root_certificates=open(self.ca, "rb").read())
        with grpc.secure_channel(self.daemon.address, creds) as ch:
            h = pb_grpc.LossGuardStub(ch).GetRunHealth(
                pb.GetRunHealthRequest(run_id="py-tls"), timeout=WAIT,
                metadata=[("authorization", f"Bearer {self.token}")])
        self.assertEqual(h.summary.last_step, 99)

        bad = lossguard.Client(self.daemon.address, "py-tls-2", project="py",
                               token="lg_wrong", tls_ca=self.ca, initial_backoff=0.05)
        bad.report(0, 0.1, 1.0)
        self.assertFalse(bad.flush(timeout=1.0))
        self.assertIn("unknown token", bad.stats.last_error)
        bad.close()


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.db = os.path.join(self.dir.name, "lossguard.db")
        self.daemon = Daemon(self.db)

    def tearDown(self):
        if self.daemon is not None:
            self.assertEqual(self.daemon.stop(), 0)
        self.dir.cleanup()

    def test_streams_a_curve_gets_advice_and_acks(self):
        seen = []
        client = lossguard.Client(self.daemon.address, "py-diverging", mode="auto",
                                  project="py", config={"optimizer": "sgd", "base_lr": 0.1},
                                  on_advice=seen.append)
        curve = list(read_curve("digits-cnn-sgd-lr300-b32-ramp-s130.csv"))
        for step, lr, loss, val, gn in curve:
            self.assertTrue(client.report(step, lr, loss, val_loss=val, grad_norm=gn))
        self.assertTrue(client.flush(WAIT))
        advice = client.poll_advice()
        self.assertGreaterEqual(len(advice), 1)
        self.assertEqual(len(seen), len(advice))
        first = advice[0]
        self.assertEqual(first.diagnosis.kind, pb.DIVERGENCE)
        self.assertEqual(first.action.WhichOneof("kind"), "scale_lr")
        client.ack(first.advice_id, True, "scaled by the test")
        self.assertTrue(client.finish(timeout=WAIT))
        h = self.daemon.health("py-diverging")
        self.assertEqual(h.summary.state, pb.FINISHED)
        self.assertEqual(h.summary.steps_stored, len(curve))
        self.assertEqual(h.config.optimizer, "sgd")
        self.assertEqual(h.advice[0].status, pb.APPLIED)
        self.assertEqual(h.advice[0].ack_reason, "scaled by the test")
        self.assertFalse(client.report(10**6, 0.1, 1.0))  # finished

    def test_refuses_what_the_daemon_would_refuse(self):
        with lossguard.Client(self.daemon.address, "py-refuse") as client:
            self.assertTrue(client.report(5, 0.1, 1.0))
            self.assertFalse(client.report(5, 0.1, 1.0))
            self.assertFalse(client.report(6, -1.0, 1.0))
            self.assertFalse(client.report(6, math.inf, 1.0))
            self.assertTrue(client.report(6, math.nan, 1.0))
            self.assertTrue(client.report(7, 0.1, math.inf))
            self.assertTrue(client.flush(WAIT))
            s = client.stats
            self.assertEqual((s.reported_steps, s.rejected_steps, s.connects), (3, 3, 1))

    def test_survives_a_daemon_restart(self):
        client = lossguard.Client(self.daemon.address, "py-restart",
                                  initial_backoff=0.01, max_backoff=0.1)
        for i in range(100):
            client.report(i, 0.01, 2.0 - 0.005 * i)
        self.assertTrue(client.flush(WAIT))
        port = self.daemon.port
        self.assertEqual(self.daemon.stop(), 0)
        for i in range(100, 200):  # training goes on while the daemon is away
            client.report(i, 0.01, 2.0 - 0.005 * i)
        self.assertFalse(client.stats.connected and client.flush(0.05))
        self.daemon = Daemon(self.db, port)
        self.assertTrue(client.flush(WAIT))
        self.assertGreaterEqual(client.stats.connects, 2)
        h = self.daemon.health("py-restart")
        self.assertEqual(h.summary.steps_stored, 200)
        self.assertEqual(h.summary.last_step, 199)
        client.close()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(8, 16)
        self.l2 = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


class RecordingClient:
    """What TorchGuard uses of a Client, recording the reports (OBSERVE)."""
    mode = "observe"

    def __init__(self):
        self.reports = []

    def report(self, step, lr, loss, val_loss=None, grad_norm=None):
        self.reports.append((step, loss, val_loss, grad_norm))

    def poll_advice(self):
        return []

    def flush(self, timeout=None):
        return True

    def finish(self, reason=""):
        return True


class AutoRecordingClient(RecordingClient):
    """A RecordingClient in AUTO mode that takes acks."""
    mode = "auto"

    def ack(self, *args, **kwargs):
        pass


def problem():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
    net = Net()
    opt = torch.optim.SGD([{"params": net.l1.parameters(), "lr": 10.0},
                           {"params": net.l2.parameters(), "lr": 1.0}], lr=10.0)
    return x, y, net, opt


def guarded_step(guard, net, opt, x, y, step):
    """One training step of problem()'s net with `guard` around it; its loss."""
    guard.before_step(step)
    loss = torch.nn.functional.mse_loss(net(x), y)
    opt.zero_grad()
    loss.backward()
    guard.after_backward(step, loss)
    opt.step()
    return loss


def drive_lightning(cb, net, opt, x, y, steps, client, accumulate=1,
                    loss_scale=1.0, no_loss_at=(), forward=None):
    """Lightning's hook order for `steps` batches after its sanity-check
    validation: an optimizer step every `accumulate` batches, a
    validation every 50; the loss divided by `accumulate` before
    backward and handed on so to on_train_batch_end, and with
    `loss_scale` (mixed precision) multiplied by it before backward and
    the gradients divided by it again before on_before_optimizer_step,
    as Lightning does; batches in `no_loss_at` hand on no outputs (a
    manual-optimization training_step that returns nothing). `forward`
    (default: net) computes the outputs, e.g. a DistributedDataParallel
    wrapper of net; `client` None: a rank other than 0. Returns the
    losses and the largest LR."""

    class FakeTrainer:  # what the callback reads of a Lightning Trainer
        optimizers = [opt]
        lr_scheduler_configs = []
        global_step = 0
        should_stop = False
        sanity_checking = False
        callback_metrics = {}
        accumulate_grad_batches = accumulate

    trainer = FakeTrainer()
    trainer.sanity_checking = True
    trainer.callback_metrics = {"val_loss": torch.tensor(5.0)}
    cb.on_validation_end(trainer, net)
    trainer.sanity_checking = False
    losses, max_lr = [], 0.0
    for batch_idx in range(steps):
        cb.on_train_batch_start(trainer, net, None, batch_idx)
        loss = torch.nn.functional.mse_loss((forward or net)(x), y)
        (loss / accumulate * loss_scale).backward()
        if batch_idx % accumulate == accumulate - 1:
            for p in net.parameters():
                p.grad.div_(loss_scale)
            cb.on_before_optimizer_step(trainer, net, opt)
            opt.step()
            opt.zero_grad()
            trainer.global_step += 1
        outputs = None if batch_idx in no_loss_at else {"loss": loss.detach() / accumulate}
        cb.on_train_batch_end(trainer, net, outputs, None, batch_idx)
        losses.append(float(loss))
        max_lr = max(max_lr, opt.param_groups[0]["lr"])
        if batch_idx % 50 == 49:
            trainer.callback_metrics = {"val_loss": torch.tensor(1.0)}
            cb.on_validation_end(trainer, net)
        if client is not None and batch_idx % 10 == 9:
            client.flush(WAIT)
    cb.on_train_end(trainer, net)
    return losses, max_lr


class SchedulerFollowsTheCorrectionTest(unittest.TestCase):
    """An LR action scales what a torch scheduler computes its LR from, so
    the schedule goes on from the corrected LR instead of undoing it at its
    next step(). No daemon: the scaling alone."""

    def check(self, make_scheduler, steps_before=5, steps_after=5):
        def lrs(scale_at):
            torch.manual_seed(0)
            net = torch.nn.Linear(4, 1)
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            sched = make_scheduler(opt)
            guard = lossguard.TorchGuard(opt, client=None, max_overhead=0, scheduler=sched)
            out = []
            for step in range(steps_before + steps_after):
                if step == scale_at:
                    guard._scale(0.1)
                opt.step()
                sched.step()
                out.append(opt.param_groups[0]["lr"])
            return out
        plain, cut = lrs(-1), lrs(steps_before)
        for a, b in zip(plain[steps_before:], cut[steps_before:]):
            self.assertAlmostEqual(b, 0.1 * a, delta=1e-12 + 1e-9 * abs(a))

    def test_one_cycle(self):
        self.check(lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=1.0, total_steps=20))

    def test_cyclic(self):
        self.check(lambda opt: torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=0.01, max_lr=1.0, step_size_up=4))

    def test_groups_keep_the_ratios_they_have_now(self):
        """Per-group schedules move the ratio between groups; a cut scales
        each group's LR as it is, even from a warmup that began at 0."""
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        opt = torch.optim.SGD([{"params": net[0].parameters()},
                               {"params": net[1].parameters()}], lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [lambda s: min(1.0, s / 4), lambda s: 0.5 * min(1.0, s / 2)])
        guard = lossguard.TorchGuard(opt, client=None, max_overhead=0, scheduler=sched)
        for _ in range(3):
            opt.step()
            sched.step()
        before = [g["lr"] for g in opt.param_groups]
        self.assertNotAlmostEqual(before[1] / before[0], 0.5)
        guard._scale(0.1)
        for b, g in zip(before, opt.param_groups):
            self.assertAlmostEqual(g["lr"], 0.1 * b)

    def test_cosine_restart_keeps_the_ratios_the_groups_have_now(self):
        """restart_cosine takes the LR over; the groups keep the ratios they
        have when it comes, not those of a warmup's LR 0 at construction."""
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        opt = torch.optim.SGD([{"params": net[0].parameters()},
                               {"params": net[1].parameters(), "lr": 0.05}], lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 4))

        class AutoClient:  # what _apply uses of a Client
            mode = "auto"

            def ack(self, *args, **kwargs):
                pass

        guard = lossguard.TorchGuard(opt, client=AutoClient(), max_overhead=0, scheduler=sched)
        for _ in range(6):
            opt.step()
            sched.step()
        advice = pb.Advice(advice_id=1, action=pb.Action(
            restart_cosine=pb.RestartCosine(t_0=10, eta_max=0.2, eta_min=0.0)))
        guard._apply(6, advice)
        guard.before_step(7)
        self.assertAlmostEqual(opt.param_groups[0]["lr"], 0.2)
        self.assertAlmostEqual(opt.param_groups[1]["lr"], 0.1)

    def test_ramp_with_a_decay_grows_then_decays_to_the_planned_end(self):
        """A ramp_lr with decay_steps grows the LR for its steps, then
        decays it along a cosine from its top to decay_eta_min over
        decay_steps, keeping the groups' ratio."""
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        opt = torch.optim.SGD([{"params": net[0].parameters()},
                               {"params": net[1].parameters(), "lr": 1e-4}], lr=1e-3)

        class AutoClient:  # what _apply uses of a Client
            mode = "auto"

            def ack(self, *args, **kwargs):
                pass

        guard = lossguard.TorchGuard(opt, client=AutoClient(), max_overhead=0)
        guard._apply(9, pb.Advice(advice_id=1, action=pb.Action(
            ramp_lr=pb.RampLr(factor_per_step=2.0, steps=3, decay_steps=10,
                              decay_eta_min=8e-5))))
        self.assertIn("then a cosine decay to 8e-05 over 10 steps", guard.events[-1][3])
        lrs = []
        for step in range(10, 24):
            guard.before_step(step)
            lrs.append(opt.param_groups[0]["lr"])
            self.assertAlmostEqual(opt.param_groups[1]["lr"] / lrs[-1], 0.1)
        # Steps 10-12 ramp (x2 each), the decay starts at 13 from the top.
        for got, want in zip(lrs[:4], [2e-3, 4e-3, 8e-3, 8e-3]):
            self.assertAlmostEqual(got, want)
        top, eta_min = 8e-3, 8e-5
        for t in range(10):
            want = eta_min + (top - eta_min) * (1 + math.cos(math.pi * t / 10)) / 2
            self.assertAlmostEqual(lrs[3 + t], want)
        self.assertLess(lrs[12], 0.05 * top)

    def test_set_lr_at_lr_zero_is_refused_not_faked(self):
        """set_lr scales the groups; from LR 0 (a warmup from 0) no scale
        gets there, so the ack says not applied, and why, instead of
        "LR set to" an LR that was never set."""
        net = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 4))

        class RecordingClient:  # what _apply uses of a Client
            mode = "auto"
            acks = []

            def ack(self, advice_id, applied, note, effective_step=None):
                self.acks.append((advice_id, applied, note))

        client = RecordingClient()
        guard = lossguard.TorchGuard(opt, client=client, max_overhead=0, scheduler=sched)
        self.assertEqual(opt.param_groups[0]["lr"], 0.0)
        guard._apply(0, pb.Advice(advice_id=7, action=pb.Action(set_lr=pb.SetLr(lr=0.05))))
        self.assertEqual(opt.param_groups[0]["lr"], 0.0)
        self.assertEqual(client.acks[-1][:2], (7, False))
        self.assertIn("LR is 0", client.acks[-1][2])
        self.assertFalse(guard.events[-1][2])
        opt.step()
        sched.step()
        guard._apply(1, pb.Advice(advice_id=8, action=pb.Action(set_lr=pb.SetLr(lr=0.05))))
        self.assertAlmostEqual(opt.param_groups[0]["lr"], 0.05)
        self.assertEqual(client.acks[-1][:2], (8, True))

    def test_lambda_and_cosine(self):
        self.check(lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 1.0 / (1 + s)))
        self.check(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=20))
        self.check(lambda opt: torch.optim.lr_scheduler.StepLR(
            opt, step_size=3, gamma=0.5))


class TorchGuardStagingTest(unittest.TestCase):
    """What the guard stages at a step and reports later, without a
    daemon."""

    def train(self, guard, net, opt, x, y, steps, start=0):
        weights = {}  # step -> l1's weight after that optimizer step
        for step in range(start, start + steps):
            guarded_step(guard, net, opt, x, y, step)
            weights[step] = net.l1.weight.detach().clone()
        return weights

    def test_without_the_gradient_norm_only_the_loss_is_reported(self):
        x, y, net, opt = problem()
        for group in opt.param_groups:
            group["lr"] = 0.01
        client = RecordingClient()
        guard = lossguard.TorchGuard(opt, client, max_overhead=0, grad_norm=False)
        self.train(guard, net, opt, x, y, 5)
        guard.flush()
        self.assertEqual([r[0] for r in client.reports], [0, 1, 2, 3, 4])
        self.assertTrue(all(r[3] is None for r in client.reports), client.reports)
        self.assertTrue(all(math.isfinite(r[1]) for r in client.reports))
        # Clipping needs the norm: with it on, the norm is measured and reported.
        client = RecordingClient()
        guard = lossguard.TorchGuard(opt, client, max_overhead=0, grad_norm=False, clip_max_norm=1e9)
        self.train(guard, net, opt, x, y, 3)
        guard.flush()
        self.assertTrue(all(r[3] is not None and r[3] > 0 for r in client.reports))
        with self.assertRaises(ValueError):
            lossguard.TorchGuard(opt, client, max_overhead=0, max_steps_in_flight=0)

    def test_over_the_overhead_budget_only_the_needed_steps_are_measured(self):
        """Over max_overhead the guard skips steps, but still measures the
        steps rollback judges its snapshots by, a step a validation loss
        is reported with, and the last one, each with its own number. (A
        budget of 1e-9 is spent by the first step and never earned back
        here, so which steps are measured is known.)"""
        x, y, net, opt = problem()
        for group in opt.param_groups:
            group["lr"] = 0.01

        client = AutoRecordingClient()
        guard = lossguard.TorchGuard(opt, client, max_overhead=1e-9, dense_steps=0,
                                     model=net, snapshot_every=20)
        for step in range(100):
            guarded_step(guard, net, opt, x, y, step)
            if step == 49:
                guard.report_validation(49, 0.25)
        guard.flush()
        self.assertEqual([r[0] for r in client.reports],
                         [0, 1, 20, 21, 40, 41, 49, 60, 61, 80, 81, 99])
        for step, loss, val, norm in client.reports:
            self.assertTrue(math.isfinite(loss), step)
            self.assertEqual(val, 0.25 if step == 49 else None, step)
            # Staged later (validation, the end), no norm: the gradients
            # may be gone by then.
            self.assertEqual(norm is None, step in (49, 99), step)
        self.assertEqual((guard.measured_steps, guard.skipped_steps), (12, 88))
        # Rollback still finds judged snapshots (after steps 0, 20, ..., 80).
        advice = pb.Advice(advice_id=1, diagnosis=pb.Diagnosis(kind=pb.DIVERGENCE, onset=70),
                           action=pb.Action(scale_lr=pb.ScaleLr(factor=0.1),
                                            restore_checkpoint=True))
        guard._apply(100, advice)
        self.assertIn("rolled back to step 60", guard.events[-1][3])
        with self.assertRaises(ValueError):
            lossguard.TorchGuard(opt, client, max_overhead=-0.1)

    def test_the_start_and_the_steps_after_a_correction_are_measured_densely(self):
        """The first dense_steps steps of a run (from wherever it starts),
        and as many after each action applied, are measured whatever the
        budget; the budget's first step after them costs what 1e-9 never
        earns back."""
        x, y, net, opt = problem()
        for group in opt.param_groups:
            group["lr"] = 0.01
        client = AutoRecordingClient()
        guard = lossguard.TorchGuard(opt, client, max_overhead=1e-9, dense_steps=10)
        for step in range(5, 80):  # a run resumed at step 5
            guarded_step(guard, net, opt, x, y, step)
            if step == 40:
                guard._apply(step, pb.Advice(advice_id=1, action=pb.Action(
                    scale_lr=pb.ScaleLr(factor=0.5))))
        guard.flush()
        want = list(range(5, 16)) + list(range(41, 51)) + [79]
        self.assertEqual([r[0] for r in client.reports], want)
        self.assertEqual((guard.measured_steps, guard.skipped_steps), (22, 53))

    def test_within_the_overhead_budget_every_step_is_measured(self):
        x, y, net, opt = problem()
        for group in opt.param_groups:
            group["lr"] = 0.01
        for budget in (0, 1e9):
            client = RecordingClient()
            guard = lossguard.TorchGuard(opt, client, max_overhead=budget)
            self.train(guard, net, opt, x, y, 30)
            guard.flush()
            self.assertEqual([r[0] for r in client.reports], list(range(30)), budget)
            self.assertEqual((guard.measured_steps, guard.skipped_steps), (30, 0))

    def test_lightning_callback_over_the_overhead_budget(self):
        """The callback shares the guard's budget: over it, the first step,
        the steps with a validation loss (every 50 batches here) and the
        last are reported, with the mean loss of their batches."""
        x, y, net, _ = problem()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        client = RecordingClient()
        cb = lossguard.LossGuardCallback(client, max_overhead=1e-9, dense_steps=0)
        drive_lightning(cb, net, opt, x, y, 240, None, accumulate=2)
        self.assertEqual([r[0] for r in client.reports], [0, 24, 49, 74, 99, 119])
        self.assertEqual([r[2] for r in client.reports], [None, 1.0, 1.0, 1.0, 1.0, None])
        self.assertEqual((cb.guard.measured_steps, cb.guard.skipped_steps), (6, 114))
        self.assertTrue(all(math.isfinite(r[1]) and 0 < r[1] < 10 for r in client.reports))

    @unittest.skipUnless(torch.cuda.is_available(), "needs CUDA")
    def test_on_cuda_every_step_is_reported_once_with_its_own_values(self):
        """The ring of pinned slots and events, with the device kept busy so
        that the copies lag: whatever max_steps_in_flight, every step is
        reported once, in order, with its own loss and gradient norm, no
        more than max_steps_in_flight steps late; a validation goes with
        its step, and a change of the loss's dtype changes nothing."""
        for n in (1, 2, 3):
            torch.manual_seed(0)
            net = torch.nn.Linear(8, 1).cuda()
            opt = torch.optim.SGD(net.parameters(), lr=0.01)
            x = torch.randn(64, 8, device="cuda")
            y = torch.randn(64, 1, device="cuda")
            client = RecordingClient()
            guard = lossguard.TorchGuard(opt, client, max_overhead=0, max_steps_in_flight=n)
            want = []  # (loss, norm) as device tensors, read after the loop
            lag = []
            for step in range(12):
                guard.before_step(step)
                torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time
                loss = torch.nn.functional.mse_loss(net(x), y)
                if step >= 6:
                    loss = loss.double()
                opt.zero_grad()
                loss.backward()
                norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.double().norm() for p in net.parameters()]))
                want.append((loss.detach().clone(), norm))
                guard.after_backward(step, loss)
                opt.step()
                lag.append(step + 1 - len(client.reports))
                if step == 5:
                    guard.report_validation(5, 0.5)
            guard.flush()
            self.assertEqual([r[0] for r in client.reports], list(range(12)), n)
            for (step, loss, val, norm), (w_loss, w_norm) in zip(client.reports, want):
                self.assertAlmostEqual(loss, w_loss.item(), places=6, msg=(n, step))
                self.assertAlmostEqual(norm, w_norm.item(), places=5, msg=(n, step))
                self.assertEqual(val, 0.5 if step == 5 else None, (n, step))
            self.assertLessEqual(max(lag), n, (n, lag))
            self.assertEqual(max(lag), n, (n, lag))  # the GPU lags: the ring fills

    def test_a_rollback_restores_the_weights_its_snapshot_was_judged_by(self):
        """A snapshot of the weights after step s counts once step s+1's
        loss, computed from them, is sound; a rollback then restores
        exactly those weights."""
        x, y, net, opt = problem()
        for group in opt.param_groups:
            group["lr"] = 0.01

        guard = lossguard.TorchGuard(opt, AutoRecordingClient(), max_overhead=0, model=net,
                                     snapshot_every=2)
        weights = self.train(guard, net, opt, x, y, 6)
        # Reported so far: steps 0-4. Snapshots of the weights after steps
        # 0 and 2 are judged (by the losses of steps 1 and 3); that of
        # step 4 waits for step 5's loss.
        advice = pb.Advice(advice_id=1, diagnosis=pb.Diagnosis(kind=pb.DIVERGENCE, onset=5),
                           action=pb.Action(scale_lr=pb.ScaleLr(factor=0.1),
                                            restore_checkpoint=True))
        guard._apply(6, advice)
        note = guard.events[-1][3]
        self.assertIn("rolled back to step 2", note)
        self.assertTrue(torch.equal(net.l1.weight, weights[2]))
        guard.flush()


class DaemonTestCase(unittest.TestCase):
    """A lossguardd of its own, on an SQLite file, per test."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.daemon = Daemon(os.path.join(self.dir.name, "lossguard.db"))

    def tearDown(self):
        self.assertEqual(self.daemon.stop(), 0)
        self.dir.cleanup()


class LrRangeTestTest(DaemonTestCase):
    def test_suggest_lr_reads_a_range_test_as_lr_find_does(self):
        rows = list(read_curve("digits-mlp-sgdm-lr1e-07-b32-exp-lrrange-s1.csv"))
        lrs = [r[1] for r in rows]
        losses = [r[2] for r in rows]
        s = lossguard.suggest_lr(lrs, losses, self.daemon.address, timeout=WAIT)
        self.assertLess(s.steep_mid_lr, s.suggested_lr)
        self.assertLess(s.suggested_lr, s.basin_mid_lr)
        self.assertAlmostEqual(math.log10(s.suggested_lr),
                               (math.log10(s.steep_mid_lr) + math.log10(s.basin_mid_lr)) / 2)
        self.assertGreater(s.diverge_lr, s.min_loss_lr)
        self.assertIn("Suggested lr", s.evidence)
        # A flat curve: no guess, the daemon's reason.
        flat = [1e-7 * 1.06 ** i for i in range(200)]
        with self.assertRaisesRegex(ValueError, "no usable descent"):
            lossguard.suggest_lr(flat, [2.3 + 0.01 * (i % 3) for i in range(200)],
                                 self.daemon.address, timeout=WAIT)
        with self.assertRaisesRegex(ValueError, "differ in length"):
            lossguard.suggest_lr(flat, [2.3], self.daemon.address)

    def test_suggest_lr_without_a_daemon_is_a_connection_error(self):
        with socket.socket() as sock:   # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{sock.getsockname()[1]}"
        with self.assertRaises(ConnectionError):
            lossguard.suggest_lr([1e-7, 1e-6], [1.0, 1.0], address, timeout=5)

    def test_range_test_on_a_model_restores_it_and_suggests_within_the_test(self):
        x, y, net, opt = problem()   # two groups, LR ratio 10:1
        before = copy.deepcopy(net.state_dict())
        group_lrs = []

        def step_fn(model, batch):
            group_lrs.append([g["lr"] for g in opt.param_groups])
            return torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
        net.eval()
        test = lossguard.lr_range_test(net, opt, batches, step_fn=step_fn,
                                       server=self.daemon.address, timeout=WAIT)
        # The weights, the optimizer's LRs and the eval mode are back.
        for k, v in net.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]), k)
        self.assertEqual([g["lr"] for g in opt.param_groups], [10.0, 1.0])
        self.assertFalse(net.training)
        # The LR grew x1.06 a step from 1e-7 on every group, keeping the
        # ratio, until the loss blew up (long before lr 10).
        self.assertAlmostEqual(test.lrs[0], 1e-7)
        for a, b in zip(test.lrs, test.lrs[1:]):
            self.assertAlmostEqual(b / a, 1.06)
        for (first, second), lr in zip(group_lrs, test.lrs):
            self.assertAlmostEqual(first, lr)
            self.assertAlmostEqual(second, lr / 10)
        self.assertEqual(len(test.losses), len(test.lrs))
        self.assertLess(test.lrs[-1], 10.0)
        self.assertRegex(test.stop_reason, "smoothed loss|the loss was")
        self.assertGreater(test.suggested_lr, test.lrs[0])
        self.assertLess(test.suggested_lr, test.lrs[-1])
        self.assertIn("Suggested lr", test.suggestion.evidence)
        # Training at the suggestion learns (the same weights, restored).
        for group, ratio in zip(opt.param_groups, (1.0, 0.1)):
            group["lr"] = test.suggested_lr * ratio
        net.train()
        first = torch.nn.functional.mse_loss(net(x), y).item()
        for _ in range(100):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
        self.assertLess(loss.item(), 0.5 * first)

    def test_range_test_that_never_descends_keeps_its_curve(self):
        net = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x = torch.randn(64, 4)
        y = torch.randn(64, 1)   # noise: nothing to learn
        with self.assertRaises(lossguard.RangeTestError) as caught:
            lossguard.lr_range_test(
                net, opt, [(x, y)], torch.nn.functional.mse_loss, end_lr=1e-3,
                server=self.daemon.address, timeout=WAIT)
        self.assertIn("no usable descent", str(caught.exception))
        self.assertIsInstance(caught.exception, ValueError)
        self.assertEqual(len(caught.exception.lrs), len(caught.exception.losses))
        self.assertGreater(len(caught.exception.lrs), 100)
        with self.assertRaisesRegex(ValueError, "exactly one"):
            lossguard.lr_range_test(net, opt, [(x, y)], server=self.daemon.address)


class TorchGuardTest(DaemonTestCase):
    def test_auto_mode_cuts_every_group_keeping_ratios(self):
        x, y, net, opt = problem()
        client = lossguard.Client(self.daemon.address, "py-guard", mode="auto",
                                  max_batch_delay=0.001)
        guard = lossguard.TorchGuard(opt, client, max_overhead=0)
        for step in range(200):
            guarded_step(guard, net, opt, x, y, step)
            if step % 10 == 9:
                client.flush(WAIT)  # the advice has arrived in order
            if any(applied for _, _, applied, _ in guard.events):
                break
        guard.flush()
        self.assertTrue(client.flush(WAIT))
        applied = [e for e in guard.events if e[2]]
        self.assertTrue(applied, guard.events)
        step, advice, _, note = applied[0]
        self.assertEqual(advice.diagnosis.kind, pb.DIVERGENCE)
        factor = advice.action.scale_lr.factor
        self.assertAlmostEqual(opt.param_groups[0]["lr"], 10.0 * factor)
        self.assertAlmostEqual(opt.param_groups[1]["lr"], 1.0 * factor)
        self.assertIn("LR x", note)
        client.finish(timeout=WAIT)
        h = self.daemon.health("py-guard")
        self.assertEqual(h.advice[0].status, pb.APPLIED)
        # The reported gradient norms are those before clipping, > 0.
        with grpc.insecure_channel(self.daemon.address) as ch:
            curve = pb_grpc.LossGuardStub(ch).GetCurve(
                pb.GetCurveRequest(run_id="py-guard"), timeout=WAIT)
        self.assertTrue(all(p.HasField("grad_norm") for p in curve.points))

    def test_rollback_restores_finite_weights_with_the_cut(self):
        x, y, net, opt = problem()
        client = lossguard.Client(self.daemon.address, "py-rollback", mode="auto",
                                  max_batch_delay=0.001)
        guard = lossguard.TorchGuard(opt, client, max_overhead=0, model=net, snapshot_every=1)
        losses = []
        for step in range(300):
            loss = guarded_step(guard, net, opt, x, y, step)
            losses.append(float(loss))
            if step % 5 == 4:
                client.flush(WAIT)
        guard.flush()
        client.finish(timeout=WAIT)
        notes = [note for _, _, applied, note in guard.events if applied]
        self.assertTrue(any("rolled back" in n for n in notes), guard.events)
        self.assertTrue(all(torch.isfinite(p).all() for p in net.parameters()))
        self.assertTrue(all(math.isfinite(v) for v in losses[-50:]), losses[-50:])

    def test_starved_run_is_ramped_and_learns(self):
        """An LR ~1000x too small: the daemon sends an LR ramp, the guard
        grows the LR every step (keeping the groups' ratio), the run learns,
        and the ack says from which step the action counts."""
        x, y, net, _ = problem()
        opt = torch.optim.SGD([{"params": net.l1.parameters(), "lr": 1e-4},
                               {"params": net.l2.parameters(), "lr": 1e-5}], lr=1e-4)
        client = lossguard.Client(self.daemon.address, "py-ramp", mode="auto",
                                  max_batch_delay=0.001)
        guard = lossguard.TorchGuard(opt, client, max_overhead=0)
        losses, max_lr = [], 0.0
        for step in range(300):
            loss = guarded_step(guard, net, opt, x, y, step)
            losses.append(float(loss))
            max_lr = max(max_lr, opt.param_groups[0]["lr"])
            if step % 10 == 9:
                client.flush(WAIT)
        guard.flush()
        client.finish(timeout=WAIT)
        ramps = [(st, a, n) for st, a, applied, n in guard.events
                 if applied and a.action.WhichOneof("kind") == "ramp_lr"]
        self.assertTrue(ramps, guard.events)
        self.assertIn("LR ramp x1.1 per step", ramps[0][2])
        self.assertGreater(max_lr, 500 * 1e-4)
        self.assertAlmostEqual(opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"], 0.1)
        self.assertLess(losses[-1], 0.5 * losses[0])
        h = self.daemon.health("py-ramp")
        self.assertEqual(h.advice[0].status, pb.APPLIED)

    def test_lightning_style_callback(self):
        x, y, net, opt = problem()
        client = lossguard.Client(self.daemon.address, "py-lightning", mode="auto",
                                  max_batch_delay=0.001)
        cb = lossguard.LossGuardCallback(client, max_overhead=0)
        drive_lightning(cb, net, opt, x, y, 150, client)
        self.assertTrue(any(applied for _, _, applied, _ in cb.guard.events))
        self.assertLess(opt.param_groups[0]["lr"], 10.0)
        h = self.daemon.health("py-lightning")
        self.assertEqual(h.summary.state, pb.FINISHED)
        self.assertEqual(h.summary.steps_stored, 150)

    def test_lightning_callback_ramps_a_starved_run(self):
        """The LR ramp (the remedy for an LR ~1000x too small) is applied
        step by step from on_train_batch_start, as before_step in a plain
        loop: the LR grows and the run learns."""
        x, y, net, _ = problem()
        opt = torch.optim.SGD([{"params": net.l1.parameters(), "lr": 1e-4},
                               {"params": net.l2.parameters(), "lr": 1e-5}], lr=1e-4)
        client = lossguard.Client(self.daemon.address, "py-lightning-ramp",
                                  mode="auto", max_batch_delay=0.001)
        cb = lossguard.LossGuardCallback(client, max_overhead=0)
        losses, max_lr = drive_lightning(cb, net, opt, x, y, 300, client)
        ramps = [n for _, a, applied, n in cb.guard.events
                 if applied and a.action.WhichOneof("kind") == "ramp_lr"]
        self.assertTrue(ramps, cb.guard.events)
        self.assertGreater(max_lr, 500 * 1e-4)
        self.assertAlmostEqual(opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"], 0.1)
        self.assertLess(losses[-1], 0.5 * losses[0])

    def test_lightning_callback_reports_each_optimizer_step_once(self):
        """accumulate_grad_batches=4: one report per optimizer step (no step
        -1 for the first batches), and an LR ramp grows once per optimizer
        step, not once per batch."""
        x, y, net, _ = problem()
        opt = torch.optim.SGD(net.parameters(), lr=1e-4)
        client = lossguard.Client(self.daemon.address, "py-lightning-accumulate",
                                  mode="auto", max_batch_delay=0.001)
        cb = lossguard.LossGuardCallback(client, max_overhead=0)
        _, max_lr = drive_lightning(cb, net, opt, x, y, 800, client,
                                    accumulate=4)
        self.assertEqual(client.stats.rejected_steps, 0)
        h = self.daemon.health("py-lightning-accumulate")
        self.assertEqual(h.summary.steps_stored, 200)
        self.assertEqual(h.summary.last_step, 199)
        ramps = [a for _, a, applied, _ in cb.guard.events
                 if applied and a.action.WhichOneof("kind") == "ramp_lr"]
        self.assertTrue(ramps, cb.guard.events)
        r = ramps[0].action.ramp_lr
        self.assertLessEqual(max_lr, 1e-4 * r.factor_per_step ** r.steps * 1.001)

    def test_lightning_callback_reports_what_the_step_saw(self):
        """Under mixed precision and gradient accumulation: the norm of the
        unscaled accumulated gradient (not 1024x it, as on_after_backward
        sees it) and the mean of the batches' losses (not 1/accumulate of
        it, as Lightning hands it on)."""
        x, y, net, _ = problem()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        client = RecordingClient()
        cb = lossguard.LossGuardCallback(client, max_overhead=0)
        # The same steps without the callback, measured directly.
        ref = copy.deepcopy(net)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3)
        want = []
        for _ in range(6):
            losses = []
            for _ in range(3):
                loss = torch.nn.functional.mse_loss(ref(x), y)
                (loss / 3).backward()
                losses.append(float(loss))
            norm = torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in ref.parameters()])).item()
            want.append((sum(losses) / 3, norm))
            ref_opt.step()
            ref_opt.zero_grad()
        drive_lightning(cb, net, opt, x, y, 18, client, accumulate=3,
                        loss_scale=1024.0)
        self.assertEqual([r[0] for r in client.reports], list(range(6)))
        self.assertTrue(all(r[2] is None for r in client.reports), client.reports)
        for (_, loss, _, norm), (want_loss, want_norm) in zip(client.reports, want):
            self.assertAlmostEqual(loss, want_loss, delta=1e-5 * want_loss)
            self.assertAlmostEqual(norm, want_norm, delta=1e-4 * want_norm)

    def test_lightning_callback_reports_steps_around_a_missing_loss(self):
        """A batch that hands on no loss (accumulating 2, the second batch
        of step 1): step 1 is reported at its end with the loss it has,
        and step 2 with its own two batches' (before, a None output raised;
        then step 1 waited for step 2's first batch and took its loss)."""
        x, y, net, _ = problem()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        client = RecordingClient()
        cb = lossguard.LossGuardCallback(client, max_overhead=0)
        losses, _ = drive_lightning(cb, net, opt, x, y, 8, client, accumulate=2,
                                    no_loss_at={3})
        want = [(losses[0] + losses[1]) / 2, losses[2], (losses[4] + losses[5]) / 2,
                (losses[6] + losses[7]) / 2]
        self.assertEqual([r[0] for r in client.reports], [0, 1, 2, 3])
        for r, w in zip(client.reports, want):
            self.assertAlmostEqual(r[1], w, delta=1e-6 * w)

    def test_lightning_callback_ignores_validation_outside_fit(self):
        """trainer.validate() without fit: no optimizer, nothing to guard
        (before, an IndexError on trainer.optimizers[0])."""
        class ValidateOnly:
            optimizers = []
            sanity_checking = False
            callback_metrics = {"val_loss": torch.tensor(1.0)}
            global_step = 0

        cb = lossguard.LossGuardCallback(RecordingClient(), max_overhead=0)
        cb.on_validation_end(ValidateOnly(), torch.nn.Linear(2, 1))
        self.assertIsNone(cb.guard)

    def test_lightning_callback_rolls_back_with_the_cut(self):
        """rollback=True: the LightningModule's weights come back from before
        the blow-up with the LR cut, as TorchGuard(model=...) does."""
        x, y, net, opt = problem()
        client = lossguard.Client(self.daemon.address, "py-lightning-rollback",
                                  mode="auto", max_batch_delay=0.001)
        cb = lossguard.LossGuardCallback(client, max_overhead=0, rollback=True, snapshot_every=1)
        losses, _ = drive_lightning(cb, net, opt, x, y, 300, client)
        notes = [note for _, _, applied, note in cb.guard.events if applied]
        self.assertTrue(any("rolled back" in n for n in notes), cb.guard.events)
        self.assertTrue(all(torch.isfinite(p).all() for p in net.parameters()))
        self.assertTrue(all(math.isfinite(v) for v in losses[-50:]), losses[-50:])


def _join_gloo(rank, world, init_file):
    """Joins this rank to the test's gloo process group; torch.distributed."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=WAIT))
    return dist


def _ddp_step(guard, ddp, xs, ys, opt, client, step):
    """One step of the DDP loop on this rank's shard; rank 0 waits every 10
    steps until the daemon has the steps, so the advice arrives in time."""
    guard.before_step(step)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(ddp(xs), ys)
    loss.backward()
    guard.after_backward(step, loss)
    opt.step()
    if client is not None and step % 10 == 9:
        client.flush(WAIT)


def _save_rank(out_dir, rank, net, opt, guard):
    """What check_ranks_agree compares: final weights, LRs, guard events."""
    torch.save({"params": [p.detach().clone() for p in net.parameters()],
                "lrs": [g["lr"] for g in opt.param_groups],
                "events": [(st, a.advice_id, applied, note)
                           for st, a, applied, note in guard.events]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def _ddp_worker(rank, world, init_file, address, out_dir):
    """One rank of a DistributedDataParallel run of problem() (its LR blows
    the run up) on gloo; rank 0 attached in AUTO mode. Saves the final
    weights, LRs and guard events."""
    dist = _join_gloo(rank, world, init_file)
    x, y, net, opt = problem()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    xs, ys = x[rank::world], y[rank::world]  # each rank its own shard
    client = (lossguard.Client(address, "py-ddp", mode="auto", max_batch_delay=0.001)
              if rank == 0 else None)
    # Syncs at steps that are not snapshot steps: a snapshot is still
    # awaiting rank 0's verdict at some of them.
    guard = lossguard.TorchGuard(opt, client, max_overhead=0, model=net, snapshot_every=5,
                                 sync_every=3)
    for step in range(300):
        _ddp_step(guard, ddp, xs, ys, opt, client, step)
    guard.flush()
    if client is not None:
        client.finish(timeout=WAIT)
    _save_rank(out_dir, rank, net, opt, guard)
    dist.destroy_process_group()


def _ddp_lightning_worker(rank, world, init_file, address, out_dir):
    """_ddp_worker through the Lightning callback (with rollback)."""
    dist = _join_gloo(rank, world, init_file)
    x, y, net, opt = problem()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    client = (lossguard.Client(address, "py-ddp-lightning", mode="auto",
                               max_batch_delay=0.001) if rank == 0 else None)
    cb = lossguard.LossGuardCallback(client, max_overhead=0, rollback=True, snapshot_every=5,
                                     sync_every=3)
    drive_lightning(cb, net, opt, x[rank::world], y[rank::world], 300, client,
                    forward=ddp)
    _save_rank(out_dir, rank, net, opt, cb.guard)
    dist.destroy_process_group()


def _ddp_misconfigured_worker(rank, world, init_file, address, out_dir):
    """Every rank with a client (rank 1 should have none): each rank's
    guard must raise, none may wait for the others."""
    dist = _join_gloo(rank, world, init_file)
    _, _, _, opt = problem()
    try:
        lossguard.TorchGuard(opt, RecordingClient(), max_overhead=0)
    except ValueError as e:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(str(e))
    dist.destroy_process_group()


def _ddp_accept_raises_worker(rank, world, init_file, address, out_dir):
    """_ddp_worker's blow-up in ADVISE mode, with an accept callback that
    raises on rank 0: every rank must raise, none may wait in a collective
    for a rank 0 that has left."""
    dist = _join_gloo(rank, world, init_file)
    x, y, net, opt = problem()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    client = (lossguard.Client(address, "py-ddp-raises", mode="advise",
                               max_batch_delay=0.001) if rank == 0 else None)

    def accept(advice):
        raise KeyError("the user's callback failed")

    guard = lossguard.TorchGuard(opt, client, max_overhead=0, accept=accept, sync_every=3)
    outcome = "finished"
    try:
        for step in range(300):
            _ddp_step(guard, ddp, x[rank::world], y[rank::world], opt, client, step)
    except (KeyError, RuntimeError) as e:
        outcome = f"{type(e).__name__} at step {step}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    if client is not None:
        client.close()
    dist.destroy_process_group()


class DistributedTest(DaemonTestCase):
    """Two DistributedDataParallel processes on gloo, rank 0 attached: both
    ranks apply the same actions at the same step and end identical."""

    def run_ranks(self, worker):
        """Runs `worker` on two gloo ranks; what each saved."""
        import torch.multiprocessing as mp
        mp.spawn(worker, nprocs=2, join=True,
                 args=(2, os.path.join(self.dir.name, "init"), self.daemon.address,
                       self.dir.name))
        return [torch.load(os.path.join(self.dir.name, f"rank{r}.pt")) for r in (0, 1)]

    def check_ranks_agree(self, r0, r1):
        """Both ranks applied the same actions at the same steps, with the
        same effect, and ended with the same LRs and weights."""
        applied = [e for e in r0["events"] if e[2]]
        self.assertTrue(applied, r0["events"])
        self.assertTrue(any("rolled back" in e[3] for e in applied), r0["events"])
        self.assertEqual([e[:3] for e in r1["events"]], [e[:3] for e in r0["events"]])
        self.assertEqual([e[3] for e in r1["events"] if e[2]], [e[3] for e in applied])
        self.assertEqual(r0["lrs"], r1["lrs"])
        self.assertLess(r0["lrs"][0], 10.0)
        self.assertAlmostEqual(r0["lrs"][1] / r0["lrs"][0], 0.1)
        for a, b in zip(r0["params"], r1["params"]):
            self.assertTrue(torch.isfinite(a).all())
            self.assertTrue(torch.equal(a, b))

    def test_lightning_callback_on_every_rank(self):
        r0, r1 = self.run_ranks(_ddp_lightning_worker)
        self.check_ranks_agree(r0, r1)
        h = self.daemon.health("py-ddp-lightning")
        self.assertEqual(h.summary.steps_stored, 300)

    def test_a_client_on_another_rank_fails_on_every_rank(self):
        import torch.multiprocessing as mp
        mp.spawn(_ddp_misconfigured_worker, nprocs=2, join=True,
                 args=(2, os.path.join(self.dir.name, "init"), self.daemon.address,
                       self.dir.name))
        for r in (0, 1):
            with open(os.path.join(self.dir.name, f"rank{r}.txt")) as f:
                self.assertIn("ranks with one: [0, 1]", f.read())

    def test_an_accept_callback_that_raises_stops_every_rank(self):
        import torch.multiprocessing as mp
        mp.spawn(_ddp_accept_raises_worker, nprocs=2, join=True,
                 args=(2, os.path.join(self.dir.name, "init"), self.daemon.address,
                       self.dir.name))
        outcome = []
        for r in (0, 1):
            with open(os.path.join(self.dir.name, f"rank{r}.txt")) as f:
                outcome.append(f.read())
        self.assertTrue(outcome[0].startswith("KeyError at step "), outcome)
        self.assertTrue(outcome[1].startswith("RuntimeError at step "), outcome)
        self.assertIn("the user's callback failed", outcome[1])
        # At the same sync.
        self.assertEqual(outcome[0].split(":")[0].split()[-1],
                         outcome[1].split(":")[0].split()[-1], outcome)

    def test_every_rank_applies_rank_0s_actions(self):
        r0, r1 = self.run_ranks(_ddp_worker)
        self.check_ranks_agree(r0, r1)
        h = self.daemon.health("py-ddp")
        self.assertEqual(h.summary.steps_stored, 300)
        self.assertEqual(h.advice[0].status, pb.APPLIED)


# Run by a venv's interpreter, outside the source tree and with torch hidden:
# the installed package reports a short curve to the daemon at argv[1].
_WHEEL_USER = r"""
import sys
sys.modules["torch"] = None  # as on a machine without PyTorch
import lossguard
print(lossguard.__file__)
try:
    lossguard.TorchGuard
    raise SystemExit("TorchGuard imported without torch")
except ImportError as e:
    print("ImportError:", e)
with lossguard.Client(sys.argv[1], "py-wheel", project="wheel") as client:
    for step in range(50):
        assert client.report(step, 0.01, 2.0 - 0.01 * step)
    assert client.flush(60.0)
"""


class WheelTest(DaemonTestCase):
    """The wheel the build makes, installed with pip into a venv."""

    def test_the_wheel_installs_into_a_venv_and_reports_without_torch(self):
        wheel = os.environ.get("LOSSGUARD_WHEEL")
        if not wheel:
            self.skipTest("no wheel given (run under ctest)")
        venv = os.path.join(self.dir.name, "venv")
        # System site packages for grpcio and protobuf (Debian's; nothing
        # is downloaded), but not build/python: PYTHONPATH is dropped.
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages",
                        "--without-pip", venv], check=True)
        python = os.path.join(venv, "bin", "python")
        subprocess.run(["/usr/bin/python3", "-m", "pip", "--python", python, "install",
                        "--quiet", "--no-deps", "--no-index", wheel], check=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([python, "-c", _WHEEL_USER, self.daemon.address],
                             cwd=self.dir.name, env=env, capture_output=True,
                             text=True, timeout=WAIT)
        self.assertEqual(out.returncode, 0, out.stderr)
        where, why = out.stdout.splitlines()[:2]
        self.assertTrue(where.startswith(os.path.join(venv, "lib")), where)
        self.assertIn("needs PyTorch", why)
        self.assertIn("lossguard[torch]", why)
        self.assertEqual(self.daemon.health("py-wheel").summary.steps_stored, 50)
        # With torch there, the installed TorchGuard imports.
        out = subprocess.run([python, "-c", "import lossguard; print(lossguard.TorchGuard.__module__)"],
                             cwd=self.dir.name, env=env, capture_output=True,
                             text=True, timeout=WAIT)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "lossguard.torch_guard")


class ExampleTest(DaemonTestCase):
    """examples/pytorch_train.py, the README's runnable PyTorch loop."""

    def test_the_example_is_rescued_by_a_cut(self):
        script = os.path.join(HERE, "..", "..", "examples", "pytorch_train.py")
        out = subprocess.run(
            ["/usr/bin/python3", script, "--server", self.daemon.address,
             "--run-id", "py-example", "--steps", "80", "--train-subset", "3000",
             "--eval-every", "40", "--device", "cpu"],
            capture_output=True, text=True, timeout=300)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("lossguard @ step", out.stdout)
        self.assertIn("final: val_acc", out.stdout)
        h = self.daemon.health("py-example")
        # Every step the guard measured is stored, the last one included
        # (on a CPU most are measured, two in three on the dev machine; the
        # rest were skipped to keep the guard within 1% of the step time).
        measured, total = map(int, re.search(r"lossguard measured (\d+) of (\d+) steps",
                                             out.stdout).groups())
        self.assertEqual(total, 80)
        self.assertGreater(measured, 20)
        self.assertEqual(h.summary.steps_stored, measured)
        self.assertEqual(h.summary.last_step, 79)
        self.assertEqual(h.summary.state, pb.FINISHED)
        # The LR 10x too large is cut (perhaps after clipping first): with
        # fewer than 100 of the 80 planned steps left, by a plain scale
        # rather than a decay to the end.
        cuts = [r for r in h.advice if r.status == pb.APPLIED
                and r.advice.action.WhichOneof("kind") == "scale_lr"
                and r.advice.action.scale_lr.factor < 1.0]
        self.assertTrue(cuts, out.stdout)
        self.assertEqual(h.config.total_steps, 80)


class FleetTest(unittest.TestCase):
    """Two daemons on one PostgreSQL database: the client follows a redirect.

    Needs the pg_server ctest fixture ($LOSSGUARD_TEST_PG_FILE)."""

    def setUp(self):
        conninfo_file = os.environ.get("LOSSGUARD_TEST_PG_FILE")
        if not conninfo_file:
            self.skipTest("no PostgreSQL test server (run under ctest)")
        with open(conninfo_file) as f:
            self.server = f.read().strip()
        fields = dict(kv.split("=", 1) for kv in self.server.split())
        self.db = f"lossguard_py_{os.getpid()}"
        self.psql(f"CREATE DATABASE {self.db}")
        uri = (f"postgresql://{fields['user']}@{fields['host']}:{fields['port']}/"
               f"{self.db}")
        self.a = Daemon(uri)
        self.b = Daemon(uri)

    def psql(self, sql):
        subprocess.run(["psql", self.server, "-q", "-c", sql], check=True,
                       capture_output=True)

    def tearDown(self):
        self.assertEqual(self.a.stop(), 0)
        self.assertEqual(self.b.stop(), 0)
        self.psql(f"DROP DATABASE {self.db} WITH (FORCE)")

    def test_a_run_served_by_another_daemon_is_followed_there(self):
        # A trainer attached at A holds run "r" there.
        import queue
        requests = queue.Queue()
        requests.put(pb.AttachRequest(start=pb.RunStart(run_id="r")))
        with grpc.insecure_channel(self.a.address) as ch:
            held = pb_grpc.LossGuardStub(ch).Attach(iter(requests.get, None))
            self.assertEqual(next(held).WhichOneof("kind"), "accepted")
            # Pointed at B, the client is sent to A and trains there.
            with lossguard.Client(self.b.address, "r") as client:
                for step in range(50):
                    client.report(step, 0.01, 1.0)
                self.assertTrue(client.flush(WAIT))
                self.assertGreaterEqual(client.stats.redirects, 1)
                self.assertEqual(client.stats.confirmed_step, 49)
            requests.put(None)
            held.cancel()


if __name__ == "__main__":
    unittest.main(verbosity=2)
