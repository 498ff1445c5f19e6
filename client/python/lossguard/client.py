"""lossguard.Client: non-blocking reporting over one Attach stream."""

import collections
import dataclasses
import math
import os
import queue
import random
import threading
import time

import grpc

from lossguard.v1 import lossguard_pb2 as pb
from lossguard.v1 import lossguard_pb2_grpc as pb_grpc

_MODES = {"observe": pb.OBSERVE, "advise": pb.ADVISE, "auto": pb.AUTO}


@dataclasses.dataclass
class ClientStats:
    connected: bool = False
    connects: int = 0            # successful attaches (1 + reconnects)
    reported_steps: int = 0      # accepted by report()
    rejected_steps: int = 0      # refused by report()
    dropped_steps: int = 0       # buffered too long, dropped (oldest first)
    buffered_steps: int = 0      # not yet confirmed by the daemon
    confirmed_step: int = None   # last step the daemon holds
    advice_received: int = 0
    # Times a daemon of a fleet said another one serves the run (the client
    # then attaches there once, at once, and falls back to `server` after).
    redirects: int = 0
    last_error: str = ""


def _connection(token, tls_ca, tls_cert, tls_key, tls, channel_options=()):
    """(new_channel(target), call metadata) for a daemon's credentials.

    A daemon with --auth_config wants a token (default $LOSSGUARD_TOKEN);
    with --tls_cert, TLS (tls_ca: the CA of its certificate, default
    $LOSSGUARD_TLS_CA, else the system's roots with tls=True); with
    --tls_client_ca, a client certificate too (tls_cert and tls_key).
    """
    token = token or os.environ.get("LOSSGUARD_TOKEN") or None
    tls_ca = tls_ca or os.environ.get("LOSSGUARD_TLS_CA") or None
    metadata = [("authorization", f"Bearer {token}")] if token else None
    options = list(channel_options)
    if tls or tls_ca or tls_cert or tls_key:
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together")

        def read(path):
            with open(path, "rb") as f:
                return f.read()
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(tls_ca) if tls_ca else None,
            private_key=read(tls_key) if tls_key else None,
            certificate_chain=read(tls_cert) if tls_cert else None)
        return (lambda target: grpc.secure_channel(target, creds, options=options),
                metadata)
    return (lambda target: grpc.insecure_channel(target, options=options),
            metadata)


@dataclasses.dataclass
class LrSuggestion:
    """What lossguardd reads from an LR range test (LRs; 0: none)."""
    suggested_lr: float      # the initial LR to train with
    steep_lo_lr: float       # the steepest-descent region
    steep_hi_lr: float
    steep_mid_lr: float
    min_loss_lr: float       # the smoothed-loss minimum and its basin
    basin_lo_lr: float
    basin_hi_lr: float
    basin_mid_lr: float
    diverge_lr: float        # where the loss blew up; 0: it did not
    points_used: int
    still_descending: bool   # lowest at the end: the test may have stopped early
    evidence: str            # words with the numbers behind them


def suggest_lr(lrs, losses, server="127.0.0.1:7077", *, timeout=60.0,
               token=None, tls_ca=None, tls_cert=None, tls_key=None, tls=False):
    """The initial LR lossguardd suggests from an LR range test.

    `lrs` grow at every step (exponentially, as LR finders run them) and
    `losses[i]` is the minibatch loss at `lrs[i]`; a non-finite loss ends
    the usable curve. The rule is `lossguard lr-find`'s: the geometric
    middle between the steepest descent and the loss minimum, with the
    numbers in `evidence`. Raises ValueError when the curve cannot give a
    suggestion (the LR does not grow, too few points, no usable descent:
    the daemon's message says which), PermissionError when the daemon
    refuses the token, and ConnectionError when it cannot be reached.
    Credentials as for Client.
    """
    lrs, losses = list(lrs), list(losses)
    if len(lrs) != len(losses):
        raise ValueError(f"lrs and losses differ in length ({len(lrs)} vs {len(losses)})")
    new_channel, metadata = _connection(token, tls_ca, tls_cert, tls_key, tls)
    request = pb.SuggestLearningRateRequest(
        steps=[pb.Step(step=i, lr=float(lr), loss=float(loss))
               for i, (lr, loss) in enumerate(zip(lrs, losses))])
    with new_channel(server) as channel:
        try:
            reply = pb_grpc.LossGuardStub(channel).SuggestLearningRate(
                request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.FAILED_PRECONDITION):
                raise ValueError(f"LR range test: {e.details()}") from None
            if e.code() in (grpc.StatusCode.UNAUTHENTICATED,
                            grpc.StatusCode.PERMISSION_DENIED):
                raise PermissionError(
                    f"lossguardd at {server}: {e.code().name}: {e.details()}") from None
            raise ConnectionError(
                f"lossguardd at {server}: {e.code().name}: {e.details()}") from None
    return LrSuggestion(**{f.name: getattr(reply, f.name)
                           for f in dataclasses.fields(LrSuggestion)})


class _Session:
    """One Attach stream: a request queue the stream consumes."""

    def __init__(self):
        self.requests = queue.Queue()
        self.call = None

    def __iter__(self):
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item


class Client:
    """Streams a run's steps to lossguardd and receives its advice.

    report() only appends to an in-memory buffer: a background thread
    batches and sends, reconnects with exponential backoff (with jitter)
    when the daemon is down or restarts, and resends whatever the daemon
    does not hold yet. Training never blocks on the daemon and no daemon
    error reaches the training loop. Past max_buffered_steps unconfirmed
    steps the oldest are dropped and counted.

    A daemon with tokens (lossguardd --auth_config) wants token= (default
    $LOSSGUARD_TOKEN); one with TLS wants tls_ca= (the PEM file of the CA
    that signed its certificate; default $LOSSGUARD_TLS_CA; tls=True for
    the system's roots), and with client certificates tls_cert= and
    tls_key= (PEM files). A refused token shows in stats().last_error.

    Thread-safe: report/poll_advice/ack may be called from any thread.
    """

    def __init__(self, server="127.0.0.1:7077", run_id=None, *, name="",
                 project="", tags=None, config=None, mode="observe",
                 max_batch_steps=1000, max_batch_delay=0.02,
                 max_buffered_steps=1_000_000, initial_backoff=0.1,
                 max_backoff=5.0, attach_timeout=10.0, on_advice=None,
                 token=None, tls_ca=None, tls_cert=None, tls_key=None, tls=False):
        if not run_id:
            raise ValueError("run_id is required")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}")
        self._server = server
        # Printable ASCII for a header: other bytes and "%" percent-encoded,
        # as the C++ client does.
        self._run_id_header = "".join(
            chr(b) if 0x20 <= b < 0x7f and b != 0x25 else f"%{b:02X}"
            for b in run_id.encode("utf-8"))
        self._start = pb.RunStart(run_id=run_id, name=name or run_id,
                                  project=project, tags=dict(tags or {}),
                                  mode=_MODES[mode])
        for key, value in (config or {}).items():
            setattr(self._start.config, key, value)
        self.mode = mode
        self._max_batch_steps = max_batch_steps
        self._max_batch_delay = max_batch_delay
        self._max_buffered = max_buffered_steps
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._attach_timeout = attach_timeout
        self._on_advice = on_advice

        self._cv = threading.Condition()
        self._buffer = collections.deque()   # unconfirmed pb.Step, in order
        self._sent = 0                       # of _buffer, sent on this stream
        self._oldest_unsent = 0.0
        self._last_reported = None
        self._acks = collections.deque()
        self._advice = collections.deque()
        self._finish_reason = None
        self._finished = False
        self._stop = False
        self._accepted = False
        self._broken = False
        self._stats = ClientStats()
        channel_options = [
            ("grpc.initial_reconnect_backoff_ms", int(initial_backoff * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(initial_backoff * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000)),
            ("grpc.keepalive_time_ms", 30000),
            ("grpc.keepalive_timeout_ms", 10000),
        ]
        self._new_channel, self._metadata = _connection(
            token, tls_ca, tls_cert, tls_key, tls, channel_options)
        self._channel = self._new_channel(server)
        self._stub = pb_grpc.LossGuardStub(self._channel)
        # Where the last session was told to go (client thread only).
        self._redirect = None
        self._session = None
        self._thread = threading.Thread(target=self._run, name="lossguard-client",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API
    def report(self, step, lr, loss, val_loss=None, grad_norm=None):
        """Records one optimizer step; returns False if refused.

        Steps must increase and lr must be finite and >= 0 (NaN: not
        logged), since the daemon would refuse the batch holding such a step.
        Losses may be anything: NaN and inf are data.
        """
        step, lr, loss = int(step), float(lr), float(loss)
        with self._cv:
            lr_ok = math.isnan(lr) or (math.isfinite(lr) and lr >= 0.0)
            if (self._finish_reason is not None or not lr_ok or
                    (self._last_reported is not None and step <= self._last_reported)):
                self._stats.rejected_steps += 1
                return False
            self._last_reported = step
            s = pb.Step(step=step, lr=lr, loss=loss, wall_time=time.time())
            if val_loss is not None:
                s.val_loss = float(val_loss)
            if grad_norm is not None:
                s.grad_norm = float(grad_norm)
            first_unsent = self._sent == len(self._buffer)
            if first_unsent:
                self._oldest_unsent = time.monotonic()
            self._buffer.append(s)
            self._stats.reported_steps += 1
            while len(self._buffer) > self._max_buffered:
                self._buffer.popleft()
                self._sent = max(0, self._sent - 1)
                self._stats.dropped_steps += 1
            # The sender wakes by itself when the oldest unsent step is due;
            # it is woken here only to start that clock or for a full batch.
            # Waking it at every step costs the training loop the GIL
            # (about 0.1 ms a step, measured).
            if first_unsent or len(self._buffer) - self._sent >= self._max_batch_steps:
                self._cv.notify_all()
            return True

    def poll_advice(self):
        """The advice received and not yet taken (a list, oldest first)."""
        with self._cv:
            out = list(self._advice)
            self._advice.clear()
            return out

    def ack(self, advice_id, applied, reason="", effective_step=None):
        """Tells the daemon an advice was applied or rejected.

        effective_step: the first step whose loss reflects an applied action
        (its outcome is judged from there)."""
        ack = pb.AdviceAck(advice_id=advice_id, applied=applied, reason=reason)
        if effective_step is not None:
            ack.effective_step = effective_step
        with self._cv:
            self._acks.append(ack)
            self._cv.notify_all()

    def flush(self, timeout=10.0):
        """Waits until the daemon holds every reported step; True if so."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._buffer and not self._acks,
                                     timeout)

    def finish(self, reason="finished", timeout=10.0):
        """Marks the run FINISHED, flushes and closes; True when done."""
        with self._cv:
            self._finish_reason = reason
            self._cv.notify_all()
            done = self._cv.wait_for(lambda: self._finished, timeout)
        self.close(timeout=0)
        return done

    def close(self, timeout=2.0):
        """Flushes for at most `timeout` seconds, then stops."""
        if timeout:
            self.flush(timeout)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            session = self._session
            attached = self._accepted and not self._broken
        if session is not None:
            session.requests.put(None)
            if session.call is not None and not attached:
                # Still attaching (the daemon away): nothing to end cleanly.
                session.call.cancel()
        self._thread.join(timeout=5)
        self._channel.close()

    @property
    def stats(self):
        with self._cv:
            s = dataclasses.replace(self._stats)
            s.buffered_steps = len(self._buffer)
            return s

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ internals
    def _confirm(self, last):
        self._stats.confirmed_step = last
        popped = 0
        while self._buffer and self._buffer[0].step <= last:
            self._buffer.popleft()
            popped += 1
        self._sent = max(0, self._sent - popped)
        self._cv.notify_all()

    def _read(self, call):
        try:
            for resp in call:
                kind = resp.WhichOneof("kind")
                advice = None
                with self._cv:
                    if kind == "accepted":
                        self._accepted = True
                        if resp.accepted.has_steps:
                            self._confirm(resp.accepted.last_step)
                    elif kind == "received":
                        if resp.received.has_steps:
                            self._confirm(resp.received.last_step)
                    elif kind == "advice":
                        self._stats.advice_received += 1
                        self._advice.append(resp.advice)
                        advice = resp.advice
                    self._cv.notify_all()
                if advice is not None and self._on_advice is not None:
                    self._on_advice(advice)
        except grpc.RpcError as e:
            with self._cv:
                if e.code() != grpc.StatusCode.CANCELLED or not self._stop:
                    self._stats.last_error = f"{e.code().name}: {e.details()}"
                if e.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.RESOURCE_EXHAUSTED):
                    # Refused: resending would be refused again, forever.
                    for _ in range(self._sent):
                        self._buffer.popleft()
                        self._stats.rejected_steps += 1
                    self._sent = 0
        with self._cv:
            self._broken = True
            self._cv.notify_all()

    def _session_once(self):
        """One connection. Returns True when the run is finished."""
        session = _Session()
        with self._cv:
            if self._stop:
                return True
            self._session = session
            self._accepted = False
            self._broken = False
            self._sent = 0
        session.requests.put(pb.AttachRequest(start=self._start))
        # A redirect (the daemon that serves the run, in a fleet) is used
        # for one session; after it, the configured server again.
        redirect, self._redirect = self._redirect, None
        stub = pb_grpc.LossGuardStub(redirect) if redirect else self._stub
        # wait_for_ready: the call waits (polling the channel) for the daemon
        # instead of failing at once while the channel is in backoff, so a
        # daemon that comes back is found as soon as it listens.
        # The run id as a header, so a load balancer in front of a fleet
        # can keep each run on one daemon (deploy/k8s: Envoy's ring hash).
        metadata = list(self._metadata or ()) + [("lossguard-run-id", self._run_id_header)]
        call = stub.Attach(iter(session), wait_for_ready=redirect is None,
                           metadata=metadata)
        session.call = call
        reader = threading.Thread(target=self._read, args=(call,), daemon=True)
        reader.start()
        finish_sent = False
        with self._cv:
            self._cv.wait_for(lambda: self._accepted or self._broken or self._stop,
                              self._attach_timeout)
            up = self._accepted and not self._broken and not self._stop
            if up:
                self._stats.connected = True
                self._stats.connects += 1
            while up:
                def work():
                    if self._stop or self._broken or self._acks:
                        return True
                    unsent = len(self._buffer) - self._sent
                    if unsent >= self._max_batch_steps:
                        return True
                    if unsent and time.monotonic() - self._oldest_unsent >= self._max_batch_delay:
                        return True
                    return self._finish_reason is not None and unsent == 0
                while not work():
                    unsent = len(self._buffer) - self._sent
                    wait = 1.0
                    if unsent:
                        wait = max(0.0, self._oldest_unsent + self._max_batch_delay
                                   - time.monotonic())
                    self._cv.wait(wait)
                if self._stop or self._broken:
                    break
                if self._acks:
                    session.requests.put(pb.AttachRequest(ack=self._acks.popleft()))
                elif len(self._buffer) > self._sent:
                    n = min(len(self._buffer) - self._sent, self._max_batch_steps)
                    batch = pb.StepBatch(steps=[self._buffer[self._sent + i]
                                                for i in range(n)])
                    self._sent += n
                    self._oldest_unsent = time.monotonic()
                    session.requests.put(pb.AttachRequest(steps=batch))
                else:
                    session.requests.put(pb.AttachRequest(
                        finish=pb.RunFinish(reason=self._finish_reason)))
                    session.requests.put(None)  # half-close
                    finish_sent = True
                    self._cv.wait_for(lambda: self._broken or self._stop)
                    break
            self._stats.connected = False
        if not finish_sent:
            session.requests.put(None)  # half-close: the daemon ends the call
            if up:
                # Wait (briefly) for that end instead of cancelling at once:
                # a cancelled call leaves grpc's request-consumer thread to
                # finish on its own, and a process that exits right after
                # close() can freeze that daemon thread holding the call's
                # lock, on which the call's finalizer then waits forever
                # (grpcio 1.51, interpreter shutdown).
                with self._cv:
                    self._cv.wait_for(lambda: self._broken, 1.0)
            call.cancel()
        reader.join()
        if redirect is not None:
            redirect.close()
        elif call.code() == grpc.StatusCode.UNAVAILABLE:
            # Another daemon of the fleet serves the run: go there next
            # (once: a redirect from a redirect waits for the backoff).
            owner = dict(call.trailing_metadata() or ()).get("lossguard-owner")
            if owner:
                self._redirect = self._new_channel(owner)
                with self._cv:
                    self._stats.redirects += 1
        ok = finish_sent and call.code() == grpc.StatusCode.OK
        with self._cv:
            self._session = None
            if ok:
                self._finished = True
                self._cv.notify_all()
        return ok

    def _run(self):
        backoff = self._initial_backoff
        connects = 0
        while True:
            try:
                if self._session_once():
                    return
            except Exception as e:  # never let the client thread die silently
                with self._cv:
                    self._stats.last_error = repr(e)
            if self._redirect is not None:
                continue  # to the run's daemon, at once
            with self._cv:
                if self._stop:
                    return
                if self._stats.connects != connects:
                    backoff = self._initial_backoff  # it worked for a while
                    connects = self._stats.connects
                self._cv.wait_for(lambda: self._stop,
                                  backoff * random.uniform(0.5, 1.0))
                if self._stop:
                    return
            backoff = min(backoff * 2, self._max_backoff)
