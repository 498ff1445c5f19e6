#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora, tests/fuzz/corpus/<target>/seed-*.

Deterministic; rerun it after changing a target's input format. Files not
named seed-* (reproducers of bugs the fuzzers found: crash-*, repro-*) are
left alone.

  fuzz_csv       short excerpts of /work/shared/curves/dev (FORMAT.md), the
                 same rows with CRLF / CR line ends, a BOM, quoted fields,
                 edge numbers, and broken files
  fuzz_tfevents  TFRecord event files written to the format's specification
                 (as tests/curvefile/tfevents_test.cc does): simple_value,
                 float/double/half/bfloat16 tensors, several tags, and broken
                 framing
  fuzz_attach    programs for fuzz_attach.cc's little op language: attach,
                 batches (of real curve rows too), acks, finish, reconnect,
                 cancel, queries
"""

import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
CURVES = os.environ.get("LOSSGUARD_CURVES", "/work/shared/curves/dev")


def write_file(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


write = write_file


def clear(target):
    d = os.path.join(CORPUS, target)
    if os.path.isdir(d):
        for n in os.listdir(d):
            if n.startswith("seed-"):
                os.remove(os.path.join(d, n))


def curve_lines(name, start=0, count=30):
    with open(os.path.join(CURVES, name), newline="") as f:
        lines = f.read().split("\n")
    return [lines[0]] + lines[1 + start:1 + start + count]


def first_nan_start(name, before=10):
    lines = curve_lines(name, 0, 10**9)
    for i, l in enumerate(lines[1:]):
        if "nan" in l.split(",")[2]:
            return max(0, i - before)
    return 0


# ------------------------------------------------------------------- CSV

def csv_seeds():
    t = "fuzz_csv"
    clear(t)
    excerpts = {
        "diverging": ("digits-mlp-sgdm-lr1-b32-s10.csv", 0, 40),
        "healthy-val-acc": ("bcancer-mlp-adam-lr0.001-b32-cosine-wd0.03-s217.csv", 0, 30),
        "oscillating": ("digits-mlp-sgdm-lr0.1-b32-s8.csv", 60, 30),
        "nan-loss": ("digits-cnn-sgd-lr300-b32-ramp-s130.csv",
                     first_nan_start("digits-cnn-sgd-lr300-b32-ramp-s130.csv"), 20),
    }
    rows = {}
    for key, (name, start, count) in excerpts.items():
        lines = curve_lines(name, start, count)
        rows[key] = lines
        write(t, key + ".csv", "\n".join(lines) + "\n")
    healthy = rows["healthy-val-acc"][:12]
    write(t, "crlf.csv", "\r\n".join(healthy) + "\r\n")
    write(t, "cr-only.csv", "\r".join(healthy))
    write(t, "bom-no-final-newline.csv", "\ufeff" + "\n".join(healthy))
    write(t, "reordered-quoted.csv",
          'loss,"step",epoch,lr\n'
          '2.30,0,1,0.1\n'
          '" 2.10 ",1,1,"0.1"\n'
          '"2,05",2,1,0.1\n')
    write(t, "edge-numbers.csv",
          "step,lr,loss,val_loss,grad_norm\n"
          "-5,0,nan,,\n"
          "0,nan,inf,-inf,Infinity\n"
          "1,1e-400,1e400,-0,4.9e-324\n"
          "2,,-1e400,NaN,1.7976931348623157e308\n"
          "9223372036854775807,0.5,0.1,,\n")
    broken = {
        "no-loss-column.csv": "step,lr,val_loss\n0,0.1,2\n",
        "column-twice.csv": "step,lr,loss,lr\n0,0.1,2,0.1\n",
        "step-not-rising.csv": "step,lr,loss\n0,0.1,2\n2,0.1,2\n2,0.1,1\n",
        "bad-lr.csv": "step,lr,loss\n0,-0.1,2\n",
        "inf-lr.csv": "step,lr,loss\n0,inf,2\n",
        "unclosed-quote.csv": 'step,lr,loss\n0,0.1,"2\n1,0.1,2\n',
        "quote-in-field.csv": 'step,lr,loss\n0,0.1,2"x\n',
        "field-count.csv": "step,lr,loss\r\n0,0.1\r\n",
        "empty.csv": "",
        "header-only.csv": "step,lr,loss\n",
        "step-overflow.csv": "step,lr,loss\n9223372036854775808,0.1,2\n",
        "step-not-integer.csv": "step,lr,loss\n1.5,0.1,2\n",
        "loss-not-number.csv": "step,lr,loss\n0,0.1,2.0x\n",
        "missing-loss.csv": "step,lr,loss\n0,0.1,\n",
    }
    for name, data in broken.items():
        write(t, name, data)


# ------------------------------------------------------------- tfevents

def crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


CRC_TABLE = crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(payload):
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc(length)) + payload +
            struct.pack("<I", masked_crc(payload)))


def varint(v):
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field, wire):
    return varint(field << 3 | wire)


def f_varint(field, v):
    return key(field, 0) + varint(v)


def f_bytes(field, b):
    if isinstance(b, str):
        b = b.encode()
    return key(field, 2) + varint(len(b)) + b


def f_double(field, v):
    return key(field, 1) + struct.pack("<d", v)


def f_float(field, v):
    return key(field, 5) + struct.pack("<f", v)


def event(step, values, wall=1.7e9):
    """values: list of (tag, encoded Summary.Value body after the tag)."""
    summary = b"".join(f_bytes(1, f_bytes(1, tag) + body) for tag, body in values)
    return f_double(1, wall + step) + f_varint(2, step) + f_bytes(5, summary)


def simple(v):
    return f_float(2, v)


def tensor(dtype, content=b"", floats=(), doubles=(), halves=()):
    t = f_varint(1, dtype)
    if content:
        t += f_bytes(4, content)
    if floats:
        t += f_bytes(5, b"".join(struct.pack("<f", x) for x in floats))
    if doubles:
        t += f_bytes(6, b"".join(struct.pack("<d", x) for x in doubles))
    if halves:
        t += f_bytes(13, b"".join(varint(h) for h in halves))
    return f_bytes(8, t)


def file_version():
    return record(f_double(1, 1.7e9) + f_bytes(3, "brain.Event:2"))


def tfevents_seeds():
    t = "fuzz_tfevents"
    clear(t)
    lines = curve_lines("digits-mlp-sgdm-lr1-b32-s10.csv", 0, 24)
    cols = lines[0].split(",")
    pytorch = file_version()
    for line in lines[1:]:
        f = dict(zip(cols, line.split(",")))
        step = int(f["step"])
        vals = [("train/loss", simple(float(f["loss"]))),
                ("lr", simple(float(f["lr"])))]
        if f.get("grad_norm"):
            vals.append(("grad_norm", simple(float(f["grad_norm"]))))
        for tag, body in vals:  # one scalar per event, as SummaryWriter does
            pytorch += record(event(step, [(tag, body)]))
        if f.get("val_loss"):
            pytorch += record(event(step, [("val/loss", simple(float(f["val_loss"])))]))
    write(t, "pytorch-simple-value.tfevents", pytorch)

    tf2 = file_version()
    for step in range(12):
        loss = 2.3 * 0.9 ** step
        tf2 += record(event(step, [
            ("epoch_loss", tensor(1, content=struct.pack("<f", loss))),
            ("epoch_learning_rate", tensor(2, doubles=[0.01])),
            ("Loss/validation", tensor(1, floats=[loss * 1.1])),
        ]))
    write(t, "tf2-tensors.tfevents", tf2)

    mixed = file_version()
    mixed += record(event(0, [("loss", tensor(19, halves=[0x4000]))]))  # 2.0
    mixed += record(event(1, [("loss", tensor(14, content=b"\x80\x3f"))]))  # bf16 1.0
    mixed += record(event(1, [("loss", simple(float("nan")))]))  # step logged twice
    mixed += record(event(2, [("loss", tensor(19, content=b"\x00\x7c"))]))  # +inf
    mixed += record(event(-3, [("loss", simple(0.5)), ("learning_rate", simple(-1.0))]))
    mixed += record(event(5, [("gradient/norm", simple(3.0)),
                              ("image", f_bytes(4, b"not a scalar"))]))
    write(t, "half-bf16-restart.tfevents", mixed)

    write(t, "no-loss-tag.tfevents",
          file_version() + record(event(0, [("accuracy", simple(0.5))])))
    write(t, "empty.tfevents", b"")
    good = file_version() + record(event(0, [("loss", simple(1.0))]))
    write(t, "truncated-header.tfevents", good[:-5] + b"\x00" * 3)
    write(t, "truncated-data.tfevents", good + record(event(1, [("loss", simple(0.9))]))[:20])
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0xFF
    write(t, "bad-data-crc.tfevents", bytes(bad_crc))
    write(t, "not-an-event.tfevents", record(b"\xff\xff\xff"))
    write(t, "csv-not-tfrecord.tfevents", "step,lr,loss\n0,0.1,2\n")
    huge = struct.pack("<Q", 1 << 62)
    write(t, "huge-length.tfevents", huge + struct.pack("<I", masked_crc(huge)) + b"\0" * 8)


# ---------------------------------------------------------------- attach

(START, STEPS, CURVE, ACK, FINISH, RAW, EMPTY, CLOSE, CANCEL, QUERY, RESTART,
 TAKEOVER) = range(12)
MEMORY, SQLITE, SQLITE_SMALL_BACKLOG = 0, 1, 3  # the config byte
OBSERVE, ADVISE, AUTO = 1, 2, 3


def op_start(run=0, mode=AUTO, project=1, name=b"", tags=(), config=None,
             raw_id=None):
    b = bytes([START])
    if raw_id is not None:
        b += bytes([0xE0, len(raw_id)]) + raw_id
    else:
        b += bytes([run])
    b += bytes([mode, project])
    b += bytes([len(name)]) + name
    b += bytes([len(tags)])
    for k, v in tags:
        b += bytes([len(k)]) + k + bytes([len(v)]) + v
    if config is None:
        b += b"\x00"
    else:
        lr_idx, total, schedule = config
        b += b"\x01" + bytes([lr_idx]) + struct.pack("<q", total) + bytes([schedule])
    return b


def op_steps(steps):
    """steps: list of (delta byte, value byte[, extra bytes])."""
    b = bytes([STEPS, len(steps)])
    for s in steps:
        b += bytes(s[:2]) + (s[2] if len(s) > 2 else b"")
    return b


def op_curve(n, kind, lr01=True, seed=7):
    return bytes([CURVE, n, kind, 1 if lr01 else 0, seed])


def op_ack(sel=0, applied=True, effective=None, reason=b""):
    flags = (1 if applied else 0) | (len(reason) << 4)
    extra = b""
    if effective == "raw":
        flags |= 2 | 4
    elif effective is not None:
        flags |= 2
        extra = bytes([effective])
    b = bytes([ACK, sel])
    if sel >= 0xF0:
        b += struct.pack("<Q", 12345)
    b += bytes([flags]) + reason
    if effective == "raw":
        b += struct.pack("<q", -(1 << 63))
    return b + extra


def op_finish(reason=b"done"):
    return bytes([FINISH, len(reason)]) + reason


def op_raw(msg):
    assert len(msg) < 256
    return bytes([RAW, len(msg)]) + msg


def op_query(sel=0, page=2, run_id=b"nope"):
    return bytes([QUERY, sel, page, len(run_id)]) + run_id


def step_msg(step, lr, loss, val=None, grad=None):
    m = f_varint(1, step) + f_double(2, lr) + f_double(3, loss)
    if val is not None:
        m += f_double(4, val)
    if grad is not None:
        m += f_double(5, grad)
    return m


def raw_batches(name, count, per=6):
    """AttachRequest{steps} messages holding the first `count` rows of a
    curve, `per` steps each."""
    lines = curve_lines(name, 0, count)
    cols = lines[0].split(",")
    rows = []
    for line in lines[1:]:
        f = dict(zip(cols, line.split(",")))
        rows.append(step_msg(int(f["step"]), float(f["lr"]), float(f["loss"]),
                             float(f["val_loss"]) if f.get("val_loss") else None,
                             float(f["grad_norm"]) if f.get("grad_norm") else None))
    out = b""
    for i in range(0, len(rows), per):
        batch = b"".join(f_bytes(1, r) for r in rows[i:i + per])
        out += op_raw(f_bytes(2, batch))
    return out


def attach_seeds():
    t = "fuzz_attach"
    clear(t)

    def write(target, name, program, config=MEMORY):
        write_file(target, name, bytes([config]) + program)

    # A diverging run in AUTO mode: advice with actions, acked (applied,
    # with effective_step, and rejected), then finished.
    diverge = op_start(0, AUTO, config=(5, 1000, 3))
    diverge += b"".join(op_curve(64, 1, seed=i) for i in range(8))
    diverge += op_ack(0, True, effective=2) + op_ack(1, False, reason=b"no")
    diverge += op_curve(32, 1) + op_query(0, 1) + op_finish() + op_query(0, 0)
    write(t, "diverge-ack-finish", diverge)
    write(t, "sqlite-diverge-ack-finish", diverge, SQLITE)
    # The same in OBSERVE: diagnoses only.
    write(t, "observe-oscillating",
          op_start(1, OBSERVE) + b"".join(op_curve(64, 2, seed=i) for i in range(6))
          + op_query(0, 3))
    # Overfitting and stagnation, ADVISE.
    write(t, "advise-overfit",
          op_start(2, ADVISE) + b"".join(op_curve(64, 4, seed=i) for i in range(9))
          + op_ack(0, True))
    write(t, "advise-stagnation",
          op_start(3, ADVISE) + b"".join(op_curve(64, 3, seed=i) for i in range(8)))
    # Real rows (a run that diverges at step 11) as raw AttachRequests.
    write(t, "real-diverging-raw",
          op_start(0, AUTO) + raw_batches("digits-mlp-sgdm-lr1-b32-s10.csv", 36)
          + op_ack(0, True) + op_query(0, 2))
    # Reconnect and resume: duplicates skipped, then new steps; a cancel;
    # attach to the same run again.
    resume = op_start(0, AUTO) + op_curve(20, 0) + op_steps([(0, 0), (0, 1)])
    resume += bytes([CLOSE]) + op_start(0, AUTO)
    # 19, 20, 21 are duplicates; 22 and 23 are new.
    resume += op_steps([(0x82, 0), (0x00, 0), (0x00, 0), (0x00, 0x40), (0x00, 0x55)])
    resume += bytes([CANCEL]) + op_start(0, ADVISE) + op_curve(10, 0)
    resume += op_finish() + bytes([CLOSE]) + op_start(0, OBSERVE) + op_query(0, 1)
    write(t, "resume-cancel-reattach", resume)
    write(t, "sqlite-resume-cancel-reattach", resume, SQLITE)
    # Restarts: with a stream open (it ends UNAVAILABLE), after a finish,
    # then resume on the recovered runs; the store's backlog kept short.
    restart = op_start(0, AUTO) + b"".join(op_curve(64, 1, seed=i) for i in range(4))
    restart += bytes([RESTART]) + op_query(0, 1) + op_start(0, AUTO)
    restart += b"".join(op_curve(64, 1, seed=i) for i in range(4, 8))
    restart += op_ack(0, True) + bytes([CLOSE]) + op_start(1, ADVISE) + op_curve(30, 0)
    restart += op_finish() + op_curve(3, 0) + bytes([RESTART]) + op_start(1, OBSERVE)
    restart += op_curve(5, 0) + op_query(1, 2)
    write(t, "restart", restart)
    write(t, "sqlite-restart-backlog", restart, SQLITE_SMALL_BACKLOG)
    # Another stream takes the run over; the old one then sends steps, acks,
    # half-closes or is cancelled (one each).
    takeover = op_start(0, AUTO) + op_curve(40, 1)
    for how in range(4):
        takeover += bytes([TAKEOVER, how, AUTO]) + op_curve(20, 1, seed=how)
    takeover += op_finish() + bytes([TAKEOVER, 2, OBSERVE]) + op_query(0, 1)
    write(t, "takeover", takeover)
    write(t, "sqlite-takeover", takeover, SQLITE)
    # Edge values: NaN/inf losses, -0, denormals, int64 extremes, NaN lr.
    edge = op_start(1, ADVISE)
    edge += op_steps([(0xFD, 0x0D), (0x00, 0x0E), (0x00, 0x3C), (0x00, 0xCD),
                      (0x00, 0x8F, struct.pack("<d", 5e-324) + b"\x0a"),
                      (0x7F, 0x4B)])
    edge += op_steps([(0xFC, 0x09)]) + op_steps([]) + op_curve(3, 0)
    edge += op_query(0, 0)
    write(t, "edge-values", edge)
    # Errors that end a stream, each followed by a new stream.
    errors = op_steps([(0, 0)])                               # before start
    errors += op_start(0) + op_start(1)                       # start twice
    errors += op_start(0) + op_steps([(0, 0), (0x80, 0)])     # not rising
    errors += op_start(0) + op_steps([(0, 0x80, b"\x0b")])    # lr -1
    errors += op_start(0) + op_steps([(0, 0)] * 65)           # over 64
    errors += bytes([EMPTY]) + op_start(0, 4)                 # no kind; bad mode
    errors += op_start(raw_id=b"") + op_start(raw_id=b"a\x01b")  # bad run ids
    errors += op_start(0, tags=((b"", b"v"),))               # empty tag key
    errors += op_ack(0xF0) + op_finish()                      # before start
    errors += op_start(0) + op_ack(0xF0, True, effective="raw") + op_ack(3)
    errors += op_raw(b"\xff\xff") + op_query(0, 5)
    write(t, "stream-errors", errors)
    # Run ids and names that are UTF-8 but not ASCII; a long project.
    write(t, "utf8-ids",
          op_start(raw_id="ラン".encode(), name="é".encode())
          + op_curve(5, 0) + op_query(0, 1, "ラ".encode()))
    # A finish whose reason is not UTF-8: the daemon cannot decode it and
    # takes it for the client's half-close (see README.md).
    write(t, "finish-reason-not-utf8",
          op_start(0) + op_curve(5, 0) + op_finish(b"\xff\xfe") + op_query(0, 1))


def main():
    if not os.path.isdir(CURVES):
        sys.exit(f"make_seeds.py: no curves at {CURVES} (set LOSSGUARD_CURVES)")
    csv_seeds()
    tfevents_seeds()
    attach_seeds()


if __name__ == "__main__":
    main()
